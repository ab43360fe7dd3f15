"""Gather and scatter ops (MIL scatter_gather)."""

from __future__ import annotations

import math

import torch

from publisher.executor.errors import ExecutorError
from publisher.executor.ops._utils import _axis
from publisher.executor.ops.registry import OpArgs, Result, _scalar, register


def _wrap(indices: torch.Tensor, size: int) -> torch.Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


@register("gather", native_half=True)
def gather(a: OpArgs) -> Result:
    x, idx = a["x"], a["indices"]
    axis = _axis(a.int("axis", 0), x.dim())
    batch_dims = a.int("batch_dims", 0)
    idx = _wrap(idx, x.shape[axis])
    if batch_dims == 0:
        out = x.index_select(axis, idx.reshape(-1))
        return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))
    batch = x.shape[:batch_dims]
    xs = x.reshape(math.prod(batch), *x.shape[batch_dims:])
    ids = idx.reshape(math.prod(batch), *idx.shape[batch_dims:])
    inner = axis - batch_dims
    rows = [
        xb.index_select(inner, ib.reshape(-1)).reshape((*xb.shape[:inner], *ib.shape, *xb.shape[inner + 1 :]))
        for xb, ib in zip(xs, ids, strict=True)
    ]
    out = torch.stack(rows)
    return out.reshape(*batch, *out.shape[1:])


@register("gather_along_axis", native_half=True)
def gather_along_axis(a: OpArgs) -> Result:
    x = a["x"]
    axis = _axis(a.int("axis", 0), x.dim())
    return torch.gather(x, axis, _wrap(a["indices"], x.shape[axis]))


@register("gather_nd", native_half=True)
def gather_nd(a: OpArgs) -> Result:
    x, idx = a["x"], a["indices"]
    batch_dims = a.int("batch_dims", 0)
    depth = idx.shape[-1]
    batch = x.shape[:batch_dims]
    xs = x.reshape(math.prod(batch), *x.shape[batch_dims:])
    ids = idx.reshape(math.prod(batch), -1, depth)
    coords = [_wrap(ids[..., k], xs.shape[1 + k]) for k in range(depth)]
    rows = torch.arange(xs.shape[0]).unsqueeze(1)
    out = xs[(rows, *coords)]
    return out.reshape(*idx.shape[:-1], *x.shape[batch_dims + depth :])


def _scatter_indices(a: OpArgs, indices: torch.Tensor, size: int) -> torch.Tensor:
    """Scatter indices checked against `size`: invalid ones become `size`, a scratch slot callers drop.

    iOS15/16 take [-size, size) (negatives count from the end) and have no validate_indices: other
    values cannot be computed. iOS17+ take [0, size) only; with validate_indices Core ML fails the
    prediction, without it the behaviour is undefined but memory safe, and the executor drops those
    updates (never wrapping them or writing them into another element).
    """
    idx = indices.long()
    validate = a.value("validate_indices")
    if validate is None:
        idx = torch.where(idx < 0, idx + size, idx)
    valid = (idx >= 0) & (idx < size)
    if bool(valid.all()):
        return idx
    if validate is None or bool(_scalar(validate)):
        bad = indices[~valid].reshape(-1)[0].item()
        raise ExecutorError(f"scatter index {bad} out of range for a dimension of size {size}")
    return torch.where(valid, idx, size)


def _with_scratch(data: torch.Tensor, axis: int) -> torch.Tensor:
    """`data` with one more slice along `axis`, where dropped scatter updates land."""
    return torch.cat([data, torch.zeros_like(data.narrow(axis, 0, 1))], dim=axis)


def _scatter_axis0(data: torch.Tensor, idx: torch.Tensor, updates: torch.Tensor, mode: str) -> torch.Tensor:
    """Scatter rows of `updates` into rows `idx` of `data` (axis 0); row len(data) is scratch."""
    out = _with_scratch(data, 0)
    if mode == "update":
        out.index_copy_(0, idx, updates)
    elif mode == "add":
        out.index_add_(0, idx, updates)
    elif mode == "sub":
        out.index_add_(0, idx, -updates)
    elif mode in ("mul", "max", "min"):
        reduce = {"mul": "prod", "max": "amax", "min": "amin"}[mode]
        out.index_reduce_(0, idx, updates, reduce, include_self=True)
    elif mode == "div":
        out.index_copy_(0, idx, out.index_select(0, idx) / updates)
    else:
        raise ExecutorError(f"unknown scatter mode {mode!r}")
    return out[: data.shape[0]]


@register("scatter")
def scatter(a: OpArgs) -> Result:
    data = a["data"]
    axis = _axis(a.int("axis", 0), data.dim())
    idx = _scatter_indices(a, a["indices"], data.shape[axis]).reshape(-1)
    updates = a["updates"].to(data.dtype).movedim(axis, 0)
    out = _scatter_axis0(data.movedim(axis, 0), idx, updates, a.str("mode", "add"))
    return out.movedim(0, axis)


@register("scatter_along_axis")
def scatter_along_axis(a: OpArgs) -> Result:
    data = a["data"]
    axis = _axis(a.int("axis", 0), data.dim())
    size = data.shape[axis]
    idx = _scatter_indices(a, a["indices"], size)
    updates = a["updates"].to(data.dtype)
    mode = a.str("mode", "add")
    padded = _with_scratch(data, axis)
    if mode == "update":
        out = padded.scatter(axis, idx, updates)
    elif mode == "add":
        out = padded.scatter_add(axis, idx, updates)
    elif mode == "sub":
        out = padded.scatter_add(axis, idx, -updates)
    elif mode in ("mul", "max", "min"):
        reduce = {"mul": "prod", "max": "amax", "min": "amin"}[mode]
        out = padded.scatter_reduce(axis, idx, updates, reduce, include_self=True)
    elif mode == "div":
        out = padded.scatter(axis, idx, torch.gather(padded, axis, idx) / updates)
    else:
        raise ExecutorError(f"unknown scatter mode {mode!r}")
    return out.narrow(axis, 0, size)


@register("scatter_nd")
def scatter_nd(a: OpArgs) -> Result:
    data, idx = a["data"], a["indices"]
    depth = idx.shape[-1]
    lead = data.shape[:depth]
    rows = math.prod(lead)
    strides = torch.tensor([math.prod(lead[k + 1 :]) for k in range(depth)], dtype=torch.long)
    coords = torch.stack([_scatter_indices(a, idx[..., k], lead[k]) for k in range(depth)], dim=-1)
    valid = (coords < torch.tensor(lead, dtype=torch.long)).all(-1)
    # A coordinate out of its own dimension must not alias another element through the flat index.
    flat_idx = torch.where(valid, (coords * strides).sum(-1), rows).reshape(-1)
    body = data.reshape(rows, *data.shape[depth:])
    updates = a["updates"].to(data.dtype).reshape(-1, *data.shape[depth:])
    return _scatter_axis0(body, flat_idx, updates, a.str("mode", "add")).reshape(data.shape)
