"""Elementwise binary ops: arithmetic, comparison, logic (MIL elementwise_binary)."""

from __future__ import annotations

import torch

from publisher.executor.ops.registry import OpArgs, Result, register


@register("add", native_half=True)
def add(a: OpArgs) -> Result:
    return torch.add(a["x"], a["y"])


@register("sub", native_half=True)
def sub(a: OpArgs) -> Result:
    return torch.sub(a["x"], a["y"])


@register("mul", native_half=True)
def mul(a: OpArgs) -> Result:
    return torch.mul(a["x"], a["y"])


@register("real_div", native_half=True)
def real_div(a: OpArgs) -> Result:
    return torch.div(a["x"], a["y"])


@register("floor_div", native_half=True)
def floor_div(a: OpArgs) -> Result:
    return torch.floor_divide(a["x"], a["y"])


@register("mod", native_half=True)
def mod(a: OpArgs) -> Result:
    # MIL mod follows Python/numpy: the result takes the divisor's sign.
    return torch.remainder(a["x"], a["y"])


@register("pow", native_half=True)
def pow_(a: OpArgs) -> Result:
    return torch.pow(a["x"], a["y"])


@register("maximum", native_half=True)
def maximum(a: OpArgs) -> Result:
    return torch.maximum(a["x"], a["y"])


@register("minimum", native_half=True)
def minimum(a: OpArgs) -> Result:
    return torch.minimum(a["x"], a["y"])


@register("equal", native_half=True)
def equal(a: OpArgs) -> Result:
    return torch.eq(a["x"], a["y"])


@register("not_equal", native_half=True)
def not_equal(a: OpArgs) -> Result:
    return torch.ne(a["x"], a["y"])


@register("greater", native_half=True)
def greater(a: OpArgs) -> Result:
    return torch.gt(a["x"], a["y"])


@register("greater_equal", native_half=True)
def greater_equal(a: OpArgs) -> Result:
    return torch.ge(a["x"], a["y"])


@register("less", native_half=True)
def less(a: OpArgs) -> Result:
    return torch.lt(a["x"], a["y"])


@register("less_equal", native_half=True)
def less_equal(a: OpArgs) -> Result:
    return torch.le(a["x"], a["y"])


@register("logical_and", native_half=True)
def logical_and(a: OpArgs) -> Result:
    return torch.logical_and(a["x"], a["y"])


@register("logical_or", native_half=True)
def logical_or(a: OpArgs) -> Result:
    return torch.logical_or(a["x"], a["y"])


@register("logical_xor", native_half=True)
def logical_xor(a: OpArgs) -> Result:
    return torch.logical_xor(a["x"], a["y"])
