"""The compiled form of an ML Program: steps (one per compute op) and nested blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from publisher.executor.ops import OpFn


@dataclass(frozen=True)
class ValueInfo:
    """What the Program declares about one op output."""

    name: str
    dtype: torch.dtype
    """The declared dtype as held by the executor."""
    shape: tuple[int, ...] | None
    """The declared shape, None where it has symbolic dimensions (and for lists)."""
    is_list: bool = False
    """A MIL list (make_list, list_write, ...): `dtype` is then its elements' dtype."""

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclass
class Step:
    """One non-constant op, ready to run."""

    op_type: str
    name: str
    fn: OpFn
    native_half: bool
    inputs: dict[str, Any]
    """Input name -> env var name (str), constant tensor, or a tuple of those."""
    raw: dict[str, Any]
    """Input name -> value of each constant input (for parameters such as axes or pad_type)."""
    outputs: tuple[ValueInfo, ...]
    out_dtypes: tuple[torch.dtype, ...]
    release: tuple[str, ...] = ()
    """Values whose last use is this step: dropped right after it."""
    state_target: str | None = None
    """For coreml_update_state: the state input its result is written to."""
    blocks: tuple[CompiledBlock, ...] = ()
    """The op's nested blocks (cond's branches, while_loop's condition and body)."""
    fused: tuple[str, ...] = ()
    """The types of the ops this step computes before its own, fused into it (see fusion.py)."""

    def op_types(self) -> set[str]:
        """The op types this step runs: its own, those fused into it, its nested blocks'."""
        return {
            self.op_type,
            *self.fused,
            *(t for block in self.blocks for step in block.steps for t in step.op_types()),
        }

    def reads(self) -> set[str]:
        """The run-time values this step reads, including those its nested blocks read."""
        names = {r for value in self.inputs.values() for r in (value if isinstance(value, tuple) else (value,))}
        for block in self.blocks:
            names |= block.free
        return {name for name in names if isinstance(name, str)}


@dataclass
class CompiledBlock:
    """A nested block, run by its op as often as the op decides, in the enclosing program's values.

    Value names are unique in a program, so the block binds its inputs and results among the
    enclosing values (while_loop's condition and body share their input names, and run in turn).
    """

    inputs: tuple[str, ...]
    steps: list[Step]
    outputs: tuple[Any, ...]
    """Env var name or constant tensor of each block output."""
    free: frozenset[str]
    """Enclosing values the block reads: they outlive the op that holds the block."""
    scoped: tuple[str, ...]
    """The block's own values still bound once its outputs are read: dropped then."""


def plan_release(steps: list[Step], keep: set[str]) -> None:
    """Give each step the values to drop after it runs: those it is the last reader of."""
    last_use: dict[str, int] = {}
    for index, step in enumerate(steps):
        for out in step.outputs:
            last_use[out.name] = index
        for name in step.reads():
            last_use[name] = index
    release: dict[int, list[str]] = {}
    for name, index in last_use.items():
        if name not in keep:
            release.setdefault(index, []).append(name)
    for index, step in enumerate(steps):
        step.release = tuple(release.get(index, ()))
