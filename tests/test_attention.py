"""The Neural Engine attention variants compute the same function as diffusers' attention: in
torch, and in the converted packages run by the executor (PSNR against the original reference)."""

from __future__ import annotations

import collections
import math
import shutil
import textwrap
from pathlib import Path

import coremltools as ct
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from publisher import executor
from publisher.attention import QUERY_CHUNK, NeuralEngineTransformer2D, split_einsum, with_attention
from publisher.convert import convert_component, example_inputs
from publisher.parity import psnr
from publisher.recipe import load_recipe
from publisher.source import load_source
from publisher.synthetic import build_pipeline
from publisher.wrappers import component_io, reference_module

ROOT = Path(__file__).resolve().parent.parent
TINY_SD = ROOT / "recipes" / "examples" / "tiny-sd"
NEURAL_ENGINE = ("split_einsum", "split_einsum_v2")


@pytest.mark.parametrize("query_chunk", [None, 4, 7, 64])
def test_split_einsum_is_multi_head_attention(query_chunk):
    """Against torch's own attention, with chunks that divide the queries, leave a remainder, or exceed them."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, dim_head, queries, keys = 2, 3, 5, 18, 11
    q, k, v = (torch.randn(batch, heads * dim_head, 1, n, generator=generator) for n in (queries, keys, keys))

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # (B, C, 1, S) -> (B, heads, S, dim_head)
        return x.squeeze(2).reshape(batch, heads, dim_head, -1).transpose(2, 3)

    expected = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))
    got = split_einsum(q, k, v, heads, dim_head**-0.5, query_chunk)
    torch.testing.assert_close(heads_first(got), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def unets(tmp_path_factory) -> dict[str, UNet2DConditionModel]:
    """SD 1.x (conv projections, GEGLU) and SDXL (linear projections, two blocks per transformer) UNets."""
    sdxl = build_pipeline(ROOT / "configs" / "tiny-sdxl", tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
    return {name: UNet2DConditionModel.from_pretrained(path / "unet").eval() for name, path in
            (("sd", TINY_SD), ("sdxl", sdxl))}


def unet_inputs(unet: UNet2DConditionModel) -> tuple[tuple[torch.Tensor, ...], dict]:
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    size = config.sample_size
    args = (torch.randn(2, config.in_channels, size, size, generator=generator), torch.tensor([999.0, 500.0]),
            torch.randn(2, 77, config.cross_attention_dim, generator=generator))
    if config.addition_embed_type != "text_time":
        return args, {}
    text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"time_ids": torch.randn(2, 6, generator=generator),
             "text_embeds": torch.randn(2, text, generator=generator)}
    return args, {"added_cond_kwargs": added}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("attention", NEURAL_ENGINE)
def test_swapped_unet_computes_the_original_function(unets, family, attention):
    unet = unets[family]
    args, kwargs = unet_inputs(unet)
    with torch.no_grad():
        expected = unet(*args, return_dict=False, **kwargs)[0]
        swapped = with_attention(unet, attention)
        got = swapped(*args, return_dict=False, **kwargs)[0]
        again = unet(*args, return_dict=False, **kwargs)[0]
    assert psnr(expected.numpy(), got.numpy()) >= 60
    assert torch.equal(again, expected), "the original model must be left untouched"
    replaced = [m for m in swapped.modules() if isinstance(m, NeuralEngineTransformer2D)]
    assert replaced and not any(isinstance(m, NeuralEngineTransformer2D) for m in unet.modules())
    # Parameters are shared, not copied: a full-size UNet must not double in memory.
    original = {p.data_ptr() for p in unet.parameters()}
    assert {p.data_ptr() for p in swapped.parameters()} == original


def test_original_attention_returns_the_model_itself(unets):
    assert with_attention(unets["sd"], "original") is unets["sd"]


def test_models_without_transformers_or_with_custom_processors_are_refused(unets):
    with pytest.raises(ValueError, match="no Transformer2DModel"):
        with_attention(torch.nn.Sequential(torch.nn.Linear(2, 2)), "split_einsum")
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    unet = UNet2DConditionModel.from_pretrained(TINY_SD / "unet")
    unet.set_attn_processor(Custom())
    with pytest.raises(NotImplementedError, match="plain attention"):
        with_attention(unet, "split_einsum")


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    """The tiny SD pipeline with a 2-head UNet: the per-head graph grows with the heads, and two
    exercise the head split as well as eight while converting in a fraction of the time."""
    folder = tmp_path_factory.mktemp("two-heads")
    source = folder / "tiny-sd"
    shutil.copytree(TINY_SD, source, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(TINY_SD / "unet")
    UNet2DConditionModel.from_config({**config, "attention_head_dim": 2}).save_pretrained(source / "unet")
    (folder / "recipe.yaml").write_text(textwrap.dedent(f"""\
        name: attention-test
        source:
          path: {source}
        target:
          repo: me/attention-test
        conversion:
          components: [unet]
          precision: float32
        """))
    recipe = load_recipe(folder / "recipe.yaml")
    return recipe, load_source(recipe)


def expected_softmaxes(unet: UNet2DConditionModel, attention: str, args: tuple) -> int:
    """One softmax per head, attention and query chunk: the shape of Apple's per-head layout."""
    seen: list[tuple[NeuralEngineTransformer2D, int]] = []
    swapped = with_attention(unet, attention)

    def record(module: NeuralEngineTransformer2D, inputs: tuple, _: object) -> None:
        seen.append((module, inputs[0].shape[2] * inputs[0].shape[3]))

    hooks = [m.register_forward_hook(record) for m in swapped.modules() if isinstance(m, NeuralEngineTransformer2D)]
    with torch.no_grad():
        swapped(*args, return_dict=False)
    for hook in hooks:
        hook.remove()
    total = 0
    for module, tokens in seen:
        chunks = math.ceil(tokens / QUERY_CHUNK) if attention == "split_einsum_v2" else 1
        heads = sum(block.attn1.heads + block.attn2.heads for block in module.transformer.transformer_blocks)
        total += heads * chunks
    return total


@pytest.mark.parametrize("attention", NEURAL_ENGINE)
def test_converted_neural_engine_unet_matches_the_reference(two_heads, tmp_path, attention):
    recipe, source = two_heads
    package = convert_component(recipe, source, "unet", tmp_path / "unet.mlpackage", attention).package
    io = component_io(recipe, source, "unet")
    case = example_inputs(io, 1, seed=3)
    with torch.no_grad():
        reference = reference_module(source, "unet")(*case).numpy()  # diffusers' own attention
    got = executor.run(package, {spec.name: x.numpy() for spec, x in zip(io.inputs, case, strict=True)}, mode="fp32")
    assert psnr(reference, got["noise_pred"]) >= 60

    operations = ct.models.MLModel(str(package), skip_model_load=True).get_spec().mlProgram.functions[
        "main"].block_specializations["CoreML6"].operations
    counts = collections.Counter(op.type for op in operations)
    unet = source.pipe.unet
    hidden = case[2].squeeze(2).transpose(1, 2)
    assert counts["softmax"] == expected_softmaxes(unet, attention, (case[0], case[1], hidden))
    # The transformers' projections became 1x1 convolutions; only the matmul-free einsums attend.
    assert counts["matmul"] == 0 and counts["einsum"] == 2 * counts["softmax"]
