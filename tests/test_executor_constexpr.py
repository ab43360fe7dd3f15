"""Constexpr decompression: bit-exact against coremltools' own materialization, every form and width.

Compressed programs come from coremltools.optimize.coreml applied to a small model; for every
constexpr op in the saved package, the executor's decompressed constant must equal, dtype and
bits, what coremltools' `materialized_val_inference` computes for that op.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

ct = pytest.importorskip("coremltools")
cto = pytest.importorskip("coremltools.optimize.coreml")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.optimize import _utils as optimize_utils  # noqa: E402

from publisher.executor import constexpr, load_program, run  # noqa: E402

TARGETS = {"iOS16": ct.target.iOS16, "iOS18": ct.target.iOS18}


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        # Shapes divisible by the group sizes and block sizes used below; above weight_threshold.
        "linear": rng.standard_normal((48, 64)).astype(np.float32),
        "conv": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
    }


def _base_model(target: str, precision: str):
    w = _weights()

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(2, 64)), mb.TensorSpec(shape=(1, 8, 6, 6))],
        opset_version=TARGETS[target],
    )
    def prog(x, image):
        return mb.linear(x=x, weight=w["linear"]), mb.conv(x=image, weight=w["conv"], pad_type="same")

    return ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=TARGETS[target],
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
    )


@pytest.fixture(scope="module")
def base_models() -> dict[tuple[str, str], object]:
    return {(t, p): _base_model(t, p) for t in TARGETS for p in ("fp16", "fp32")}


def _palettize(nbits: int, granularity: str = "per_tensor", mode: str = "uniform", **kw):
    def apply(model):
        config = cto.OpPalettizerConfig(mode=mode, nbits=nbits, granularity=granularity, weight_threshold=512, **kw)
        return cto.palettize_weights(model, cto.OptimizationConfig(global_config=config))

    return apply


def _quantize(dtype: str, mode: str = "linear_symmetric", granularity: str = "per_channel", **kw):
    def apply(model, joint: bool = False):
        config = cto.OpLinearQuantizerConfig(
            mode=mode, dtype=dtype, granularity=granularity, weight_threshold=512, **kw
        )
        return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=config), joint_compression=joint)

    return apply


def _prune(model):
    config = cto.OpMagnitudePrunerConfig(target_sparsity=0.6, weight_threshold=512)
    return cto.prune_weights(model, cto.OptimizationConfig(global_config=config))


def _joint(first, second):
    def apply(model):
        return second(first(model), joint=True)

    return apply


def _palettize_joint(nbits: int, **kw):
    def apply(model, joint: bool = True):
        config = cto.OpPalettizerConfig(mode="uniform", nbits=nbits, weight_threshold=512, **kw)
        return cto.palettize_weights(model, cto.OptimizationConfig(global_config=config), joint_compression=joint)

    return apply


CASES = {
    **{f"iOS16-lut-{n}bit": ("iOS16", _palettize(n), {"constexpr_lut_to_dense"}) for n in (1, 2, 4, 6, 8)},
    **{f"iOS18-lut-{n}bit": ("iOS18", _palettize(n), {"constexpr_lut_to_dense"}) for n in (1, 2, 3, 4, 6, 8)},
    **{
        f"iOS18-lut-{n}bit-grouped": (
            "iOS18",
            _palettize(n, "per_grouped_channel", group_size=4),
            {"constexpr_lut_to_dense"},
        )
        for n in (1, 2, 3, 4, 6, 8)
    },
    "iOS18-lut-4bit-vector": (
        "iOS18",
        _palettize(4, "per_grouped_channel", "kmeans", group_size=8, cluster_dim=2),
        {"constexpr_lut_to_dense"},
    ),
    "iOS18-lut-4bit-channel-scale": (
        "iOS18",
        _palettize(4, enable_per_channel_scale=True),
        {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"},
    ),
    "iOS16-affine-int8": ("iOS16", _quantize("int8"), {"constexpr_affine_dequantize"}),
    "iOS16-affine-uint8-asym": (
        "iOS16",
        _quantize("uint8", "linear", "per_tensor"),
        {"constexpr_affine_dequantize"},
    ),
    "iOS18-blockwise-int8": ("iOS18", _quantize("int8"), {"constexpr_blockwise_shift_scale"}),
    "iOS18-blockwise-int4-block8": (
        "iOS18",
        _quantize("int4", granularity="per_block", block_size=8),
        {"constexpr_blockwise_shift_scale"},
    ),
    "iOS18-blockwise-uint4-asym": (
        "iOS18",
        _quantize("uint4", "linear", "per_block", block_size=8),
        {"constexpr_blockwise_shift_scale"},
    ),
    "iOS18-blockwise-uint8-asym": (
        "iOS18",
        _quantize("uint8", "linear"),
        {"constexpr_blockwise_shift_scale"},
    ),
    "iOS16-sparse": ("iOS16", _prune, {"constexpr_sparse_to_dense"}),
    "iOS18-sparse": ("iOS18", _prune, {"constexpr_sparse_to_dense"}),
    **{
        f"iOS18-sparse+lut-{n}bit": (
            "iOS18",
            _joint(_prune, _palettize_joint(n)),
            {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"},
        )
        for n in (2, 4, 6)
    },
    "iOS18-sparse+int8": (
        "iOS18",
        _joint(_prune, _quantize("int8")),
        {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"},
    ),
    "iOS18-sparse+int4-block8": (
        "iOS18",
        _joint(_prune, _quantize("int4", granularity="per_block", block_size=8)),
        {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"},
    ),
    "iOS18-lut-4bit+int8-lut": (
        "iOS18",
        _joint(_palettize(4), _quantize("int8", granularity="per_tensor")),
        {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"},
    ),
}


def _materialized(var) -> np.ndarray:
    if var.val is not None:
        return var.val
    values = _coremltools_value(var.op)
    return values[var.op.outputs.index(var)]


def _coremltools_value(op) -> tuple[np.ndarray, ...]:
    """coremltools' own decompression of `op`, inputs that are constexpr outputs materialized first."""
    if op.op_type == "constexpr_lut_to_dense" and op.lut.val is None:
        # materialized_val_inference reads lut.val, which is None when the LUT is itself compressed.
        vector_axis = None if op.vector_axis is None else op.vector_axis.val
        value = type(op).decompress(op.indices.val, _materialized(op.lut), vector_axis)
    else:
        value = op.materialized_val_inference()
    return tuple(np.asarray(v) for v in (value if isinstance(value, tuple) else (value,)))


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_decompression_is_bit_exact(case, precision, base_models, tmp_path):
    target, compress, expected_ops = CASES[case]
    package = tmp_path / "compressed.mlpackage"
    compress(base_models[(target, precision)]).save(str(package))

    program = load_program(package)
    constexpr_ops = [op for op in program.function.operations if op.op_type.startswith("constexpr_")]
    assert expected_ops <= {op.op_type for op in constexpr_ops}, "compression did not emit the form under test"
    for op in constexpr_ops:
        for var, expected in zip(op.outputs, _coremltools_value(op), strict=True):
            ours = program.constants[var.name].numpy()
            if expected.dtype == np.uint8 and ours.dtype == np.bool_:
                ours = ours.astype(np.uint8)
            assert ours.dtype == expected.dtype, f"{op.op_type} {var.name}: dtype {ours.dtype} != {expected.dtype}"
            assert ours.shape == expected.shape, f"{op.op_type} {var.name}: shape {ours.shape} != {expected.shape}"
            ours_bits, expected_bits = (np.ascontiguousarray(v).view(np.uint8) for v in (ours, expected))
            same_bits = np.array_equal(ours_bits, expected_bits)
            assert same_bits, f"{op.op_type} {var.name} differs"


def test_compressed_program_runs_with_decompressed_weights(base_models, tmp_path):
    """The decompressed weights are the ones the ops consume: outputs match a numpy re-computation."""
    package = tmp_path / "lut.mlpackage"
    _palettize(6)(base_models[("iOS18", "fp32")]).save(str(package))
    program = load_program(package)
    dense = {
        tuple(op.outputs[0].shape): op.materialized_val_inference()
        for op in program.function.operations
        if op.op_type == "constexpr_lut_to_dense"
    }
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    image = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    out = run(program, {"x": x, "image": image})
    linear_out = next(v for v in out.values() if v.shape == (2, 48))
    np.testing.assert_allclose(linear_out, x @ dense[(48, 64)].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys_per_chunk", [1 << 18, 12])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8])
@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_packed_lut_decoding_matches_coremltools_unpacking(nbits, dtype, keys_per_chunk, monkeypatch):
    # Keys of several fields, groups of bytes holding whole keys and the chunking are all ours: every
    # width, counts that end inside a key and a group, and chunks that split the groups' keys.
    monkeypatch.setattr(constexpr, "_KEYS_PER_CHUNK", keys_per_chunk)
    rng = np.random.default_rng(nbits)
    for count in (1, 7, 1001):
        packed = rng.integers(0, 256, size=-(-count * nbits // 8), dtype=np.uint8)
        lut = (rng.standard_normal(2**nbits) * 50).astype(dtype)
        expected = lut[optimize_utils.restore_elements_from_packed_bits(packed, nbits, count)]
        dense = constexpr.lut_to_dense_ios16(packed, lut, np.array([count])).numpy()
        assert dense.dtype == expected.dtype
        np.testing.assert_array_equal(dense.view(np.uint8), expected.view(np.uint8))
