"""Random sampling (MIL random).

Core ML's generator cannot be reproduced bit for bit: these ops draw from the same distributions
with torch's generator (seeded by the op's `seed` when it is >= 0, so a seeded op repeats its
values across calls, as the MIL spec requires), and are tested by distribution.
"""

from __future__ import annotations

import torch

from publisher.executor.ops._utils import _fill_dtype
from publisher.executor.ops.registry import OpArgs, Result, register


def _generator(a: OpArgs) -> torch.Generator:
    generator = torch.Generator()
    seed = a.int("seed", -1)
    if seed >= 0:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def _uniform(a: OpArgs) -> torch.Tensor:
    """Samples of U[0, 1) in the op's declared shape, in float64."""
    return torch.rand(a.ints("shape"), generator=_generator(a), dtype=torch.float64)


@register("random_bernoulli")
def random_bernoulli(a: OpArgs) -> Result:
    return (_uniform(a) < a.float("prob", 0.5)).to(_fill_dtype(a))


@register("random_uniform")
def random_uniform(a: OpArgs) -> Result:
    low, high = a.float("low", 0.0), a.float("high", 1.0)
    return (low + (high - low) * _uniform(a)).to(_fill_dtype(a))


@register("random_normal")
def random_normal(a: OpArgs) -> Result:
    samples = torch.randn(a.ints("shape"), generator=_generator(a), dtype=torch.float64)
    return (a.float("mean", 0.0) + a.float("stddev", 1.0) * samples).to(_fill_dtype(a))


@register("random_categorical")
def random_categorical(a: OpArgs) -> Result:
    # Draws `size` class indices per distribution (with replacement), returned in the float dtype.
    x = a["x"].double()
    probs = torch.softmax(x, dim=-1) if a.str("mode", "logits") == "logits" else x
    size = a.int("size", 1)
    flat = probs.reshape(-1, probs.shape[-1])
    draws = torch.multinomial(flat, size, replacement=True, generator=_generator(a))
    return draws.reshape(*x.shape[:-1], size).to(_fill_dtype(a))
