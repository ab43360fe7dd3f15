"""Reductions (MIL reduction)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from publisher.executor.ops._utils import _axis
from publisher.executor.ops.registry import OpArgs, Result, register


def _reduce_axes(a: OpArgs, x: torch.Tensor) -> list[int]:
    axes = a.value("axes")
    if axes is None:
        return list(range(x.dim()))
    return sorted({_axis(int(ax), x.dim()) for ax in np.asarray(axes).reshape(-1)})


_SINGLE_KERNEL_REDUCTIONS = {"reduce_sum", "reduce_mean", "reduce_max", "reduce_min"}


def _reduction(op_type: str, fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> None:
    def reduce(a: OpArgs) -> Result:
        x = a["x"]
        return fn(x, _reduce_axes(a, x), a.bool("keep_dims"))

    reduce.__name__ = op_type
    # Single-kernel reductions accumulate half inputs in fp32; composite ones (l2 = sqrt of a sum of
    # squares, ...) would round between their steps, so they get fp32 inputs.
    register(op_type, native_half=op_type in _SINGLE_KERNEL_REDUCTIONS)(reduce)


def _prod(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    for ax in sorted(axes, reverse=True):
        x = x.prod(dim=ax, keepdim=keep)
    return x


def _log_sum_exp(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    return torch.logsumexp(x, dim=axes, keepdim=keep) if axes else x


for _name, _rfn in {
    "reduce_sum": lambda x, ax, k: x.sum(dim=ax, keepdim=k),
    "reduce_mean": lambda x, ax, k: x.mean(dim=ax, keepdim=k),
    "reduce_max": lambda x, ax, k: x.amax(dim=ax, keepdim=k),
    "reduce_min": lambda x, ax, k: x.amin(dim=ax, keepdim=k),
    "reduce_prod": _prod,
    "reduce_l1_norm": lambda x, ax, k: x.abs().sum(dim=ax, keepdim=k),
    "reduce_l2_norm": lambda x, ax, k: x.square().sum(dim=ax, keepdim=k).sqrt(),
    "reduce_sum_square": lambda x, ax, k: x.square().sum(dim=ax, keepdim=k),
    "reduce_log_sum": lambda x, ax, k: x.sum(dim=ax, keepdim=k).log(),
    "reduce_log_sum_exp": _log_sum_exp,
}.items():
    _reduction(_name, _rfn)


@register("reduce_argmax")
def reduce_argmax(a: OpArgs) -> Result:
    # torch, like numpy, returns the first index among equal maxima.
    return torch.argmax(a["x"], dim=a.int("axis", -1), keepdim=a.bool("keep_dims"))


@register("reduce_argmin")
def reduce_argmin(a: OpArgs) -> Result:
    return torch.argmin(a["x"], dim=a.int("axis", -1), keepdim=a.bool("keep_dims"))
