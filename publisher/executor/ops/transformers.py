"""scaled_dot_product_attention (MIL iOS18 transformers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from publisher.executor.ops.registry import OpArgs, Result, register


@register("scaled_dot_product_attention")
def scaled_dot_product_attention(a: OpArgs) -> Result:
    q, k, v = a["query"], a["key"], a["value"]
    mask = a.opt("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
