"""The op table: one small torch function per MIL op type, registered by name.

Every function receives an `OpArgs` view of the op's inputs and returns a tensor (or a tuple of
tensors for multi-output ops). Tensors come in the dtype the executor holds them in; the executor
then casts each result to the dtype the Program declares for it (fp16 mode) or to fp32 (fp32 mode).

Ops registered with `native_half=True` are single torch calls whose CPU half-precision kernels
compute in fp32 and round once (elementwise math, matmul, softmax, sum/mean/max/min), or that only
move data: in fp16 mode they run on fp16 tensors directly, which gives the result of computing in
fp32 and rounding once (bit for bit, up to fp32 summation order in matmul), without the fp32 copies
that would double the memory traffic of the UNet's attention. All other ops receive their
floating-point inputs widened to fp32.

Semantics follow coremltools' MIL op definitions (coremltools/converters/mil/mil/ops/defs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from publisher.executor.errors import ExecutorError

Result = torch.Tensor | tuple[torch.Tensor, ...]


def _scalar(value: Any) -> Any:
    # Scalar parameters may be stored as 1-element tensors; NumPy 2 refuses int() on those.
    return np.asarray(value).reshape(-1)[0]


class OpArgs:
    """The inputs of one op at run time: tensors by name, plus the raw values of constant inputs."""

    __slots__ = ("_tensors", "_raw", "_widen", "out_dtypes")

    def __init__(
        self,
        tensors: dict[str, Any],
        raw: dict[str, Any],
        widen: bool,
        out_dtypes: Sequence[torch.dtype],
    ) -> None:
        self._tensors = tensors
        self._raw = raw
        self._widen = widen
        self.out_dtypes = out_dtypes

    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        if self._widen and t.dtype == torch.float16:
            return t.float()
        return t

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        if t is None:
            raise ExecutorError(f"input '{name}' is missing or is not a tensor")
        return self._prepare(t)

    def opt(self, name: str) -> torch.Tensor | None:
        """The tensor input `name`, or None when the op was given none."""
        t = self._tensors.get(name)
        return None if t is None else self._prepare(t)

    def many(self, name: str) -> list[torch.Tensor]:
        """A tuple input (concat's `values`, einsum's `values`, ...)."""
        return [self._prepare(t) for t in self._tensors[name]]

    def value(self, name: str, default: Any = None) -> Any:
        """A parameter's value as numpy/Python (const inputs, or a runtime tensor read back)."""
        if name in self._raw and self._raw[name] is not None:
            return self._raw[name]
        t = self._tensors.get(name)
        if t is None:
            return default
        return t.numpy() if t.dim() else t.item()

    def ints(self, name: str, default: Sequence[int] | None = None) -> list[int]:
        v = self.value(name)
        if v is None:
            return list(default) if default is not None else []
        return [int(i) for i in np.asarray(v).reshape(-1)]

    def int(self, name: str, default: int = 0) -> int:
        v = self.value(name)
        return default if v is None else int(_scalar(v))

    def float(self, name: str, default: float = 0.0) -> float:
        v = self.value(name)
        return default if v is None else float(_scalar(v))

    def bool(self, name: str, default: bool = False) -> bool:
        v = self.value(name)
        return default if v is None else bool(_scalar(v))

    def str(self, name: str, default: str = "") -> str:
        v = self.value(name)
        return default if v is None else str(v)


OpFn = Callable[[OpArgs], Result]


@dataclass(frozen=True)
class OpImpl:
    """An entry of the op table."""

    fn: OpFn
    native_half: bool


OPS: dict[str, OpImpl] = {}
"""MIL op type -> implementation. Op types absent here make the executor raise UnsupportedOpError."""


def register(*op_types: str, native_half: bool = False) -> Callable[[OpFn], OpFn]:
    """Register `fn` as the implementation of `op_types`."""

    def decorate(fn: OpFn) -> OpFn:
        for op_type in op_types:
            if op_type in OPS:
                raise ValueError(f"op {op_type} registered twice")
            OPS[op_type] = OpImpl(fn, native_half)
        return fn

    return decorate


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _per_channel(param: torch.Tensor, rank: int) -> torch.Tensor:
    """A [C] parameter shaped to broadcast along axis 1 of a rank-`rank` tensor."""
    return param.reshape([1, -1] + [1] * (rank - 2))


# ----------------------------------------------------------------------------- elementwise binary


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


# ----------------------------------------------------------------------------- elementwise unary


def _unary(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    def unary(a: OpArgs) -> Result:
        return fn(a["x"])

    unary.__name__ = op_type
    register(op_type, native_half=True)(unary)


for _name, _fn in {
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
    "relu": torch.relu,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softplus": F.softplus,
}.items():
    _unary(_name, _fn)


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


# ----------------------------------------------------------------------------- activations


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


# ----------------------------------------------------------------------------- linear algebra


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


@register("linear")
def linear(a: OpArgs) -> Result:
    x, weight, bias = _common(a["x"], a["weight"], a.opt("bias"))
    return F.linear(x, weight, bias)


@register("matmul", native_half=True)
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


@register("scaled_dot_product_attention")
def scaled_dot_product_attention(a: OpArgs) -> Result:
    q, k, v = a["query"], a["key"], a["value"]
    mask = a.opt("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------- convolution


def _same_pads(
    pad_type: str,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[int, int]]:
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        effective = (k - 1) * d + 1
        total = max(0, s * math.ceil(size / s) - size + effective - s)
        small, large = total // 2, total - total // 2
        # `same` puts the odd element after, `same_lower` before (TF/ONNX SAME_UPPER/SAME_LOWER).
        pads.append((large, small) if pad_type == "same_lower" else (small, large))
    return pads


def _conv_pads(
    a: OpArgs, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[tuple[int, int]]:
    spatial = x.shape[2:]
    pad_type = a.str("pad_type", "valid")
    if pad_type == "custom":
        flat = a.ints("pad", [0] * 2 * len(spatial))
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(spatial))]
    if pad_type in ("same", "same_lower"):
        return _same_pads(pad_type, spatial, kernel, strides, dilations)
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    raise ExecutorError(f"unknown pad_type {pad_type!r}")


def _pad_spatial(x: torch.Tensor, pads: Sequence[tuple[int, int]], value: float = 0.0) -> torch.Tensor:
    # F.pad lists the last dimension first.
    flat = [p for pair in reversed(pads) for p in pair]
    return F.pad(x, flat, value=value) if any(flat) else x


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register("conv")
def conv(a: OpArgs) -> Result:
    x, w = a["x"], a["weight"]
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
    x, w = a["x"], a["weight"]
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


# ----------------------------------------------------------------------------- normalization


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


# ----------------------------------------------------------------------------- pooling


def _pool_pads(a: OpArgs, x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
    return _conv_pads(a, x, kernel, strides, [1] * len(kernel))


_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _sum_pool(x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], ceil_mode: bool) -> torch.Tensor:
    return _AVG[len(kernel)](x, kernel, strides, 0, ceil_mode, True) * math.prod(kernel)


@register("avg_pool")
def avg_pool(a: OpArgs) -> Result:
    x = a["x"]
    kernel = a.ints("kernel_sizes")
    strides = a.ints("strides", [1] * len(kernel))
    ceil_mode = a.bool("ceil_mode")
    pads = _pool_pads(a, x, kernel, strides)
    padded = _pad_spatial(x, pads)
    if not a.bool("exclude_padding_from_average") or not any(p for pair in pads for p in pair):
        return _AVG[len(kernel)](padded, kernel, strides, 0, ceil_mode, True)
    ones = _pad_spatial(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype), pads)
    return _sum_pool(padded, kernel, strides, ceil_mode) / _sum_pool(ones, kernel, strides, ceil_mode)


@register("max_pool")
def max_pool(a: OpArgs) -> Result:
    x = a["x"]
    kernel = a.ints("kernel_sizes")
    strides = a.ints("strides", [1] * len(kernel))
    padded = _pad_spatial(x, _pool_pads(a, x, kernel, strides), value=-math.inf)
    return _MAX[len(kernel)](padded, kernel, strides, 0, 1, a.bool("ceil_mode"))


@register("l2_pool")
def l2_pool(a: OpArgs) -> Result:
    x = a["x"]
    kernel = a.ints("kernel_sizes")
    strides = a.ints("strides", [1] * len(kernel))
    padded = _pad_spatial(x, _pool_pads(a, x, kernel, strides))
    return torch.sqrt(_sum_pool(padded.square(), kernel, strides, a.bool("ceil_mode")))


# ----------------------------------------------------------------------------- resizing


def _nearest(x: torch.Tensor, out_h: int, out_w: int, ratio_h: float, ratio_w: float) -> torch.Tensor:
    # Output index i reads input index floor(i * ratio), ratio = input size / output size.
    rows = torch.clamp((torch.arange(out_h, dtype=torch.float64) * ratio_h).floor().long(), max=x.shape[-2] - 1)
    cols = torch.clamp((torch.arange(out_w, dtype=torch.float64) * ratio_w).floor().long(), max=x.shape[-1] - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


@register("upsample_nearest_neighbor", native_half=True)
def upsample_nearest_neighbor(a: OpArgs) -> Result:
    x = a["x"]
    sh, sw = a.float("scale_factor_height", 1.0), a.float("scale_factor_width", 1.0)
    if sh.is_integer() and sw.is_integer():
        return x.repeat_interleave(int(sh), dim=-2).repeat_interleave(int(sw), dim=-1)
    out_h, out_w = math.floor(sh * x.shape[-2]), math.floor(sw * x.shape[-1])
    # Core ML samples by the size ratio, not by 1/scale (they differ once the output size is floored).
    return _nearest(x, out_h, out_w, x.shape[-2] / out_h, x.shape[-1] / out_w)


@register("resize_nearest_neighbor", native_half=True)
def resize_nearest_neighbor(a: OpArgs) -> Result:
    x = a["x"]
    out_h, out_w = a.int("target_size_height"), a.int("target_size_width")
    return _nearest(x, out_h, out_w, x.shape[-2] / out_h, x.shape[-1] / out_w)


def _lerp_axis(x: torch.Tensor, dim: int, grid: torch.Tensor) -> torch.Tensor:
    size = x.shape[dim]
    grid = grid.clamp(0, size - 1)
    low = grid.floor().long()
    high = torch.clamp(low + 1, max=size - 1)
    shape = [1] * x.dim()
    shape[dim] = -1
    weight = (grid - low).to(x.dtype).reshape(shape)
    return x.index_select(dim, low) * (1 - weight) + x.index_select(dim, high) * weight


def _grid(mode: str, size_in: int, size_out: int, spacing: float | None = None) -> torch.Tensor:
    """Sampling positions in input coordinates (see MIL resize_bilinear's sampling modes)."""
    i = torch.arange(size_out, dtype=torch.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            return torch.full((1,), (size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0, dtype=torch.float64)
        return i * ((size_in - 1) / (size_out - 1))
    if mode == "DEFAULT":
        step = (
            spacing
            if spacing is not None
            else ((size_in - size_in / size_out) / (size_out - 1) if size_out > 1 else 0.0)
        )
        return i * step
    if mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        return 0.5 * delta + i * delta
    if mode == "UNALIGN_CORNERS":
        step = spacing if spacing is not None else size_in / size_out
        return i * step + 0.5 * step - 0.5
    raise ExecutorError(f"unknown sampling_mode {mode!r}")


def _bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return _lerp_axis(_lerp_axis(x, x.dim() - 2, rows), x.dim() - 1, cols)


@register("resize_bilinear")
def resize_bilinear(a: OpArgs) -> Result:
    x = a["x"]
    mode = a.str("sampling_mode", "DEFAULT")
    out_h, out_w = a.int("target_size_height", 1), a.int("target_size_width", 1)
    return _bilinear(x, _grid(mode, x.shape[-2], out_h), _grid(mode, x.shape[-1], out_w))


@register("upsample_bilinear")
def upsample_bilinear(a: OpArgs) -> Result:
    x = a["x"]
    sh, sw = a.float("scale_factor_height", 1.0), a.float("scale_factor_width", 1.0)
    h, w = x.shape[-2], x.shape[-1]
    out_h, out_w = math.floor(h * sh), math.floor(w * sw)
    align = a.bool("align_corners", True)
    half_pixel = a.bool("half_pixel_centers", not align)
    if align:
        return _bilinear(x, _grid("ALIGN_CORNERS", h, out_h), _grid("ALIGN_CORNERS", w, out_w))
    # Without aligned corners the grid steps by input/output size (the scale recomputed from the
    # floored output size, as MIL defines it), optionally from the half-pixel offset.
    mode = "UNALIGN_CORNERS" if half_pixel else "DEFAULT"
    return _bilinear(x, _grid(mode, h, out_h, h / out_h), _grid(mode, w, out_w, w / out_w))


# ----------------------------------------------------------------------------- reductions


def _reduce_axes(a: OpArgs, x: torch.Tensor) -> list[int]:
    axes = a.value("axes")
    if axes is None:
        return list(range(x.dim()))
    return sorted({_axis(int(ax), x.dim()) for ax in np.asarray(axes).reshape(-1)})


_SINGLE_KERNEL_REDUCTIONS = {"reduce_sum", "reduce_mean", "reduce_max", "reduce_min"}


def _reduction(op_type: str, fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> None:
    def reduce(a: OpArgs) -> Result:
        x = a["x"]
        return fn(x, _reduce_axes(a, x), a.bool("keep_dims"))

    reduce.__name__ = op_type
    # Single-kernel reductions accumulate half inputs in fp32; composite ones (l2 = sqrt of a sum of
    # squares, ...) would round between their steps, so they get fp32 inputs.
    register(op_type, native_half=op_type in _SINGLE_KERNEL_REDUCTIONS)(reduce)


def _prod(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    for ax in sorted(axes, reverse=True):
        x = x.prod(dim=ax, keepdim=keep)
    return x


def _log_sum_exp(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    return torch.logsumexp(x, dim=axes, keepdim=keep) if axes else x


for _name, _rfn in {
    "reduce_sum": lambda x, ax, k: x.sum(dim=ax, keepdim=k),
    "reduce_mean": lambda x, ax, k: x.mean(dim=ax, keepdim=k),
    "reduce_max": lambda x, ax, k: x.amax(dim=ax, keepdim=k),
    "reduce_min": lambda x, ax, k: x.amin(dim=ax, keepdim=k),
    "reduce_prod": _prod,
    "reduce_l1_norm": lambda x, ax, k: x.abs().sum(dim=ax, keepdim=k),
    "reduce_l2_norm": lambda x, ax, k: x.square().sum(dim=ax, keepdim=k).sqrt(),
    "reduce_sum_square": lambda x, ax, k: x.square().sum(dim=ax, keepdim=k),
    "reduce_log_sum": lambda x, ax, k: x.sum(dim=ax, keepdim=k).log(),
    "reduce_log_sum_exp": _log_sum_exp,
}.items():
    _reduction(_name, _rfn)


@register("reduce_argmax")
def reduce_argmax(a: OpArgs) -> Result:
    # torch, like numpy, returns the first index among equal maxima.
    return torch.argmax(a["x"], dim=a.int("axis", -1), keepdim=a.bool("keep_dims"))


@register("reduce_argmin")
def reduce_argmin(a: OpArgs) -> Result:
    return torch.argmin(a["x"], dim=a.int("axis", -1), keepdim=a.bool("keep_dims"))


# ----------------------------------------------------------------------------- gather / scatter


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
        return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])
    batch = x.shape[:batch_dims]
    xs = x.reshape(math.prod(batch), *x.shape[batch_dims:])
    ids = idx.reshape(math.prod(batch), *idx.shape[batch_dims:])
    inner = axis - batch_dims
    rows = [
        xb.index_select(inner, ib.reshape(-1)).reshape(*xb.shape[:inner], *ib.shape, *xb.shape[inner + 1 :])
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


# ----------------------------------------------------------------------------- tensor operations


@register("identity", native_half=True)
def identity(a: OpArgs) -> Result:
    return a["x"]


@register("read_state", native_half=True)
def read_state(a: OpArgs) -> Result:
    return a["input"]


@register("coreml_update_state", native_half=True)
def coreml_update_state(a: OpArgs) -> Result:
    # The runtime stores the result into the state (Step.state_target); the op also outputs it.
    return a["value"]


@register("select", native_half=True)
def select(a: OpArgs) -> Result:
    cond = a["cond"]
    return torch.where(cond if cond.dtype == torch.bool else cond != 0, a["a"], a["b"])


@register("concat", native_half=True)
def concat(a: OpArgs) -> Result:
    values = a.many("values")
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


def _fill_dtype(a: OpArgs) -> torch.dtype:
    dtype = a.out_dtypes[0]
    return torch.float32 if dtype.is_floating_point else dtype


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


# ----------------------------------------------------------------------------- shape transformations


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
    x = a["x"]
    spec, forward = _slices(a, x.shape)
    out = x.clone()
    key: Any = tuple(spec) if forward else _index_tensors(spec, x.shape)
    region = out[key]
    out[key] = a["update"].to(x.dtype).reshape(region.shape)
    return out


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


# ----------------------------------------------------------------------------- quantization (iOS17)


def _along(param: torch.Tensor, rank: int, axis: int | None) -> torch.Tensor:
    if param.dim() == 0 or axis is None:
        return param
    shape = [1] * rank
    shape[_axis(axis, rank)] = -1
    return param.reshape(shape)


@register("quantize")
def quantize(a: OpArgs) -> Result:
    x = a["input"]
    axis = a.value("axis")
    axis_i = None if axis is None else int(axis)
    q = torch.round(x / _along(a["scale"], x.dim(), axis_i))
    zero_point = a.opt("zero_point")
    if zero_point is not None:
        q = q + _along(zero_point, x.dim(), axis_i).float()
    info = torch.iinfo(a.out_dtypes[0])
    return torch.clamp(q, info.min, info.max)


@register("dequantize")
def dequantize(a: OpArgs) -> Result:
    q = a["input"]
    axis = a.value("axis")
    axis_i = None if axis is None else int(axis)
    values = q.float()
    zero_point = a.opt("zero_point")
    if zero_point is not None:
        values = values - _along(zero_point, q.dim(), axis_i).float()
    return values * _along(a["scale"], q.dim(), axis_i)
