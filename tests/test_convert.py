"""The coremltools 9.0 + NumPy >= 2.4 frontend fix, and reference modules matching diffusers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import coremltools as ct
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from publisher.convert import install_frontend_fixes

# diffusers' attention computes head sizes from traced shapes: `aten::Int` on folded 1-element arrays.
CONVERT_ATTENTION = textwrap.dedent(
    """
    import coremltools as ct, numpy as np, torch
    from diffusers.models.attention_processor import Attention
    {fix}
    attention = Attention(query_dim=32, heads=4, dim_head=8).eval()
    traced = torch.jit.trace(attention, torch.randn(1, 16, 32))
    ct.convert(traced, convert_to="mlprogram", inputs=[ct.TensorType(name="x", shape=(1, 16, 32))],
               minimum_deployment_target=ct.target.iOS16, skip_model_load=True)
    print("converted")
    """
)


def _convert_in_subprocess(fix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CONVERT_ATTENTION.format(fix=fix)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(
    tuple(int(p) for p in np.__version__.split(".")[:2]) < (2, 4), reason="bug needs NumPy >= 2.4"
)
def test_unpatched_frontend_still_fails_on_attention():
    """Proves the next test exercises the bug: if this starts passing, coremltools fixed it upstream
    and `install_frontend_fixes` can go."""
    result = _convert_in_subprocess("")
    assert result.returncode != 0
    assert "only 0-dimensional arrays can be converted to Python scalars" in result.stderr


def test_patched_frontend_converts_attention_exactly():
    install_frontend_fixes()
    attention = Attention(query_dim=32, heads=4, dim_head=8).eval()
    example = torch.randn(1, 16, 32)
    traced = torch.jit.trace(attention, example)
    model = ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=[ct.TensorType(name="x", shape=(1, 16, 32))],
        minimum_deployment_target=ct.target.iOS16,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    op_types = {
        op.type
        for op in model.get_spec().mlProgram.functions["main"].block_specializations["CoreML6"].operations
    }
    assert {"linear", "softmax", "matmul"} <= op_types


def test_fix_is_installed_once():
    install_frontend_fixes()
    install_frontend_fixes()
    assert install_frontend_fixes.cache_info().currsize == 1
