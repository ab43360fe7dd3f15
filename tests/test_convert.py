"""coremltools 9.0 fixes: the NumPy >= 2.4 frontend cast, the fp16 pass's range check."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import coremltools as ct
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from publisher.coremltools_fixes import fits_fp16, install_coremltools_fixes

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
    and `install_coremltools_fixes` can go."""
    result = _convert_in_subprocess("")
    assert result.returncode != 0
    assert "only 0-dimensional arrays can be converted to Python scalars" in result.stderr


def test_patched_frontend_converts_attention_exactly():
    install_coremltools_fixes()
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
    install_coremltools_fixes()
    install_coremltools_fixes()
    assert install_coremltools_fixes.cache_info().currsize == 1


def coremltools_overflow_check(value) -> bool:
    """coremltools 9.0's own expression in FP16ComputePrecision.fp16_overflow: the oracle."""
    abs_value = np.abs(np.expand_dims(value, 0))
    return bool(np.max(abs_value[np.where(abs_value < 1e38)], initial=0.0) > 65504)


@pytest.mark.parametrize("value", [
    np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32),
    np.float32(65504), np.float32(65505), np.float32(-65505), np.array([1.0, np.inf, -np.inf], np.float32),
    np.array([np.nan, 3.0], np.float32), np.array([1e38, -1e38], np.float32), np.array([9e37, 1.0], np.float32),
    np.array([-9e37], np.float32), np.zeros((0, 3), np.float32), 70000.0,
], ids=lambda value: np.array2string(np.asarray(value).ravel()[:3], precision=0))
def test_fp16_range_check_answers_as_coremltools_does(value):
    assert fits_fp16(value) is not coremltools_overflow_check(value)


def test_constant_beyond_fp16_keeps_its_op_in_fp32():
    install_coremltools_fixes()

    class Scale(torch.nn.Module):
        def forward(self, x):
            return x * 70000.0 + x * 3.0

    traced = torch.jit.trace(Scale().eval(), torch.randn(1, 4))
    model = ct.convert(traced, convert_to="mlprogram", inputs=[ct.TensorType(name="x", shape=(1, 4))],
                       minimum_deployment_target=ct.target.iOS16, skip_model_load=True)
    program = model._mil_program.functions["main"]
    muls = {float(op.y.val): op.x.dtype for op in program.operations if op.op_type == "mul"}
    fp16, fp32 = ct.converters.mil.mil.types.fp16, ct.converters.mil.mil.types.fp32
    assert muls == {70000.0: fp32, 3.0: fp16}
