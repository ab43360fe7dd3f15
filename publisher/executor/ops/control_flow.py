"""Control flow and lists: select, cond, while_loop, make_list, list_* (MIL control_flow)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from publisher.executor.errors import ExecutorError
from publisher.executor.ops.registry import OpArgs, Result, register


@register("select", native_half=True)
def select(a: OpArgs) -> Result:
    cond = a["cond"]
    return torch.where(cond if cond.dtype == torch.bool else cond != 0, a["a"], a["b"])


@register("cond", native_half=True)
def cond(a: OpArgs) -> Result:
    true_branch, false_branch = a.blocks
    return (true_branch if a.bool("pred") else false_branch)(())


@register("while_loop", native_half=True)
def while_loop(a: OpArgs) -> Result:
    condition, body = a.blocks
    values = tuple(a.held("loop_vars"))
    while bool(condition(values)[0]):
        values = body(values)
    return values


@dataclass(frozen=True)
class TensorList:
    """A MIL list value. Lists are values like tensors: a write returns a new list."""

    items: tuple[torch.Tensor | None, ...]
    """None where nothing was written yet: such an element reads as zeros, as make_list's do."""
    elem_shape: tuple[int, ...] | None
    """None where make_list declared a symbolic element shape: then the written elements' shape."""
    dtype: torch.dtype
    dynamic: bool

    def _index(self, index: int) -> int:
        if not 0 <= index < len(self.items):
            raise ExecutorError(f"list index {index} out of range (length {len(self.items)})")
        return index

    def read(self, index: int) -> torch.Tensor:
        item = self.items[self._index(index)]
        return item if item is not None else torch.zeros(self.element_shape(), dtype=self.dtype)

    def element_shape(self) -> tuple[int, ...]:
        if self.elem_shape is not None:
            return self.elem_shape
        written = next((item for item in self.items if item is not None), None)
        if written is None:
            raise ExecutorError("read of a list whose element shape is symbolic and which holds no element")
        return tuple(written.shape)

    def write(self, updates: dict[int, torch.Tensor]) -> TensorList:
        items = list(self.items)
        end = max(updates, default=-1) + 1
        if end > len(items):
            # A dynamic list grows to hold an index past its end (make_list's "auto-resizing array").
            if not self.dynamic:
                raise ExecutorError(f"list index {end - 1} out of range of a fixed-length list ({len(items)})")
            items += [None] * (end - len(items))
        for index, value in updates.items():
            if index < 0:
                raise ExecutorError(f"list index {index} out of range")
            items[index] = value
        return TensorList(tuple(items), self.elem_shape, self.dtype, self.dynamic)


@register("make_list", native_half=True)
def make_list(a: OpArgs) -> Result:
    dims = a.value("elem_shape")
    static = dims is not None and all(not isinstance(d, str) for d in dims)
    shape = tuple(int(d) for d in dims) if static else None
    return TensorList((None,) * a.int("init_length", 1), shape, a.out_dtypes[0], a.bool("dynamic_length", True))


@register("list_length", native_half=True)
def list_length(a: OpArgs) -> Result:
    return torch.tensor(len(a.held("ls").items), dtype=torch.int32)


@register("list_read", native_half=True)
def list_read(a: OpArgs) -> Result:
    return a.held("ls").read(a.int("index"))


@register("list_write", native_half=True)
def list_write(a: OpArgs) -> Result:
    return a.held("ls").write({a.int("index"): a["value"]})


@register("list_gather", native_half=True)
def list_gather(a: OpArgs) -> Result:
    ls: TensorList = a.held("ls")
    indices = a.ints("indices")
    if not indices:
        return torch.zeros((0, *ls.element_shape()), dtype=ls.dtype)
    return torch.stack([ls.read(i) for i in indices])


@register("list_scatter", native_half=True)
def list_scatter(a: OpArgs) -> Result:
    values = a["value"]
    return a.held("ls").write(dict(zip(a.ints("indices"), values.unbind(0), strict=True)))
