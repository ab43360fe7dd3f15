"""Per-op overrides: a pattern in the recipe reaches the weights it names, and only those."""

from __future__ import annotations

import textwrap
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.milproto import load as milproto

from publisher import executor
from publisher.compress import compress_package
from publisher.errors import RecipeError
from publisher.mixed_bit import MixedBitRecipe
from publisher.package_weights import program_weights
from publisher.parity import psnr
from publisher.recipe import Scheme, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY_SOURCE = ROOT / "recipes" / "examples" / "tiny-sd"
WIDTH = 64
LAYERS = ("time_embedding_linear", "attn1_to_q", "attn1_to_k", "ff_net")


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """Four 64x64 linears in a chain, named like a converted UNet's weights and ops."""
    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 8 for name in LAYERS}

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, WIDTH))])
    def program(x):
        for name in LAYERS:
            weight = mb.const(val=weights[name], name=f"unet_{name}_weight")
            x = mb.linear(x=x, weight=weight, name=f"{name}_op")
        return x

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    path = tmp_path_factory.mktemp("overrides") / "chain.mlpackage"
    model.save(str(path))
    return path


def weight_forms(package: Path) -> dict[str, str]:
    """Layer -> how its weight is stored: 'float', 'lut<entries>' or 'affine'."""
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = milproto.load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    producers = {op.outputs[0].name: op for op in program.functions["main"].operations}
    forms = {}
    for op in program.functions["main"].operations:
        if op.op_type != "linear":
            continue
        source, layer = producers[op.weight.name], op.name.removesuffix("_op_cast_fp16")
        if source.op_type == "constexpr_lut_to_dense":
            forms[layer] = f"lut{source.lut.val.size}"
        elif source.op_type == "constexpr_affine_dequantize":
            forms[layer] = "affine"
        else:
            assert source.op_type == "const", source.op_type
            forms[layer] = "float"
    return forms


def compress(package: Path, tmp_path: Path, scheme: dict) -> Path:
    out = tmp_path / "out.mlpackage"
    compress_package(package, Scheme.model_validate(scheme), out)
    return out


def test_overrides_reach_the_matching_ops_only(package: Path, tmp_path: Path):
    out = compress(package, tmp_path, {
        "palettize": {"nbits": 6},
        "weight_threshold": 512,
        "overrides": [
            {"pattern": "*time_embedding*", "skip": True},
            {"pattern": "*attn1_to_q*", "palettize": {"nbits": 8}},
            # Matched by the reading op's name, not the constant's.
            {"pattern": "ff_net_op*", "quantize": {"nbits": 8}},
        ],
    })
    assert weight_forms(out) == {"time_embedding_linear": "float", "attn1_to_q": "lut256", "attn1_to_k": "lut64",
                                 "ff_net": "affine"}
    inputs = {"x": np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)}
    reference = executor.run(executor.load_program(package), inputs)
    compressed = executor.run(executor.load_program(out), inputs)
    (name,) = reference
    assert 30 < psnr(reference[name], compressed[name]) < 100


def test_later_overrides_win_and_overrides_alone_compress(package: Path, tmp_path: Path):
    out = compress(package, tmp_path, {
        "weight_threshold": 512,
        "overrides": [
            {"pattern": "*attn1*", "palettize": {"nbits": 4}},
            {"pattern": "*to_k*", "palettize": {"nbits": 2}},
        ],
    })
    assert weight_forms(out) == {"time_embedding_linear": "float", "attn1_to_q": "lut16", "attn1_to_k": "lut4",
                                 "ff_net": "float"}


def test_overrides_win_over_a_mixed_bit_recipe(package: Path, tmp_path: Path):
    stored = tmp_path / "mixed.json"
    layers = {f"unet_{name}_weight_to_fp16": bits for name, bits in zip(LAYERS, (2, 4, 6, 8), strict=True)}
    MixedBitRecipe("unet", layers, 5.0).save(stored)
    out = compress(package, tmp_path, {
        "palettize": {"mixed": {"recipe": str(stored)}},
        "weight_threshold": 512,
        "overrides": [{"pattern": "*to_k*", "skip": True}],
    })
    assert weight_forms(out) == {"time_embedding_linear": "lut4", "attn1_to_q": "lut16", "attn1_to_k": "float",
                                 "ff_net": "lut256"}


def test_a_constant_shared_by_differently_compressed_ops_keeps_its_own_config(tmp_path: Path):
    """Const deduplication shares equal tensors between ops: here one zero vector is a LayerNorm's
    beta and a linear's bias, and only the linear's weight is palettized (as a random-weight SDXL
    UNet's mixed-bit recipe does; coremltools refused it as a config conflict)."""
    rng = np.random.default_rng(1)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, WIDTH))])
    def program(x):
        zeros = mb.const(val=np.zeros(WIDTH, np.float32), name="unet_norm_bias")
        x = mb.layer_norm(x=x, axes=[-1], gamma=np.ones(WIDTH, np.float32), beta=zeros, name="norm_op")
        weight = mb.const(val=rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 8, name="unet_attn1_to_q_weight")
        return mb.linear(x=x, weight=weight, bias=zeros, name="attn1_to_q_op")

    shared = tmp_path / "shared.mlpackage"
    ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
               compute_precision=ct.precision.FLOAT16, skip_model_load=True).save(str(shared))
    readers = {w.name: w.consumers for w in program_weights(shared)}
    assert len(readers["unet_norm_bias_to_fp16"]) == 2
    stored = tmp_path / "mixed.json"
    MixedBitRecipe("unet", {"unet_attn1_to_q_weight_to_fp16": 4}, 4.0).save(stored)
    out = compress(shared, tmp_path, {"palettize": {"mixed": {"recipe": str(stored)}}, "weight_threshold": 32})
    assert weight_forms(out) == {"attn1_to_q": "lut16"}
    x = {"x": rng.standard_normal((2, WIDTH)).astype(np.float32)}
    assert psnr(executor.run(shared, x)["attn1_to_q_op"], executor.run(out, x)["attn1_to_q_op"]) > 20


def test_a_mixed_bit_recipe_for_another_model_is_refused(package: Path, tmp_path: Path):
    stored = tmp_path / "mixed.json"
    MixedBitRecipe("unet", {"unet_conv_in_weight_to_fp16": 4}, 4.0).save(stored)
    with pytest.raises(ValueError, match="names 1 weights the package lacks, e.g. 'unet_conv_in_weight_to_fp16'"):
        compress(package, tmp_path, {"palettize": {"mixed": {"recipe": str(stored)}}})


def test_overrides_only_scheme_is_not_none():
    assert not Scheme.model_validate({"overrides": [{"pattern": "*", "palettize": {"nbits": 4}}]}).is_none
    assert Scheme.model_validate({"overrides": [{"pattern": "*", "skip": True}]}).is_none


RECIPE = f"""\
name: ok
source:
  path: {TINY_SOURCE}
target:
  repo: me/ok
compression:
  unet:
    palettize: {{nbits: 6}}
    overrides:
"""


@pytest.mark.parametrize(
    ("entry", "line", "message"),
    [
        ("- {pattern: '*attn*'}", 10,
         "compression.unet.overrides.0: give 'skip: true' or at least one of 'palettize', 'quantize', 'prune'"),
        ("- {pattern: '*attn*', palettize: {nbits: 5}}", 10,
         "compression.unet.overrides.0.palettize.nbits: 5 is not one of 1,2,3,4,6,8"),
        ("- {pattern: '*', palettize: {mixed: {target_bits: 4}}}", 10,
         "compression.unet.overrides.0: 'mixed' applies to a whole component, not to an override"),
        ("- {pattern: '*', quantize: {nbits: 4}}", 7,
         "compression.unet: palettize 6-bit kmeans + 1 override needs iOS18/macOS15;"
         " conversion.minimum_deployment_target is iOS16"),
    ],
)
def test_bad_override_message(tmp_path: Path, entry: str, line: int, message: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE + textwrap.indent(entry, "      ") + "\n")
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert str(raised.value) == f"{path}:{line}: {message}"
