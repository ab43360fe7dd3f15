"""Load-time fusion: an op sequence run as one step that computes the same values with less memory traffic.

Attention without iOS18's scaled_dot_product_attention converts to matmul -> softmax -> matmul.
Run op by op, it writes and reads the [batch, heads, L, S] score matrix twice (2 GiB per SD 1.5
self-attention at 64x64 latents, in fp32): the UNet's attention took a third of a forward, three
times what torch's fused kernel takes. The fused step computes the same values:

- when no intermediate is rounded (fp32 mode, or fp32 declared), with torch's
  scaled_dot_product_attention: softmax(q @ k^T) @ v in fp32, summed in another order;
- otherwise (fp16 mode) a block of query rows at a time, each intermediate rounded to its declared
  dtype exactly as the three ops round it: softmax and matmul are row-wise, so the result is the
  ops' own, and the score blocks stay in cache.

A stateful language model writes its KV cache as read_state -> slice_update -> coreml_update_state, once
per layer: slice_update returns a new tensor, a copy of the whole cache (every layer's) per layer and token,
which took a fifth of a 1B model's decode step. Where the state's value is read by that slice_update alone
and the result is written back to the same state, the update is made in the state's tensor instead
(:func:`update_states_in_place`): the values are the same, without the copy.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from publisher.executor.ops import OpArgs, Result
from publisher.executor.ops.tensor_transformation import slice_update_in_place
from publisher.executor.steps import Step

_SCORES_PER_BLOCK = 1 << 22
"""Score elements computed at once on the rounded path (16 MiB in fp32): measured fastest on the
SD 1.5 UNet's 4096-token attention (64 rows of 16 heads)."""


def fuse(steps: list[Step], keep: set[str]) -> list[Step]:
    """`steps` with each attention sequence replaced by one step; `keep`: values read after them."""
    readers = Counter(name for step in steps for name in step.reads())
    producers = {info.name: step for step in steps for info in step.outputs}
    fused: dict[int, Step] = {}
    dropped: set[int] = set()
    taken: set[int] = set()
    for index, step in enumerate(steps):
        match = _attention_ops(step, producers, readers, keep)
        # A matmul ending one sequence and starting the next is fused into the first one only.
        if match is not None and not taken & {id(step), *map(id, match)}:
            first, softmax = match
            fused[index] = _fused_attention(first, softmax, step)
            dropped |= {id(first), id(softmax)}
            taken |= {id(step), id(first), id(softmax)}
    if not fused:
        return steps
    return [fused.get(index, step) for index, step in enumerate(steps) if id(step) not in dropped]


def _attention_ops(
    last: Step, producers: dict[str, Step], readers: Counter, keep: set[str]
) -> tuple[Step, Step] | None:
    """The first matmul and the softmax of a matmul -> softmax -> matmul ending at `last`, or None."""
    if last.op_type != "matmul" or _flag(last, "transpose_x") is not False or _flag(last, "transpose_y") is None:
        return None
    softmax = _sole_producer(last.inputs["x"], "softmax", producers, readers, keep)
    if softmax is None or last.inputs["y"] == last.inputs["x"] or not _last_axis(softmax):
        return None
    first = _sole_producer(softmax.inputs["x"], "matmul", producers, readers, keep)
    if first is None or _flag(first, "transpose_x") is not False or _flag(first, "transpose_y") is None:
        return None
    return first, softmax


def _sole_producer(ref: Any, op_type: str, producers: dict[str, Step], readers: Counter, keep: set[str]) -> Step | None:
    # The value must be read by the next op of the sequence alone: no other step sees it.
    if not isinstance(ref, str) or ref in keep or readers[ref] != 1:
        return None
    step = producers.get(ref)
    if step is None or step.op_type != op_type or len(step.outputs) != 1 or step.blocks:
        return None
    return step


def _flag(step: Step, name: str) -> bool | None:
    """A constant bool input (False when not given), None when it is computed at run time."""
    if name in step.raw:
        return bool(np.asarray(step.raw[name]).reshape(-1)[0])
    return None if name in step.inputs else False


def _last_axis(softmax: Step) -> bool:
    if "axis" not in softmax.raw:
        return "axis" not in softmax.inputs  # the default axis is -1
    axis = int(np.asarray(softmax.raw["axis"]).reshape(-1)[0])
    shape = softmax.outputs[0].shape
    return axis == -1 or (shape is not None and axis == len(shape) - 1)


def _fused_attention(first: Step, softmax: Step, last: Step) -> Step:
    return Step(
        op_type=last.op_type,
        name=last.name,
        fn=partial(
            attention,
            transpose_k=bool(_flag(first, "transpose_y")),
            transpose_v=bool(_flag(last, "transpose_y")),
            scores_dtype=first.outputs[0].dtype,
            weights_dtype=softmax.outputs[0].dtype,
        ),
        native_half=True,
        inputs={"q": first.inputs["x"], "k": first.inputs["y"], "v": last.inputs["y"]},
        raw={},
        outputs=last.outputs,
        out_dtypes=last.out_dtypes,
        fused=(first.op_type, softmax.op_type),
    )


def attention(
    a: OpArgs, *, transpose_k: bool, transpose_v: bool, scores_dtype: torch.dtype, weights_dtype: torch.dtype
) -> Result:
    """matmul(softmax(matmul(q, k, transpose_y=transpose_k), -1), v, transpose_y=transpose_v), as
    the three ops compute it; the scores and weights rounded to their dtypes unless widened."""
    q, k, v = a["q"], a["k"], a["v"]
    keys = k if transpose_k else k.transpose(-1, -2)
    values = v.transpose(-1, -2) if transpose_v else v
    rounded = not a.widened and (scores_dtype, weights_dtype) != (torch.float32, torch.float32)
    same_batch = q.dim() == keys.dim() == values.dim() and q.shape[:-2] == keys.shape[:-2] == values.shape[:-2]
    if not rounded and same_batch and q.dtype == keys.dtype == values.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, keys, values, scale=1.0)
    # Contiguous once: the program's q, k and v are head-split views ([B, L, H, D] read as [B, H, L, D]),
    # which matmul cannot batch without copying them, and it would copy k and v again for every block
    # (0.57 -> 0.36 s for one of SD 1.5's 4096-token self-attentions).
    keys_t = keys.transpose(-1, -2).float().contiguous()
    values = values.float().contiguous()
    q = q.float().contiguous()
    batch = math.prod(torch.broadcast_shapes(q.shape[:-2], keys_t.shape[:-2]))
    rows = max(1, _SCORES_PER_BLOCK // max(1, batch * keys_t.shape[-1]))
    blocks = []
    for start in range(0, q.shape[-2], rows):
        scores = torch.matmul(q[..., start : start + rows, :], keys_t)
        if rounded:
            # As the ops do: the first matmul's result rounded, softmax on it as held (torch's
            # half softmax computes in fp32 and rounds once), its result rounded.
            scores = torch.softmax(scores.to(scores_dtype), -1).to(weights_dtype)
        else:
            scores = torch.softmax(scores, -1)
        blocks.append(torch.matmul(scores.float(), values))
    return torch.cat(blocks, -2)


# Ops whose result may share its input's memory (torch views, or the input itself): an in-place update must
# wait until every such alias of the updated value has been read for the last time.
_VIEW_OPS = frozenset({"slice_by_index", "slice_by_size", "reshape", "transpose", "expand_dims", "squeeze", "identity",
                       "read_state", "coreml_update_state"})


def update_states_in_place(steps: list[Step], keep: set[str]) -> list[Step]:
    """`steps` with each state's slice_update made in place where the state is written back with its result
    and nothing reads the state's old value (or a view of it) afterwards."""
    producers = {info.name: step for step in steps for info in step.outputs}
    position = {id(step): index for index, step in enumerate(steps)}
    last_read: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.reads():
            last_read[name] = index
    in_place: dict[int, Step] = {}
    for step in steps:
        update = producers.get(step.inputs.get("value")) if step.state_target else None  # type: ignore[arg-type]
        if update is None or update.op_type != "slice_update" or not isinstance(update.inputs.get("x"), str):
            continue
        old = update.inputs["x"]
        at = position[id(update)]
        if old in keep or not _state_value(old, step.state_target, producers):
            continue
        if all(last_read.get(alias, -1) <= at if alias == old else last_read.get(alias, -1) < at
               for alias in _aliases(old, steps[:at])):
            in_place[id(update)] = replace(update, fn=slice_update_in_place)
    return [in_place.get(id(step), step) for step in steps]


def _state_value(name: str, state: str | None, producers: dict[str, Step]) -> bool:
    """Whether ``name`` is the state's value: read from it, or the result of its last update."""
    producer = producers.get(name)
    if producer is None:
        return False
    if producer.op_type == "read_state":
        return producer.inputs.get("input") == state
    return producer.op_type == "coreml_update_state" and producer.state_target == state


def _aliases(name: str, before: list[Step]) -> set[str]:
    """``name`` and every value the steps ``before`` made that may share its memory."""
    aliases = {name}
    for step in before:
        if step.op_type in _VIEW_OPS and step.reads() & aliases:
            aliases |= {info.name for info in step.outputs}
    return aliases
