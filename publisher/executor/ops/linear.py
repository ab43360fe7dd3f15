"""linear, matmul and einsum (MIL linear)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from publisher.executor.ops.registry import OpArgs, Result, register


def _common(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Operands in one dtype: iOS17 linear/matmul mix fp32, fp16 and int32 (torch kernels do not)."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        # Integer products of int32 operands are exact in fp64; the runtime casts back to int32.
        dtype = torch.float64
    return [None if t is None else t.to(dtype) for t in tensors]


@register("linear")
def linear(a: OpArgs) -> Result:
    x, weight, bias = _common(a["x"], a.weight("weight"), a.opt("bias"))
    return F.linear(x, weight, bias)


@register("matmul")
def matmul(a: OpArgs) -> Result:
    x, y = _common(a["x"], a["y"])
    if a.bool("transpose_x") and x.dim() > 1:
        x = x.transpose(-1, -2)
    if a.bool("transpose_y") and y.dim() > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@register("einsum")
def einsum(a: OpArgs) -> Result:
    return torch.einsum(a.str("equation"), *a.many("values"))
