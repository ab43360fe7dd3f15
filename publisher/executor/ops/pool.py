"""Pooling (MIL pool)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from publisher.executor.ops._utils import _conv_pads, _pad_spatial
from publisher.executor.ops.registry import OpArgs, Result, register


def _pool_pads(a: OpArgs, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    return _conv_pads(a, x, kernel, strides, [1] * len(kernel))


_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _sum_pool(x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], ceil_mode: bool) -> torch.Tensor:
    return _AVG[len(kernel)](x, kernel, strides, 0, ceil_mode, True) * math.prod(kernel)


@register("avg_pool")
def avg_pool(a: OpArgs) -> Result:
    x = a["x"]
    kernel = a.ints("kernel_sizes")
    strides = a.ints("strides", [1] * len(kernel))
    ceil_mode = a.bool("ceil_mode")
    pads = _pool_pads(a, x, kernel, strides)
    padded = _pad_spatial(x, pads)
    if not a.bool("exclude_padding_from_average") or not any(p for pair in pads for p in pair):
        return _AVG[len(kernel)](padded, kernel, strides, 0, ceil_mode, True)
    ones = _pad_spatial(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype), pads)
    return _sum_pool(padded, kernel, strides, ceil_mode) / _sum_pool(ones, kernel, strides, ceil_mode)


@register("max_pool")
def max_pool(a: OpArgs) -> Result:
    x = a["x"]
    kernel = a.ints("kernel_sizes")
    strides = a.ints("strides", [1] * len(kernel))
    padded = _pad_spatial(x, _pool_pads(a, x, kernel, strides), value=-math.inf)
    return _MAX[len(kernel)](padded, kernel, strides, 0, 1, a.bool("ceil_mode"))


@register("l2_pool")
def l2_pool(a: OpArgs) -> Result:
    x = a["x"]
    kernel = a.ints("kernel_sizes")
    strides = a.ints("strides", [1] * len(kernel))
    padded = _pad_spatial(x, _pool_pads(a, x, kernel, strides))
    return torch.sqrt(_sum_pool(padded.square(), kernel, strides, a.bool("ceil_mode")))
