"""The component table is the one place the project knows its components: every entry is complete,
and no other module keeps a list of component names."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest
import torch

from publisher import components, language_model, wrappers
from publisher.components import (
    TABLE,
    Role,
    chunk_names,
    component_names,
    component_spec,
    package_suffix,
    swift_resource,
    whole_component,
)
from publisher.convert import convert_language_model
from publisher.recipe import Compression, Conversion

ROOT = Path(__file__).resolve().parent.parent
NAMES = set(TABLE)
# swift-transformers' LanguageModel.Keys: the names its stateful language model reads.
FEATURE_NAMES_READ_BY_SWIFT_TRANSFORMERS = {"inputIds", "causalMask", "keyCache", "valueCache", "logits"}


def test_every_component_has_a_wrapper_and_a_contract():
    """The diffusion components' are registered in publisher.wrappers; a language model's wrapper and contract are
    its own module's (publisher.language_model: one stateful program, its inputs ranged rather than sized), its
    conversion publisher.convert's."""
    modules, contracts = wrappers.registered()
    diffusion = {name for name in NAMES if component_spec(name).role != "language_model"}
    assert modules == contracts == diffusion
    assert NAMES - diffusion == {"language_model"}
    assert issubclass(language_model.StatefulCausalLM, torch.nn.Module)
    contract = {language_model.INPUT_IDS, language_model.CAUSAL_MASK, language_model.KEY_CACHE,
                language_model.VALUE_CACHE, language_model.LOGITS}
    assert contract == FEATURE_NAMES_READ_BY_SWIFT_TRANSFORMERS and callable(convert_language_model)


def test_the_recipe_schema_follows_the_table():
    assert set(Compression.model_fields) == NAMES
    assert set(Conversion.model_fields["components"].annotation.__args__[0].__args__) == NAMES


@pytest.mark.parametrize(
    ("package", "resource"),
    [("text_encoder", "TextEncoder"), ("text_encoder_2", "TextEncoder2"), ("unet", "Unet"),
     ("unet_chunk1", "UnetChunk1"), ("unet_chunk2", "UnetChunk2"), ("vae_decoder", "VAEDecoder"),
     ("vae_encoder", "VAEEncoder"), ("control_unet", "ControlledUnet"),
     ("control_unet_chunk1", "ControlledUnetChunk1"), ("control_unet_chunk2", "ControlledUnetChunk2")],
)
def test_swift_resource_names_are_apples(package: str, resource: str):
    """StableDiffusionPipeline+Resources.swift's names, as Apple's bundle_resources_for_swift_cli compiles them."""
    assert swift_resource(package) == resource


def test_a_controlnets_compiled_name_is_its_model_title_cased():
    """torch2coreml.py: ``"".join(word.title() for word in re.split('_|-', name))`` under controlnet/."""
    package = "original/packages/ControlNet_lllyasviel_sd-controlnet-mlsd.mlpackage"
    assert swift_resource("controlnet", package) == "controlnet/LllyasvielSdControlnetMlsd"
    with pytest.raises(ValueError, match="file name"):
        swift_resource("controlnet")


@pytest.mark.parametrize(("package", "suffix"), [("unet", "unet"), ("unet_chunk2", "unet_chunk2"),
                                                   ("control_unet", "control-unet"),
                                                   ("control_unet_chunk1", "control-unet_chunk1")])
def test_package_suffixes_are_apples(package: str, suffix: str):
    assert package_suffix(package) == suffix


def test_chunk_names_round_trip():
    for name in TABLE:
        assert all(whole_component(chunk) == name for chunk in chunk_names(name))
    assert chunk_names("unet") == ("unet_chunk1", "unet_chunk2")


def test_roles_partition_the_table():
    roles = typing.get_args(Role)
    assert set().union(*(component_names(role) for role in roles)) == NAMES
    assert component_names(in_images=True) == ("text_encoder", "text_encoder_2", "unet", "vae_decoder")


def _string_tuples(tree: ast.AST) -> list[tuple[int, set[str]]]:
    """Every tuple, list, set or dict-key literal holding two or more component names."""
    found = []
    for node in ast.walk(tree):
        elements = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if elements is None:
            continue
        values = {element.value for element in elements if isinstance(element, ast.Constant)
                  and isinstance(element.value, str)}
        if len(values & NAMES) >= 2:
            found.append((node.lineno, values & NAMES))
    return found


def test_no_other_module_lists_component_names():
    """Grep for a module that keeps its own list of components: it would drift from the table."""
    offenders = []
    for path in sorted((ROOT / "publisher").rglob("*.py")):
        if path.name == "components.py":
            continue
        for line, names in _string_tuples(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {sorted(names)}")
    assert offenders == []


def test_the_check_finds_a_list():
    assert _string_tuples(ast.parse('X = ("unet", "vae_decoder")\n')) == [(1, {"unet", "vae_decoder"})]
    assert _string_tuples(ast.parse('X = {"unet": 1, "text_encoder": 2}\n'))
    assert not _string_tuples(ast.parse('X = ("unet", "other")\n'))
    assert re.search("component", components.__doc__)
