"""The fixes this project installs into coremltools, each tied to the ``coremltools==9.0`` pin.

Each one replaces a single function of coremltools 9.0 with one that gives the same results, and
each has a test that shows what it fixes (``tests/test_convert.py``, ``tests/test_palettize.py``). A
coremltools upgrade must re-check every one: drop it when upstream has fixed it, port it when the
replaced function moved.

- **NumPy >= 2.4 ``_cast``** (a bug; apple/coremltools#2633): the torch frontend's ``aten::Int`` /
  ``aten::Bool`` call ``int()`` on a shape-(1,) array, which NumPy 2.4 refuses. diffusers' attention
  hits it, so no UNet converts without the fix.
- **fp16 overflow check** (speed; no upstream issue): the fp16 pass checks every fp32 constant's
  range through ``np.where`` index arrays, 40 bytes per element and about a third of SD 1.5's UNet
  conversion. :func:`fits_fp16` answers the same question with two masked reductions.
- **LUT index packing** (speed; no upstream issue): ``pack_elements_into_bits`` expands every element
  to 8 bytes through ``np.unpackbits``. :func:`pack_bits` writes the same bytes by shifting whole-byte
  runs of elements into words, 4x faster.

- **Grouped-channel palettization** (speed; no upstream issue): ``grouped_channelwise_compress``
  calls the LUT function once per channel group (9,950 calls for SD 1.5's UNet in groups of 16).
  When the function is ours (``publisher.palettize.lut_function``), :func:`grouped_channelwise_compress`
  palettizes all of a weight's groups in one :func:`publisher.palettize.palettize_groups` call first
  and hands coremltools' loop the results in its own order: the same LUTs and indices, byte for byte.

:func:`install_coremltools_fixes` installs all four, once per process, before the first conversion
or compression.
"""

from __future__ import annotations

import builtins
import functools
import math
from typing import Any

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
from coremltools.optimize import _utils
from coremltools.optimize.coreml._quantization_passes import palettize_weights

from publisher.palettize import palettize, palettize_groups


def _install_numpy2_cast_fix() -> None:
    """coremltools 9.0 + NumPy >= 2.4: ``aten::Int`` on a folded 1-element array fails.

    Its frontend calls ``int(x.val)`` on a shape-(1,) array, which NumPy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"; apple/coremltools#2633). diffusers'
    attention hits it. Re-registering the two casting ops is the narrowest fix: the rest of the
    frontend is untouched, and the override is a no-op on NumPy versions that still allow it.
    """

    def cast(context, node, to_python: type, dtype_name: str) -> None:
        x = _get_inputs(context, node, expected=1)[0]
        if len(x.shape) > 0 and not all(dim == 1 for dim in x.shape):
            raise ValueError("input to cast must be either a scalar or a length 1 tensor")
        if x.can_be_folded_to_const():
            result = mb.const(val=to_python(np.asarray(x.val).reshape(())), name=node.name)
        elif len(x.shape) > 0:
            result = mb.cast(x=mb.squeeze(x=x, name=node.name + "_item"), dtype=dtype_name, name=node.name)
        else:
            result = mb.cast(x=x, dtype=dtype_name, name=node.name)
        context.add(result, node.name)

    def _int(context, node) -> None:
        cast(context, node, builtins.int, "int32")

    def _bool(context, node) -> None:
        cast(context, node, builtins.bool, "bool")

    # Same registry names as coremltools' own functions, so these replace them exactly.
    register_torch_op(_int, torch_alias=["int"], override=True)
    register_torch_op(_bool, torch_alias=["bool"], override=True)


def fits_fp16(value: Any) -> bool:
    """Whether the finite part of ``value`` (magnitudes under 1e38) lies within fp16's range.

    What coremltools' fp16 pass asks of every fp32 constant, answered with two masked reductions:
    its own check indexes the values through ``np.where`` (five int64 index arrays for a conv weight,
    40 bytes per element), which took about a third of SD 1.5's UNet conversion.
    """

    value = np.asarray(value)
    return not (np.max(value, where=value < 1e38, initial=0.0) > 65504
                or np.min(value, where=value > -1e38, initial=0.0) < -65504)


def _install_fp16_overflow_fix() -> None:
    """coremltools 9.0's ``FP16ComputePrecision.fp16_overflow`` with :func:`fits_fp16` as its check."""
    def fp16_overflow(op: Any) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, list | tuple) else [inputs]:
                if (var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                        and not fits_fp16(var.op.val.val)):
                    return True
        return False

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)


def pack_bits(elements: np.ndarray, nbits: int) -> np.ndarray:
    """``elements`` (integers of ``nbits`` bits, signed or not) packed LSB first into uint8.

    The bytes of coremltools 9.0's ``pack_elements_into_bits`` (iOS16/17 LUT indices), which
    expands every element to 8 bytes through ``np.unpackbits`` and copies the slice again: about a
    third of a 6-bit SD 1.5 UNet's compression. This shifts each run of elements that fills whole
    bytes (4 for 6 bits) into one integer word instead.
    """

    if not np.issubdtype(elements.dtype, np.integer):
        raise ValueError(f"Only support packing integers elements, but got {elements.dtype}")
    signed = np.issubdtype(elements.dtype, np.signedinteger)
    low, high = (-(1 << (nbits - 1)), (1 << (nbits - 1)) - 1) if signed else (0, (1 << nbits) - 1)
    if elements.size and not (low <= np.min(elements) and np.max(elements) <= high):
        raise ValueError(f"To pack elements into {nbits}-bit, they must lie in [{low}, {high}]")
    flat = elements.reshape(-1)
    group = 8 // math.gcd(nbits, 8)
    group_bytes = group * nbits // 8
    padded = np.zeros(-(-flat.size // group) * group, np.uint8)
    # Two's complement in uint8, cut to the low nbits: the bits np.unpackbits would have kept.
    padded[: flat.size] = flat.astype(np.uint8) & ((1 << nbits) - 1)
    columns = padded.reshape(-1, group)
    word = np.dtype("<u4" if group_bytes <= 4 else "<u8")
    packed = np.zeros(columns.shape[0], word)
    for position in range(group):
        packed |= columns[:, position].astype(word) << word.type(nbits * position)
    packed_bytes = packed.view(np.uint8).reshape(-1, word.itemsize)[:, :group_bytes].reshape(-1)
    return packed_bytes[: -(-flat.size * nbits // 8)].copy()


def _install_packing_fix() -> None:
    """Make coremltools pack LUT indices with :func:`pack_bits` (same bytes, a fraction of the time)."""
    _utils.pack_elements_into_bits = pack_bits


_COREMLTOOLS_GROUPED = palettize_weights.grouped_channelwise_compress


def grouped_channelwise_compress(original_data: np.ndarray, mode: str, nbits: int | None, channel_axis: int,
                                 channel_group_size: int, lut_function: Any = None, cluster_dim: int = 1,
                                 num_kmeans_workers: int = 1) -> Any:
    """coremltools 9.0's ``palettize_weights.grouped_channelwise_compress``, with our LUT function's
    groups palettized together up front (same arguments, same result)."""
    ours = isinstance(lut_function, functools.partial) and lut_function.func is palettize
    groups = _channel_groups(original_data, channel_axis, channel_group_size) if ours else None
    if mode.upper() == "CUSTOM" and cluster_dim == 1 and groups is not None and len(groups) > 1:
        palettes = iter(palettize_groups(groups, lut_function.keywords["nbits"]))
        expected = groups[0].shape

        def lut_function(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # coremltools cuts the groups as _channel_groups does; a change there must not pass silently.
            if group.shape != expected:
                raise AssertionError(f"coremltools passed a group of shape {group.shape}, expected {expected}")
            return next(palettes)

    return _COREMLTOOLS_GROUPED(original_data, mode, nbits, channel_axis, channel_group_size, lut_function,
                                cluster_dim, num_kmeans_workers)


def _channel_groups(data: Any, channel_axis: int, group_size: int) -> list[np.ndarray] | None:
    """The groups coremltools' loop visits, in its order; ``None`` where it would refuse the weight
    (it then says why itself)."""
    if not isinstance(data, np.ndarray) or not -data.ndim <= channel_axis < data.ndim:
        return None
    channels = data.shape[channel_axis]
    group_size = group_size or channels
    if channels % group_size:
        return None
    return np.split(np.swapaxes(data, 0, channel_axis), channels // group_size, axis=0)


def _install_grouped_palettization() -> None:
    palettize_weights.grouped_channelwise_compress = staticmethod(grouped_channelwise_compress)


@functools.cache
def install_coremltools_fixes() -> None:
    """Install every fix once per process (conversion and compression both call it)."""
    _install_numpy2_cast_fix()
    _install_fp16_overflow_fix()
    _install_packing_fix()
    _install_grouped_palettization()
