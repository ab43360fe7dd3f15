"""`publisher plan`: exact parameter counts and package sizes without weights, for local sources and for the
shipped recipes' Hub repositories (from the architecture configs in `configs/`)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from publisher.cli import main
from publisher.plan import Plan, describe_plan, plan_recipe
from publisher.recipe import load_recipe
from publisher.report import PublishReport
from tests.conftest import DEMO_RECIPE, ROOT

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml")) + [DEMO_RECIPE]
MiB = 2**20


@cache
def _plan(recipe_file: Path) -> Plan:
    return plan_recipe(load_recipe(recipe_file))


@cache
def _described(recipe_file: Path) -> str:
    return describe_plan(recipe_file)


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if ".mlpackage" in line]


def test_plan_matches_what_a_publish_of_the_demo_reports(demo_output: Path):
    # Measured: text encoder 1.000, UNet 1.006, VAE decoder 1.016, VAE encoder 1.017. The demo's random
    # weights leave its GroupNorms the identity, which the converter drops; trained weights store them.
    report = {c.component: c for c in PublishReport.read(demo_output).variants[0].components}
    planned = {p.component: p for p in _plan(DEMO_RECIPE).packages}
    assert planned.keys() == report.keys()
    for component, published in report.items():
        assert planned[component].parameters == published.parameters, component
        ratio = planned[component].size_bytes / published.compressed_bytes
        assert abs(ratio - 1) < 0.02, f"{component}: plan/publish size ratio {ratio:.4f}"


@pytest.mark.parametrize("recipe_file", SHIPPED, ids=lambda path: path.stem)
def test_every_shipped_recipe_plans_parameters_and_sizes(recipe_file: Path):
    plan = _plan(recipe_file)
    assert plan.packages and plan.unknown is None
    assert all(p.parameters and p.size_bytes for p in plan.packages)
    text = _described(recipe_file)
    assert "?" not in text
    assert "total" in text


def test_full_size_numbers_are_the_published_architectures():
    sd15 = {p.component: p for p in _plan(ROOT / "recipes" / "stable-diffusion-v1-5.yaml").packages}
    # Published parameter counts of SD 1.5 (tests/test_families.py): the VAE's halves each convert their
    # part of the 83.7M-parameter VAE (post_quant_conv + decoder, encoder + quant_conv), not all of it.
    assert sd15["unet"].parameters == 859_520_964
    assert sd15["text_encoder"].parameters == 123_060_480
    assert sd15["vae_decoder"].parameters + sd15["vae_encoder"].parameters == 83_653_863
    assert sd15["vae_encoder"].parameters < sd15["vae_decoder"].parameters < 83_653_863
    # float16 text encoder; 6-bit UNet (its LUTs and its small fp16 tensors add a little).
    assert sd15["text_encoder"].size_bytes == pytest.approx(2 * 123_060_480, rel=0.01)
    assert 6 / 8 < sd15["unet"].size_bytes / 859_520_964 < 6.2 / 8
    canny = _plan(ROOT / "recipes" / "controlnet-sd15-canny.yaml").packages
    assert {p.parameters for p in canny} == {361_279_120}


def test_a_float32_vae_counts_four_bytes_a_weight():
    sdxl = {p.component: p for p in _plan(ROOT / "recipes" / "stable-diffusion-xl-base-1.0.yaml").packages}
    assert sdxl["vae_decoder"].size_bytes == pytest.approx(4 * sdxl["vae_decoder"].parameters, rel=0.01)
    # Mixed-bit at a 4.5-bit average target.
    assert sdxl["unet"].size_bytes == pytest.approx(sdxl["unet"].parameters * 4.5 / 8, rel=0.03)


def test_columns_stay_aligned_with_apples_long_package_names():
    for recipe_file in (DEMO_RECIPE, ROOT / "recipes" / "stable-diffusion-xl-base-1.0.yaml"):
        rows = _rows(_described(recipe_file))
        assert len(rows) > 1
        # Each size ends at the same column, and every package path starts at the same one.
        assert len({row.index("iB") for row in rows}) == 1, rows
        assert len({len(row) - len(row.split()[-1]) for row in rows}) == 1, rows


def test_a_controlnet_plan_names_the_controlnet_it_converts():
    text = _described(ROOT / "recipes" / "controlnet-sd15-depth.yaml")
    recipe = load_recipe(ROOT / "recipes" / "controlnet-sd15-depth.yaml")
    line = next(line for line in text.splitlines() if line.startswith("controlnet"))
    assert "lllyasviel/control_v11f1p_sd15_depth" in line and recipe.source.controlnet.revision in line


def test_a_separate_vae_is_named_and_sized_from_its_own_architecture():
    text = _described(ROOT / "recipes" / "sdxl-turbo.yaml")
    assert any(line.startswith("vae") and "madebyollin/sdxl-vae-fp16-fix" in line for line in text.splitlines())


def _hub_recipe(folder: Path, repo: str) -> Path:
    recipe = folder / "hub.yaml"
    recipe.write_text(f"name: hub\nsource:\n  repo: {repo}\n  revision: {'a' * 40}\n  family: sd1\n"
                      "target:\n  repo: me/hub\n")
    return recipe


def test_an_unknown_hub_repo_prints_question_marks_and_says_why(tmp_path: Path):
    text = describe_plan(_hub_recipe(tmp_path, "someone/unknown-model"))
    assert all(row.split().count("?") == 2 for row in _rows(text))
    assert "someone/unknown-model" in text.splitlines()[-1] and "architecture" in text.splitlines()[-1]


def test_a_missing_recipe_is_one_line_and_exit_2(tmp_path: Path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_broken_mixed_bit_recipe_file_is_one_line_and_exit_2(tmp_path: Path, capsys):
    (tmp_path / "mixed.json").write_text("{}")
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(f"name: mixed\nsource:\n  path: {DEMO_RECIPE.parent / 'tiny-sd'}\ntarget:\n  repo: me/mixed\n"
                      "compression:\n  unet: {palettize: {mixed: {recipe: mixed.json}}}\n")
    assert main(["plan", str(recipe)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "average_bits" in error
