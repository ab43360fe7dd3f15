"""Tensor creation and manipulation ops (MIL tensor_operation)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from publisher.executor.errors import ExecutorError
from publisher.executor.ops._utils import _axis, _fill_dtype, _pad_spatial
from publisher.executor.ops.registry import OpArgs, Result, register


@register("identity", native_half=True)
def identity(a: OpArgs) -> Result:
    return a["x"]


@register("concat", native_half=True)
def concat(a: OpArgs) -> Result:
    # MIL concatenates scalars as one-element vectors: the torch frontend builds a shape from scalar sizes
    # so (a stateful LLM's cache slice end, for one).
    values = [value.reshape(1) if value.dim() == 0 else value for value in a.many("values")]
    axis = _axis(a.int("axis"), values[0].dim())
    if a.bool("interleave"):
        stacked = torch.stack(values, dim=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return torch.cat(values, dim=axis)


@register("split", native_half=True)
def split(a: OpArgs) -> Result:
    x = a["x"]
    axis = _axis(a.int("axis"), x.dim())
    sizes = a.ints("split_sizes")
    if not sizes:
        count = a.int("num_splits")
        sizes = [x.shape[axis] // count] * count
    return tuple(torch.split(x, sizes, dim=axis))


@register("stack", native_half=True)
def stack(a: OpArgs) -> Result:
    values = a.many("values")
    return torch.stack(values, dim=_axis(a.int("axis"), values[0].dim() + 1))


@register("shape", native_half=True)
def shape(a: OpArgs) -> Result:
    return torch.tensor(a["x"].shape, dtype=torch.int32)


@register("fill", native_half=True)
def fill(a: OpArgs) -> Result:
    return torch.full(a.ints("shape"), a.float("value", 0.0), dtype=_fill_dtype(a))


@register("fill_like", native_half=True)
def fill_like(a: OpArgs) -> Result:
    return torch.full(tuple(a["ref_tensor"].shape), a.float("value", 0.0), dtype=_fill_dtype(a))


@register("range_1d", native_half=True)
def range_1d(a: OpArgs) -> Result:
    dtype = _fill_dtype(a)
    start, end, step = (a.value(n) for n in ("start", "end", "step"))
    return torch.arange(float(start), float(end), float(step), dtype=torch.float64).to(dtype)


@register("tile", native_half=True)
def tile(a: OpArgs) -> Result:
    return a["x"].repeat(*a.ints("reps"))


@register("pad", native_half=True)
def pad(a: OpArgs) -> Result:
    x = a["x"]
    flat = a.ints("pad")
    n = len(flat) // 2
    pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(n)]
    mode = a.str("mode", "constant")
    if mode == "constant":
        return _pad_spatial(x, pairs, value=a.float("constant_val", 0.0)) if any(flat) else x
    # torch's reflect/replicate pad the last 1-3 dims of a tensor with one leading batch dim.
    while pairs and pairs[0] == (0, 0):
        pairs.pop(0)
    if not pairs:
        return x
    k = len(pairs)
    lead = x.shape[: x.dim() - k]
    body = x.reshape(math.prod(lead), *x.shape[x.dim() - k :])
    torch_mode = {"reflect": "reflect", "replicate": "replicate"}.get(mode)
    if torch_mode is None:
        raise ExecutorError(f"unknown pad mode {mode!r}")
    widened = body.float() if body.dtype == torch.float16 else body
    out = F.pad(widened, [p for pair in reversed(pairs) for p in pair], mode=torch_mode)
    return out.to(x.dtype).reshape(*lead, *out.shape[1:])


@register("band_part", native_half=True)
def band_part(a: OpArgs) -> Result:
    x = a["x"]
    lower, upper = a.int("lower", -1), a.int("upper", -1)
    rows = torch.arange(x.shape[-2]).unsqueeze(1)
    cols = torch.arange(x.shape[-1]).unsqueeze(0)
    keep = torch.ones(x.shape[-2:], dtype=torch.bool)
    if lower >= 0:
        keep &= rows - cols <= lower
    if upper >= 0:
        keep &= cols - rows <= upper
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


@register("cumsum")
def cumsum(a: OpArgs) -> Result:
    x = a["x"]
    axis = _axis(a.int("axis", 0), x.dim())
    reverse = a.bool("reverse")
    if reverse:
        x = x.flip(axis)
    out = torch.cumsum(x, dim=axis)
    if a.bool("exclusive"):
        out = torch.cat([torch.zeros_like(out.narrow(axis, 0, 1)), out.narrow(axis, 0, out.shape[axis] - 1)], axis)
    return out.flip(axis) if reverse else out


@register("non_zero", native_half=True)
def non_zero(a: OpArgs) -> Result:
    return torch.nonzero(a["x"])


@register("one_hot", native_half=True)
def one_hot(a: OpArgs) -> Result:
    idx = a["indices"].long()
    size = a.int("one_hot_vector_size")
    hot = idx.unsqueeze(-1) == torch.arange(size)
    dtype = _fill_dtype(a)
    on = torch.tensor(a.float("on_value", 1.0), dtype=dtype)
    off = torch.tensor(a.float("off_value", 0.0), dtype=dtype)
    out = torch.where(hot, on, off)
    return out.movedim(-1, _axis(a.int("axis", -1), out.dim()))


@register("argsort", native_half=True)
def argsort(a: OpArgs) -> Result:
    return torch.argsort(a["x"], dim=a.int("axis", -1), descending=not a.bool("ascending"), stable=True)


@register("topk", native_half=True)
def topk(a: OpArgs) -> Result:
    x = a["x"]
    axis = a.int("axis", -1)
    order = torch.argsort(x, dim=axis, descending=not a.bool("ascending"), stable=True)
    indices = order.narrow(axis, 0, a.int("k", 1))
    values = torch.gather(x, axis, indices)
    if len(a.out_dtypes) == 1:
        return values
    return values, indices


@register("flatten2d", native_half=True)
def flatten2d(a: OpArgs) -> Result:
    x = a["x"]
    axis = _axis(a.int("axis", 1), x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("non_maximum_suppression")
def non_maximum_suppression(a: OpArgs) -> Result:
    # iOS15 form: boxes [n, B, 4], scores [n, B, K], a score threshold and a 4th output (the count
    # per batch); iOS17 form: boxes [n, 4, B], scores [n, K, B], neither.
    ios15 = len(a.out_dtypes) == 4
    boxes, scores = a["boxes"], a["scores"]
    if not ios15:
        boxes, scores = boxes.transpose(1, 2), scores.transpose(1, 2)
    max_boxes = a.int("max_boxes")
    threshold = a.float("score_threshold") if ios15 else None
    n = boxes.shape[0]
    out_boxes = boxes.new_zeros(n, max_boxes, 4)
    out_scores = scores.new_zeros(n, max_boxes, scores.shape[2])
    out_indices = torch.full((n, max_boxes), -1, dtype=torch.int32)
    counts = torch.zeros(n, dtype=torch.int32)
    for b in range(n):
        kept = _nms_one(
            boxes[b].numpy(), scores[b].numpy(), a.float("iou_threshold"), threshold, a.bool("per_class_suppression")
        )[:max_boxes]
        count = len(kept)
        index = torch.from_numpy(kept)
        out_boxes[b, :count], out_scores[b, :count] = boxes[b, index], scores[b, index]
        out_indices[b, :count] = index.int()
        counts[b] = count
    if ios15:
        return out_boxes, out_scores, out_indices, counts
    return out_boxes.transpose(1, 2), out_scores.transpose(1, 2), out_indices


def _nms_one(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, score_threshold: float | None, per_class: bool
) -> np.ndarray:
    """Greedy NMS of one batch: the kept box indices, best score first.

    A box scores its best class. Boxes in (x_center, y_center, width, height). Per-class
    suppression only lets boxes of the same best class suppress each other; which gives what
    suppressing each class apart and merging by score gives, in one pass.
    """
    best = scores.max(axis=1)
    order = np.argsort(-best, kind="stable")
    if score_threshold is not None:
        order = order[best[order] > score_threshold]
        if not order.size:
            # Core ML then returns the best-scoring box alone (coremltools' reference of the op).
            return np.argmax(best, keepdims=True)
    half = boxes[:, 2:] / 2
    low, high = boxes[:, :2] - half, boxes[:, :2] + half
    extent = np.clip(np.minimum(high[:, None], high[None]) - np.maximum(low[:, None], low[None]), 0, None)
    inter = extent[..., 0] * extent[..., 1]
    area = boxes[:, 2] * boxes[:, 3]
    union = area[:, None] + area[None] - inter
    # Degenerate (empty) boxes overlap nothing, as in TensorFlow's NMS that the op's tests compare with.
    valid = (area[:, None] > 0) & (area[None] > 0)
    iou = np.where(valid, inter / np.where(valid, union, 1), 0)
    overlaps = iou > iou_threshold
    if per_class:
        label = scores.argmax(axis=1)
        overlaps &= label[:, None] == label[None]
    suppressed = np.zeros(len(boxes), dtype=bool)
    kept = []
    for i in order:
        if not suppressed[i]:
            kept.append(i)
            suppressed |= overlaps[i]
    return np.asarray(kept, dtype=np.int64)
