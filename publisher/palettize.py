"""Fast, near-exact k-means palettization plugged into coremltools' custom LUT hook.

coremltools 9.0's ``mode="kmeans"`` spends most of its time in ``np.unique`` over every element
of a weight tensor. Weights in an fp16 program have at most 65,536 distinct values, so this
module clusters the *weighted histogram* of a tensor instead: one ``np.bincount`` over the bit
patterns, an optimal-partition search over at most 65,536 sorted points, and one table lookup
per element for the indices.

The clustering (``kmeans_1d``) solves weighted 1-D k-means on the sorted distinct values. An
optimal partition is a set of contiguous runs, i.e. a dynamic program over boundary positions;
solving it exactly on 65,536 points takes 0.2-0.4 s per tensor even in compiled code (kmeans1d),
so the exact solver (the weighted kmeans1d that coremltools 9.0 ships) runs on about 8k
*micro-bins* instead: runs of points a fraction of an optimal cluster wide, cut by the
high-resolution optimal point density p(x)^(1/3), which leaves sparse tails as single points.
That fixes how many clusters each region of the distribution gets. A windowed search then
refines the boundaries on grids growing 4-fold down to single points: in each pass every
boundary may move within a window around its position, the best joint placement is an exact
min-plus DP over the windows, and passes repeat until one gains less than 1e-5 of the SSE; a
final "migration" pass also lets every boundary jump next to a neighbour or to the best split of
an adjacent cluster, moving a cluster between regions. Measured against an exact DP: within
1.0006x of the optimal SSE on normal, Student-t(3), Laplace, uniform, bimodal, discrete and small
(1k-25k element) tensors at 1-8 bits; within 1.005x on Cauchy tensors. ``tests/test_palettize.py``
holds the 1.001x contract.

Hook contract (coremltools 9.0, ``palettize_weights.grouped_channelwise_compress``): for every
weight (per tensor) or every channel group (per grouped channel; the group is the slice of the
weight with the channel axis swapped to axis 0), coremltools calls ``lut_function(w)`` with the
numpy array in the program's dtype and expects ``(lut, indices)``: ``lut`` of length exactly
``2**nbits`` (coremltools derives ``nbits = ceil(log2(len(lut)))`` and reshapes to that many
entries) in the weight's dtype, and ``indices`` holding ``w.size`` integers in C order of ``w``.
It stacks the groups, casts the indices to ``uint{nbits}`` and emits ``constexpr_lut_to_dense``
(iOS18: unpacked sub-byte indices plus an LUT of shape ``[..., 2**nbits, 1]``; iOS16/17:
per-tensor only, indices bit-packed LSB first into uint8 plus a ``shape``). The custom path runs
in-process (coremltools only uses a worker pool for ``mode="kmeans"``); the function returned by
``lut_function`` is still picklable.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from coremltools._deps.kmeans1d import _core as _kmeans1d_core
from coremltools.optimize.coreml import OpPalettizerConfig

from publisher.recipe import PALETTIZE_NBITS

# Finite fp16 bit patterns in ascending value order; -0.0 (0x8000) is folded into +0.0 so that a
# tensor of zeros has one distinct value.
_F16_ORDER = np.concatenate([np.arange(0xFBFF, 0x8000, -1), np.arange(0, 0x7C00)]).astype(np.intp)
_F16_SORTED = _F16_ORDER.astype(np.uint16).view(np.float16).astype(np.float64)
_F16_NEG_ZERO = 0x8000

# Threads that share a weight's channel groups.
_WORKERS = os.cpu_count() or 1
# A shard's searches hold about 40 bytes per element of its groups at once (histograms, prefix sums,
# DP tables), so a weight with thousands of groups (a language model's embedding) is solved a bounded
# shard at a time; the SD 1.5 UNet's largest weight (14.7 M elements) is cut in four.
_SHARD_ELEMENTS = 1 << 22

# coremltools 9.0 ships Apple's weighted build of kmeans1d (exact 1-D k-means in C++); it is
# called directly so that arrays cross without the Python-list conversion of its wrapper.
_KMEANS1D = ctypes.CDLL(_kmeans1d_core.__file__)
_KMEANS1D.cluster_with_weights.restype = None
_KMEANS1D.cluster_with_weights.argtypes = [
    np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS"),
    np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS"),
    ctypes.c_ulong,
    ctypes.c_ulong,
    np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS"),
    np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS"),
]

# Search schedule (see _optimal_partition). Exact k-means runs on about _MICRO_PER_CLUSTER micro-bins
# per cluster; the density estimate behind them averages runs of 2 * _SMOOTH + 1 points. The
# refinement grids grow _REFINE-fold per level; local windows span +-_HALF_WINDOW grid positions,
# migration windows +-_MIGRATION_HALF_WINDOW positions around a boundary and around each
# neighbour plus the best split points of the two clusters it separates.
_MICRO_PER_CLUSTER = 8
_SMOOTH = 2
_REFINE = 4
_HALF_WINDOW = 8
_MIGRATION_HALF_WINDOW = 4
# A pass that gains less than this fraction of the cost ends the search on a grid.
_TOLERANCE = 1e-5
_MAX_PASSES = 64


def kmeans_1d(values: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Weighted 1-D k-means of sorted distinct points.

    Args:
        values: strictly increasing finite points (any float dtype; computed in float64).
        weights: positive weight (count) of each point.
        k: number of clusters, >= 1.

    Returns:
        The ``min(k, len(values))`` cluster means (float64, ascending), from the partition found
        as described in the module docstring (exact when ``len(values) <= 8 * k``).
    """
    x = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if x.ndim != 1 or x.shape != w.shape or x.size == 0:
        raise ValueError("values and weights must be non-empty 1-D arrays of the same length")
    if not (np.all(np.diff(x) > 0) and np.all(w > 0)):
        raise ValueError("values must be strictly increasing and weights positive")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _kmeans_many([(x, w)], k)[0]


def _kmeans_many(problems: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[np.ndarray]:
    """:func:`kmeans_1d` of every ``(values, weights)`` problem, solved side by side (see _solve)."""
    centroids: list[np.ndarray] = [x.copy() for x, _ in problems]
    searched = [index for index, (x, _) in enumerate(problems) if x.size > k]
    starts = _solve([_optimal_partition(*problems[index], k) for index in searched])
    for index, first in zip(searched, starts, strict=True):
        x, w = problems[index]
        centroids[index] = np.add.reduceat(w * x, first) / np.add.reduceat(w, first)
    return centroids


def palettize(weight: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Palettize one weight tensor (or one channel group) to ``2**nbits`` entries.

    fp16 weights (what an fp16 ML program holds) go through the 65,536-bin histogram. Other
    dtypes (fp32 programs; int32 views of int8 data in joint compression) are clustered over their
    exact unique values with ``np.unique``: rounding fp32 weights to fp16 first would palettize
    a different tensor than the one the program stores. Integer LUTs are rounded to integers.

    Args:
        weight: finite numeric array of any shape.
        nbits: one of ``PALETTIZE_NBITS``.

    Returns:
        ``(lut, indices)``: ``lut`` has ``2**nbits`` entries in ``weight.dtype``, ascending; with
        fewer distinct values than entries it holds every value exactly and repeats the largest.
        ``indices`` is a flat uint8 array of ``weight.size`` entries in C order, each the index of
        the nearest LUT entry (after the LUT is cast to ``weight.dtype``).

    Raises:
        ValueError: a bad ``nbits``, an empty tensor, a non-numeric dtype, or inf/NaN values.
    """
    return palettize_groups([weight], nbits)[0]


def palettize_groups(groups: list[np.ndarray], nbits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`palettize` of every array in ``groups`` (a weight's channel groups), byte for byte.

    The groups run on all cores, and within a core their searches run side by side (see
    :func:`_solve`): a grouped weight has up to thousands of groups, and coremltools' own loop calls
    the LUT function once per group. They are solved in shards of at most ``_SHARD_ELEMENTS`` elements,
    so the searches' memory is bounded by the shard, not by the weight.

    Args:
        groups: finite numeric arrays, each palettized on its own.
        nbits: one of ``PALETTIZE_NBITS``.

    Returns:
        ``palettize(group, nbits)`` of each group, in order.

    Raises:
        ValueError: as :func:`palettize`, for any group.
    """
    if nbits not in PALETTIZE_NBITS:
        raise ValueError(f"nbits must be one of {PALETTIZE_NBITS}, got {nbits}")
    elements = sum(np.size(group) for group in groups)
    shard_count = max(min(len(groups), _WORKERS), -(-elements // _SHARD_ELEMENTS))
    shards = [list(shard) for shard in np.array_split(np.arange(len(groups)), max(1, shard_count)) if shard.size]
    if len(shards) < 2:
        return _palettize_shard(groups, nbits)
    # numpy and kmeans1d release the GIL in their loops, so threads share the cores; each shard
    # batches its own groups' window passes.
    with ThreadPoolExecutor(max_workers=min(len(shards), _WORKERS)) as pool:
        done = list(pool.map(lambda shard: _palettize_shard([groups[index] for index in shard], nbits), shards))
    return [palette for shard in done for palette in shard]


def _palettize_shard(groups: list[np.ndarray], nbits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    k = 1 << nbits
    histograms = [_Histogram.of(np.asarray(group)) for group in groups]
    centroids = _kmeans_many([(h.values, h.counts) for h in histograms if h.values.size > k], k)
    found = iter(centroids)
    return [h.palette(next(found) if h.values.size > k else None, k) for h in histograms]


# np.bincount and np.take first widen a uint16 index array to intp, 8 bytes an element, in memory; chunk
# by chunk the widened copy stays in cache. On a 14.7 M-element tensor: bincount 53 -> 24 ms, the
# index lookup 40 -> 15 ms (per-tensor palettization of the SD 1.5 UNet spends most of its time in them).
_COUNT_CHUNK = 1 << 20
_LOOKUP_CHUNK = 1 << 16


def _bincount16(patterns: np.ndarray) -> np.ndarray:
    """``np.bincount(patterns, minlength=65536)`` of uint16 ``patterns``."""
    counts = np.zeros(1 << 16, dtype=np.intp)
    for start in range(0, patterns.size, _COUNT_CHUNK):
        counts += np.bincount(patterns[start : start + _COUNT_CHUNK], minlength=1 << 16)
    return counts


def _lookup16(table: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """``np.take(table, patterns)`` of uint16 ``patterns``."""
    out = np.empty(patterns.size, dtype=table.dtype)
    for start in range(0, patterns.size, _LOOKUP_CHUNK):
        stop = start + _LOOKUP_CHUNK
        np.take(table, patterns[start:stop], out=out[start:stop])
    return out


class _Histogram:
    """The sorted distinct values of a tensor, their counts, and the way back to its elements."""

    def __init__(self, weight: np.ndarray, values: np.ndarray, counts: np.ndarray,
                 elements: Callable[[np.ndarray], np.ndarray]) -> None:
        self.dtype = weight.dtype
        self.values = values
        self.counts = counts
        # Maps the cluster of each distinct value to the cluster of each element (C order).
        self.elements = elements

    @classmethod
    def of(cls, weight: np.ndarray) -> _Histogram:
        if weight.size == 0:
            raise ValueError("cannot palettize an empty tensor")
        if weight.dtype == np.float16:
            patterns = np.ascontiguousarray(weight).view(np.uint16).reshape(-1)
            counts = _bincount16(patterns)
            if counts[0x7C00:0x8000].any() or counts[0xFC00:].any():
                raise ValueError("cannot palettize a tensor with inf or NaN values")
            counts[0] += counts[_F16_NEG_ZERO]
            sorted_counts = counts[_F16_ORDER]
            present = np.flatnonzero(sorted_counts)

            def elements(cluster: np.ndarray) -> np.ndarray:
                table = np.zeros(1 << 16, dtype=np.uint8)
                table[_F16_ORDER[present]] = cluster
                table[_F16_NEG_ZERO] = table[0]
                return _lookup16(table, patterns)

            return cls(weight, _F16_SORTED[present], sorted_counts[present], elements)
        if not np.issubdtype(weight.dtype, np.number) or np.iscomplexobj(weight):
            raise ValueError(f"cannot palettize a tensor of dtype {weight.dtype}")
        distinct, inverse, counts = np.unique(weight.reshape(-1), return_inverse=True, return_counts=True)
        if not np.isfinite(distinct).all():
            raise ValueError("cannot palettize a tensor with inf or NaN values")
        return cls(weight, distinct.astype(np.float64), counts, lambda cluster: cluster[inverse.reshape(-1)])

    def palette(self, centroids: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(lut, indices)`` from the k-means ``centroids`` (``None``: at most ``k`` distinct values)."""
        lut, cluster = self.table(centroids, k)
        return lut, self.elements(cluster)

    def table(self, centroids: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(lut, cluster)``: the LUT from ``centroids`` and the LUT entry of each distinct value."""
        values = self.values
        if centroids is None:
            lut = np.concatenate([values, np.full(k - values.size, values[-1])]).astype(self.dtype)
            return lut, np.arange(values.size, dtype=np.uint8)
        if np.issubdtype(self.dtype, np.integer):
            centroids = np.rint(centroids)
        lut = centroids.astype(self.dtype)
        # Assign against the LUT as stored, so rounding a centroid to dtype never leaves a value
        # mapped to an entry that is no longer its nearest.
        stored = lut.astype(np.float64)
        cluster = np.searchsorted((stored[:-1] + stored[1:]) / 2, values, side="left")
        return lut, cluster.astype(np.uint8)

    def squared_error(self, lut: np.ndarray, cluster: np.ndarray) -> float:
        """The sum over elements of (LUT entry - value)^2, from the distinct values and their counts."""
        return float(np.sum(self.counts * (lut.astype(np.float64)[cluster] - self.values) ** 2))


def palette_errors(weight: np.ndarray, widths: list[int]) -> list[tuple[np.ndarray, float]]:
    """For each of ``widths``: the LUT :func:`palettize` gives ``weight`` and its squared error.

    What a mixed-bit analysis needs of every weight at every width, from one histogram and without
    the indices: the error is summed over the distinct values weighted by their counts, a pass over
    at most 65,536 fp16 values instead of over the elements.

    Raises:
        ValueError: as :func:`palettize`.
    """
    for nbits in widths:
        if nbits not in PALETTIZE_NBITS:
            raise ValueError(f"nbits must be one of {PALETTIZE_NBITS}, got {nbits}")
    histogram = _Histogram.of(np.asarray(weight))
    errors = []
    for nbits in widths:
        k = 1 << nbits
        centroids = kmeans_1d(histogram.values, histogram.counts, k) if histogram.values.size > k else None
        lut, cluster = histogram.table(centroids, k)
        errors.append((lut, histogram.squared_error(lut, cluster)))
    return errors


def lut_function(nbits: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The ``lut_function`` for ``OpPalettizerConfig(mode="custom")`` at ``nbits`` bits.

    A ``functools.partial`` of :func:`palettize`, so it pickles by reference.
    """
    if nbits not in PALETTIZE_NBITS:
        raise ValueError(f"nbits must be one of {PALETTIZE_NBITS}, got {nbits}")
    return functools.partial(palettize, nbits=nbits)


def palettize_config(
    nbits: int,
    granularity: str = "per_tensor",
    group_size: int | None = None,
    channel_axis: int | None = None,
    weight_threshold: int = 2048,
) -> OpPalettizerConfig:
    """An ``OpPalettizerConfig`` that palettizes with :func:`palettize` through the custom hook.

    Args:
        nbits: bits per index, one of ``PALETTIZE_NBITS``.
        granularity: ``"per_tensor"`` (one LUT per weight) or ``"per_grouped_channel"`` (one LUT
            per ``group_size`` output channels; needs an iOS18/macOS15 deployment target, which
            coremltools checks when the pass runs).
        group_size: channels per group; only for ``per_grouped_channel`` (default 32 there).
            Weights whose channel count is not a multiple are left uncompressed by coremltools.
        channel_axis: axis the groups are cut along; ``None`` lets coremltools pick the output
            channel axis per op. Only for ``per_grouped_channel``.
        weight_threshold: weights with at most this many elements stay uncompressed.
    """
    if granularity not in ("per_tensor", "per_grouped_channel"):
        raise ValueError(f"granularity must be 'per_tensor' or 'per_grouped_channel', got {granularity!r}")
    if granularity == "per_tensor" and (group_size is not None or channel_axis is not None):
        raise ValueError("group_size and channel_axis only apply to granularity='per_grouped_channel'")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return OpPalettizerConfig(
        mode="custom",
        lut_function=lut_function(nbits),
        granularity=granularity,
        group_size=32 if group_size is None else group_size,
        channel_axis=channel_axis,
        weight_threshold=weight_threshold,
    )


class _MicroBins(NamedTuple):
    """A search's request: the exact weighted k-means labels of these sorted micro-bins."""

    means: np.ndarray
    mass: np.ndarray
    k: int


class _Windows(NamedTuple):
    """A search's request: the best boundaries among the candidates ``cand`` (see _window_passes)."""

    cand: np.ndarray
    prefix: np.ndarray


_Search = Generator[_MicroBins | _Windows, Any, np.ndarray]

# The batched window passes hold about this many bytes of DP tables at once.
_WINDOW_BATCH_BYTES = 1 << 26


def _solve(searches: list[_Search]) -> list[np.ndarray]:
    """Run every search to its result, serving their requests together.

    Each search's numbers are the ones it computes alone: the window passes of searches waiting on
    candidates of the same shape run as one batched DP, so a weight's channel groups cost a few
    hundred numpy calls per pass together instead of a few hundred each.
    """
    results: list[np.ndarray | None] = [None] * len(searches)
    waiting: dict[int, _MicroBins | _Windows] = {}

    def advance(index: int, answer: Any) -> None:
        try:
            waiting[index] = searches[index].send(answer)
        except StopIteration as finished:
            results[index] = finished.value

    for index in range(len(searches)):
        advance(index, None)
    while waiting:
        requests, waiting = waiting, {}
        micro = [index for index, request in requests.items() if isinstance(request, _MicroBins)]
        for index in micro:
            advance(index, _exact_kmeans(*requests[index]))
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, request in requests.items():
            if isinstance(request, _Windows):
                by_shape.setdefault(request.cand.shape, []).append(index)
        for (boundaries, width), indices in by_shape.items():
            batch = max(1, _WINDOW_BATCH_BYTES // (32 * boundaries * width * width))
            for first in range(0, len(indices), batch):
                chunk = indices[first:first + batch]
                answers = _window_passes(np.stack([requests[i].cand for i in chunk]),
                                         [requests[i].prefix for i in chunk])
                for index, answer in zip(chunk, answers, strict=True):
                    advance(index, answer)
    return results


def _optimal_partition(x: np.ndarray, w: np.ndarray, k: int) -> _Search:
    """Search for the start index of each of the ``k`` clusters of sorted points ``x`` (``len(x) > k``).

    A generator driven by :func:`_solve`: it yields its exact micro-bin k-means and its window
    passes as requests and returns the starts.
    """
    n = x.size
    total = w.sum()
    mean = (w * x).sum() / total
    scale = np.sqrt((w * (x - mean) ** 2).sum() / total)
    # Standardizing keeps the prefix sums of z**2 small, so cluster costs computed as
    # differences of prefix sums do not cancel catastrophically.
    z = (x - mean) / scale
    prefix = np.zeros((3, n + 1))
    np.cumsum(w, out=prefix[0, 1:])
    np.cumsum(w * z, out=prefix[1, 1:])
    np.cumsum(w * z * z, out=prefix[2, 1:])

    # Companded coordinate: cumulative p^(1/3), p estimated over runs of 2 * _SMOOTH + 1 points
    # (weight over span); optimal high-resolution clusters are about equally wide in it.
    span = x[np.minimum(np.arange(n) + _SMOOTH, n - 1)] - x[np.maximum(np.arange(n) - _SMOOTH, 0)]
    run = np.concatenate([[0.0], np.cumsum(w)])
    mass = run[np.minimum(np.arange(n) + _SMOOTH + 1, n)] - run[np.maximum(np.arange(n) - _SMOOTH, 0)]
    gap = np.empty(n)
    gap[1:-1] = (x[2:] - x[:-2]) / 2
    gap[0] = x[1] - x[0]
    gap[-1] = x[-1] - x[-2]
    density = np.zeros(n + 1)
    np.cumsum(np.cbrt(mass / span) * gap, out=density[1:])
    density /= density[-1]

    # Exact k-means of micro-bins (runs of points about 1/_MICRO_PER_CLUSTER of an optimal cluster
    # wide, single points where the data is sparse) fixes the global layout: how many clusters
    # each region of the distribution gets. The windowed search then only moves boundaries
    # locally. Few enough points are all clustered exactly.
    cells = _MICRO_PER_CLUSTER * k
    if n <= cells:
        edges = np.arange(n + 1)
    else:
        # Equal-rank cuts guarantee at least k micro-bins however concentrated the density is.
        edges = np.union1d(_grid(density, cells), np.arange(k + 1) * n // k)
    mass = np.add.reduceat(w, edges[:-1])
    labels = yield _MicroBins(np.add.reduceat(w * x, edges[:-1]) / mass, mass, k)
    bounds = edges[1:-1][labels[1:] != labels[:-1]]
    if edges.size == n + 1:
        return np.concatenate([[0], bounds])
    cost = _partition_cost(bounds, prefix)

    # The refinement grids mix in the point rank so that enough cells separate every point however
    # the density concentrates; a migration pass on the point grid catches a cluster the micro-bins
    # put in the wrong region.
    coord = (density + np.arange(n + 1) / n) / 2
    while True:
        cells *= _REFINE
        edges = _grid(coord, cells)
        final = edges.size == n + 1
        bounds, cost = yield from _settle(edges, bounds, cost, prefix, migrate=final)
        if final:
            return np.concatenate([[0], bounds])


def _partition_cost(bounds: np.ndarray, prefix: np.ndarray) -> float:
    """Total within-cluster sum of squares of the partition with inner boundaries ``bounds``."""
    full = np.concatenate([[0], bounds, [prefix.shape[1] - 1]])
    s0, s1, s2 = np.diff(prefix[:, full], axis=1)
    return float((s2 - s1 * s1 / s0).sum())


def _grid(coord: np.ndarray, cells: int) -> np.ndarray:
    """The distinct values of ``np.searchsorted(coord, np.arange(cells + 1) / cells)``: positions
    where the non-decreasing ``coord`` (in [0, 1]) crosses a multiple of ``1 / cells``.

    Computed in one pass over the points rather than one search per grid line, as the finest
    grids have more lines than points: position ``i`` is an edge when more lines lie at or below
    ``coord[i]`` than below ``coord[i - 1]``.
    """
    lines = np.floor(coord * cells)
    # One correction each way makes lines[i] the last line j with j / cells <= coord[i], with
    # j / cells rounded as the searched grid rounds it.
    lines += (lines + 1) / cells <= coord
    lines -= lines / cells > coord
    reached = np.concatenate([[-1.0], lines])
    return np.flatnonzero(reached[1:] > reached[:-1])


def _settle(
    edges: np.ndarray, bounds: np.ndarray, cost: float, prefix: np.ndarray, migrate: bool
) -> Generator[_Windows, tuple[np.ndarray, float], tuple[np.ndarray, float]]:
    """Improve ``bounds`` (of partition cost ``cost``) on the grid ``edges``.

    Local passes run until one gains less than _TOLERANCE; then, with ``migrate``, a migration
    pass, and local passes again if it gained.
    """
    n = prefix.shape[1] - 1
    for _ in range(_MAX_PASSES):
        bounds, new_cost = yield _Windows(_local(edges, bounds, n), prefix)
        if cost - new_cost <= _TOLERANCE * new_cost:
            if not migrate:
                return bounds, new_cost
            cost = new_cost
            bounds, new_cost = yield _Windows(_migration(edges, bounds, prefix), prefix)
            if cost - new_cost <= _TOLERANCE * new_cost:
                return bounds, new_cost
        cost = new_cost
    return bounds, cost


def _local(edges: np.ndarray, bounds: np.ndarray, n: int) -> np.ndarray:
    """Candidates of each inner boundary: itself and the grid positions within +-_HALF_WINDOW."""
    at = np.searchsorted(edges, bounds)[:, None] + np.arange(-_HALF_WINDOW, _HALF_WINDOW + 1)
    cand = np.concatenate([edges[np.clip(at, 0, edges.size - 1)], bounds[:, None]], axis=1)
    return np.clip(cand, 1, n - 1)


def _migration(edges: np.ndarray, bounds: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Candidates of each inner boundary for a pass that can move clusters between regions.

    Boundary ``j`` may stay near itself, move next to either neighbour, or take the best 2-means
    split point of either cluster it separates. One pass can thus shift a whole run of boundaries
    by one cluster (merging two clusters at one end of the run, splitting one at the other),
    which local windows cannot.
    """
    n = prefix.shape[1] - 1
    full = np.concatenate([[0], bounds, [n]])
    steps = np.arange(-_MIGRATION_HALF_WINDOW, _MIGRATION_HALF_WINDOW + 1)
    near = edges[np.clip(np.searchsorted(edges, full)[:, None] + steps, 0, edges.size - 1)]
    split = _best_splits(full, prefix)[:, None]
    cand = np.concatenate([near[:-2], near[1:-1], near[2:], split[:-1], split[1:], bounds[:, None]], axis=1)
    return np.clip(cand, 1, n - 1)


def _best_splits(full: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """For each cluster ``[full[c], full[c + 1])``, the split position minimizing the two halves' cost.

    A single-point cluster cannot be split; its start position is returned.
    """
    n = prefix.shape[1] - 1
    cluster = np.repeat(np.arange(full.size - 1), np.diff(full))
    start, stop = full[cluster], full[cluster + 1]
    at = prefix[:, :n]
    left = at - prefix[:, start]
    right = prefix[:, stop] - at
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = (left[2] - left[1] * left[1] / left[0]) + (right[2] - right[1] * right[1] / right[0])
    position = np.arange(n)
    cost[position == start] = np.inf
    best = np.minimum.reduceat(cost, full[:-1])
    first = np.where(cost == best[cluster], position, n)
    found = np.minimum.reduceat(first, full[:-1])
    return np.where(found < n, found, full[:-1])


def _window_passes(cand: np.ndarray, prefixes: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
    """For each search ``g``: the best joint choice of inner boundary ``j`` among the positions
    ``cand[g, j]``, and its cost.

    A min-plus DP along the boundaries, exact for the windows given, run for all searches at once
    (the loop is along the boundaries; every search adds only a leading axis to its arrays, so each
    search's numbers are those it would get alone).
    """
    searches, boundaries, width = cand.shape
    c0, c1, c2 = np.stack([prefix[:, positions] for prefix, positions in zip(prefixes, cand, strict=True)], axis=1)
    # steps[g, j, b, a]: cost of the cluster between candidate a of boundary j and candidate b of
    # boundary j + 1, laid out so that the minimum over a runs along the contiguous axis.
    # (s2 - s1 * s1 / s0) of each cluster, computed in place: these tables are most of a pass's time.
    steps = c2[:, 1:, :, None] - c2[:, :-1, None, :]
    spread = c1[:, 1:, :, None] - c1[:, :-1, None, :]
    np.multiply(spread, spread, out=spread)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(spread, c0[:, 1:, :, None] - c0[:, :-1, None, :], out=spread)
    np.subtract(steps, spread, out=steps)
    np.copyto(steps, np.inf, where=cand[:, 1:, :, None] <= cand[:, :-1, None, :])
    best = c2[:, 0] - c1[:, 0] * c1[:, 0] / c0[:, 0]
    choice = np.empty(steps.shape[:3], dtype=np.intp)
    for j in range(boundaries - 1):
        step = steps[:, j]
        step += best[:, None, :]
        choice[:, j] = step.argmin(axis=2)
        best = np.take_along_axis(step, choice[:, j, :, None], axis=2)[:, :, 0]
    t0, t1, t2 = np.stack([prefix[:, -1, None] - prefix[:, positions[-1]]
                           for prefix, positions in zip(prefixes, cand, strict=True)], axis=1)
    best += t2 - t1 * t1 / t0
    sel = np.empty((searches, boundaries), dtype=np.intp)
    sel[:, -1] = best.argmin(axis=1)
    every = np.arange(searches)
    for j in range(boundaries - 2, -1, -1):
        sel[:, j] = choice[every, j, sel[:, j + 1]]
    chosen = np.take_along_axis(cand, sel[:, :, None], axis=2)[:, :, 0]
    return [(chosen[g], float(best[g, sel[g, -1]])) for g in range(searches)]


def _exact_kmeans(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Cluster label of each sorted point: exact weighted 1-D k-means, ``len(x) > k``."""
    labels = np.empty(x.size, dtype=np.uint64)
    centroids = np.empty(k, dtype=np.float64)
    _KMEANS1D.cluster_with_weights(
        np.ascontiguousarray(x, dtype=np.float64),
        np.ascontiguousarray(w, dtype=np.float64),
        x.size,
        k,
        labels,
        centroids,
    )
    return labels
