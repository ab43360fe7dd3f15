"""Elementwise unary ops and cast (MIL elementwise_unary)."""

from __future__ import annotations

import torch

from publisher.executor.ops.registry import OpArgs, Result, register, register_elementwise

register_elementwise(
    {
        "abs": torch.abs,
        "acos": torch.acos,
        "asin": torch.asin,
        "atan": torch.atan,
        "atanh": torch.atanh,
        "ceil": torch.ceil,
        "cos": torch.cos,
        "cosh": torch.cosh,
        "erf": torch.erf,
        "exp": torch.exp,
        "exp2": torch.exp2,
        "floor": torch.floor,
        # numpy and torch both round half to even.
        "round": torch.round,
        "sign": torch.sign,
        "sin": torch.sin,
        "sinh": torch.sinh,
        "sqrt": torch.sqrt,
        "square": torch.square,
        "tan": torch.tan,
        "tanh": torch.tanh,
        "logical_not": torch.logical_not,
    }
)


@register("clip", native_half=True)
def clip(a: OpArgs) -> Result:
    return torch.clamp(a["x"], a.float("alpha"), a.float("beta"))


@register("threshold", native_half=True)
def threshold(a: OpArgs) -> Result:
    return torch.clamp_min(a["x"], a.float("alpha"))


@register("inverse")
def inverse(a: OpArgs) -> Result:
    return torch.reciprocal(a["x"] + a.float("epsilon", 1e-4))


@register("log")
def log(a: OpArgs) -> Result:
    return torch.log(a["x"] + a.float("epsilon", 1e-45))


@register("rsqrt")
def rsqrt(a: OpArgs) -> Result:
    return torch.rsqrt(a["x"] + a.float("epsilon", 1e-12))


@register("cast", native_half=True)
def cast(a: OpArgs) -> Result:
    x = a["x"]
    target = a.out_dtypes[0]
    if target.is_floating_point:
        # The executor rounds to the declared float dtype (fp16 mode) or keeps fp32 (fp32 mode).
        return x if x.is_floating_point() else x.float()
    if target == torch.bool:
        return x != 0
    return x.to(target)
