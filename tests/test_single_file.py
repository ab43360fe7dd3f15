"""Single-file checkpoints and LoRAs, published end to end: SD 1.x with a VAE file and two LoRAs (kohya and PEFT),
SD 2.x detected from its keys, SDXL from a file and a LoRA on the loopback Hub; and every bad input refused
with one line and exit 2, nothing written.

The files are written in the original layouts by ``tests/original_layout.py`` (proved there to load back to
the same weights) from the tiny pipelines of ``configs/tiny-*-original``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import save_file

from publisher.cli import main
from publisher.pipeline import publish
from publisher.synthetic import build_pipeline
from tests.conftest import ROOT
from tests.hub.helpers import USER, WRITE_TOKEN
from tests.original_layout import VAE_PREFIX, kohya_lora, original_state_dict, peft_lora, write_checkpoint

pytest_plugins = ["tests.hub.fixtures"]

CONFIGS = {family: ROOT / "configs" / f"tiny-{family.replace('_', '-')}-original"
           for family in ("sd1", "sd2", "sdxl", "sdxl_refiner")}
# SD 1.x and SDXL publish what the text-to-image check needs and check images end to end; SD 2.x converts its
# UNet alone (the assembly loads every model either way), which keeps the default suite short.
COMPONENTS = {"sd1": ["text_encoder", "unet", "vae_decoder"], "sd2": ["unet"],
              "sdxl": ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> Callable[[str, int], object]:
    """The tiny random-weight pipeline of a family (and seed), built once per module."""
    from diffusers import DiffusionPipeline

    built: dict[tuple[str, int], object] = {}

    def pipeline(family: str, seed: int = 0) -> object:
        if (family, seed) not in built:
            folder = build_pipeline(CONFIGS[family], tmp_path_factory.mktemp(f"{family}-{seed}"), seed=seed)
            built[family, seed] = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
        return built[family, seed]

    return pipeline


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_recipe(folder: Path, family: str, source: dict, **extra) -> Path:
    recipe = {
        "name": f"single-file-{family}",
        "source": {**source, "config": str(CONFIGS[family])},
        "target": {"repo": f"me/single-file-{family}"},
        "conversion": {"components": COMPONENTS[family], "image_size": 64},
        "parity": {"min_psnr": 35, "image_steps": 2},
        **extra,
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_sd1_checkpoint_with_a_vae_file_and_two_loras(tmp_path, pipelines):
    pipe, other = pipelines("sd1"), pipelines("sd1", seed=1)
    # An fp16 file with EMA weights, as community checkpoints ship; the loader reads the non-EMA copy.
    checkpoint = write_checkpoint(original_state_dict(pipe, "sd1"), tmp_path / "model.safetensors",
                                  dtype=torch.float16, ema=True)
    vae_file = tmp_path / "vae-ft.safetensors"  # a VAE file's keys carry no first_stage_model. prefix
    save_file({key.removeprefix(VAE_PREFIX): value.contiguous()
               for key, value in original_state_dict(other, "sd1").items() if key.startswith(VAE_PREFIX)}, vae_file)
    kohya, peft = tmp_path / "kohya-style.safetensors", tmp_path / "peft-detail.safetensors"
    save_file(kohya_lora(pipe, rank=2, seed=1, family="sd1", alpha=1.0), kohya)
    save_file(peft_lora(pipe, rank=2, seed=2), peft)
    recipe = write_recipe(tmp_path, "sd1", {
        "path": str(checkpoint), "vae": {"path": str(vae_file)},
        "loras": [{"path": str(kohya), "scale": 0.5}, {"path": str(peft), "scale": 1.0}],
    }, card={"license": "creativeml-openrail-m"})  # a local file has no card to read it from

    out = tmp_path / "published"
    report = publish(recipe, out, quiet=True)

    assert report.family == "sd1" and report.source == "local:model.safetensors"
    assert [(item.role, item.name, item.sha256, item.scale) for item in report.inputs] == [
        ("checkpoint", "model.safetensors", sha256(checkpoint), None),
        ("vae", "vae-ft.safetensors", sha256(vae_file), None),
        ("lora", "kohya-style.safetensors", sha256(kohya), 0.5),
        ("lora", "peft-detail.safetensors", sha256(peft), 1.0),
    ]
    assert report.parity and all(result.passed for result in report.parity)
    assert report.image_parity  # the fused model's images, end to end
    assert ModelCard.load(out / "README.md").data.license == "creativeml-openrail-m"
    card = (out / "README.md").read_text()
    assert "a local checkpoint file (`model.safetensors`)" in card
    assert "- `kohya-style.safetensors`, scale 0.5" in card and "- `peft-detail.safetensors`, scale 1.0" in card
    for path in (checkpoint, vae_file, kohya, peft):
        assert f"| {path.name} | local file |" in card and sha256(path) in card


def assembled(cache: Path, name: str) -> Path:
    (folder,) = [entry / "pipeline" / name for entry in (cache / "source").iterdir() if not entry.name.startswith(".")]
    return folder


def test_the_assembled_pipeline_holds_the_fused_weights_and_the_vae_file(tmp_path, pipelines):
    """What parity compares against: the checkpoint's weights, the VAE file's, and both LoRAs' deltas."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from publisher.cache import StageCache

    pipe, other = pipelines("sd1"), pipelines("sd1", seed=1)
    checkpoint = write_checkpoint(original_state_dict(pipe, "sd1"), tmp_path / "model.safetensors")
    vae_file = tmp_path / "vae.safetensors"
    save_file({key.removeprefix(VAE_PREFIX): value.contiguous()
               for key, value in original_state_dict(other, "sd1").items() if key.startswith(VAE_PREFIX)}, vae_file)
    kohya_state = kohya_lora(pipe, rank=2, seed=1, family="sd1", alpha=1.0)
    peft_state = peft_lora(pipe, rank=2, seed=2)
    save_file(kohya_state, tmp_path / "kohya.safetensors")
    save_file(peft_state, tmp_path / "peft.safetensors")
    recipe = write_recipe(tmp_path, "sd1", {
        "path": str(checkpoint), "vae": {"path": str(vae_file)},
        "loras": [{"path": str(tmp_path / "kohya.safetensors"), "scale": 0.5},
                  {"path": str(tmp_path / "peft.safetensors"), "scale": 2.0}],
    }, conversion={"components": ["vae_decoder"]})

    from publisher.monitor import Monitor
    from publisher.pipeline import assemble_source_stage
    from publisher.recipe import load_recipe

    assemble_source_stage(load_recipe(recipe), StageCache(tmp_path / "cache"), Monitor(quiet=True), {})
    unet = UNet2DConditionModel.from_pretrained(assembled(tmp_path / "cache", "unet"))
    vae = AutoencoderKL.from_pretrained(assembled(tmp_path / "cache", "vae"))

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    kohya_key = "lora_unet_" + name.replace(".", "_")
    up, down = kohya_state[f"{kohya_key}.lora_up.weight"], kohya_state[f"{kohya_key}.lora_down.weight"]
    kohya_delta = 0.5 * (1.0 / 2) * up @ down  # scale x alpha / rank
    peft_delta = 2.0 * peft_state[f"unet.{name}.lora_B.weight"] @ peft_state[f"unet.{name}.lora_A.weight"]
    base = pipe.unet.get_submodule(name).weight
    torch.testing.assert_close(unet.get_submodule(name).weight, base + kohya_delta + peft_delta)
    untouched = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(unet.get_submodule(untouched.rsplit(".", 1)[0]).weight, pipe.unet.get_submodule(
        untouched.rsplit(".", 1)[0]).weight)
    for key, value in other.vae.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key


@pytest.mark.parametrize(("family", "expected"), [("sd1", ("sd1", "sd15")), ("sd2", ("sd2", "sd21-base")),
                                                  ("sdxl", ("sdxl", "sdxl-base")),
                                                  ("sdxl_refiner", ("sdxl", "sdxl-refiner"))])
def test_the_family_and_its_shipped_architecture_come_from_the_keys(family, expected, pipelines):
    """Keys only (no weights): a tiny checkpoint of each family, named like the real ones."""
    from publisher.checkpoint import detect_family

    found = detect_family(Path("x.safetensors"), original_state_dict(pipelines(family), family), None)
    assert (found.family, found.config) == expected
    assert (ROOT / "configs" / found.config / "model_index.json").is_file()


def test_sd2_family_is_detected_from_the_keys(tmp_path, pipelines):
    checkpoint = write_checkpoint(original_state_dict(pipelines("sd2"), "sd2"), tmp_path / "sd2.safetensors")
    report = publish(write_recipe(tmp_path, "sd2", {"path": str(checkpoint)}), tmp_path / "out", quiet=True)
    assert report.family == "sd2"
    assert all(result.passed for result in report.parity)
    assert [item.sha256 for item in report.inputs] == [sha256(checkpoint)]
    # Never silently partial: the card names what Apple's pipelines also need.
    assert report.missing_components == ["text_encoder", "vae_decoder"]
    limitations = (tmp_path / "out" / "README.md").read_text().split("## Limitations", 1)[1]
    assert "This is a partial repository: Apple's pipelines also load `text_encoder`, `vae_decoder`" in limitations


def test_sdxl_checkpoint_and_lora_from_the_hub(tmp_path, pipelines, hub_cli):
    pipe = pipelines("sdxl")
    api = HfApi(endpoint=hub_cli.url, token=WRITE_TOKEN)
    model_repo, lora_repo = f"{USER}/community-xl", f"{USER}/xl-style-lora"
    checkpoint = write_checkpoint(original_state_dict(pipe, "sdxl"), tmp_path / "community-xl.safetensors",
                                  dtype=torch.float16)
    lora = tmp_path / "style.safetensors"
    save_file(peft_lora(pipe, rank=2, seed=3), lora)
    api.create_repo(model_repo)
    api.upload_file(path_or_fileobj=b"---\nlicense: openrail++\n---\n# community XL\n", path_in_repo="README.md",
                    repo_id=model_repo)
    revision = api.upload_file(path_or_fileobj=checkpoint, path_in_repo="community-xl.safetensors",
                               repo_id=model_repo).oid
    # The head moves on: the license is read from the card at the recipe's revision.
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# community XL\n", path_in_repo="README.md",
                    repo_id=model_repo)
    api.create_repo(lora_repo)
    lora_revision = api.upload_file(path_or_fileobj=lora, path_in_repo="style.safetensors", repo_id=lora_repo).oid
    recipe = write_recipe(tmp_path, "sdxl", {
        "repo": model_repo, "revision": revision, "filename": "community-xl.safetensors",
        "loras": [{"repo": lora_repo, "revision": lora_revision, "filename": "style.safetensors", "scale": 0.8}],
    })

    out = tmp_path / "published"
    report = publish(recipe, out, quiet=True)

    assert report.family == "sdxl" and report.source == model_repo and report.source_revision == revision
    assert all(result.passed for result in report.parity)
    # SDXL end to end: both text encoders, pooled embeddings and time ids through the packages, against torch.
    assert report.image_parity and all(image.psnr_db > 30 for image in report.image_parity)
    assert (out / "images" / "image_grid.png").is_file() and report.missing_components == []
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [model_repo, lora_repo] and card.data.base_model_relation == "merge"
    assert card.data.license == "openrail++"
    reproducibility = card.text.split("## Reproducibility", 1)[1]
    assert f"| checkpoint | {model_repo}/community-xl.safetensors | {revision} |" in reproducibility
    assert f"| lora | {lora_repo}/style.safetensors | {lora_revision} | 0.8 |" in reproducibility
    assert sha256(checkpoint) in reproducibility and sha256(lora) in reproducibility


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written


def refused(capsys, recipe: Path, out: Path) -> str:
    capsys.readouterr()
    code = main(["publish", str(recipe), "--out", str(out), "-q"])
    # Library progress bars reach the captured stream here: a test process imported tqdm before the CLI
    # could disable it (a `publisher` process prints none).
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s]" not in line]
    error = "\n".join(lines)
    assert code == 2, error
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in error, error
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return error


def test_a_truncated_checkpoint_is_refused(tmp_path, pipelines, capsys):
    checkpoint = write_checkpoint(original_state_dict(pipelines("sd1"), "sd1"), tmp_path / "model.safetensors")
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    error = refused(capsys, write_recipe(tmp_path, "sd1", {"path": str(checkpoint)}), tmp_path / "out")
    assert "model.safetensors: is not a whole safetensors file" in error


def test_a_checkpoint_of_another_family_is_refused(tmp_path, pipelines, capsys):
    checkpoint = write_checkpoint(original_state_dict(pipelines("sdxl"), "sdxl"), tmp_path / "xl.safetensors")
    error = refused(capsys, write_recipe(tmp_path, "sd1", {"path": str(checkpoint), "family": "sd1"}),
                    tmp_path / "out")
    assert "xl.safetensors: is an SDXL base checkpoint" in error and "source.family is sd1" in error


def test_a_detected_sdxl_checkpoint_with_a_batch_no_consumer_loads_is_refused(tmp_path, pipelines, capsys):
    checkpoint = write_checkpoint(original_state_dict(pipelines("sdxl"), "sdxl"), tmp_path / "xl.safetensors")
    recipe = write_recipe(tmp_path, "sdxl", {"path": str(checkpoint)},
                          conversion={"components": ["unet"], "unet_batch": 1})
    error = refused(capsys, recipe, tmp_path / "out")
    assert "conversion.unet_batch: 1 cannot be loaded by Apple's SDXL pipelines" in error


def test_a_checkpoint_that_does_not_fit_the_architecture_is_refused(tmp_path, pipelines, capsys):
    checkpoint = write_checkpoint(original_state_dict(pipelines("sd1"), "sd1"), tmp_path / "model.safetensors")
    recipe = write_recipe(tmp_path, "sd1", {"path": str(checkpoint)})
    data = yaml.safe_load(recipe.read_text())
    data["source"]["config"] = str(ROOT / "configs" / "tiny-sd")  # 2 blocks of 1 layer: not this file's UNet
    recipe.write_text(yaml.safe_dump(data))
    error = refused(capsys, recipe, tmp_path / "out")
    assert "its weights do not fit the architecture in" in error


def test_a_lora_for_another_base_is_refused(tmp_path, pipelines, capsys):
    checkpoint = write_checkpoint(original_state_dict(pipelines("sd1"), "sd1"), tmp_path / "model.safetensors")
    lora = tmp_path / "xl-lora.safetensors"
    save_file(kohya_lora(pipelines("sdxl"), rank=2, seed=0, family="sdxl"), lora)
    error = refused(capsys, write_recipe(tmp_path, "sd1", {"path": str(checkpoint), "loras": [{"path": str(lora)}]}),
                    tmp_path / "out")
    assert "xl-lora.safetensors: names" in error and "none of them is in this model" in error
    assert "give a LoRA trained for this base model" in error


def test_a_lora_naming_modules_the_model_lacks_is_refused(tmp_path, pipelines, capsys):
    pipe = pipelines("sd1")
    checkpoint = write_checkpoint(original_state_dict(pipe, "sd1"), tmp_path / "model.safetensors")
    state = peft_lora(pipe, rank=2, seed=0)
    state = {key.replace("attn1.to_q", "attn9.to_q"): value for key, value in state.items()}
    lora = tmp_path / "partly-elsewhere.safetensors"
    save_file(state, lora)
    error = refused(capsys, write_recipe(tmp_path, "sd1", {"path": str(checkpoint), "loras": [{"path": str(lora)}]}),
                    tmp_path / "out")
    assert "partly-elsewhere.safetensors: names" in error and "of them are in this model" in error


def test_a_pickle_checkpoint_is_refused_unread(tmp_path, capsys):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04 not even read")
    error = refused(capsys, write_recipe(tmp_path, "sd1", {"path": str(pickle)}), tmp_path / "out")
    assert "model.ckpt is a pickle checkpoint (.ckpt): loading one runs any code it holds" in error
    assert "safetensors" in error


def test_a_pickle_renamed_safetensors_is_refused(tmp_path, capsys):
    disguised = tmp_path / "model.safetensors"
    torch.save({"state_dict": {}}, disguised)
    error = refused(capsys, write_recipe(tmp_path, "sd1", {"path": str(disguised)}), tmp_path / "out")
    assert "model.safetensors: is not a whole safetensors file" in error


def test_a_kohya_lora_with_mixed_alphas_is_refused(tmp_path, pipelines, capsys):
    """diffusers would fuse it with one alpha for all modules: wrong weights, silently."""
    pipe = pipelines("sd1")
    checkpoint = write_checkpoint(original_state_dict(pipe, "sd1"), tmp_path / "model.safetensors")
    state = kohya_lora(pipe, rank=2, seed=0, family="sd1", alpha=2.0)
    state = {key: torch.tensor(1.0) if "attn2" in key and key.endswith(".alpha") else value
             for key, value in state.items()}
    lora = tmp_path / "block-weighted.safetensors"
    save_file(state, lora)
    error = refused(capsys, write_recipe(tmp_path, "sd1", {"path": str(checkpoint), "loras": [{"path": str(lora)}]}),
                    tmp_path / "out")
    assert "block-weighted.safetensors: gives the modules of unet different alphas" in error


def test_the_example_files_are_what_the_fixtures_write(tmp_path, pipelines):
    """recipes/examples/tiny-sd-single-file holds files these fixtures wrote: they can be made again, byte for byte."""
    example = ROOT / "recipes" / "examples" / "tiny-sd-single-file"
    pipe = pipelines("sd1")
    checkpoint = write_checkpoint(original_state_dict(pipe, "sd1"), tmp_path / "tiny-sd1.safetensors",
                                  dtype=torch.float16)
    lora = tmp_path / "tiny-style-lora.safetensors"
    save_file(kohya_lora(pipe, rank=2, seed=1, family="sd1", alpha=1.0), lora)
    for written in (checkpoint, lora):
        assert sha256(written) == sha256(example / written.name), written.name


def test_plan_sizes_a_single_file_recipe_from_the_architecture_it_loads_into(tmp_path):
    from publisher.plan import describe_plan

    example = describe_plan(ROOT / "recipes" / "examples" / "tiny-sd-single-file.yaml")
    assert " ? " not in example and "2446788" in example  # the tiny UNet's parameters, from the file's config
    hub = {"repo": "someone/community-model", "revision": "a" * 40, "filename": "model.safetensors"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "source": {**hub, "family": "sd1"}, "target": {"repo": "me/x"}}))
    assert " ? " not in describe_plan(recipe) and "859520964" in describe_plan(recipe)  # SD 1.5's UNet
    recipe.write_text(yaml.safe_dump({"name": "x", "source": hub, "target": {"repo": "me/x"}}))
    assert describe_plan(recipe).splitlines()[-1].endswith("once it downloads: give source.family")
