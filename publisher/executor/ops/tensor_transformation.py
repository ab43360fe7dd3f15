"""Shape and layout transformations (MIL tensor_transformation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from publisher.executor.ops._utils import _axis
from publisher.executor.ops.registry import OpArgs, Result, register


@register("reshape", native_half=True)
def reshape(a: OpArgs) -> Result:
    x = a["x"]
    target = a.ints("shape")
    # A 0 copies the input dimension it lines up with counting from the right, or is 1 where there
    # is none (iOS17; earlier opsets require len(shape) == rank, where this is the same position).
    offset = len(target) - x.dim()
    target = [(x.shape[i - offset] if 0 <= i - offset < x.dim() else 1) if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


@register("reshape_like", native_half=True)
def reshape_like(a: OpArgs) -> Result:
    refs = a.many("ref_tensors")
    begins = a.ints("begins")
    ends = a.ints("ends")
    end_masks = [bool(m) for m in np.asarray(a.value("end_masks")).reshape(-1)]
    shape: list[int] = []
    for ref, begin, end, end_mask in zip(refs, begins, ends, end_masks, strict=True):
        shape.extend(ref.shape[begin : ref.dim() if end_mask else end])
    return a["x"].reshape(shape)


@register("expand_dims", native_half=True)
def expand_dims(a: OpArgs) -> Result:
    x = a["x"]
    axes = a.ints("axes")
    out_rank = x.dim() + len(axes)
    for axis in sorted(_axis(ax, out_rank) for ax in axes):
        x = x.unsqueeze(axis)
    return x


@register("squeeze", native_half=True)
def squeeze(a: OpArgs) -> Result:
    x = a["x"]
    axes = a.value("axes")
    if axes is None:
        return x.squeeze()
    # Dimensions that are not 1 are left alone (PyTorch semantics, as the MIL spec states).
    return x.squeeze(tuple(_axis(int(ax), x.dim()) for ax in np.asarray(axes).reshape(-1)))


@register("transpose", native_half=True)
def transpose(a: OpArgs) -> Result:
    return a["x"].permute(a.ints("perm"))


@register("reverse", native_half=True)
def reverse(a: OpArgs) -> Result:
    x = a["x"]
    axes = a.value("axes")
    dims = list(range(x.dim())) if axes is None else a.ints("axes")
    return x.flip(dims)


def _slices(a: OpArgs, shape: Sequence[int]) -> tuple[list[slice | int], bool]:
    """Python slices per dim from slice_by_index/slice_update params; True if all steps > 0."""
    rank = len(shape)
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * rank)
    begin_mask = [bool(m) for m in np.asarray(a.value("begin_mask", [False] * rank)).reshape(-1)]
    end_mask = [bool(m) for m in np.asarray(a.value("end_mask", [False] * rank)).reshape(-1)]
    squeeze_mask = [bool(m) for m in np.asarray(a.value("squeeze_mask", [False] * rank)).reshape(-1)]
    out: list[slice | int] = []
    for i in range(rank):
        if squeeze_mask[i]:
            out.append(begin[i] + shape[i] if begin[i] < 0 else begin[i])
        else:
            out.append(slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]))
    return out, all(s > 0 for s in stride)


def _index_tensors(spec: Sequence[slice | int], shape: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Broadcastable index tensors equivalent to `spec` (supports negative steps)."""
    kept = [i for i, s in enumerate(spec) if isinstance(s, slice)]
    out = []
    for i, s in enumerate(spec):
        if isinstance(s, slice):
            idx = torch.arange(*s.indices(shape[i]))
            view = [1] * len(kept)
            view[kept.index(i)] = -1
            out.append(idx.reshape(view))
        else:
            out.append(torch.tensor(s))
    return tuple(out)


@register("slice_by_index", native_half=True)
def slice_by_index(a: OpArgs) -> Result:
    x = a["x"]
    spec, forward = _slices(a, x.shape)
    if forward:
        return x[tuple(spec)]
    return x[_index_tensors(spec, x.shape)]


@register("slice_by_size", native_half=True)
def slice_by_size(a: OpArgs) -> Result:
    x = a["x"]
    out = x
    for i, (begin, size) in enumerate(zip(a.ints("begin"), a.ints("size"), strict=True)):
        begin = begin + x.shape[i] if begin < 0 else begin
        out = out.narrow(i, begin, x.shape[i] - begin if size < 0 else size)
    return out


@register("slice_update", native_half=True)
def slice_update(a: OpArgs) -> Result:
    return slice_update_in_place(a, a["x"].clone())


def slice_update_in_place(a: OpArgs, out: torch.Tensor | None = None) -> Result:
    """slice_update writing into ``out`` (default: its input ``x`` itself, see fusion.update_states_in_place)."""
    x = a["x"] if out is None else out
    spec, forward = _slices(a, x.shape)
    key: Any = tuple(spec) if forward else _index_tensors(spec, x.shape)
    region = x[key]
    x[key] = a["update"].to(x.dtype).reshape(region.shape)
    return x


@register("depth_to_space", native_half=True)
def depth_to_space(a: OpArgs) -> Result:
    # TF DepthToSpace (DCR order) in NCHW, which is what the TF frontend lowers into this op.
    x = a["x"]
    bs = a.int("block_size")
    n, c, h, w = x.shape
    out = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    return out.reshape(n, c // (bs * bs), h * bs, w * bs)


@register("space_to_depth", native_half=True)
def space_to_depth(a: OpArgs) -> Result:
    x = a["x"]
    bs = a.int("block_size")
    n, c, h, w = x.shape
    out = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return out.reshape(n, c * bs * bs, h // bs, w // bs)


@register("pixel_shuffle", native_half=True)
def pixel_shuffle(a: OpArgs) -> Result:
    return F.pixel_shuffle(a["x"], a.int("upscale_factor"))


@register("pixel_unshuffle", native_half=True)
def pixel_unshuffle(a: OpArgs) -> Result:
    return F.pixel_unshuffle(a["x"], a.int("downscale_factor"))


@register("sliding_windows", native_half=True)
def sliding_windows(a: OpArgs) -> Result:
    x = a["x"]
    axis = _axis(a.int("axis"), x.dim())
    windows = x.unfold(axis, a.int("size"), a.int("stride", 1))
    return windows.movedim(-1, axis + 1)


@register("reverse_sequence", native_half=True)
def reverse_sequence(a: OpArgs) -> Result:
    x = a["x"]
    seq_axis = _axis(a.int("seq_axis", 0), x.dim())
    batch_axis = _axis(a.int("batch_axis", 0), x.dim())
    lengths = a["lengths"].long()
    # Position t of batch b reads t' = length - 1 - t for t < length, else t itself.
    positions = torch.arange(x.shape[seq_axis])
    bounds = lengths.unsqueeze(1)
    source = torch.where(positions < bounds, bounds - 1 - positions, positions)
    shape = [1] * x.dim()
    shape[batch_axis], shape[seq_axis] = source.shape
    if batch_axis > seq_axis:
        source = source.T
    return torch.gather(x, seq_axis, source.reshape(shape).expand(x.shape))


@register("space_to_batch", native_half=True)
def space_to_batch(a: OpArgs) -> Result:
    # TF SpaceToBatchND in NCHW: block offsets lead the new batch axis.
    x = a["x"]
    bh, bw = a.ints("block_shape")
    (top, bottom), (left, right) = np.asarray(a.value("paddings")).reshape(2, 2).tolist()
    x = F.pad(x, [left, right, top, bottom])
    n, c, h, w = x.shape
    out = x.reshape(n, c, h // bh, bh, w // bw, bw).permute(3, 5, 0, 1, 2, 4)
    return out.reshape(bh * bw * n, c, h // bh, w // bw)


@register("batch_to_space", native_half=True)
def batch_to_space(a: OpArgs) -> Result:
    x = a["x"]
    bh, bw = a.ints("block_shape")
    (top, bottom), (left, right) = np.asarray(a.value("crops")).reshape(2, 2).tolist()
    b, c, h, w = x.shape
    n = b // (bh * bw)
    out = x.reshape(bh, bw, n, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
    return out[:, :, top : h * bh - bottom, left : w * bw - right]
