"""The parity gate: PSNR, backend selection, the demo's numbers, aggressive schemes and sabotage."""

from __future__ import annotations

import copy
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest

from publisher import parity
from publisher.errors import ParityError
from publisher.recipe import load_recipe
from publisher.report import PublishReport
from publisher.source import load_source
from tests.conftest import DEMO_RECIPE, ROOT

UNET = "original/packages/Stable_Diffusion_version_tiny-sd-palettized_unet.mlpackage"


def test_psnr_is_apples_formula():
    reference = np.array([1.0, -2.0, 0.5, 0.0])
    candidate = reference + np.array([0.1, -0.1, 0.1, -0.1])
    expected = 20 * np.log10((2.0 + 1e-5) / (0.1 + 1e-10))
    assert parity.psnr(reference, candidate) == pytest.approx(expected)
    assert parity.psnr(reference, reference) == pytest.approx(20 * np.log10((2.0 + 1e-5) / 1e-10))


def test_backends_follow_the_coreml_runtime(monkeypatch):
    monkeypatch.setattr(parity, "coreml_runtime_available", lambda: False)
    assert parity.backends() == ("executor-fp32", "executor-fp16")
    monkeypatch.setattr(parity, "coreml_runtime_available", lambda: True)
    assert parity.backends() == ("executor-fp32", "executor-fp16", "coreml-runtime")


def test_runtime_detection_matches_this_platform():
    assert parity.coreml_runtime_available() == (sys.platform == "darwin" and parity.coreml_runtime_available())
    if sys.platform != "darwin":
        assert not parity.coreml_runtime_available()


def test_demo_report_holds_psnr_per_component_and_mode(demo_output: Path):
    report = PublishReport.read(demo_output)
    table = {(r.component, r.backend): r for r in report.parity}
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        for backend in ("executor-fp32", "executor-fp16"):
            result = table[(component, backend)]
            assert result.passed and result.psnr_db >= result.threshold_db
    # A 6-bit UNet sits in the high 30s to 40s dB, well short of a float16 copy (~60 dB).
    assert 35 <= table[("unet", "executor-fp32")].psnr_db <= 50
    assert len(report.image_parity) == 2
    for image in report.image_parity:
        assert image.psnr_db > 25
        assert (demo_output / image.reference_image).is_file() and (demo_output / image.variant_image).is_file()


def test_float16_package_is_near_lossless(demo_output: Path, tmp_path: Path):
    """The executor agrees with torch far beyond the gate on an uncompressed package: the gap the
    gate sees on palettized packages is the compression's, not the executor's."""
    from publisher.convert import convert_component

    recipe = load_recipe(DEMO_RECIPE)
    source = load_source(recipe)
    package = convert_component(recipe, source, "vae_decoder", tmp_path / "vae_decoder.mlpackage").package
    measured = parity.measure_component(recipe, source, "vae_decoder", package)
    assert measured.psnr_db["executor-fp32"] > 60
    assert measured.psnr_db["executor-fp16"] > 50


def test_each_case_runs_once_per_backend_whatever_the_outputs(demo_output: Path, monkeypatch):
    """A ControlNet has 13 outputs: running the package once per output made its gate 13 times as slow."""
    recipe = load_recipe(DEMO_RECIPE)
    source = load_source(recipe)
    package = demo_output / "original/packages/Stable_Diffusion_version_tiny-sd-palettized_text_encoder.mlpackage"
    calls = []
    run_package = parity.executor.run
    monkeypatch.setattr(parity.executor, "run", lambda *args, **kwargs: calls.append(1) or run_package(*args, **kwargs))
    reference = parity.reference_cases(recipe, source, "text_encoder")
    assert len(parity.component_io(recipe, source, "text_encoder").outputs) == 2

    measured = parity.measure_component(recipe, source, "text_encoder", package, reference=reference)

    assert len(calls) == len(reference.inputs) * len(measured.psnr_db) == len(reference.inputs) * 2


# ---------------------------------------------------------------------------------------------
# Sabotage: corrupt the compressed UNet's weight.bin in place, the gate must fail.


def _blobs(package: Path) -> dict[str, dict[str, int]]:
    """For each palettized weight: the byte offset and size of its `lut` and `indices` data."""
    spec = ct.utils.load_spec(str(package))
    weights = (package / "Data/com.apple.CoreML/weights/weight.bin").read_bytes()
    blobs: dict[str, dict[str, int]] = {}
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    for op in block.operations:
        if op.type != "constexpr_lut_to_dense":
            continue
        entry = {}
        for name in ("lut", "indices"):
            metadata = op.attributes[name].blobFileValue.offset
            sentinel, _, size, data = struct.unpack_from("<IIQQ", weights, metadata)
            assert sentinel == 0xDEADBEEF
            entry[name], entry[f"{name}_size"] = data, size
        blobs[op.outputs[0].name] = entry
    return blobs


def _flip_lut_entry(data: bytearray, blobs, rng) -> None:
    name = sorted(blobs)[rng.integers(len(blobs))]
    entry = rng.integers(blobs[name]["lut_size"] // 2)
    offset = blobs[name]["lut"] + 2 * entry
    # One bit flip in the fp16 exponent's top bit: the kind of corruption storage and transfers cause.
    value = struct.unpack_from("<H", data, offset)[0] ^ 0x4000
    struct.pack_into("<H", data, offset, value)


def _scale_tensor(data: bytearray, blobs, rng) -> None:
    name = sorted(blobs)[rng.integers(len(blobs))]
    start, size = blobs[name]["lut"], blobs[name]["lut_size"]
    lut = np.frombuffer(bytes(data[start:start + size]), dtype=np.float16) * np.float16(8)
    data[start:start + size] = lut.astype(np.float16).tobytes()


def _swap_tensors(data: bytearray, blobs, rng) -> None:
    by_size: dict[int, list[str]] = {}
    for name, blob in sorted(blobs.items()):
        by_size.setdefault(blob["indices_size"], []).append(name)
    pairs = [names for names in by_size.values() if len(names) >= 2]
    first, second = pairs[rng.integers(len(pairs))][:2]
    a, b, size = blobs[first]["indices"], blobs[second]["indices"], blobs[first]["indices_size"]
    data[a:a + size], data[b:b + size] = bytes(data[b:b + size]), bytes(data[a:a + size])


@pytest.fixture(scope="module")
def demo_source():
    recipe = load_recipe(DEMO_RECIPE)
    return recipe, load_source(recipe)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sabotage", [_flip_lut_entry, _scale_tensor, _swap_tensors], ids=lambda f: f.__name__)
def test_sabotaged_unet_fails_the_gate(demo_output: Path, demo_source, tmp_path: Path, sabotage, seed):
    recipe, source = demo_source
    package = shutil.copytree(demo_output / UNET, tmp_path / "unet.mlpackage")
    weight_file = package / "Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weight_file.read_bytes())
    sabotage(data, _blobs(package), np.random.default_rng(seed))
    weight_file.write_bytes(bytes(data))
    measured = parity.measure_component(recipe, source, "unet", package, on=("executor-fp32",))
    with pytest.raises(ParityError, match=r"parity failed: unet \(original\) reaches .* dB .* below the 35 dB"):
        parity.gate(recipe, "original", measured)


def test_two_bit_unet_fails_with_exit_code_3_and_no_output(tmp_path: Path):
    recipe = tmp_path / "aggressive.yaml"
    text = DEMO_RECIPE.read_text().replace("path: tiny-sd", f"path: {DEMO_RECIPE.parent / 'tiny-sd'}")
    text = text.replace("components: [text_encoder, unet, vae_decoder, vae_encoder]", "components: [unet]")
    text = text.replace("unet: {palettize: {nbits: 6", "unet: {palettize: {nbits: 2")
    text = "\n".join(line for line in text.splitlines()
                     if not line.lstrip().startswith(("text_encoder:", "vae_decoder:", "vae_encoder:")))
    text = text.replace("per_component: {text_encoder: 30}", "image_steps: 0")
    text = text.replace("  image_steps: 4\n", "")
    recipe.write_text(text)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "publisher", "publish", str(recipe), "--out", str(out), "-q"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error: parity failed: unet (original) reaches ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [recipe]


def test_unet_cases_are_the_reference_images_denoising_at_three_noise_levels(demo_source):
    recipe, source = demo_source
    drawn = parity.reference_images(recipe, source)
    cases = parity.reference_cases(recipe, source, "unet")
    scheduler = copy.deepcopy(source.pipe.scheduler)
    scheduler.set_timesteps(recipe.parity.image_steps)
    steps = scheduler.timesteps.numpy()
    picks = np.linspace(0, len(steps) - 1, parity.UNET_TIMESTEP_SAMPLES).round().astype(int)
    assert [case["timestep"][0] for case in cases.inputs] == list(steps[picks].astype(np.float32))
    assert picks[0] == 0 and picks[-1] == len(steps) - 1
    for taken, again in zip(cases.inputs + cases.outputs, drawn.cases["unet"].inputs + drawn.cases["unet"].outputs,
                            strict=True):
        assert all(np.array_equal(taken[name], again[name]) for name in taken)
    # Each case is a step of the first prompt's denoising: the torch UNet's own output on it, on
    # latents that leave pure noise behind as the steps go on.
    with source.weights("unet"):
        module = parity.reference_module(source, "unet")
        for case, expected in zip(cases.inputs, cases.outputs, strict=True):
            again = parity._reference(module, case, ("noise_pred",))
            assert np.allclose(again["noise_pred"], expected["noise_pred"], atol=1e-5)
    noise = np.random.default_rng(0).standard_normal(cases.inputs[0]["sample"].shape)
    spread = [float(np.std(case["sample"])) for case in cases.inputs]
    assert spread[0] == pytest.approx(float(np.std(noise)) * scheduler.init_noise_sigma, rel=0.1)
    assert spread[-1] != pytest.approx(spread[0], rel=0.05)


def test_the_vae_decoder_case_is_the_first_reference_images_final_latents(demo_source):
    recipe, source = demo_source
    drawn = parity.reference_images(recipe, source)
    cases = parity.reference_cases(recipe, source, "vae_decoder")
    assert len(cases.inputs) == 1 and list(cases.inputs[0]) == ["z"]
    # Its torch output is the first image, before postprocessing.
    assert np.array_equal(parity._to_uint8(cases.outputs[0]["image"]), drawn.images[0])
    with source.weights("vae"):
        again = parity._reference(parity.reference_module(source, "vae_decoder"), cases.inputs[0], ("image",))
    assert np.allclose(again["image"], cases.outputs[0]["image"], atol=1e-5)


def test_fewer_image_steps_than_noise_levels_keep_three_random_unet_cases(demo_source):
    recipe, source = demo_source
    few = recipe.model_copy(update={"parity": recipe.parity.model_copy(update={"image_steps": 2})})
    assert parity.cases_from_images(few, source) == ("vae_decoder",)
    assert parity.cases_from_images(recipe, source) == ("unet", "vae_decoder")
    cases = parity.reference_cases(few, source, "unet")
    assert len(cases.inputs) == parity.UNET_TIMESTEP_SAMPLES
    assert len({float(case["timestep"][0]) for case in cases.inputs}) == parity.UNET_TIMESTEP_SAMPLES


def test_an_ancestral_scheduler_draws_the_same_noise_for_the_reference_and_the_packages(demo_source):
    """SDXL-Turbo's Euler ancestral scheduler adds noise at each step: the image check seeds it, so two runs of the
    same components give the same image (without the generator, each run drew its own noise)."""
    from diffusers import EulerAncestralDiscreteScheduler

    recipe, loaded = demo_source
    source = copy.copy(loaded)
    source.pipe = copy.copy(loaded.pipe)
    source.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(loaded.pipe.scheduler.config,
                                                                         timestep_spacing="trailing")
    run = parity.reference_runner(recipe, source)
    prompt = recipe.card.prompts[0]
    first, second = (parity.denoise(recipe, source, prompt, run) for _ in range(2))
    assert np.array_equal(first, second)
    deterministic = parity.denoise(recipe, loaded, prompt, run)
    assert not np.array_equal(first, deterministic)  # the ancestral steps did add noise
