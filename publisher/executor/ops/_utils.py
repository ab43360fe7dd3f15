"""Helpers shared by several op families (axes, per-channel parameters, spatial padding)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from publisher.executor.errors import ExecutorError
from publisher.executor.ops.registry import OpArgs


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _per_channel(param: torch.Tensor, rank: int) -> torch.Tensor:
    """A [C] parameter shaped to broadcast along axis 1 of a rank-`rank` tensor."""
    return param.reshape([1, -1] + [1] * (rank - 2))


def _same_pads(
    pad_type: str,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[int, int]]:
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        effective = (k - 1) * d + 1
        total = max(0, s * math.ceil(size / s) - size + effective - s)
        small, large = total // 2, total - total // 2
        # `same` puts the odd element after, `same_lower` before (TF/ONNX SAME_UPPER/SAME_LOWER).
        pads.append((large, small) if pad_type == "same_lower" else (small, large))
    return pads


def _conv_pads(
    a: OpArgs, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[tuple[int, int]]:
    spatial = x.shape[2:]
    pad_type = a.str("pad_type", "valid")
    if pad_type == "custom":
        flat = a.ints("pad", [0] * 2 * len(spatial))
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(spatial))]
    if pad_type in ("same", "same_lower"):
        return _same_pads(pad_type, spatial, kernel, strides, dilations)
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    raise ExecutorError(f"unknown pad_type {pad_type!r}")


def _pad_spatial(x: torch.Tensor, pads: Sequence[tuple[int, int]], value: float = 0.0) -> torch.Tensor:
    # F.pad lists the last dimension first.
    flat = [p for pair in reversed(pads) for p in pair]
    return F.pad(x, flat, value=value) if any(flat) else x


def _fill_dtype(a: OpArgs) -> torch.dtype:
    dtype = a.out_dtypes[0]
    return torch.float32 if dtype.is_floating_point else dtype
