"""The safety checker, Apple's way: its package when the source has one (Apple's Python pipeline fails without it),
its contract, and its parity; and never for a source without one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from publisher.cli import main
from publisher.pipeline import publish
from publisher.validate import validate_recipe
from publisher.wrappers import SafetyChecker
from tests.conftest import TINY_SOURCE
from tests.test_consumer_contract import check_package, component_of


@pytest.fixture(scope="module")
def checked_source(tmp_path_factory) -> Path:
    """The demo pipeline with a tiny random-weight safety checker and its feature extractor, as SD 1.x repos ship."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = tmp_path_factory.mktemp("checked") / "tiny-sd-checked"
    shutil.copytree(TINY_SOURCE, folder)
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(text_config={**tiny, "vocab_size": 1000, "eos_token_id": 2},
                        vision_config={**tiny, "image_size": 32, "patch_size": 8}, projection_dim=32)
    StableDiffusionSafetyChecker(config).save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def write_recipe(folder: Path, source: Path, components: list[str] | None) -> Path:
    recipe = {"name": "checked", "source": {"path": str(source)}, "target": {"repo": "me/checked"}}
    if components is not None:
        recipe["conversion"] = {"components": components, "image_size": 64}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_wrapper_is_diffusers_checker_vectorized(checked_source):
    """Apple's forward_coreml: the same flags and filtered images as diffusers' own checker, without its loop."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    checker = StableDiffusionSafetyChecker.from_pretrained(checked_source / "safety_checker").eval()
    clip_input, images = torch.randn(2, 3, 32, 32), torch.rand(2, 64, 64, 3)
    with torch.no_grad():
        for weights in (1.0, -1.0):  # random embeddings stay under 1: nothing flagged; under -1: everything
            checker.concept_embeds_weights.fill_(weights)
            filtered, flags, scores = SafetyChecker(checker)(clip_input, images.clone(), torch.zeros(1))
            expected_images, expected_flags = checker.forward_onnx(clip_input, images.clone())
            assert flags.tolist() == expected_flags.float().tolist() == [float(weights < 0)] * 2
            assert torch.equal(filtered, expected_images)
            assert bool((scores > 0).any(dim=1).all()) == (weights < 0)


def test_the_default_components_take_the_checker_when_the_source_has_one(tmp_path, checked_source):
    with_checker = validate_recipe(write_recipe(tmp_path, checked_source, None)).conversion.components
    without = validate_recipe(write_recipe(tmp_path, TINY_SOURCE, None)).conversion.components
    assert with_checker == (*without, "safety_checker")
    assert "safety_checker" not in without


def test_listing_a_checker_the_source_lacks_is_refused(tmp_path, capsys):
    assert main(["validate", str(write_recipe(tmp_path, TINY_SOURCE, ["safety_checker"]))]) == 2
    assert "'safety_checker' is not in the source pipeline" in capsys.readouterr().err


def test_the_checker_package_follows_apples_contract_and_parity(tmp_path, checked_source):
    out = tmp_path / "out"
    report = publish(write_recipe(tmp_path, checked_source, ["safety_checker"]), out, quiet=True)

    (package,) = (out / "original" / "packages").glob("*.mlpackage")
    assert package.name == "Stable_Diffusion_version_checked_safety_checker.mlpackage"
    check_package(package, component_of(package, report))
    assert [result.component for result in report.parity] == ["safety_checker"] * 2
    assert all(result.passed for result in report.parity)
    assert "$OUT/SafetyChecker.mlmodelc" in (out / "README.md").read_text()
    # The other packages Apple's pipelines load for this source are named as missing.
    assert report.missing_components == ["text_encoder", "unet", "vae_decoder"]
