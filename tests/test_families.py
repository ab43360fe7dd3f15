"""Families beyond SD 1.x on tiny random-weight models: SDXL (two text encoders, added
conditioning, the refiner), SDXL-Turbo and the refiner published with their end-to-end images, ControlNet with
Apple's control-unet, the recipe fields they need, and converting one component per process."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch

from publisher import executor, parity
from publisher.convert import _conversion_context, convert_component, convert_in_subprocess, example_inputs
from publisher.errors import RecipeError
from publisher.parity import psnr
from publisher.pipeline import publish
from publisher.plan import count_parameters
from publisher.recipe import Recipe, load_recipe
from publisher.source import LoadedSource, load_source
from publisher.synthetic import build_pipeline
from publisher.wrappers import component_io, image_size, reference_module, residual_names

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY_SD = ROOT / "recipes" / "examples" / "tiny-sd"
FLOAT16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
FLOAT32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
SHA = "0123456789abcdef0123456789abcdef01234567"


def write_recipe(folder: Path, source: str, conversion: str, name: str = "recipe.yaml", rest: str = "") -> Path:
    """A recipe over ``source`` (the YAML of the source mapping's body) with ``conversion``'s body, then ``rest``
    (top-level YAML)."""
    path = folder / name
    text = f"name: family-test\nsource:\n{textwrap.indent(source.strip(), '  ')}\ntarget:\n  repo: me/family-test\n"
    path.write_text(text + f"conversion:\n{textwrap.indent(conversion.strip(), '  ')}\n{rest}")
    return path


def io_of(package: Path) -> tuple[dict[str, tuple[tuple[int, ...], int]], dict[str, tuple[int, ...]]]:
    """The package's declared inputs (shape, dtype) and outputs (shape)."""
    description = ct.models.MLModel(str(package), skip_model_load=True).get_spec().description
    inputs = {i.name: (tuple(i.type.multiArrayType.shape), i.type.multiArrayType.dataType) for i in description.input}
    return inputs, {o.name: tuple(o.type.multiArrayType.shape) for o in description.output}


def parity_db(recipe: Recipe, source: LoadedSource, component: str, package: Path) -> float:
    """Worst PSNR over outputs of ``package`` (executor, fp32 hold) against the torch reference."""
    io = component_io(recipe, source, component)
    case = example_inputs(io, source.tokenizer.vocab_size, seed=1)
    with torch.no_grad():
        reference = reference_module(source, component)(*case)
    reference = reference if isinstance(reference, tuple) else (reference,)
    outputs = executor.run(package, {spec.name: x.numpy() for spec, x in zip(io.inputs, case, strict=True)})
    return min(psnr(r.numpy(), outputs[name]) for name, r in zip(io.outputs, reference, strict=True))


# ---------------------------------------------------------------------------------------------
# Full-size architecture configs


# Parameter counts of the real checkpoints' models, as their architectures define them.
PUBLISHED_PARAMETERS = {
    "sd15": {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863, "safety_checker": 303_981_588},
    "sd21-base": {"text_encoder": 340_387_840, "unet": 865_910_724, "vae": 83_653_863},
    "sdxl-base": {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "unet": 2_567_463_684,
                  "vae": 83_653_863},
    "sdxl-refiner": {"text_encoder_2": 694_659_840, "unet": 2_259_526_660, "vae": 83_653_863},
    "sdxl-turbo": {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "unet": 2_567_463_684,
                   "vae": 83_653_863},
}


@pytest.mark.parametrize("family", list(PUBLISHED_PARAMETERS))
def test_full_size_configs_build_the_published_architectures(family):
    folder = CONFIGS / family
    index = json.loads((folder / "model_index.json").read_text())
    models = {name for name, spec in index.items() if isinstance(spec, list) and spec[0] and "Tokenizer" not in spec[1]
              and "Scheduler" not in spec[1] and "Processor" not in spec[1]}
    assert models == set(PUBLISHED_PARAMETERS[family])
    counts = {name: count_parameters(folder / name, name) for name in models}  # on the meta device: no memory
    assert counts == PUBLISHED_PARAMETERS[family]


def test_controlnet_config_builds_the_published_architecture():
    assert count_parameters(CONFIGS / "controlnet-sd15", "controlnet") == 361_279_120


# ---------------------------------------------------------------------------------------------
# SDXL


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_pipeline(CONFIGS / "tiny-sdxl", tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, tmp_path_factory) -> tuple[Recipe, LoadedSource]:
    """float16 packages with a float32 VAE, as the SDXL recipes ship them."""
    path = write_recipe(
        tmp_path_factory.mktemp("sdxl-recipe"),
        f"path: {tiny_sdxl}",
        "components: [text_encoder, text_encoder_2, unet, vae_decoder]\nvae_precision: float32",
    )
    recipe = load_recipe(path)
    return recipe, load_source(recipe)


def test_sdxl_text_encoders_condition_the_unet_as_diffusers_does(sdxl):
    """Concatenated ``hidden_embeds`` and the second encoder's ``pooled_outputs`` are exactly what
    diffusers' own SDXL pipeline feeds its UNet."""
    recipe, source = sdxl
    ids = source.tokenizer(["a lighthouse at dawn"], padding="max_length", max_length=77, return_tensors="pt")
    float_ids = ids.input_ids.to(torch.float32)
    with torch.no_grad():
        hidden_1, _ = reference_module(source, "text_encoder")(float_ids)
        hidden_2, pooled_2 = reference_module(source, "text_encoder_2")(float_ids)
        prompt_embeds, _, pooled, _ = source.pipe.encode_prompt(
            "a lighthouse at dawn", do_classifier_free_guidance=False
        )
    torch.testing.assert_close(torch.cat([hidden_1, hidden_2], dim=-1), prompt_embeds)
    torch.testing.assert_close(pooled_2, pooled)
    assert pooled_2.shape == (1, source.pipe.text_encoder_2.config.projection_dim) != hidden_2[:, 0].shape


SDXL_CONTRACT = {
    "text_encoder": (
        {"input_ids": ((1, 77), FLOAT32)},
        {"hidden_embeds": (1, 77, 32), "pooled_outputs": (1, 32)},
    ),
    # pooled_outputs is the projected pooled output (projection_dim 24), SDXL's text_embeds.
    "text_encoder_2": (
        {"input_ids": ((1, 77), FLOAT32)},
        {"hidden_embeds": (1, 77, 32), "pooled_outputs": (1, 24)},
    ),
    # Both encoders' hidden states (32 + 32) and 6 time ids x 8 + 24 pooled = the UNet's 72-wide projection.
    "unet": (
        {
            "sample": ((2, 4, 32, 32), FLOAT16),
            "timestep": ((2,), FLOAT16),
            "encoder_hidden_states": ((2, 64, 1, 77), FLOAT16),
            "time_ids": ((2, 6), FLOAT16),
            "text_embeds": ((2, 24), FLOAT16),
        },
        {"noise_pred": (2, 4, 32, 32)},
    ),
    "vae_decoder": ({"z": ((1, 4, 32, 32), FLOAT32)}, {"image": (1, 3, 64, 64)}),
}


@pytest.mark.parametrize("component", list(SDXL_CONTRACT))
def test_sdxl_package_has_apples_contract_and_computes_the_reference(sdxl, tmp_path, component):
    recipe, source = sdxl
    package = convert_component(recipe, source, component, tmp_path / f"{component}.mlpackage").package
    inputs, outputs = SDXL_CONTRACT[component]
    assert io_of(package) == (inputs, outputs)
    # float16 weights cost ~70-80 dB on these tiny models; the float32 VAE matches to ~130 dB.
    assert parity_db(recipe, source, component, package) >= (60 if component == "vae_decoder" else 45)


def test_refiner_unet_takes_five_time_ids_and_the_bigG_pooled_output(tmp_path):
    refiner = build_pipeline(CONFIGS / "tiny-sdxl-refiner", tmp_path / "tiny-sdxl-refiner")
    recipe = load_recipe(write_recipe(tmp_path, f"path: {refiner}", "components: [text_encoder_2, unet]"))
    source = load_source(recipe)
    assert source.family == "sdxl" and source.pipe.text_encoder is None
    shapes = {spec.name: spec.shape for spec in component_io(recipe, source, "unet").inputs}
    assert shapes["time_ids"] == (2, 5) and shapes["text_embeds"] == (2, 24)
    assert shapes["encoder_hidden_states"] == (2, 32, 1, 77)
    # The refiner's UNet refuses any other split of its 64-wide added-condition projection.
    io = component_io(recipe, source, "unet")
    with torch.no_grad():
        noise = reference_module(source, "unet")(*example_inputs(io, source.tokenizer.vocab_size))
    assert noise.shape == (2, 4, 32, 32)
    assert [file.name for file in source.tokenizer_files()] == ["vocab.json", "merges.txt"]


# ---------------------------------------------------------------------------------------------
# End-to-end images: SDXL-Turbo and the refiner


TURBO, REFINER = "tiny-sdxl-turbo", "tiny-sdxl-refiner"
# Components and image steps: Turbo samples in 1-4 steps; the refiner denoises the last 0.3 of 7 steps (2 of them).
IMAGE_FAMILIES = {
    TURBO: ("[text_encoder, text_encoder_2, unet, vae_decoder]", 2, 0.0),
    REFINER: ("[text_encoder_2, unet, vae_decoder, vae_encoder]", 7, 7.5),
}


@pytest.fixture(scope="module")
def image_recipes(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny pipeline and a recipe drawing its images (float16, the SDXL VAE in float32)."""
    recipes = {}
    for config, (components, steps, guidance) in IMAGE_FAMILIES.items():
        folder = tmp_path_factory.mktemp(config)
        source = build_pipeline(CONFIGS / config, folder / config)
        recipes[config] = write_recipe(folder, f"path: {source}", f"components: {components}\nvae_precision: float32",
                                       rest=f"parity:\n  image_steps: {steps}\n  guidance_scale: {guidance}\n")
    return recipes


@pytest.mark.parametrize("config", list(IMAGE_FAMILIES))
def test_the_image_checks_reference_draws_what_diffusers_pipeline_draws(image_recipes, config):
    """The torch side of the image check is diffusers' own pipeline, seed for seed: Turbo unguided on its Euler
    ancestral trailing schedule, the refiner from the structured base image encoded, noised to 0.3 and refined."""
    recipe = load_recipe(image_recipes[config])
    source = load_source(recipe)
    prompt = recipe.card.prompts[0]
    ours = parity.denoise(recipe, source, prompt, parity.reference_runner(recipe, source))

    size = image_size(recipe, source)
    options = {"num_inference_steps": recipe.parity.image_steps, "output_type": "np",
               "generator": torch.Generator().manual_seed(recipe.parity.seed)}
    if config == REFINER:
        base = (parity.structured_image(size, size)[None] + 1) / 2  # diffusers takes images in [0, 1]
        options |= {"image": torch.from_numpy(base), "strength": parity.REFINER_STRENGTH,
                    "guidance_scale": recipe.parity.guidance_scale}
    else:
        options |= {"height": size, "width": size, "guidance_scale": recipe.parity.guidance_scale}
    with torch.no_grad():
        theirs = (source.pipe(prompt, **options).images[0] * 255).round()
    assert np.abs(ours.astype(np.float64) - theirs).max() <= 1


@pytest.mark.parametrize("config", list(IMAGE_FAMILIES))
def test_sdxl_turbo_and_the_refiner_publish_their_images(image_recipes, config, tmp_path):
    """Each family's packages draw the images (the refiner's through its VAE encoder package) against torch's:
    a row of the image-parity table and a grid image per prompt."""
    out = tmp_path / "out"
    report = publish(image_recipes[config], out, quiet=True)

    components = set(IMAGE_FAMILIES[config][0].strip("[]").split(", "))
    assert {result.component for result in report.parity} == components and report.missing_components == []
    assert all(result.passed for result in report.parity)
    assert [image.prompt for image in report.image_parity] == list(load_recipe(image_recipes[config]).card.prompts)
    assert all(image.psnr_db > 30 for image in report.image_parity)
    assert (out / "images" / "image_grid.png").is_file() and "| Image PSNR (dB) |" in (out / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# ControlNet


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory) -> Path:
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    ControlNetModel.from_config(ControlNetModel.load_config(CONFIGS / "tiny-controlnet")).save_pretrained(folder)
    return folder


def test_controlnet_residuals_drive_the_control_unet_as_in_diffusers(tiny_controlnet, tmp_path):
    recipe = load_recipe(write_recipe(
        tmp_path,
        f"path: {TINY_SD}\ncontrolnet:\n  path: {tiny_controlnet}",
        "components: [controlnet, control_unet]\nprecision: float32",
    ))
    source = load_source(recipe)
    controlnet = convert_component(recipe, source, "controlnet", tmp_path / "controlnet.mlpackage").package
    control_unet = convert_component(recipe, source, "control_unet", tmp_path / "control_unet.mlpackage").package
    controlnet_in, residuals = io_of(controlnet)
    unet_in, unet_out = io_of(control_unet)
    # conv_in, one resnet per block, one downsampler between the two blocks, then the mid block.
    assert list(residuals) == list(residual_names(5))
    assert {name: unet_in[name][0] for name in residuals} == residuals
    assert controlnet_in["controlnet_cond"][0] == (2, 3, 64, 64) and unet_out == {"noise_pred": (2, 4, 32, 32)}

    io = component_io(recipe, source, "controlnet")
    case = dict(zip((spec.name for spec in io.inputs), example_inputs(io, 1, seed=2), strict=True))
    case["controlnet_cond"] = case["controlnet_cond"].sigmoid()  # an image in [0, 1]
    hidden = case["encoder_hidden_states"].squeeze(2).transpose(1, 2)
    with torch.no_grad():
        down, mid = source.controlnet(case["sample"], case["timestep"], hidden, case["controlnet_cond"],
                                      return_dict=False)
        expected = source.pipe.unet(case["sample"], case["timestep"], hidden, down_block_additional_residuals=down,
                                    mid_block_additional_residual=mid, return_dict=False)[0]
    arrays = {name: value.numpy() for name, value in case.items()}
    got_residuals = executor.run(controlnet, arrays)
    assert len(got_residuals) == len(down) + 1
    denoiser = {name: arrays[name] for name in ("sample", "timestep", "encoder_hidden_states")}
    noise = executor.run(control_unet, {**denoiser, **got_residuals})["noise_pred"]
    assert psnr(expected.numpy(), noise) >= 60


# ---------------------------------------------------------------------------------------------
# Recipe fields


@pytest.mark.parametrize("component", ["vae_decoder", "vae_encoder"])
def test_vae_traced_on_small_latents_computes_the_reference_at_the_recipes_size(tmp_path, monkeypatch, component):
    recipe = load_recipe(write_recipe(tmp_path, f"path: {TINY_SD}", f"components: [{component}]\n"
                                                                     "image_size: 128\nprecision: float32"))
    source = load_source(recipe)
    traced_shapes, trace = [], torch.jit.trace

    def recording_trace(module, inputs, **options):
        traced_shapes.append(tuple(inputs[0].shape))
        return trace(module, inputs, **options)

    monkeypatch.setattr(torch.jit, "trace", recording_trace)
    package = tmp_path / f"{component}.mlpackage"
    convert_component(recipe, source, component, package)

    full = component_io(recipe, source, component).inputs[0].shape
    per_latent = source.vae_scale_factor if component == "vae_encoder" else 1
    latent_sides = {side // per_latent for side in traced_shapes[0][2:]}
    assert latent_sides == {8} and traced_shapes[0][2] < full[2]
    inputs, _ = io_of(package)
    assert [shape for shape, _ in inputs.values()] == [full]
    assert parity_db(recipe, source, component, package) > 100


def test_vae_precision_applies_to_the_vae_only(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, f"path: {TINY_SD}", "components: [unet, vae_decoder]\n"
                                                                     "vae_precision: float32"))
    assert recipe.conversion.precision_for("unet") == "float16"
    assert recipe.conversion.precision_for("vae_decoder") == "float32"
    assert load_recipe(write_recipe(tmp_path, f"path: {TINY_SD}", "components: [unet]")).conversion.precision_for(
        "vae_decoder") == "float16"


def test_source_vae_and_controlnet_paths_resolve_against_the_recipe(tmp_path, tiny_controlnet):
    (tmp_path / "models").symlink_to(tiny_controlnet.parent)
    recipe = load_recipe(write_recipe(
        tmp_path,
        f"path: {TINY_SD}\nvae:\n  repo: madebyollin/sdxl-vae-fp16-fix\n  revision: {SHA}\n"
        "controlnet:\n  path: models/tiny-controlnet",
        "components: [vae_decoder, controlnet]",
    ))
    assert recipe.source.controlnet.path == (tmp_path / "models" / "tiny-controlnet").resolve()
    assert recipe.source.vae.model_id == "madebyollin/sdxl-vae-fp16-fix"


# (source body, conversion body, expected line, expected message)
BAD_FAMILY_RECIPES = {
    "controlnet-without-source": (f"path: {TINY_SD}", "components: [controlnet]", 7,
                                  "conversion.components: controlnet needs source.controlnet"),
    "controlnet-source-unused": (f"path: {TINY_SD}\ncontrolnet:\n  path: {TINY_SD}/unet", "components: [unet]", 4,
                                 "source.controlnet: is given but conversion.components does not list controlnet"),
    "controlnet-unpinned": (f"path: {TINY_SD}\ncontrolnet:\n  repo: lllyasviel/canny\n  revision: main",
                            "components: [controlnet]", 6,
                            "source.controlnet.revision: 'main' is not a 40-character commit sha"),
    "controlnet-not-a-model": (f"path: {TINY_SD}\ncontrolnet:\n  path: {TINY_SD}", "components: [controlnet]", 5,
                               "source.controlnet.path: "),
    "vae-repo-and-path": (f"path: {TINY_SD}\nvae:\n  repo: a/b\n  path: {TINY_SD}/vae",
                          "components: [vae_decoder]", 4, "source.vae: give exactly one of 'repo'"),
    "vae-source-unused": (f"path: {TINY_SD}\nvae:\n  path: {TINY_SD}/vae", "components: [unet]", 4,
                          "source.vae: is given but no VAE component is listed"),
    "vae-precision-unused": (f"path: {TINY_SD}", "components: [unet]\nvae_precision: float32", 8,
                             "conversion.vae_precision: no VAE component is listed"),
    "vae-precision-int8": (f"path: {TINY_SD}", "components: [vae_decoder]\nvae_precision: int8", 8,
                           "conversion.vae_precision: 'int8' is not one of float16,float32"),
}


@pytest.mark.parametrize(("source", "conversion", "line", "message"), list(BAD_FAMILY_RECIPES.values()),
                         ids=list(BAD_FAMILY_RECIPES))
def test_bad_family_recipe_gets_one_line(tmp_path, source, conversion, line, message):
    path = write_recipe(tmp_path, source, conversion)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert str(raised.value).startswith(f"{path}:{line}: {message}"), str(raised.value)
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------------
# One component per process


def test_load_source_loads_only_the_models_asked_for(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, f"path: {TINY_SD}", "components: [text_encoder]"))
    source = load_source(recipe, models=("text_encoder",))
    assert not any(parameter.is_meta for parameter in source.pipe.text_encoder.parameters())
    assert all(parameter.is_meta for parameter in source.pipe.unet.parameters())
    assert all(parameter.is_meta for parameter in source.pipe.vae.parameters())
    full = load_source(recipe)
    for component in ("unet", "vae_decoder"):  # shapes still come from the configs
        assert component_io(recipe, source, component) == component_io(recipe, full, component)


def _is_meta(model: torch.nn.Module) -> bool:
    return all(parameter.is_meta for parameter in model.parameters())


def test_weights_load_a_model_for_the_block_and_drop_it_after(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, f"path: {TINY_SD}", "components: [unet, text_encoder]"))
    source = load_source(recipe, models=())
    assert source.loaded == set() and _is_meta(source.pipe.unet) and _is_meta(source.pipe.text_encoder)
    reference = load_source(recipe).pipe.unet.state_dict()
    with source.weights("unet"):
        assert source.loaded == {"unet"} and _is_meta(source.pipe.text_encoder)
        loaded = source.pipe.unet.state_dict()
        assert all(torch.equal(loaded[name], value) for name, value in reference.items())
        assert not source.pipe.unet.training
    assert source.loaded == set() and _is_meta(source.pipe.unet)


def test_weights_keep_models_that_were_already_loaded(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, f"path: {TINY_SD}", "components: [unet]"))
    source = load_source(recipe, models=("unet",))
    unet = source.pipe.unet
    with source.weights("unet", "vae"):
        assert source.pipe.unet is unet and not _is_meta(source.pipe.vae)
    assert source.pipe.unet is unet and source.loaded == {"unet"} and _is_meta(source.pipe.vae)


def test_weights_load_a_separate_vae_and_controlnet_from_their_own_sources(tiny_controlnet, tmp_path):
    from diffusers import AutoencoderKL

    other_vae = tmp_path / "other-vae"
    torch.manual_seed(7)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(TINY_SD / "vae"))
    vae.save_pretrained(other_vae)
    recipe = load_recipe(write_recipe(
        tmp_path,
        f"path: {TINY_SD}\nvae:\n  path: {other_vae}\ncontrolnet:\n  path: {tiny_controlnet}",
        "components: [vae_decoder, controlnet]",
    ))
    source = load_source(recipe, models=())
    assert _is_meta(source.pipe.vae) and _is_meta(source.controlnet)
    with source.weights("vae", "controlnet"):
        assert torch.equal(source.pipe.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)
        assert not _is_meta(source.controlnet)
    assert _is_meta(source.pipe.vae) and _is_meta(source.controlnet)


def test_convert_in_subprocess_loads_the_controlnet_it_converts(tiny_controlnet, tmp_path):
    recipe_file = write_recipe(tmp_path, f"path: {TINY_SD}\ncontrolnet:\n  path: {tiny_controlnet}",
                               "components: [controlnet]\nprecision: float32")
    recipe = load_recipe(recipe_file)
    converted = convert_in_subprocess(recipe_file, "controlnet", "original", tmp_path / "controlnet.mlpackage")
    assert parity_db(recipe, load_source(recipe), "controlnet", converted.package) > 60


def _set_up_then_sleep(parent: int, ready: Path) -> None:
    """In a converting process: its setup, then a conversion that would outlast its publish."""
    import time
    import warnings

    from publisher.child_process import mirror_parent

    mirror_parent(parent, {}, list(warnings.filters), None)
    ready.touch()
    time.sleep(60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd_open is Linux's")
def test_converting_process_dies_with_its_publish(tmp_path):
    import subprocess
    import time
    from concurrent.futures.process import BrokenProcessPool

    publish = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    ready = tmp_path / "set-up"
    with ProcessPoolExecutor(1, mp_context=_conversion_context()) as pool:
        conversion = pool.submit(_set_up_then_sleep, publish.pid, ready)
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        publish.kill()
        with pytest.raises(BrokenProcessPool):  # well before the conversion's 60 s sleep ends
            conversion.result(timeout=30)
    publish.wait()
    # A publish already gone when the conversion starts: it exits at once instead of converting.
    with ProcessPoolExecutor(1, mp_context=_conversion_context()) as pool:
        with pytest.raises(BrokenProcessPool):
            pool.submit(_set_up_then_sleep, publish.pid, tmp_path / "never").result(timeout=30)
    assert not (tmp_path / "never").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd_open is Linux's")
def test_a_killed_publish_leaves_no_process_behind(tmp_path):
    """SIGKILL while the UNet's compression runs beside the text encoder's conversion: the forkserver
    and the conversion it forked die with the publish."""
    import signal
    import subprocess
    import time

    import psutil

    publish_process = subprocess.Popen(
        [sys.executable, "-m", "publisher", "publish", str(ROOT / "recipes" / "examples" / "tiny-sd-palettized.yaml"),
         "--out", str(tmp_path / "out")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COREML_PUBLISHER_CACHE": str(tmp_path / "cache")},
    )
    for line in publish_process.stdout:
        if "convert original/unet" in line:
            break
    descendants = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the text encoder's conversion runs, forked by the server
        descendants = psutil.Process(publish_process.pid).children(recursive=True)
        if any(process.ppid() != publish_process.pid for process in descendants):
            break
        time.sleep(0.05)
    assert any(process.ppid() != publish_process.pid for process in descendants), descendants
    publish_process.kill()
    assert publish_process.wait(timeout=60) == -signal.SIGKILL
    publish_process.stdout.close()
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert alive == [], [(p.pid, p.ppid(), p.cmdline()[-3:]) for p in alive]


def test_a_conversion_sees_the_environment_of_its_call(tmp_path, monkeypatch):
    """Libraries read some variables when imported (huggingface_hub its endpoint and caches): a conversion
    after a change of environment runs under the new one, though the forkserver imported them before."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with ProcessPoolExecutor(1, mp_context=_conversion_context()) as pool:
        assert pool.submit(_hub_constants).result()[0] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with ProcessPoolExecutor(1, mp_context=_conversion_context()) as pool:
        assert pool.submit(_hub_constants).result() == (True, str(tmp_path / "hf-home" / "hub"))


def _hub_constants() -> tuple[bool, str]:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE


def test_convert_in_subprocess_reports_the_child_peak(tmp_path):
    recipe_file = write_recipe(tmp_path, f"path: {TINY_SD}", "components: [text_encoder]")
    converted = convert_in_subprocess(recipe_file, "text_encoder", "original", tmp_path / "te.mlpackage")
    assert converted.package.is_dir() and converted.parameters > 0
    # The child imported torch and coremltools (>100 MB) but never held the UNet or the VAE.
    assert 100 * 2**20 < converted.peak_rss < 8 * 2**30
    assert io_of(converted.package)[1] == {"last_hidden_state": (1, 77, 32), "pooled_outputs": (1, 32)}
