"""quantize / dequantize (MIL iOS17 quantization_ops)."""

from __future__ import annotations

import torch

from publisher.executor.ops._utils import _axis
from publisher.executor.ops.registry import OpArgs, Result, register


def _along(param: torch.Tensor, rank: int, axis: int | None) -> torch.Tensor:
    if param.dim() == 0 or axis is None:
        return param
    shape = [1] * rank
    shape[_axis(axis, rank)] = -1
    return param.reshape(shape)


@register("quantize")
def quantize(a: OpArgs) -> Result:
    x = a["input"]
    axis = a.value("axis")
    axis_i = None if axis is None else int(axis)
    q = torch.round(x / _along(a["scale"], x.dim(), axis_i))
    zero_point = a.opt("zero_point")
    if zero_point is not None:
        q = q + _along(zero_point, x.dim(), axis_i).float()
    info = torch.iinfo(a.out_dtypes[0])
    return torch.clamp(q, info.min, info.max)


@register("dequantize")
def dequantize(a: OpArgs) -> Result:
    q = a["input"]
    axis = a.value("axis")
    axis_i = None if axis is None else int(axis)
    values = q.float()
    zero_point = a.opt("zero_point")
    if zero_point is not None:
        values = values - _along(zero_point, q.dim(), axis_i).float()
    return values * _along(a["scale"], q.dim(), axis_i)
