"""State access of stateful programs (MIL iOS18 states, coreml_update_state)."""

from __future__ import annotations

from publisher.executor.ops.registry import OpArgs, Result, register


@register("read_state", native_half=True)
def read_state(a: OpArgs) -> Result:
    return a["input"]


@register("coreml_update_state", native_half=True)
def coreml_update_state(a: OpArgs) -> Result:
    # The runtime stores the result into the state (Step.state_target); the op also outputs it.
    return a["value"]
