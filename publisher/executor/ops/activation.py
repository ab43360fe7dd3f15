"""Activation functions (MIL activation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from publisher.executor.ops._utils import _per_channel
from publisher.executor.ops.registry import OpArgs, Result, register, register_elementwise

register_elementwise(
    {
        "relu": torch.relu,
        "relu6": F.relu6,
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
        "softplus": F.softplus,
    }
)


@register("gelu", native_half=True)
def gelu(a: OpArgs) -> Result:
    mode = a.str("mode", "EXACT")
    x = a["x"]
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        x = x.float()
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


@register("elu", native_half=True)
def elu(a: OpArgs) -> Result:
    return F.elu(a["x"], alpha=a.float("alpha", 1.0))


@register("leaky_relu", native_half=True)
def leaky_relu(a: OpArgs) -> Result:
    return F.leaky_relu(a["x"], negative_slope=a.float("alpha", 0.01))


@register("thresholded_relu", native_half=True)
def thresholded_relu(a: OpArgs) -> Result:
    x = a["x"]
    return torch.where(x < a.float("alpha", 1.0), torch.zeros((), dtype=x.dtype), x)


@register("clamped_relu")
def clamped_relu(a: OpArgs) -> Result:
    x, alpha, beta = a["x"], a.float("alpha"), a.float("beta")
    return torch.clamp(x, 0, beta) + torch.clamp_max(torch.clamp_max(x, 0) * alpha, beta)


@register("linear_activation")
def linear_activation(a: OpArgs) -> Result:
    return a.float("alpha") * a["x"] + a.float("beta", 0.0)


@register("prelu")
def prelu(a: OpArgs) -> Result:
    x = a["x"]
    return torch.clamp_min(x, 0) + torch.clamp_max(x, 0) * _per_channel(a["alpha"], x.dim())


@register("scaled_tanh")
def scaled_tanh(a: OpArgs) -> Result:
    return a.float("alpha") * torch.tanh(a["x"] * a.float("beta"))


@register("sigmoid_hard")
def sigmoid_hard(a: OpArgs) -> Result:
    return torch.clamp(a.float("alpha") * a["x"] + a.float("beta"), 0, 1)


@register("softplus_parametric")
def softplus_parametric(a: OpArgs) -> Result:
    x = a["x"]
    alpha, beta = _per_channel(a["alpha"], x.dim()), _per_channel(a["beta"], x.dim())
    return alpha * torch.log1p(torch.exp(x * beta))


@register("softsign")
def softsign(a: OpArgs) -> Result:
    return F.softsign(a["x"])


@register("softmax", native_half=True)
def softmax(a: OpArgs) -> Result:
    return torch.softmax(a["x"], dim=a.int("axis", -1))
