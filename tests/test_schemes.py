"""Every compression scheme a recipe can name compresses a tiny package that the parity executor runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from publisher import parity
from publisher.compress import compress_package
from publisher.convert import convert_component
from publisher.pipeline import BuiltComponent, component_report, weights_bytes
from publisher.recipe import load_recipe
from publisher.source import load_source
from tests.conftest import DEMO_RECIPE

# (recipe YAML of the VAE decoder's scheme, deployment target, lowest acceptable PSNR in dB)
SCHEMES = {
    "palettize-6bit-kmeans": ("{palettize: {nbits: 6}, weight_threshold: 512}", "iOS16", 35),
    "palettize-4bit-uniform": ("{palettize: {nbits: 4, mode: uniform}, weight_threshold: 512}", "iOS16", 15),
    "palettize-4bit-grouped": ("{palettize: {nbits: 4, granularity: per_grouped_channel, group_size: 16},"
                               " weight_threshold: 512}", "iOS18", 25),
    "quantize-8bit-per-channel": ("{quantize: {nbits: 8}, weight_threshold: 512}", "iOS16", 40),
    "quantize-8bit-per-block": ("{quantize: {nbits: 8, granularity: per_block, block_size: 32},"
                                " weight_threshold: 512}", "iOS18", 40),
    "quantize-4bit-per-block": ("{quantize: {nbits: 4, granularity: per_block, block_size: 32},"
                                " weight_threshold: 512}", "iOS18", 20),
    "prune-50pct": ("{prune: {sparsity: 0.5}, weight_threshold: 512}", "iOS16", 5),
    "prune-2-4": ("{prune: {n_m: [2, 4]}, weight_threshold: 512}", "iOS16", 5),
    "joint-prune-palettize": ("{prune: {sparsity: 0.25}, palettize: {nbits: 6}, weight_threshold: 512}",
                              "iOS18", 5),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[object, object, Path]]:
    """The tiny VAE decoder converted once per deployment target."""
    folder = tmp_path_factory.mktemp("schemes")
    built = {}
    for target in ("iOS16", "iOS18"):
        recipe_file = folder / f"{target}.yaml"
        recipe_file.write_text(
            DEMO_RECIPE.read_text()
            .replace("path: tiny-sd", f"path: {DEMO_RECIPE.parent / 'tiny-sd'}")
            .replace("minimum_deployment_target: iOS16", f"minimum_deployment_target: {target}")
        )
        recipe = load_recipe(recipe_file)
        source = load_source(recipe)
        package = convert_component(recipe, source, "vae_decoder", folder / f"vae_decoder_{target}.mlpackage").package
        built[target] = (recipe, source, package)
    return built


@pytest.mark.parametrize("name", SCHEMES)
def test_scheme_compresses_and_runs_through_the_executor(converted, tmp_path, name):
    text, target, floor = SCHEMES[name]
    recipe, source, package = converted[target]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe.text.replace("path: tiny-sd", f"path: {DEMO_RECIPE.parent / 'tiny-sd'}").replace(
        "vae_decoder: {palettize: {nbits: 6, mode: kmeans}, weight_threshold: 512}", f"vae_decoder: {text}"))
    scheme = load_recipe(recipe_file).compression.vae_decoder
    assert not scheme.is_none and scheme.min_opset <= int(target.removeprefix("iOS"))

    compressed = compress_package(package, scheme, tmp_path / "compressed.mlpackage").package
    measured = parity.measure_component(recipe, source, "vae_decoder", compressed, on=("executor-fp32",))
    psnr = measured.psnr_db["executor-fp32"]
    assert np.isfinite(psnr) and psnr >= floor, (name, psnr)
    # Every scheme stores something other than the dense float16 weights.
    assert weights_bytes(compressed) != weights_bytes(package)


def test_a_threshold_above_every_weight_is_reported_as_compressing_nothing(converted, tmp_path):
    """A huge weight_threshold once published "palettize 6-bit" at 16.1 bits per weight."""
    recipe, _, package = converted["iOS16"]
    scheme = recipe.compression.vae_decoder
    applied = compress_package(package, scheme, tmp_path / "applied.mlpackage")
    untouched = compress_package(package, scheme.model_copy(update={"weight_threshold": 10**9}),
                                 tmp_path / "untouched.mlpackage")
    assert applied.compressed_weights > 0
    assert untouched.compressed_weights == 0

    built = BuiltComponent("vae_decoder", package, untouched.package, parameters=1000, convert_seconds=1.0,
                           compress_seconds=1.0, compressed_weights=untouched.compressed_weights)
    scheme_line = component_report(recipe, built).scheme
    assert scheme_line.startswith("none: palettize 6-bit kmeans compressed no weight")
    assert "weight_threshold" in scheme_line
    assert component_report(recipe, replace(built, compressed_weights=3)).scheme == scheme.describe()
