"""The op table's machinery: `OpArgs`, the `OPS` registry and the `register` decorator."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from publisher.executor.errors import ExecutorError

Result = torch.Tensor | tuple[torch.Tensor, ...]
BlockFn = Callable[[Sequence[Any]], tuple[Any, ...]]


class Scratch:
    """fp32 buffers that one run's ops reuse, one per input name, for widened weights.

    A fresh fp32 copy of a large fp16 weight costs more in page faults than in the copy itself
    (torch gets blocks over 32 MiB straight from mmap, zero-filled page by page): 15 ms of a
    17 ms widening of SD 1.5's 1280x1280x3x3 kernels. A buffer the next op reuses faults once.
    """

    __slots__ = ("_buffers",)

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def widen(self, name: str, t: torch.Tensor) -> torch.Tensor:
        count = t.numel()
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[name] = torch.empty(count, dtype=torch.float32)
        return buffer[:count].view(t.shape).copy_(t)


class OpArgs:
    """The inputs of one op at run time: tensors by name, plus the raw values of constant inputs.

    `blocks` are the op's nested blocks (cond, while_loop), each run by the runtime as
    `block(inputs) -> outputs`.
    """

    __slots__ = ("_tensors", "_raw", "_widen", "out_dtypes", "blocks", "_scratch")

    def __init__(
        self,
        tensors: dict[str, Any],
        raw: dict[str, Any],
        widen: bool,
        out_dtypes: Sequence[torch.dtype],
        blocks: Sequence[BlockFn] = (),
        scratch: Scratch | None = None,
    ) -> None:
        self._tensors = tensors
        self._raw = raw
        self._widen = widen
        self.out_dtypes = out_dtypes
        self.blocks = blocks
        self._scratch = scratch

    @property
    def widened(self) -> bool:
        """True when floating-point inputs come widened to fp32 (fp32 mode, or an op that is not
        native_half); False when they come in their declared dtypes (fp16 mode, native_half ops)."""
        return self._widen

    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        if self._widen and t.dtype == torch.float16:
            return t.float()
        return t

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        if t is None:
            raise ExecutorError(f"input '{name}' is missing or is not a tensor")
        return self._prepare(t)

    def weight(self, name: str) -> torch.Tensor:
        """Input `name` as `a[name]` gives it, widened (when it is) into the run's reused buffer for
        that name: only for an input that the op's result never aliases (conv's or linear's weight),
        as the next op overwrites the buffer."""
        t = self._tensors.get(name)
        if self._scratch is not None and self._widen and t is not None and t.dtype == torch.float16:
            return self._scratch.widen(name, t)
        return self[name]

    def widened_weight(self, name: str) -> torch.Tensor:
        """Input `name` in fp32 whatever the mode, widened into the run's reused buffer like :meth:`weight`."""
        t = self._tensors.get(name)
        if self._scratch is not None and t is not None and t.dtype == torch.float16:
            return self._scratch.widen(name, t)
        return self[name] if t is None or t.dtype != torch.float16 else t.float()

    def opt(self, name: str) -> torch.Tensor | None:
        """The tensor input `name`, or None when the op was given none."""
        t = self._tensors.get(name)
        return None if t is None else self._prepare(t)

    def many(self, name: str) -> list[torch.Tensor]:
        """A tuple input (concat's `values`, einsum's `values`, ...)."""
        return [self._prepare(t) for t in self._tensors[name]]

    def held(self, name: str) -> Any:
        """Input `name` as the runtime holds it, unconverted: a list value, or a tuple of values."""
        return self._tensors[name]

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


def _scalar(value: Any) -> Any:
    # Scalar parameters may be stored as 1-element tensors; NumPy 2 refuses int() on those.
    return np.asarray(value).reshape(-1)[0]


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


def register_elementwise(fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Register each single-kernel function of `x` in `fns` as the op of that name (native_half)."""
    for op_type, fn in fns.items():
        register(op_type, native_half=True)(_of_x(op_type, fn))


def _of_x(op_type: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    def unary(a: OpArgs) -> Result:
        return fn(a["x"])

    unary.__name__ = op_type
    return unary
