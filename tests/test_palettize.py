"""The histogram palettizer against an exact 1-D k-means optimum, and through coremltools end to end."""

from __future__ import annotations

import itertools
import os
import pickle
import tracemalloc
from collections.abc import Callable

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
from coremltools.optimize import _utils as coremltools_utils
from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

from publisher import palettize as palettize_module
from publisher.coremltools_fixes import install_coremltools_fixes, pack_bits
from publisher.palettize import (
    _grid,
    kmeans_1d,
    lut_function,
    palette_errors,
    palettize,
    palettize_config,
    palettize_groups,
)
from publisher.recipe import PALETTIZE_NBITS

# Taken at collection, before any test installs the packing fix.
COREMLTOOLS_PACK = coremltools_utils.pack_elements_into_bits

SSE_RATIO = 1.001


def optimal_centroids(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Exact weighted 1-D k-means (sorted distinct ``x``) by dynamic programming.

    D[j][i] = min over m of D[j-1][m] + cost(m, i); the argmin is monotone in i, so each layer is
    solved by divide and conquer, one numpy pass per recursion depth. Independent of the module
    under test (which uses kmeans1d and a windowed search).
    """
    n = x.size
    if n <= k:
        return x.copy()
    z = (x - np.average(x, weights=w)) / (np.ptp(x) or 1.0)
    q0, q1, q2 = (np.concatenate([[0.0], np.cumsum(w * z**p)]) for p in range(3))

    def cost(m: np.ndarray, i: np.ndarray) -> np.ndarray:
        s0, s1 = q0[i] - q0[m], q1[i] - q1[m]
        return (q2[i] - q2[m]) - s1 * s1 / s0

    positions = np.arange(n + 1)
    layer = np.full(n + 1, np.inf)
    layer[1:] = cost(np.zeros(n, dtype=np.intp), positions[1:])
    argmins = []
    for j in range(2, k + 1):
        new, arg = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=np.intp)
        segments = np.array([[j, n, j - 1, n - 1]])  # rows lo, hi, opt_lo, opt_hi
        while segments.size:
            lo, hi, opt_lo, opt_hi = segments.T
            mid = (lo + hi) // 2
            hi_cand = np.minimum(opt_hi, mid - 1)
            lengths = hi_cand - opt_lo + 1
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            seg = np.repeat(np.arange(len(segments)), lengths)
            m = opt_lo[seg] + np.arange(lengths.sum()) - offsets[seg]
            values = layer[m] + cost(m, mid[seg])
            best = np.minimum.reduceat(values, offsets)
            first = np.where(values == best[seg], np.arange(values.size), values.size)
            best_m = m[np.minimum.reduceat(first, offsets)]
            new[mid], arg[mid] = best, best_m
            segments = np.concatenate(
                [
                    np.stack([lo, mid - 1, opt_lo, best_m], 1)[lo <= mid - 1],
                    np.stack([mid + 1, hi, best_m, opt_hi], 1)[mid + 1 <= hi],
                ]
            )
        argmins.append(arg)
        layer = new
    bounds = [n]
    for arg in reversed(argmins):
        bounds.append(arg[bounds[-1]])
    starts = np.array([0, *reversed(bounds[1:])])
    return np.add.reduceat(w * x, starts) / np.add.reduceat(w, starts)


def weighted_sse(x: np.ndarray, w: np.ndarray, centroids: np.ndarray) -> float:
    """SSE of the points against their nearest centroid (centroids sorted)."""
    nearest = centroids[np.searchsorted((centroids[:-1] + centroids[1:]) / 2, x)]
    return float(np.sum(w * (x - nearest) ** 2))


def histogram(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, counts = np.unique(weight.astype(np.float64).ravel(), return_counts=True)
    return values, counts.astype(np.float64)


def reconstruction_sse(weight: np.ndarray, lut: np.ndarray, indices: np.ndarray) -> float:
    return float(np.sum((lut[indices].astype(np.float64) - weight.astype(np.float64).ravel()) ** 2))


def optimal_sse(weight: np.ndarray, nbits: int) -> float:
    """SSE of the exact optimum once its centroids are stored in the weight's dtype."""
    x, w = histogram(weight)
    stored = optimal_centroids(x, w, 1 << nbits).astype(weight.dtype).astype(np.float64)
    return weighted_sse(x, w, stored)


def tensor(kind: str, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = {
        "normal": lambda: rng.standard_normal(size) * 0.02,
        "student_t3": lambda: rng.standard_t(3, size) * 0.02,
        "laplace": lambda: rng.laplace(size=size) * 0.02,
        "uniform": lambda: rng.uniform(-0.03, 0.03, size),
        "bimodal": lambda: np.where(
            rng.random(size) < 0.25, rng.normal(-0.05, 0.01, size), rng.normal(0.05, 0.002, size)
        ),
    }[kind]()
    return values.astype(np.float16)


def test_oracle_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(40):
        n, k = int(rng.integers(2, 9)), int(rng.integers(1, 5))
        x = np.sort(rng.choice(200, n, replace=False)).astype(np.float64)
        w = rng.integers(1, 6, n).astype(np.float64)
        best = weighted_sse(x, w, x) if n <= k else np.inf
        for cuts in itertools.combinations(range(1, n), min(k, n) - 1):
            starts = np.array([0, *cuts])
            means = np.add.reduceat(w * x, starts) / np.add.reduceat(w, starts)
            labels = np.repeat(np.arange(starts.size), np.diff(np.append(starts, n)))
            best = min(best, float(np.sum(w * (x - means[labels]) ** 2)))
        assert weighted_sse(x, w, optimal_centroids(x, w, k)) == pytest.approx(best, rel=1e-9, abs=1e-9)


# These tensors hold 1,600-15,000 distinct fp16 values; all but the 8-bit bimodal one have more than
# the 8 micro-bins per cluster that are clustered exactly, so they go through the windowed search.
# 8 bits use a quarter of the elements to keep the oracle's exact DP fast.
@pytest.mark.parametrize("kind", ["normal", "student_t3", "laplace", "uniform", "bimodal"])
@pytest.mark.parametrize("nbits", PALETTIZE_NBITS)
def test_sse_within_0_1_percent_of_optimum(kind, nbits):
    weight = tensor(kind, 1 << (14 if nbits == 8 else 16)).reshape(128, -1)
    lut, indices = palettize(weight, nbits)
    assert lut.dtype == np.float16 and lut.shape == (1 << nbits,)
    assert indices.dtype == np.uint8 and indices.shape == (weight.size,)
    assert np.all(np.diff(lut.astype(np.float64)) >= 0)
    assert reconstruction_sse(weight, lut, indices) <= SSE_RATIO * optimal_sse(weight, nbits)


@pytest.mark.parametrize("kind", ["normal", "student_t3", "uniform"])
def test_kmeans_1d_centroids_within_0_1_percent(kind):
    x, w = histogram(tensor(kind, 1 << 16, seed=3))
    for k in (8, 64):
        ours = kmeans_1d(x, w, k)
        assert ours.shape == (k,) and np.all(np.diff(ours) > 0)
        assert weighted_sse(x, w, ours) <= SSE_RATIO * weighted_sse(x, w, optimal_centroids(x, w, k))


def test_indices_point_at_the_nearest_entry():
    weight = tensor("student_t3", 20000, seed=5)
    lut, indices = palettize(weight, 4)
    distance = np.abs(weight.astype(np.float64)[:, None] - lut.astype(np.float64)[None, :])
    assert np.array_equal(distance[np.arange(weight.size), indices], distance.min(axis=1))


@pytest.mark.parametrize("nbits", PALETTIZE_NBITS)
def test_few_distinct_values_are_stored_exactly(nbits):
    rng = np.random.default_rng(nbits)
    palette = np.sort(rng.choice(np.arange(-500, 500), min(1 << nbits, 37), replace=False)) / 256
    weight = rng.choice(palette, (64, 96)).astype(np.float16)
    lut, indices = palettize(weight, nbits)
    assert np.array_equal(lut[indices].reshape(weight.shape), weight)
    distinct = np.unique(weight)
    assert np.array_equal(lut[: distinct.size], distinct)
    assert np.all(lut[distinct.size :] == distinct[-1])


def test_constant_and_signed_zero_tensors():
    lut, indices = palettize(np.full((50, 70), -0.375, dtype=np.float16), 6)
    assert np.all(lut == np.float16(-0.375)) and not indices.any()
    zeros = np.zeros(4096, dtype=np.float16)
    zeros[::2] = -0.0
    lut, indices = palettize(zeros, 2)
    assert np.all(lut == 0) and not indices.any()
    mixed = np.array([-0.0, 0.0, 1.0, -1.0] * 1000, dtype=np.float16)
    lut, indices = palettize(mixed, 2)
    assert np.array_equal(lut[indices], mixed) and lut.size == 4


def test_non_finite_and_bad_arguments_are_rejected():
    weight = tensor("normal", 4096)
    for bad in (np.inf, -np.inf, np.nan):
        broken = weight.copy()
        broken[7] = bad
        with pytest.raises(ValueError, match="inf or NaN"):
            palettize(broken, 4)
        with pytest.raises(ValueError, match="inf or NaN"):
            palettize(broken.astype(np.float32), 4)
    for nbits in (0, 5, 7, 16):
        with pytest.raises(ValueError, match="nbits"):
            palettize(weight, nbits)
        with pytest.raises(ValueError, match="nbits"):
            palettize_config(nbits)
    with pytest.raises(ValueError, match="strictly increasing"):
        kmeans_1d(np.array([1.0, 1.0, 2.0]), np.ones(3), 2)


def test_float32_weights_are_clustered_over_their_own_values():
    weight = tensor("laplace", 30000, seed=2).astype(np.float32) + np.float32(1e-6)
    lut, indices = palettize(weight, 6)
    assert lut.dtype == np.float32
    assert reconstruction_sse(weight, lut, indices) <= SSE_RATIO * optimal_sse(weight, 6)


def test_integer_weights_get_an_integer_lut():
    weight = np.random.default_rng(4).integers(-128, 128, 5000).astype(np.int32)
    lut, indices = palettize(weight, 4)
    assert lut.dtype == np.int32
    assert reconstruction_sse(weight, lut, indices) <= 1.05 * optimal_sse(weight.astype(np.float64), 4)


def test_deterministic_and_picklable():
    weight = tensor("student_t3", 1 << 16, seed=9).reshape(128, 512)
    function = lut_function(6)
    first = function(weight)
    again = pickle.loads(pickle.dumps(function))(weight.copy())
    assert first[0].tobytes() == again[0].tobytes() and first[1].tobytes() == again[1].tobytes()
    # A non-contiguous view (what coremltools passes for groups cut along another axis).
    view = weight.T.copy().T
    assert not view.flags.c_contiguous
    assert palettize(view, 6)[1].tobytes() == first[1].tobytes()


def test_config_wires_the_custom_hook():
    config = palettize_config(4, granularity="per_grouped_channel", group_size=16, weight_threshold=100)
    assert isinstance(config, OpPalettizerConfig)
    assert config.mode == "CUSTOM" and config.nbits is None and config.group_size == 16
    assert config.weight_threshold == 100
    weight = tensor("normal", 4096)
    assert config.lut_function(weight)[0].tobytes() == palettize(weight, 4)[0].tobytes()
    with pytest.raises(ValueError, match="per_grouped_channel"):
        palettize_config(4, group_size=16)
    with pytest.raises(ValueError, match="granularity"):
        palettize_config(4, granularity="per_channel")


def test_grouped_channels_through_coremltools_blockwise_compress():
    from coremltools.optimize.coreml._quantization_passes import palettize_weights as palettize_pass

    weight = tensor("student_t3", 64 * 300, seed=11).reshape(64, 300)
    params = palettize_pass.blockwise_compress(weight, "CUSTOM", None, [16, 0], lut_function(4))
    assert params.lut.shape == (4, 1, 16, 1) and params.indices.shape == weight.shape
    for group in range(4):
        rows = weight[16 * group : 16 * (group + 1)]
        lut, indices = palettize(rows, 4)
        assert np.array_equal(params.lut[group, 0, :, 0], lut)
        assert np.array_equal(params.indices[16 * group : 16 * (group + 1)].ravel(), indices)
        assert reconstruction_sse(rows, lut, indices) <= SSE_RATIO * optimal_sse(rows, 4)


@pytest.mark.parametrize("nbits", [1, 4, 6, 8])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_groups_palettized_together_equal_groups_palettized_alone(nbits, dtype):
    rng = np.random.default_rng(nbits)
    groups = [(rng.standard_t(3, (8, 700)) * 0.01).astype(dtype) for _ in range(6)]
    groups += [np.full((8, 700), 0.5, dtype), (rng.standard_normal((8, 700)) * 0.02).astype(dtype)]
    together = palettize_groups(groups, nbits)
    assert palettize_groups([], nbits) == []
    for group, (lut, indices) in zip(groups, together, strict=True):
        alone = palettize(group, nbits)
        assert lut.dtype == alone[0].dtype and lut.tobytes() == alone[0].tobytes()
        assert indices.tobytes() == alone[1].tobytes()


def _traced_peak(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_weight_of_many_groups_is_palettized_in_bounded_memory(monkeypatch):
    # A language model's embedding has thousands of channel groups: solved all at once, their searches
    # held about 40 bytes per element of the weight (Qwen 2.5 1.5B's 0.47 GB embedding: 10.7 GB).
    rng = np.random.default_rng(21)
    weight = (rng.standard_normal((4 * 48 * 8, 512)) * 0.02).astype(np.float16)
    few, many = np.split(weight[: 48 * 8], 48), np.split(weight, 4 * 48)
    monkeypatch.setattr(palettize_module, "_SHARD_ELEMENTS", 16 * 8 * 512)
    assert _traced_peak(lambda: palettize_groups(many, 4)) < 1.5 * _traced_peak(lambda: palettize_groups(few, 4))
    sharded = palettize_groups(many, 4)
    monkeypatch.setattr(palettize_module, "_SHARD_ELEMENTS", weight.size)
    for (lut, indices), (whole_lut, whole_indices) in zip(sharded, palettize_groups(many, 4), strict=True):
        assert lut.tobytes() == whole_lut.tobytes() and indices.tobytes() == whole_indices.tobytes()


@pytest.mark.parametrize("weight", [
    tensor("student_t3", 40_000, seed=14),
    tensor("normal", 5000, seed=15).astype(np.float32),
    np.random.default_rng(16).integers(-128, 128, 3000).astype(np.int32),
    np.array([0.5, -0.0, 0.0, 0.5, 1.5] * 20, dtype=np.float16),
], ids=["fp16", "fp32", "int32", "few-values"])
def test_palette_errors_are_the_palettes_element_errors(weight):
    widths = [8, 6, 4, 2, 1]
    for nbits, (lut, error) in zip(widths, palette_errors(weight, widths), strict=True):
        expected_lut, indices = palettize(weight, nbits)
        assert lut.dtype == expected_lut.dtype and lut.tobytes() == expected_lut.tobytes()
        elementwise = float(np.sum((lut[indices].astype(np.float64) - weight.reshape(-1).astype(np.float64)) ** 2))
        assert error == pytest.approx(elementwise, rel=1e-9, abs=1e-300)


def test_grouped_fix_hands_coremltools_the_same_bytes_in_one_call(monkeypatch):
    from coremltools.optimize.coreml._quantization_passes import palettize_weights as palettize_pass

    from publisher import coremltools_fixes

    install_coremltools_fixes()
    assert palettize_pass.grouped_channelwise_compress is coremltools_fixes.grouped_channelwise_compress
    calls = []
    monkeypatch.setattr(coremltools_fixes, "palettize_groups",
                        lambda groups, nbits: calls.append(len(groups)) or palettize_groups(groups, nbits))
    weight = tensor("student_t3", 48 * 5 * 64, seed=12).reshape(5, 48, 64)
    for axis in (1, -2):
        fixed = palettize_pass.grouped_channelwise_compress(weight, "CUSTOM", None, axis, 16, lut_function(6))
        per_group = coremltools_fixes._COREMLTOOLS_GROUPED(weight, "CUSTOM", None, axis, 16, lut_function(6))
        assert fixed.lut.tobytes() == per_group.lut.tobytes() and fixed.lut.shape == per_group.lut.shape
        assert fixed.indices.tobytes() == per_group.indices.tobytes() and fixed.indices.dtype == per_group.indices.dtype
    assert calls == [3, 3]
    # What coremltools refuses it still refuses, in its own words.
    assert palettize_pass.blockwise_compress(weight, "CUSTOM", None, [0, 20, 0], lut_function(6)) is None
    assert calls == [3, 3]


def test_grid_is_the_searched_grid():
    rng = np.random.default_rng(5)
    # Powers of two (what the search uses) and others, whose lines j / cells round.
    sizes = [(10, 4), (100, 512), (1000, 2048), (3000, 131072), (257, 256), (500, 1000), (300, 49), (2000, 7777)]
    for n, cells in sizes:
        coord = np.concatenate([[0.0], np.sort(rng.random(n - 1)), [1.0]])
        lines = rng.integers(1, cells, 40) / cells
        # Values on grid lines and one step either side of them.
        coord[rng.integers(1, n, 120)] = np.concatenate([lines, np.nextafter(lines, 0), np.nextafter(lines, 1)])
        coord.sort()
        for case in (coord, np.repeat(coord, 2)):  # and repeated values
            searched = np.searchsorted(case, np.arange(cells + 1) / cells)
            assert np.array_equal(_grid(case, cells), np.unique(searched))


def test_chunked_histogram_and_lookup_equal_whole_array_ones(monkeypatch):
    # Chunks of 1,000 and 700 elements over 10,007: several full chunks and a short last one.
    rng = np.random.default_rng(11)
    weight = (rng.standard_t(3, 10_007) * 0.02).astype(np.float16)
    weight[:5] = [0.0, -0.0, 65504.0, -65504.0, 2.0**-24]
    whole = palettize(weight, 6)
    monkeypatch.setattr(palettize_module, "_COUNT_CHUNK", 1_000)
    monkeypatch.setattr(palettize_module, "_LOOKUP_CHUNK", 700)
    chunked = palettize(weight, 6)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1], whole[1])
    patterns = weight.view(np.uint16)
    np.testing.assert_array_equal(palettize_module._bincount16(patterns), np.bincount(patterns, minlength=1 << 16))
    table = rng.integers(0, 64, 1 << 16).astype(np.uint8)
    np.testing.assert_array_equal(palettize_module._lookup16(table, patterns), np.take(table, patterns))


def unpack_lsb_first(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    bits = np.unpackbits(packed, bitorder="little")[: count * nbits].reshape(count, nbits)
    return bits.astype(np.int64) @ (1 << np.arange(nbits))


@pytest.mark.parametrize("nbits", range(1, 9))
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int32])
def test_pack_bits_gives_coremltools_bytes(nbits, dtype):
    assert COREMLTOOLS_PACK.__module__ == "coremltools.optimize._utils"
    signed = np.issubdtype(dtype, np.signedinteger)
    low, high = (-(1 << (nbits - 1)), 1 << (nbits - 1)) if signed else (0, 1 << nbits)
    rng = np.random.default_rng(nbits)
    for count in (1, 2, 3, 5, 7, 8, 9, 13, 24, 1001):
        elements = rng.integers(low, high, count).astype(dtype)
        elements[0] = low  # both ends of the range, whatever the draw
        elements[-1] = high - 1
        packed = pack_bits(elements.reshape(1, -1) if count % 2 else elements, nbits)
        assert packed.dtype == np.uint8 and packed.size == -(-count * nbits // 8)
        assert np.array_equal(packed, COREMLTOOLS_PACK(elements, nbits))
        unsigned = unpack_lsb_first(packed, nbits, count)
        assert np.array_equal(np.where(unsigned >= high, unsigned - (1 << nbits), unsigned), elements)


def test_pack_bits_refuses_what_coremltools_refuses():
    with pytest.raises(ValueError, match="integers"):
        pack_bits(np.zeros(4, np.float16), 4)
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        pack_bits(np.array([0, 64], np.uint8), 6)
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        pack_bits(np.array([-5, 0], np.int8), 3)


def test_packing_fix_reaches_the_palettization_pass():
    install_coremltools_fixes()
    assert coremltools_utils.pack_elements_into_bits is pack_bits
    lut = np.arange(64, dtype=np.float16).reshape(1, 1, 64, 1)
    indices = np.random.default_rng(0).integers(0, 64, (8, 4)).astype(np.uint8)
    params = coremltools_utils.LutParams(indices=indices, lut=lut, vector_axis=None)
    ios16 = coremltools_utils.ios18_lut_params_to_ios16(params)
    assert np.array_equal(ios16.indices, COREMLTOOLS_PACK(indices, 6))


@pytest.mark.parametrize(
    ("target", "granularity", "nbits"),
    [
        (ct.target.iOS16, "per_tensor", 6),
        (ct.target.iOS18, "per_tensor", 3),
        (ct.target.iOS18, "per_grouped_channel", 6),
    ],
)
def test_saved_package_holds_our_lut_and_indices(tmp_path, target, granularity, nbits):
    linear = tensor("normal", 256 * 512, seed=1).reshape(256, 512)
    conv = tensor("student_t3", 64 * 256 * 9, seed=2).reshape(64, 256, 3, 3)
    small = tensor("normal", 32 * 64, seed=3).reshape(32, 64)  # below the 2048-element threshold

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, 512)), mb.TensorSpec(shape=(1, 256, 8, 8)), mb.TensorSpec(shape=(1, 64))],
        opset_version=target,
    )
    def program(x, y, z):
        # fp32 constants: the conversion's fp16 pass rounds them back to exactly these fp16 values.
        return (
            mb.linear(x=x, weight=linear.astype(np.float32)),
            mb.conv(x=y, weight=conv.astype(np.float32), pad_type="same"),
            mb.linear(x=z, weight=small.astype(np.float32)),
        )

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target)
    group_size = 16 if granularity == "per_grouped_channel" else None
    config = OptimizationConfig(global_config=palettize_config(nbits, granularity, group_size=group_size))
    path = tmp_path / "model.mlpackage"
    palettize_weights(model, config).save(str(path))

    weights_dir = path / "Data" / "com.apple.CoreML" / "weights"
    spec = ct.utils.load_spec(str(path))
    program_back = load_milproto(spec, spec.specificationVersion, str(weights_dir))
    ops = [op for op in program_back.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(ops) == 2
    for op, original in zip(ops, (linear, conv), strict=True):
        groups = original.shape[0] // (group_size or original.shape[0])
        if target == ct.target.iOS16:
            assert tuple(op.shape.val) == original.shape
            stored_lut = op.lut.val[None]
            stored_indices = unpack_lsb_first(op.indices.val, nbits, original.size).reshape(original.shape)
        else:
            assert op.lut.val.shape == (groups, *[1] * (original.ndim - 1), 1 << nbits, 1)
            stored_lut = op.lut.val.reshape(groups, 1 << nbits)
            stored_indices = op.indices.val
        rows = original.shape[0] // groups
        for group in range(groups):
            chunk = original[group * rows : (group + 1) * rows]
            lut, indices = palettize(chunk, nbits)
            assert np.array_equal(stored_lut[group], lut)
            assert np.array_equal(stored_indices[group * rows : (group + 1) * rows].ravel(), indices)
            assert np.array_equal(
                stored_lut[group][stored_indices[group * rows : (group + 1) * rows]], lut[indices].reshape(chunk.shape)
            )

    # weight.bin: packed indices, one fp16 LUT per tensor or group, and the small weight in fp16.
    luts = 256 // 16 + 64 // 16 if group_size else 2
    expected = (linear.size + conv.size) * nbits / 8 + luts * (1 << nbits) * 2 + small.size * 2
    assert abs(os.path.getsize(weights_dir / "weight.bin") - expected) <= 0.01 * expected
