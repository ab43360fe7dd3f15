"""What Apple's pipelines load, read back from the published packages' specs: every output float32, Apple's
metadata, a package name and compiled resource for each package, checked against the component table."""

from __future__ import annotations

from pathlib import Path

import coremltools as ct
import pytest
import torch
import yaml
from coremltools.proto import FeatureTypes_pb2

from publisher import VERSION_KEY
from publisher.components import CONTROLNET_PACKAGE_PREFIX, TABLE, package_suffix, swift_resource, whole_component
from publisher.pipeline import publish
from publisher.report import PublishReport
from publisher.wrappers import feature_description
from tests.conftest import DEMO_RECIPE, ROOT, TINY_SOURCE

FLOAT32 = FeatureTypes_pb2.ArrayFeatureType.FLOAT32


def component_of(package: Path, report: PublishReport) -> str:
    (component,) = [c.component for variant in report.variants for c in variant.components
                    if c.package.endswith(package.name)]
    return component


def check_package(package: Path, component: str) -> None:
    """Apple's contract for one package (torch2coreml.py): its name, float32 outputs, author, license, version,
    descriptions of every feature, and our tool's version key."""
    if TABLE[whole_component(component)].package_suffix is None:
        assert package.name.startswith(CONTROLNET_PACKAGE_PREFIX)
    else:
        assert package.name.endswith(f"_{package_suffix(component)}.mlpackage")
    swift_resource(component, package.name)  # every package has a compiled name Swift loads
    spec = ct.utils.load_spec(str(package))
    description = spec.description
    # The contract's outputs; a first chunk's outputs are the second's inputs, float16 as in Apple's chunks.
    outputs = [o for o in description.output if feature_description(o.name)]
    assert outputs or component.endswith("_chunk1")
    assert [(o.name, o.type.multiArrayType.dataType) for o in outputs] == [(o.name, FLOAT32) for o in outputs]
    metadata = description.metadata
    assert metadata.author.startswith("Please refer to the model card") and metadata.license and metadata.versionString
    assert metadata.userDefined[VERSION_KEY]
    for feature in (*description.input, *description.output):
        if feature_description(feature.name):  # a chunk's internal tensors have none
            assert feature.shortDescription == feature_description(feature.name)


def test_every_demo_package_follows_apples_contract(demo_output):
    report = PublishReport.read(demo_output)
    packages = sorted(demo_output.glob("*/packages/*.mlpackage"))
    assert len(packages) == 4
    for package in packages:
        check_package(package, component_of(package, report))
    assert ct.utils.load_spec(str(packages[0])).description.metadata.license == "apache-2.0"  # the source card's


@pytest.fixture(scope="module")
def tiny_controlnet(tmp_path_factory) -> Path:
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    config = ControlNetModel.load_config(ROOT / "configs" / "tiny-controlnet")
    ControlNetModel.from_config(config).save_pretrained(folder)
    return folder


def test_a_chunked_controlnet_repository_has_every_package_and_its_compiled_name(tmp_path, tiny_controlnet):
    """The ControlNet and the two control-unet chunks, each with Apple's name, float32 outputs (Swift reads the
    ControlNet's as Float buffers) and its compiled name in the card's instructions."""
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["source"] = {"path": str(TINY_SOURCE), "controlnet": {"path": str(tiny_controlnet)}}
    recipe["conversion"].update(components=["text_encoder", "controlnet", "control_unet", "vae_decoder"],
                                chunk_unet=True)
    recipe["compression"] = {}
    # One prompt, two steps: the chained chunks and the residuals are exercised at every step alike.
    recipe["parity"].update(per_component={}, image_steps=2)
    recipe["card"]["prompts"] = recipe["card"]["prompts"][:1]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    out = tmp_path / "out"
    report = publish(path, out, quiet=True)

    packages = sorted((out / "original" / "packages").glob("*.mlpackage"))
    assert [package.name for package in packages] == [
        "ControlNet_tiny-controlnet.mlpackage",
        "Stable_Diffusion_version_tiny-sd-palettized_control-unet_chunk1.mlpackage",
        "Stable_Diffusion_version_tiny-sd-palettized_control-unet_chunk2.mlpackage",
        "Stable_Diffusion_version_tiny-sd-palettized_text_encoder.mlpackage",
        "Stable_Diffusion_version_tiny-sd-palettized_vae_decoder.mlpackage",
    ]
    for package in packages:
        check_package(package, component_of(package, report))
    assert {result.component for result in report.parity} == {"text_encoder", "controlnet", "control_unet",
                                                               "vae_decoder"}
    assert all(result.passed for result in report.parity) and report.missing_components == []
    # End to end: the ControlNet package's residuals drive the chained control-unet chunks, against torch.
    assert report.image_parity and all(image.psnr_db > 30 for image in report.image_parity)
    card = (out / "README.md").read_text()
    assert "$OUT/controlnet/TinyControlnet.mlmodelc" in card
    assert "$OUT/ControlledUnetChunk1.mlmodelc" in card and "$OUT/ControlledUnetChunk2.mlmodelc" in card
