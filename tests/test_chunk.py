"""Chunking the UNet in two (Apple's unet_chunk1/2): the chunks chained compute what the whole did,
and a publish with `chunk_unet` ships, checks and documents the chunks in place of the UNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard

from publisher import executor
from publisher.chunk import chains, chunk_package
from publisher.components import chunk_names, whole_component
from publisher.compress import compress_package
from publisher.convert import convert_component, example_inputs
from publisher.errors import RecipeError
from publisher.parity import measure_component, psnr
from publisher.pipeline import publish
from publisher.plan import describe_plan
from publisher.recipe import load_recipe
from publisher.report import PublishReport
from publisher.source import load_source
from publisher.wrappers import component_io
from tests.conftest import DEMO_RECIPE

PREFIX = "original/packages/Stable_Diffusion_version_tiny-sd-palettized"


@pytest.fixture(scope="module")
def palettized_unet(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's 6-bit UNet, and its two chunks."""
    folder = tmp_path_factory.mktemp("chunk")
    recipe = load_recipe(DEMO_RECIPE)
    source = load_source(recipe, models=("unet",))
    converted = convert_component(recipe, source, "unet", folder / "unet.mlpackage").package
    whole = compress_package(converted, recipe.compression.for_component("unet"), folder / "palettized.mlpackage",
                             component="unet").package
    (folder / "chunks").mkdir()
    return whole, chunk_package(whole, folder / "chunks")


def test_chunks_split_the_weights_and_chain_to_the_whole(palettized_unet):
    whole, (first, second) = palettized_unet
    programs = [executor.load_program(package) for package in (whole, first, second)]
    sizes = [sum(f.stat().st_size for f in p.glob("Data/com.apple.CoreML/weights/*")) for p in (whole, first, second)]
    # Roughly halved by weight bytes; together they hold the whole's weights (compressed as they were).
    assert 0.25 < sizes[1] / sizes[0] < 0.75 and 0.95 < (sizes[1] + sizes[2]) / sizes[0] < 1.05
    assert set(programs[1].inputs) <= set(programs[0].inputs)
    assert [spec.name for spec in programs[2].outputs] == [spec.name for spec in programs[0].outputs]
    recipe = load_recipe(DEMO_RECIPE)
    source = load_source(recipe, models=())
    case = dict(zip((spec.name for spec in component_io(recipe, source, "unet").inputs),
                    (tensor.numpy() for tensor in example_inputs(component_io(recipe, source, "unet"), 100)),
                    strict=True))
    expected = executor.run(programs[0], case)["noise_pred"]
    middle = executor.run(programs[1], {name: case[name] for name in programs[1].inputs})
    assert set(middle) & set(programs[2].inputs), "the second chunk reads the first's outputs"
    values = {**case, **middle}
    chained = executor.run(programs[2], {name: values[name] for name in programs[2].inputs})["noise_pred"]
    assert psnr(expected, chained) > 100


def test_parity_measures_the_chain_as_the_component(palettized_unet):
    whole, chunks = palettized_unet
    recipe = load_recipe(DEMO_RECIPE)
    source = load_source(recipe, models=())
    as_whole = measure_component(recipe, source, "unet", whole, on=("executor-fp32",))
    as_chain = measure_component(recipe, source, "unet", chunks, on=("executor-fp32",))
    assert as_chain.psnr_db["executor-fp32"] == pytest.approx(as_whole.psnr_db["executor-fp32"], abs=0.05)
    with pytest.raises(KeyError):  # the second chunk alone lacks the first's outputs
        measure_component(recipe, source, "unet", chunks[1:], on=("executor-fp32",))


def test_chains_gather_chunks_under_their_component():
    packages = {"text_encoder": Path("te"), "unet_chunk2": Path("c2"), "unet_chunk1": Path("c1"),
                "vae_decoder": Path("v")}
    assert chains(packages) == {"text_encoder": (Path("te"),), "unet": (Path("c1"), Path("c2")),
                                "vae_decoder": (Path("v"),)}
    assert chunk_names("unet") == ("unet_chunk1", "unet_chunk2")
    assert whole_component("unet_chunk2") == "unet" and whole_component("vae_encoder") == "vae_encoder"


def test_publish_with_chunk_unet_ships_the_chunks_in_place_of_the_unet(tmp_path):
    recipe = tmp_path / "chunked.yaml"
    recipe.write_text(DEMO_RECIPE.read_text().replace("path: tiny-sd", f"path: {DEMO_RECIPE.parent / 'tiny-sd'}")
                      .replace("conversion:\n", "conversion:\n  chunk_unet: true\n"))
    assert load_recipe(recipe).conversion.chunk_unet
    out = tmp_path / "out"
    report = publish(recipe, out, quiet=True)

    packages = sorted(path.name for path in (out / PREFIX).parent.glob("*.mlpackage"))
    assert [name for name in packages if "unet" in name] == [
        "Stable_Diffusion_version_tiny-sd-palettized_unet_chunk1.mlpackage",
        "Stable_Diffusion_version_tiny-sd-palettized_unet_chunk2.mlpackage",
    ]
    components = {c.component: c for c in report.variants[0].components}
    assert set(components) == {"text_encoder", "unet_chunk1", "unet_chunk2", "vae_decoder", "vae_encoder"}
    first, second = components["unet_chunk1"], components["unet_chunk2"]
    for chunk in (first, second):
        assert chunk.compressed_bytes == sum(
            f.stat().st_size for f in (out / "original" / chunk.package).glob("Data/com.apple.CoreML/weights/*"))
        assert chunk.scheme == "palettize 6-bit kmeans"
    assert first.parameters + second.parameters > 0
    # Parity ran the chained chunks as the UNet, and the images came from them.
    assert {result.component for result in report.parity} == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert report.image_parity and all(image.psnr_db > 20 for image in report.image_parity)
    assert PublishReport.read(out).variants == report.variants
    card = ModelCard.load(out / "README.md").text
    assert "UnetChunk1" in card and "UnetChunk2" in card
    assert json.loads((out / "publish_report.json").read_text())["variants"][0]["components"][1]["component"] == (
        "unet_chunk1")
    assert np.isfinite(first.bits_per_weight)


def _chunked_recipe(folder: Path, components: str) -> Path:
    recipe = folder / "chunked.yaml"
    recipe.write_text(f"name: chunked\nsource:\n  path: {DEMO_RECIPE.parent / 'tiny-sd'}\ntarget:\n  repo: me/chunked\n"
                      f"conversion:\n  components: [{components}]\n  chunk_unet: true\n")
    return recipe


def test_plan_names_the_chunks(tmp_path):
    plan = describe_plan(_chunked_recipe(tmp_path, "text_encoder, unet"))
    assert "UNet in two chunks" in plan
    assert "original/packages/Stable_Diffusion_version_chunked_unet_chunk1/2.mlpackage" in plan


def test_chunk_unet_without_a_unet_is_refused(tmp_path):
    recipe = _chunked_recipe(tmp_path, "text_encoder")
    with pytest.raises(RecipeError, match=r"chunked.yaml:6: conversion: chunk_unet needs one of unet, control_unet in"
                                          r" components$"):
        load_recipe(recipe)
