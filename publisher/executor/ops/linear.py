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


# Up to this many rows (a language model's decode step, a short prompt) fp16 operands are multiplied in fp16:
# torch's CPU kernel accumulates in fp32 and rounds once per output, as the widened product is rounded, but
# widening a 2048x8192 weight costs twenty times the product (benchmarks/decode.py). Rounding the bias sum
# apart moves about 0.3% of outputs by one fp16 step. Above it, torch's fp16 GEMM is the slower.
NATIVE_HALF_ROWS = 64


@register("linear", native_half=True)
def linear(a: OpArgs) -> Result:
    x, bias = a["x"], a.opt("bias")
    weight = a.held("weight")
    if x.dtype == weight.dtype == torch.float16 and x.numel() <= NATIVE_HALF_ROWS * x.shape[-1]:
        return F.linear(x, weight, None if bias is None else bias.to(torch.float16))
    x, weight, bias = _common(x.float() if x.dtype == torch.float16 else x, a.widened_weight("weight"),
                              None if bias is None else bias.float() if bias.dtype == torch.float16 else bias)
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
