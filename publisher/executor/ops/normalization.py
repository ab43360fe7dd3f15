"""Normalization ops (MIL normalization)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from publisher.executor.ops._utils import _axis, _per_channel
from publisher.executor.ops.registry import OpArgs, Result, register


@register("batch_norm")
def batch_norm(a: OpArgs) -> Result:
    x = a["x"]
    rank = x.dim()
    out = (x - _per_channel(a["mean"], rank)) / torch.sqrt(_per_channel(a["variance"], rank) + a.float("epsilon", 1e-5))
    gamma, beta = a.opt("gamma"), a.opt("beta")
    if gamma is not None:
        out = out * _per_channel(gamma, rank)
    if beta is not None:
        out = out + _per_channel(beta, rank)
    return out


@register("instance_norm")
def instance_norm(a: OpArgs) -> Result:
    return F.instance_norm(a["x"], weight=a.opt("gamma"), bias=a.opt("beta"), eps=a.float("epsilon", 1e-5))


@register("layer_norm")
def layer_norm(a: OpArgs) -> Result:
    x = a["x"]
    rank = x.dim()
    axes = sorted({_axis(ax, rank) for ax in a.ints("axes", range(rank))})
    eps = a.float("epsilon", 1e-5)
    gamma, beta = a.opt("gamma"), a.opt("beta")
    if axes == list(range(rank - len(axes), rank)):
        normalized = x.shape[rank - len(axes) :]
        gamma = None if gamma is None else gamma.reshape(normalized)
        beta = None if beta is None else beta.reshape(normalized)
        return F.layer_norm(x, normalized, gamma, beta, eps)
    mean = x.mean(dim=axes, keepdim=True)
    centered = x - mean
    out = centered / torch.sqrt(centered.square().mean(dim=axes, keepdim=True) + eps)
    normalized_shape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    if gamma is not None:
        out = out * gamma.reshape(normalized_shape)
    if beta is not None:
        out = out + beta.reshape(normalized_shape)
    return out


@register("l2_norm")
def l2_norm(a: OpArgs) -> Result:
    x = a["x"]
    batch = x.shape[: x.dim() - 3]
    flat = x.reshape(math.prod(batch), -1)
    out = flat / torch.sqrt(flat.square().sum(dim=1, keepdim=True) + a.float("epsilon", 1e-6))
    return out.reshape(x.shape)


@register("local_response_norm")
def local_response_norm(a: OpArgs) -> Result:
    # The window spans size // 2 channels before and (size - 1) // 2 after, as the op tests' reference.
    return F.local_response_norm(
        a["x"], a.int("size"), alpha=a.float("alpha", 1e-4), beta=a.float("beta", 0.75), k=a.float("k", 1.0)
    )
