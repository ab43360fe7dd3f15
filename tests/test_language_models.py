"""Language models: tiny random-weight Llama, Qwen2 and Falcon published end to end as stateful Core ML packages,
int4 and palettized, gated on prefill + decode parity through the executor; a broken state update fails the gate;
the package carries what swift-transformers reads; a Hub source and a push go through the loopback Hub; bad
recipes fail with one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from coremltools.proto import FeatureTypes_pb2, Model_pb2
from huggingface_hub import HfApi, ModelCard

from publisher import VERSION_KEY
from publisher.cli import main
from publisher.convert import convert_language_model
from publisher.errors import ParityError
from publisher.executor import fusion, load_program, make_state, run
from publisher.executor.ops import OPS
from publisher.executor.ops.registry import OpImpl
from publisher.executor.ops.tensor_transformation import slice_update_in_place
from publisher.language_model import (
    CAUSAL_MASK,
    INPUT_IDS,
    KEY_CACHE,
    LOGITS,
    VALUE_CACHE,
    StatefulCausalLM,
    causal_mask,
)
from publisher.language_model_parity import gate, measure_language_model, reference_tokens
from publisher.language_model_source import load_language_model_source
from publisher.package_weights import program_weights
from publisher.pipeline import publish
from publisher.plan import plan_recipe
from publisher.push import PushOptions
from publisher.recipe import Recipe, load_recipe
from publisher.synthetic import build_language_model
from tests.conftest import ROOT
from tests.hub.helpers import USER, WRITE_TOKEN
from tests.hub.server import HubServer

pytest_plugins = ["tests.hub.fixtures"]

CONTEXT = 64
SCHEMES = {
    "int4": {"quantize": {"nbits": 4, "granularity": "per_block", "block_size": 32}},
    "palettized": {"palettize": {"nbits": 4, "granularity": "per_grouped_channel", "group_size": 16}},
}
# Random weights quantize harshly (see language_model_parity.DEFAULT_THRESHOLDS): the floors measured on these
# tiny models, with a margin. A broken state update falls far below them (test_a_broken_state_update_...).
TINY_PARITY = {"int4": {"min_psnr": 4, "min_token_agreement": 0.15},
               "palettized": {"min_psnr": 4, "min_token_agreement": 0.15},
               "none": {"min_psnr": 20, "min_token_agreement": 0.9}}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """The tiny families' random-weight model folders, saved with save_pretrained, side by side."""
    root = tmp_path_factory.mktemp("language-models")
    for family in ("llama", "qwen2", "falcon"):
        build_language_model(ROOT / "configs" / f"tiny-{family}", root / f"tiny-{family}")
    return root


def write_recipe(folder: Path, family: str, scheme: str, name: str | None = None, **sections) -> Path:
    name = name or f"tiny-{family}-{scheme}"
    recipe = {
        "name": name,
        "task": "text-generation",
        "source": {"path": f"tiny-{family}"},
        "target": {"repo": f"{USER}/{name}-coreml"},
        "conversion": {"context_length": CONTEXT},
        "compression": {"language_model": SCHEMES.get(scheme, "none")},
        "parity": {"decode_steps": 16, **TINY_PARITY[scheme]},
        # Two scripts of the three default prompts: one Latin, one that byte-level BPE splits finely.
        "card": {"license": "apache-2.0", "prompts": ["The capital of France is", "日本の首都は"]},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    return path


def check_package(package: Path, context: int) -> Model_pb2.Model:
    """What swift-transformers' LanguageModelWithStatefulKVCache reads (publisher.language_model's docstring)."""
    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    description = spec.description
    inputs = {feature.name: feature.type.multiArrayType for feature in description.input}
    assert list(inputs) == [INPUT_IDS, CAUSAL_MASK]
    assert inputs[INPUT_IDS].dataType == FeatureTypes_pb2.ArrayFeatureType.INT32
    assert inputs[CAUSAL_MASK].dataType == FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    ranges = inputs[INPUT_IDS].shapeRange.sizeRanges
    assert (ranges[-1].lowerBound, ranges[-1].upperBound) == (1, context)  # a ranged length: prefill and decode
    states = {feature.name: feature.type.stateType.arrayType for feature in description.state}
    assert set(states) == {KEY_CACHE, VALUE_CACHE}
    assert all(state.dataType == FeatureTypes_pb2.ArrayFeatureType.FLOAT16 and state.shape[3] == context
               for state in states.values())
    (output,) = description.output
    assert output.name == LOGITS and output.type.multiArrayType.dataType == FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    metadata = description.metadata.userDefined
    assert metadata["co.huggingface.exporters.task"] == "text-generation"
    assert metadata["co.huggingface.exporters.context_length"] == str(context)
    assert metadata[VERSION_KEY]
    return spec


@pytest.mark.parametrize("family", ["llama", "qwen2", "falcon"])
def test_a_tiny_family_publishes_int4_and_palettized_with_stateful_parity(tiny_models, family, tmp_path,
                                                                          hub_cli: HubServer):
    api = HfApi(endpoint=hub_cli.url, token=WRITE_TOKEN)
    for scheme in ("int4", "palettized"):
        # One name and target for both schemes, as a maintainer re-publishing another scheme: converted once,
        # pushed to the loopback Hub twice (the second a new commit replacing the package).
        recipe_file = write_recipe(tiny_models, family, scheme, name=f"tiny-{family}")
        (planned,) = plan_recipe(load_recipe(recipe_file)).packages
        out = tmp_path / scheme
        report = publish(recipe_file, out, quiet=True, push=PushOptions())
        pushed = api.hf_hub_download(report.target_repo, "publish_report.json", local_dir=tmp_path / f"{scheme}-hub")
        assert json.loads(Path(pushed).read_text())["variants"][0]["components"][0]["scheme"] == \
            report.variants[0].components[0].scheme
        (variant,) = report.variants
        (component,) = variant.components
        assert planned.parameters == component.parameters
        # coremltools gives bias-less linears zero biases (kilobytes), which plan leaves out: a few % at this size.
        assert abs(planned.size_bytes - component.compressed_bytes) / component.compressed_bytes < 0.08
        package = out / variant.folder / component.package
        spec = check_package(package, CONTEXT)
        assert spec.description.metadata.userDefined["co.huggingface.exporters.name"] == report.target_repo
        # Prefill then 16 decode steps of every prompt, on both executor modes.
        assert {row.backend for row in report.token_parity} == {"executor-fp32", "executor-fp16"}
        assert all(row.decode_steps == 16 and row.passed for row in report.token_parity)
        assert {row.prompt for row in report.token_parity} == set(load_recipe(recipe_file).card.prompts)
        # Every weight at 4 bits, embeddings (a tied LM head) included: scales and small norms stay float16.
        assert 4 < component.bits_per_weight < 6.5, component
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (out / name).read_bytes() == (tiny_models / f"tiny-{family}" / name).read_bytes()
        card = ModelCard.load(out / "README.md")
        assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "coreml"
        assert family in card.data.tags and "stable-diffusion" not in card.data.tags
        assert "Top-1 agreement" in card.text and "swift-transformers" in card.text and "make_state" in card.text


def break_cache_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A KV-cache update that writes nothing, in place or not: the state keeps its old value, as an update at the
    wrong positions would leave the positions the next step reads. Programs loaded afterwards run it."""
    def unwritten(a, out=None):
        return a["x"] if out is None else out

    monkeypatch.setattr(fusion, "slice_update_in_place", unwritten)
    monkeypatch.setitem(OPS, "slice_update", OpImpl(lambda a: unwritten(a, a["x"].clone()), native_half=True))


@pytest.fixture(scope="module")
def fp16_llama(tiny_models, tmp_path_factory) -> tuple[Recipe, Path]:
    """The tiny Llama converted uncompressed, in this process, and its recipe."""
    recipe = load_recipe(write_recipe(tiny_models, "llama", "none", name="tiny-llama-fp16"))
    package = tmp_path_factory.mktemp("fp16-llama") / "model.mlpackage"
    convert_language_model(recipe, load_language_model_source(recipe), package)
    return recipe, package


def test_a_broken_state_update_fails_the_token_gate(fp16_llama, monkeypatch):
    recipe, package = fp16_llama
    references = reference_tokens(recipe, load_language_model_source(recipe))
    judged, _ = gate(recipe, measure_language_model(package, references, "original", on=("executor-fp16",)))
    assert all(row.token_agreement == 1.0 for row in judged)

    break_cache_writes(monkeypatch)
    rows = measure_language_model(package, references, "original", on=("executor-fp16",))
    with pytest.raises(ParityError, match="top-1 agreement"):
        gate(recipe, rows)
    assert max(row.token_agreement for row in rows) < TINY_PARITY["none"]["min_token_agreement"]


def test_the_cache_updates_in_place_compute_what_copies_compute(fp16_llama):
    """Every layer's slice_update of the KV cache writes into the state (executor.fusion.update_states_in_place):
    prefill then decode give the logits and the final state that copying updates give, bit for bit."""
    _, package = fp16_llama
    in_place, copying = load_program(package), load_program(package)
    updates = [step for step in in_place.steps if step.op_type == "slice_update"]
    assert len(updates) == 4 and all(step.fn is slice_update_in_place for step in updates)  # 2 layers, K and V
    copying.steps[:] = [replace(step, fn=OPS["slice_update"].fn) if step.op_type == "slice_update" else step
                        for step in copying.steps]

    def decode(program, mode):
        state = make_state(program)
        logits = [run(program, {INPUT_IDS: np.array([[3, 9, 27, 81, 5]], np.int32), CAUSAL_MASK: causal_mask(5, 5)},
                      state=state, mode=mode)[LOGITS]]
        for position in range(5, 11):
            logits.append(run(program, {INPUT_IDS: np.array([[position + 7]], np.int32),
                                        CAUSAL_MASK: causal_mask(1, position + 1)}, state=state, mode=mode)[LOGITS])
        return logits, state.read_state(KEY_CACHE), state.read_state(VALUE_CACHE)

    for mode in ("fp16", "fp32"):
        fast, slow = decode(in_place, mode), decode(copying, mode)
        assert all(np.array_equal(a, b) for a, b in zip(fast[0], slow[0], strict=True))
        assert np.array_equal(fast[1], slow[1]) and np.array_equal(fast[2], slow[2])


def test_the_wrapper_decodes_as_transformers_with_its_cache(tiny_models):
    """The traced module itself, in torch: prefill then decode through its buffers gives the model's logits."""
    recipe = load_recipe(write_recipe(tiny_models, "qwen2", "none", name="tiny-qwen2-wrapper"))
    model = load_language_model_source(recipe).model()
    wrapper = StatefulCausalLM(model, CONTEXT)
    tokens = torch.tensor([[5, 17, 300, 42, 9, 77]])
    with torch.no_grad():
        expected = model(tokens).logits[0].numpy()
        prefill = wrapper(tokens[:, :4].int(), torch.from_numpy(causal_mask(4, 4)).float())[0].numpy()
        steps = [wrapper(tokens[:, position:position + 1].int(),
                         torch.from_numpy(causal_mask(1, position + 1)).float())[0, -1].numpy() for position in (4, 5)]
    np.testing.assert_allclose(prefill, expected[:4], atol=1e-4)
    np.testing.assert_allclose(np.stack(steps), expected[4:], atol=1e-4)


def test_a_hub_source_publishes_and_pushes_to_the_hub(tiny_models, tmp_path, hub_cli: HubServer):
    api = HfApi(endpoint=hub_cli.url, token=WRITE_TOKEN)
    source_repo = f"{USER}/tiny-llama-source"
    api.create_repo(source_repo)
    revision = api.upload_folder(folder_path=tiny_models / "tiny-llama", repo_id=source_repo).oid
    recipe_file = write_recipe(tmp_path, "llama", "int4", name="tiny-llama-hub")
    data = yaml.safe_load(recipe_file.read_text())
    data["source"] = {"repo": source_repo, "revision": revision}
    # Per-layer: the tied embedding (the LM head's constant too) at 8 bits per channel, the rest int4 in blocks.
    data["compression"]["language_model"]["overrides"] = [
        {"pattern": "*embed_tokens*", "quantize": {"nbits": 8, "granularity": "per_channel"}}]
    recipe_file.write_text(yaml.safe_dump(data))

    report = publish(recipe_file, tmp_path / "out", quiet=True, push=PushOptions())
    files = set(api.list_repo_files(report.target_repo))
    assert {"config.json", "tokenizer.json", "README.md", "recipe.yaml", "publish_report.json"} <= files
    assert any(name.endswith(".mlpackage/Manifest.json") for name in files)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == source_repo and card.data.base_model_relation == "quantized"
    (weights,) = [item for item in report.inputs if item.filename == "model.safetensors"]
    assert weights.repo == source_repo and weights.revision == revision
    package = tmp_path / "out" / report.variants[0].folder / report.variants[0].components[0].package
    # coremltools numbers the constants it makes (`..._quantized_scale_<n>`): matched by their weight's name.
    scales = {weight.name.split("_quantized_scale")[0]: weight.size for weight in program_weights(package)
              if "_quantized_scale" in weight.name}
    vocabulary, hidden = 512, 64
    assert scales["model_model_embed_tokens_weight_to_fp16"] == vocabulary  # one scale per row
    assert scales["model_model_layers_0_mlp_up_proj_weight_to_fp16"] == 128 * hidden // 32  # one per block


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"conversion": {"minimum_deployment_target": "iOS17"}}, "conversion.minimum_deployment_target",
     "needs iOS18 or macOS15"),
    ({"conversion": {"components": ["unet"]}}, "conversion.components", "converts language_model alone"),
    ({"conversion": {"max_input_length": 128}}, "conversion.max_input_length", "longer than conversion.context_length"),
    ({"conversion": {"context_length": 4096}}, "conversion.context_length", "max_position_embeddings 256"),
    ({"source": {"path": "tiny-llama", "family": "sd1"}}, "source.family", "for diffusion pipelines"),
    ({"variants": [{"attention": "split_einsum"}]}, "variants", "one attention implementation"),
])
def test_a_bad_language_model_recipe_gets_one_line(tiny_models, change, field, message, capsys):
    recipe_file = write_recipe(tiny_models, "llama", "int4", name="tiny-llama-bad", **change)
    if "variants" in change:
        data = yaml.safe_load(recipe_file.read_text())
        data["variants"] = change["variants"]
        recipe_file.write_text(yaml.safe_dump(data))
    assert main(["validate", str(recipe_file)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and field in error and message in error, error


def test_a_folder_with_pickled_weights_only_is_refused(tiny_models, tmp_path, capsys):
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_models / "tiny-llama" / name).read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    recipe_file = write_recipe(tmp_path, "llama", "int4")
    assert main(["validate", str(recipe_file)]) == 2
    error = capsys.readouterr().err
    assert "pytorch_model.bin" in error and "no .safetensors weights" in error


def test_the_shipped_language_model_recipes_validate_and_plan():
    for recipe_file in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(recipe_file)
        if recipe.task != "text-generation":
            continue
        assert main(["validate", str(recipe_file)]) == 0
        (package,) = plan_recipe(recipe).packages
        assert package.size_bytes and package.parameters, recipe_file
