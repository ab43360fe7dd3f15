"""select (MIL control_flow)."""

from __future__ import annotations

import torch

from publisher.executor.ops.registry import OpArgs, Result, register


@register("select", native_half=True)
def select(a: OpArgs) -> Result:
    cond = a["cond"]
    return torch.where(cond if cond.dtype == torch.bool else cond != 0, a["a"], a["b"])
