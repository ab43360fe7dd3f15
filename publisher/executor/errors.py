"""Errors raised by the ML Program executor."""

from __future__ import annotations

from publisher.errors import PublisherError


class ExecutorError(PublisherError):
    """The program cannot be executed faithfully (malformed program, bad inputs, shape mismatch)."""


class UnsupportedOpError(ExecutorError):
    """The program uses an op (or an op form) the executor's op table does not implement."""

    def __init__(self, op_type: str, opset: str, component: str, detail: str = "") -> None:
        self.op_type = op_type
        self.opset = opset
        self.component = component
        suffix = f": {detail}" if detail else ""
        super().__init__(f"unsupported MIL op '{op_type}' (opset {opset}) in {component}{suffix}")
