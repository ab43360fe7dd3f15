"""Convolution and transposed convolution (MIL conv)."""

from __future__ import annotations

import torch.nn.functional as F

from publisher.executor.ops._utils import _conv_pads, _pad_spatial, _per_channel
from publisher.executor.ops.registry import OpArgs, Result, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register("conv")
def conv(a: OpArgs) -> Result:
    x, w = a["x"], a.weight("weight")
    n = x.dim() - 2
    strides = a.ints("strides", [1] * n)
    dilations = a.ints("dilations", [1] * n)
    pads = _conv_pads(a, x, w.shape[2:], strides, dilations)
    if all(b == e for b, e in pads):
        padding = [b for b, _ in pads]
    else:
        x, padding = _pad_spatial(x, pads), [0] * n
    return _CONV[n](x, w, a.opt("bias"), strides, padding, dilations, a.int("groups", 1))


@register("conv_transpose")
def conv_transpose(a: OpArgs) -> Result:
    x, w = a["x"], a.weight("weight")
    n = x.dim() - 2
    strides = a.ints("strides", [1] * n)
    dilations = a.ints("dilations", [1] * n)
    full = _CONV_T[n](x, w, None, strides, 0, 0, a.int("groups", 1), dilations)
    full_sizes = full.shape[2:]
    pad_type = a.str("pad_type", "valid")
    output_shape = a.ints("output_shape")
    if pad_type == "custom":
        flat = a.ints("pad", [0] * 2 * n)
        begins = [flat[2 * i] for i in range(n)]
        targets = [full_sizes[i] - flat[2 * i] - flat[2 * i + 1] for i in range(n)]
    elif pad_type == "same":
        targets = [x.shape[2 + i] * strides[i] for i in range(n)]
        begins = [max(0, full_sizes[i] - targets[i]) // 2 for i in range(n)]
    else:
        begins, targets = [0] * n, list(full_sizes)
    if output_shape:
        targets = output_shape[2:]
        if pad_type == "same":
            begins = [max(0, full_sizes[i] - targets[i]) // 2 for i in range(n)]
    out = full
    for i in range(n):
        # The output window may reach past the full result (torch's output_padding): zeros there.
        take = out.narrow(2 + i, begins[i], min(targets[i], full_sizes[i] - begins[i]))
        missing = targets[i] - take.shape[2 + i]
        if missing > 0:
            tail = [0, 0] * (n - 1 - i) + [0, missing]
            take = F.pad(take, tail)
        out = take
    bias = a.opt("bias")
    return out if bias is None else out + _per_channel(bias, out.dim())
