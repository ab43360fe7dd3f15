"""Broken local sources: `validate` and `publish` refuse each with one line and exit 2, before any conversion.

Each case copies the tiny demo pipeline, breaks one thing and expects the line to name the broken
file (or folder) and the problem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from publisher.cli import main
from tests.conftest import DEMO_RECIPE, ROOT, TINY_SOURCE

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
TEXT_WEIGHTS = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory) -> Path:
    """A tiny random-weight ControlNet matching the demo UNet (built once; under a second)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    config = ControlNetModel.load_config(ROOT / "configs" / "tiny-controlnet")
    ControlNetModel.from_config(config).save_pretrained(folder)
    return folder


def write_recipe(folder: Path, source: Path | dict, *, vae: Path | None = None, controlnet: Path | None = None) -> Path:
    """The demo recipe over ``source`` (a folder, or the source mapping), optionally with a separate VAE or a
    ControlNet to convert."""
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["source"] = {"path": str(source)} if isinstance(source, Path) else source
    if vae is not None:
        recipe["source"]["vae"] = {"path": str(vae)}
    if controlnet is not None:
        recipe["source"]["controlnet"] = {"path": str(controlnet)}
        recipe["conversion"]["components"] = ["controlnet", "control_unet"]
        recipe["compression"] = {}
        recipe["parity"]["per_component"] = {}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def truncate(path: Path, size: int | None = None) -> None:
    """Cut ``path`` to ``size`` bytes (default: 100 bytes short)."""
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size - 100 if size is None else size)


def shard(folder: Path, *, keep_second: bool) -> None:
    """Split the VAE's weights into two shards with an index, as large checkpoints ship."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(weights)
    halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for index, (file, keys) in enumerate(halves.items()):
        if index == 0 or keep_second:
            save_file({key: weights[key] for key in keys}, folder / file)
    weight_map = {key: file for file, keys in halves.items() for key in keys}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def unlink(relative: str) -> Callable[[Path], None]:
    return lambda src: (src / relative).unlink()


def write(relative: str, text: str) -> Callable[[Path], None]:
    return lambda src: (src / relative).write_text(text)


def set_index(name: str, value) -> Callable[[Path], None]:
    return lambda src: edit_json(src / "model_index.json", lambda index: index.__setitem__(name, value))


def rename_weights(relative: str, new_name: str) -> Callable[[Path], None]:
    return lambda src: (src / relative).rename((src / relative).with_name(new_name))


def pickle_only(src: Path) -> None:
    (src / TEXT_WEIGHTS).unlink()
    (src / "text_encoder/pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")


# (id, how to break the copy, the broken file or folder relative to it, what the line says is wrong)
BROKEN: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("index-invalid-json", write("model_index.json", '{\n  "unet": ["diffusers",\n'), "model_index.json:3",
     "invalid JSON"),
    ("index-not-a-mapping", write("model_index.json", "[]"), "model_index.json", "not a JSON object"),
    ("index-unknown-class", set_index("unet", ["diffusers", "UNet9000"]), "model_index.json", "UNet9000"),
    ("index-unknown-library", set_index("unet", ["nosuchlib", "UNet2DConditionModel"]), "model_index.json",
     "nosuchlib"),
    ("index-malformed-entry", set_index("unet", "UNet2DConditionModel"), "model_index.json", "unet"),
    ("index-unknown-pipeline", set_index("_class_name", "NoSuchPipeline"), "model_index.json", "NoSuchPipeline"),
    ("index-without-scheduler", lambda src: edit_json(src / "model_index.json", lambda i: i.pop("scheduler")),
     "model_index.json", "scheduler"),
    ("unet-folder-missing", lambda src: shutil.rmtree(src / "unet"), "unet", "is missing"),
    ("tokenizer-folder-missing", lambda src: shutil.rmtree(src / "tokenizer"), "tokenizer", "is missing"),
    ("scheduler-config-missing", unlink("scheduler/scheduler_config.json"), "scheduler/scheduler_config.json",
     "missing"),
    ("unet-config-missing", unlink("unet/config.json"), "unet/config.json", "missing"),
    ("unet-config-invalid-json", write("unet/config.json", '{"in_channels": 4,,}'), "unet/config.json:1",
     "invalid JSON"),
    ("unet-config-not-a-mapping", write("unet/config.json", "[4]"), "unet/config.json", "not a JSON object"),
    ("text-encoder-config-invalid-json", write("text_encoder/config.json", "{"), "text_encoder/config.json",
     "invalid JSON"),
    ("text-encoder-config-without-model-type",
     lambda src: edit_json(src / "text_encoder/config.json", lambda c: c.pop("model_type")),
     "text_encoder/config.json", "model_type"),
    ("unet-weights-missing", unlink(UNET_WEIGHTS), "unet", "diffusion_pytorch_model.safetensors"),
    ("text-encoder-weights-missing", unlink(TEXT_WEIGHTS), "text_encoder", "model.safetensors"),
    ("unet-fp16-variant-only", rename_weights(UNET_WEIGHTS, "diffusion_pytorch_model.fp16.safetensors"),
     "unet/diffusion_pytorch_model.fp16.safetensors", "variant"),
    ("vae-shard-missing", lambda src: shard(src / "vae", keep_second=False),
     "vae/diffusion_pytorch_model-00002-of-00002.safetensors", "missing"),
    ("vae-index-invalid-json",
     lambda src: [shard(src / "vae", keep_second=True),
                  write("vae/diffusion_pytorch_model.safetensors.index.json", "{")(src)],
     "vae/diffusion_pytorch_model.safetensors.index.json", "invalid JSON"),
    ("unet-weights-truncated", lambda src: truncate(src / UNET_WEIGHTS), UNET_WEIGHTS, "truncated"),
    ("vae-weights-truncated-into-header", lambda src: truncate(src / VAE_WEIGHTS, 20),
     VAE_WEIGHTS, "header"),
    ("text-encoder-weights-garbage", write(TEXT_WEIGHTS, "not a safetensors file at all"), TEXT_WEIGHTS, "header"),
    ("text-encoder-pickle-only", pickle_only, "text_encoder/pytorch_model.bin", "safetensors"),
    ("tokenizer-without-merges", unlink("tokenizer/merges.txt"), "tokenizer/merges.txt", "merges.txt"),
    ("tokenizer-without-vocab", unlink("tokenizer/vocab.json"), "tokenizer/vocab.json", "vocab.json"),
    ("tokenizer-json-only-not-bpe",
     lambda src: [unlink("tokenizer/vocab.json")(src), unlink("tokenizer/merges.txt")(src),
                  write("tokenizer/tokenizer.json", '{"model": {"type": "WordPiece", "vocab": {}}}')(src)],
     "tokenizer/tokenizer.json", "BPE"),
    ("tokenizer-json-only-bad-merge",
     lambda src: [unlink("tokenizer/vocab.json")(src), unlink("tokenizer/merges.txt")(src),
                  write("tokenizer/tokenizer.json", '{"model": {"type": "BPE", "vocab": {}, "merges": [["a"]]}}')(src)],
     "tokenizer/tokenizer.json", "not a pair"),
    ("tokenizer-without-length",
     lambda src: edit_json(src / "tokenizer/tokenizer_config.json", lambda c: c.pop("model_max_length")),
     "tokenizer/tokenizer_config.json", "model_max_length"),
    ("tokenizer-vocab-invalid-json", write("tokenizer/vocab.json", '{"a": 1'), "tokenizer/vocab.json",
     "invalid JSON"),
    ("card-metadata-invalid", write("README.md", "---\nlicense: [apache\n---\n"), "README.md", "metadata"),
    ("unet-for-another-text-encoder",
     lambda src: edit_json(src / "unet/config.json", lambda c: c.__setitem__("cross_attention_dim", 64)),
     "unet/config.json", "cross_attention_dim"),
]


@pytest.fixture
def source(tmp_path) -> Path:
    """A fresh copy of the demo pipeline (6 MB) to break."""
    return Path(shutil.copytree(TINY_SOURCE, tmp_path / "tiny-sd"))


def validate(recipe: Path, capsys) -> tuple[int, str]:
    code = main(["validate", "-q", str(recipe)])
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def assert_one_line_naming(err: str, broken: Path, problem: str) -> None:
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(broken) in err and problem in err, err


def test_the_shipped_demo_and_an_intact_copy_validate(tmp_path, source, capsys):
    assert validate(DEMO_RECIPE, capsys) == (0, "")
    assert validate(write_recipe(tmp_path, source), capsys) == (0, "")


@pytest.mark.parametrize("layout", ["sharded", "fp16-variant-beside", "pickle-beside"])
def test_other_loadable_weight_layouts_validate(tmp_path, source, capsys, layout):
    if layout == "sharded":
        shard(source / "vae", keep_second=True)
    elif layout == "fp16-variant-beside":
        shutil.copy(source / UNET_WEIGHTS, source / "unet/diffusion_pytorch_model.fp16.safetensors")
    else:  # the loaders prefer safetensors: the pickle is never read
        (source / "text_encoder/pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    assert validate(write_recipe(tmp_path, source), capsys) == (0, "")


@pytest.mark.parametrize(("name", "breaks", "broken", "problem"), [pytest.param(*case, id=case[0]) for case in BROKEN])
def test_broken_source_is_one_line_and_exit_2_at_validate(tmp_path, source, capsys, name, breaks, broken, problem):
    breaks(source)
    code, err = validate(write_recipe(tmp_path, source), capsys)
    assert code == 2
    file, _, line = broken.partition(":")
    assert_one_line_naming(err, source / file, problem)
    if line:
        assert f"{source / file}:{line}:" in err, err


@pytest.mark.parametrize("part", ["vae", "controlnet"])
@pytest.mark.parametrize("breakage", ["config", "weights"])
def test_broken_separate_vae_or_controlnet_is_refused(tmp_path, source, controlnet, capsys, part, breakage):
    separate = Path(shutil.copytree(controlnet if part == "controlnet" else source / "vae", tmp_path / part))
    recipe = write_recipe(tmp_path, source, **{part: separate})
    assert validate(recipe, capsys) == (0, "")
    if breakage == "config":
        (separate / "config.json").write_text('{"in_channels": 4')
        broken, problem = separate / "config.json", "invalid JSON"
    else:
        broken, problem = separate / "diffusion_pytorch_model.safetensors", "truncated"
        truncate(broken)
    code, err = validate(recipe, capsys)
    assert code == 2
    assert_one_line_naming(err, broken, problem)


@pytest.mark.parametrize(("name", "breaks", "broken", "problem"),
                         [pytest.param(*case, id=case[0]) for case in BROKEN
                          if case[0] in ("tokenizer-without-merges", "unet-weights-truncated")])
def test_publish_refuses_a_broken_source_before_converting_anything(tmp_path, source, capsys, monkeypatch,
                                                                   name, breaks, broken, problem):
    """Both used to fail with exit 1: a tokenizer traceback, and a truncated UNet after other components converted."""
    import publisher.pipeline

    def no_conversion(*args, **kwargs):
        raise AssertionError("a component was converted from a broken source")

    monkeypatch.setattr(publisher.pipeline, "build_variants", no_conversion)
    breaks(source)
    out = tmp_path / "published" / "tiny-sd"
    code = main(["publish", "-q", str(write_recipe(tmp_path, source)), "--out", str(out)])
    assert code == 2
    assert_one_line_naming(capsys.readouterr().err, source / broken, problem)
    assert not out.exists() and not any(out.parent.glob("*"))


def test_loading_a_broken_source_refuses_it_before_any_model(tmp_path, source):
    """`publish` called as a library checks too: `load_source` inspects before it builds anything."""
    from publisher.errors import RecipeError
    from publisher.recipe import load_recipe
    from publisher.source import load_source

    (source / UNET_WEIGHTS).write_bytes(b"")
    with pytest.raises(RecipeError, match="is truncated or damaged"):
        load_source(load_recipe(write_recipe(tmp_path, source)), models=())


def test_publish_checks_a_hub_source_once_its_configs_are_downloaded(tmp_path):
    """`validate` cannot read a Hub pipeline offline; `publish` checks the configs and tokenizer it downloads
    before loading any model (served here, offline, from a prepared Hub cache)."""
    revision = "a" * 40
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / revision
    shutil.copytree(TINY_SOURCE, snapshot, ignore=shutil.ignore_patterns("*.safetensors"))
    (snapshot / "tokenizer/merges.txt").unlink()
    recipe = write_recipe(tmp_path, {"repo": "org/tiny", "revision": revision})
    out = tmp_path / "published" / "tiny"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-m", "publisher", "publish", "-q", str(recipe), "--out", str(out)],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert_one_line_naming(result.stderr, snapshot / "tokenizer/merges.txt", "is missing")
    assert not out.exists() and not any(out.parent.glob("*"))


@pytest.mark.parametrize(("model", "class_name", "weights", "pickle_name"), [
    ("text_encoder", "CLIPTextModel", TEXT_WEIGHTS, "pytorch_model.bin"),
    ("unet", "UNet2DConditionModel", UNET_WEIGHTS, "diffusion_pytorch_model.bin"),
])
def test_the_loaders_refuse_a_pickle_only_model(source, model, class_name, weights, pickle_name):
    """A Hub source's weights are not checked before the loaders read them: they must not unpickle a file
    (`torch.load` on user input runs code). A loadable pickle proves the loader refuses it rather than fails on it."""
    import torch
    from safetensors.torch import load_file

    from publisher.errors import RecipeError
    from publisher.source import _load_model

    torch.save(load_file(source / weights), source / model / pickle_name)
    (source / weights).unlink()
    with pytest.raises(RecipeError, match=f"{source}: the {class_name} has no safetensors weights") as caught:
        _load_model(class_name, str(source), None, model)
    assert "\n" not in str(caught.value) and "pickled weights (.bin) are refused" in str(caught.value)
    assert caught.value.exit_code == 2  # a bad input, as a local source's pickle is refused at validate
