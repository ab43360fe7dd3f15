"""The conformance rows that stay wrong, shown to be the op tests' expected values, not the executor.

Each test here reruns one of coremltools' own op tests with its `run_compare_builder` captured:
the test's program is converted as the test converts it, and its inputs and expected values are
kept. The program then runs through the executor, and the expected values are checked against a
float64 recomputation from what the converted package actually holds (its weights, its inputs'
dtypes). conformance/README.md explains each case; the tolerances below are the tests' own
(`compare_backend`'s atol 1e-4 / rtol 1e-5 for an fp32 backend on the CPU), never loosened.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

ct = pytest.importorskip("coremltools")

from conformance.plugin import set_op_test_environment  # noqa: E402

set_op_test_environment()  # before the op tests' modules are imported, here or by a later session

from coremltools.converters.mil.mil.ops.tests import testing_utils  # noqa: E402
from coremltools.converters.mil.testing_reqs import BackendConfig  # noqa: E402

from publisher.executor import load_program, run  # noqa: E402

ATOL, RTOL = 1e-4, 1e-5
FP16_ULP = 2.0**-10
"""One fp16 unit in the last place, relative: how far the executor's fp16 outputs may sit from the
float64 value (outputs are rounded to their declared fp16; the op itself runs in fp32)."""
CPU = ct.ComputeUnit.CPU_ONLY


def _backend(opset: Any) -> BackendConfig:
    return BackendConfig(backend="mlprogram", precision="fp32", opset_version=opset)


@dataclass
class Captured:
    """One `run_compare_builder` call of an op test: the converted model, inputs, expected outputs."""

    model: Any
    inputs: dict[str, np.ndarray]
    expected: list[np.ndarray]

    def predict(self) -> list[np.ndarray]:
        program = load_program(self.model.package_path)
        outputs = run(program, self.inputs, mode="fp16")
        return [np.asarray(outputs[spec.name], dtype=np.float64) for spec in program.outputs]

    def op(self, op_type: str) -> Any:
        """The op as loaded from the package's bytes (its constant inputs are the stored weights)."""
        (op,) = load_program(self.model.package_path).function.find_ops(op_type=op_type)
        return op


def _capture(monkeypatch: pytest.MonkeyPatch, module: Any, test: Callable[[], Any]) -> list[Captured]:
    """Run `test` with `module.run_compare_builder` converting only, and collect its calls."""
    calls: list[Captured] = []

    def convert_only(build, input_placeholders, input_values=None, expected_output_types=None,
                     expected_outputs=None, **kwargs):  # fmt: skip
        model = testing_utils.run_compare_builder(
            build, input_placeholders, input_values, expected_output_types, frontend_only=True,
            **{k: v for k, v in kwargs.items() if k in ("compute_unit", "backend", "inputs")},
        )  # fmt: skip
        expected = expected_outputs if isinstance(expected_outputs, list) else [expected_outputs]
        calls.append(Captured(model, dict(input_values), [np.asarray(e, dtype=np.float64) for e in expected]))
        return model

    monkeypatch.setattr(module, "run_compare_builder", convert_only)
    test()
    return calls


def _within_test_tolerance(actual: np.ndarray, expected: np.ndarray) -> bool:
    return bool(np.allclose(actual, expected, atol=ATOL, rtol=RTOL))


# ============================================================================ recurrent, fp16 dtype
#
# With `dtype=np.float16` on the fp32 backend, the recurrent op tests declare fp16 inputs, weights
# and outputs, yet compute the expected values from the unrounded weights (numpy float64 for gru,
# torch fp32 for lstm and rnn; for those two, from the unrounded fp32 inputs as well), and compare
# them with atol 1e-4, less than half an fp16 step above 0.25 (1.2e-4 to 4.9e-4). The float64
# recomputations below follow MIL's definitions (gate orders: lstm [i, f, o, z], gru [r, o, z])
# from the weights read back from the package.


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


_ACT = {"tanh": np.tanh, "sigmoid": _sigmoid}


def _f64(op: Any, name: str, size: int) -> np.ndarray:
    var = op.inputs.get(name)
    return np.zeros(size) if var is None else np.asarray(var.val, dtype=np.float64)


def _steps(x: np.ndarray, reverse: bool) -> list[np.ndarray]:
    return list(x[::-1] if reverse else x)


def _emit(op: Any, outputs: list[np.ndarray], *state: np.ndarray) -> list[np.ndarray]:
    seq = np.stack(outputs) if op.output_sequence.val else outputs[-1][None]
    return [seq, *state]


def _rnn_f64(op: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    w, r = _f64(op, "weight_ih", 0), _f64(op, "weight_hh", 0)
    b = _f64(op, "bias", w.shape[0])
    h = inputs["initial_h"].astype(np.float64)
    outputs = []
    for x in _steps(inputs["x"].astype(np.float64), op.direction.val == "reverse"):
        h = np.tanh(x @ w.T + h @ r.T + b)
        outputs.append(h)
    return _emit(op, outputs, h)


def _lstm_f64(op: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    w, r = _f64(op, "weight_ih", 0), _f64(op, "weight_hh", 0)
    b = _f64(op, "bias", w.shape[0])
    h, c = inputs["initial_h"].astype(np.float64), inputs["initial_c"].astype(np.float64)
    outputs = []
    for x in _steps(inputs["x"].astype(np.float64), op.direction.val == "reverse"):
        i, f, o, z = np.split(x @ w.T + h @ r.T + b, 4, axis=-1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(z)
        h = _sigmoid(o) * np.tanh(c)
        outputs.append(h)
    return _emit(op, outputs, h, c)


def _gru_f64(op: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    w, r = _f64(op, "weight_ih", 0), _f64(op, "weight_hh", 0)
    b = _f64(op, "bias", w.shape[0])
    act, gate = _ACT[op.activation.val], _ACT[op.recurrent_activation.val]
    (r_r, r_o, r_z), (b_r, b_o, b_z) = np.split(r, 3), np.split(b, 3)
    h = inputs["initial_h"].astype(np.float64)
    outputs = []
    for x in _steps(inputs["x"].astype(np.float64), op.direction.val == "reverse"):
        x_r, x_o, x_z = np.split(x @ w.T, 3, axis=-1)
        reset = gate(x_r + h @ r_r.T + b_r)
        update = gate(x_z + h @ r_z.T + b_z)
        h = (1 - update) * act(x_o + (reset * h) @ r_o.T + b_o) + update * h
        outputs.append(h)
    return _emit(op, outputs, h)


def _recurrent_case(request: pytest.FixtureRequest, dtype: type) -> Captured:
    op_type, opset, run_test = request.param
    monkeypatch = request.getfixturevalue("monkeypatch")
    from coremltools.converters.mil.mil.ops.tests.iOS14 import test_recurrent

    # gru draws its weights and data from numpy's global generator (lstm and rnn seed torch):
    # seeded, the fp16 and fp32 runs of one parametrization hold the same draws.
    np.random.seed(17)
    (captured,) = _capture(monkeypatch, test_recurrent, lambda: run_test(test_recurrent, _backend(opset), dtype))
    return captured


# Failing parametrizations from the sampled runs (conformance/README.md): iOS17 rnn, lstm and gru,
# iOS18 gru, each as the op test builds it (compute unit, backend, then the test's parameters).
RECURRENT = {
    "iOS17-rnn": ("rnn", ct.target.iOS17, lambda m, be, dt: m.TestRNN().test_builder_to_backend_smoke(
        CPU, be, 8, 32, 64, 1, True, False, "forward", False, dt)),
    "iOS17-lstm": ("lstm", ct.target.iOS17, lambda m, be, dt: m.TestLSTM().test_builder_to_backend_smoke_unilstm(
        CPU, be, 8, 32, 1, 16, False, True, "forward", False, dt)),
    "iOS17-gru": ("gru", ct.target.iOS17, lambda m, be, dt: m.TestGRU().test_builder_to_backend_smoke(
        CPU, be, 3, 1, 2, 2, True, True, "forward", ["tanh", "sigmoid"], False, dt)),
    "iOS18-gru": ("gru", ct.target.iOS18, lambda m, be, dt: m.TestGRU().test_builder_to_backend_smoke(
        CPU, be, 3, 1, 1, 2, True, True, "reverse", ["sigmoid", "tanh"], False, dt)),
}  # fmt: skip
RECOMPUTE = {"rnn": _rnn_f64, "lstm": _lstm_f64, "gru": _gru_f64}


@pytest.fixture(params=list(RECURRENT.values()), ids=list(RECURRENT))
def recurrent(request: pytest.FixtureRequest) -> tuple[str, Captured, Captured]:
    return request.param[0], _recurrent_case(request, np.float32), _recurrent_case(request, np.float16)


def test_recurrent_fp32_twin_validates_the_float64_recomputation(recurrent):
    # The same parametrization with fp32 weights: the recomputation from the package meets the
    # test's reference within the test's tolerance, and so does the executor.
    op_type, fp32, _ = recurrent
    recomputed = RECOMPUTE[op_type](fp32.op(op_type), fp32.inputs)
    for ours, executor, expected in zip(recomputed, fp32.predict(), fp32.expected, strict=True):
        np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(executor, expected, atol=ATOL, rtol=RTOL)


def test_recurrent_fp16_reference_is_out_of_reach_of_the_fp16_package(recurrent):
    op_type, _, fp16 = recurrent
    op = fp16.op(op_type)
    assert op.weight_ih.dtype == ct.converters.mil.mil.types.fp16  # the package holds fp16 weights
    recomputed = RECOMPUTE[op_type](op, fp16.inputs)
    executor = fp16.predict()
    for ours, out in zip(recomputed, executor, strict=True):
        # The executor is the exact computation on the package's contents, to fp16 precision.
        np.testing.assert_allclose(out, ours, rtol=FP16_ULP, atol=2.0**-24)
    # The outputs are declared fp16: the best any runtime (Core ML included) can return is the
    # exact value rounded to fp16, and that misses the test's reference by more than its tolerance.
    best = [ours.astype(np.float16) for ours in recomputed]
    assert not all(_within_test_tolerance(b, e) for b, e in zip(best, fp16.expected, strict=True))


# ============================================================================ image resizing


def test_crop_resize_expected_7_899_contradicts_the_13_9_below_it(monkeypatch):
    """iOS16 (roi) and iOS17 (boxes) crop_resize, box [0.5, 1.8, 1.0, 0.3], ALIGN_CORNERS, 2x2.

    Its rows sit at 0.5 * 3 = 1.5 and 1.0 * 3 = 3 (exact in any float format) and both output rows
    share one column position c. The image is x[r, c] = 1 + 4 r + c, linear, so any bilinear sample
    is exactly 1 + 4 r + c: the two expected values imply two different columns.
    """
    from coremltools.converters.mil.mil.ops.tests.iOS16 import test_image_resizing as ios16
    from coremltools.converters.mil.mil.ops.tests.iOS17 import test_image_resizing as ios17

    calls = [
        *_capture(monkeypatch, ios16, lambda: ios16.TestCropResize().test_builder_to_backend_ios16(
            compute_unit=CPU, backend=_backend(ct.target.iOS16), pad_value=0.0)),
        *_capture(monkeypatch, ios17, lambda: ios17.TestCropResize().test_builder_to_backend_ios17(
            CPU, _backend(ct.target.iOS17), 3)),
    ]  # fmt: skip
    for call in calls:
        (expected,), (executor,) = call.expected, call.predict()
        upper, lower = expected.reshape(3, 2, 2)[1, :, 1]
        col_from_upper, col_from_lower = upper - 1 - 4 * 1.5, lower - 1 - 4 * 3
        slack = (ATOL + RTOL * abs(upper)) + (ATOL + RTOL * abs(lower))
        assert abs(col_from_upper - col_from_lower) > slack  # 0.899 vs 0.9: no shared column
        # The executor samples column 0.3 * 3 = 0.9 for both, and meets every other expected value.
        np.testing.assert_allclose(executor.reshape(3, 2, 2)[1, :, 1], [7.9, 13.9], rtol=1e-6)
        mismatched = ~np.isclose(executor, expected, atol=ATOL, rtol=RTOL)
        assert np.flatnonzero(mismatched).tolist() == [5]


def _resample_f64(image: np.ndarray, coordinates: np.ndarray) -> np.ndarray:
    """resample's build_2 (bilinear, reflection, normalized_zero_to_one, align_corners) in float64:
    torch's grid_sample reflects about the border pixels' centres as MIL's `reflection` does."""
    grid = torch.from_numpy(coordinates.astype(np.float64) * 2 - 1)
    out = torch.nn.functional.grid_sample(
        torch.from_numpy(image.astype(np.float64)), grid, mode="bilinear", padding_mode="reflection",
        align_corners=True,
    )  # fmt: skip
    return out.numpy()


RESAMPLE_COORDINATES = np.array([-1.0, -2.0, -3.7, -1.0, 0.0, 0.0, 3.5, 1.2], dtype=np.float32).reshape(1, 2, 2, 2)
"""The resample test's coordinates before its cast to the coordinates' dtype."""


def test_resample_fp16_coordinates_expectation_uses_the_fp32_coordinates(monkeypatch):
    """iOS16/iOS17 resample, fp32 backend, fp16 coordinates: -3.7 and 1.2 are fed as fp16
    (-3.69921875, 1.2001953), and the reflected bilinear samples move by 0.009 and 0.004."""
    from coremltools.converters.mil.mil.ops.tests.iOS15 import test_image_resizing as ios15
    from coremltools.converters.mil.mil.ops.tests.iOS17 import test_image_resizing as ios17

    calls = _capture(monkeypatch, ios15, lambda: ios17.TestResample().test_builder_to_backend_smoke(
        CPU, _backend(ct.target.iOS17), np.float16))  # fmt: skip
    build_2 = calls[2]
    coordinates, image = build_2.inputs["coordinates"], build_2.inputs["x"]
    np.testing.assert_array_equal(coordinates, RESAMPLE_COORDINATES.astype(np.float16))
    (expected,), (executor,) = build_2.expected, build_2.predict()
    exact = _resample_f64(image, coordinates)
    from_fp32_coordinates = _resample_f64(image, RESAMPLE_COORDINATES)
    np.testing.assert_allclose(executor, exact, rtol=1e-6)
    np.testing.assert_allclose(expected, from_fp32_coordinates, atol=ATOL, rtol=RTOL)
    assert not _within_test_tolerance(exact, expected)
    # The other three programs of the test meet their expected values.
    for call in calls[:2] + calls[3:]:
        np.testing.assert_allclose(call.predict()[0], call.expected[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("coordinates_dtype", [np.int32, np.float32])
def test_ios15_resample_fp32_fails_on_its_cast_count_not_on_a_prediction(monkeypatch, coordinates_dtype):
    """iOS15 resample hard-codes 2 cast ops (what fp16 precision inserts); an fp32 program has none.
    Passing the true count (0) lets all four programs run: each prediction meets its expected value."""
    from coremltools.converters.mil.mil.ops.tests.iOS15 import test_image_resizing as ios15

    backend = _backend(ct.target.iOS15)
    with pytest.raises(AssertionError):
        _capture(monkeypatch, ios15, lambda: ios15.TestResample._test_builder_to_backend_smoke(
            CPU, backend, coordinates_dtype, 2))  # fmt: skip
    calls = _capture(monkeypatch, ios15, lambda: ios15.TestResample._test_builder_to_backend_smoke(
        CPU, backend, coordinates_dtype, 0))  # fmt: skip
    assert len(calls) == 4
    for call in calls:
        assert not call.model._mil_program["main"].find_ops(op_type="cast")
        np.testing.assert_allclose(call.predict()[0], call.expected[0], atol=ATOL, rtol=RTOL)


def test_ios15_crop_resize_inverted_box_expects_the_whole_image(monkeypatch):
    """iOS15 crop_resize, normalized roi [2, 2, 1, 1] (outside the [0, 1] the op requires),
    UNALIGN_CORNERS, 2x2: the expected values are the whole 4x4 image resized (half-pixel samples at
    rows and columns 0.5 and 2.5). Scaled by (H - 1) as documented, the box spans rows and columns
    3 to 6: its samples fall outside the image (the executor reads the pad value, 0), and none of
    them near 0.5."""
    from coremltools.converters.mil.mil.ops.tests.iOS15 import test_image_resizing as ios15

    calls = _capture(monkeypatch, ios15, lambda: ios15.TestCropResize().test_builder_to_backend_smoke(
        compute_unit=CPU, backend=_backend(ct.target.iOS15), is_symbolic=False))  # fmt: skip
    (call,) = calls
    image = torch.from_numpy(call.inputs["x"].astype(np.float64))
    whole = torch.nn.functional.interpolate(image, size=(2, 2), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(call.expected[0].reshape(2, 2), whole.numpy().reshape(2, 2))
    np.testing.assert_array_equal(call.predict()[0], np.zeros((1, 1, 1, 2, 2)))


# ============================================================================ fp16 values, fp32 backend
#
# conv, conv_transpose, instance_norm and l2_norm rows of the fp32 backend where the input, the
# weights (parameters) or both are fp16 (`x_weight_dtype`, `x_param_dtype`; iOS17 mixes them) compare
# with atol 1e-4 against values that are not the program's: conv's and conv_transpose's come from
# torch in fp32 on the unrounded weights and input (cast to fp16 where the output is), instance_norm's
# are exact values for the unrounded gamma and beta, l2_norm's are computed in numpy fp16 arithmetic.
# The package holds the rounded values, and an fp16 output can only be the exact value rounded to fp16
# (a step is 2.4e-4 to 9.8e-4 between 0.25 and 1, wider than the tolerance). As for recurrent: the fp32
# twin (both dtypes fp32) validates the float64 recomputation, and the executor equals the
# recomputation from the package's contents to the output's precision.


def _spatial_pads(op: Any) -> list[tuple[int, int]]:
    flat = [int(p) for p in op.pad.val]
    return list(zip(flat[::2], flat[1::2], strict=True))


def _tensor(op: Any, name: str) -> torch.Tensor | None:
    var = getattr(op, name)
    return None if var is None else torch.from_numpy(np.asarray(var.val, dtype=np.float64))


def _conv_f64(op: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    x, weight, bias = torch.from_numpy(inputs["x"].astype(np.float64)), _tensor(op, "weight"), _tensor(op, "bias")
    pads = _spatial_pads(op)
    dims = len(pads)
    strides, dilations = [int(s) for s in op.strides.val], [int(d) for d in op.dilations.val]
    groups = int(op.groups.val)
    if op.op_type == "conv":
        padded = torch.nn.functional.pad(x, [p for pair in reversed(pads) for p in pair])
        conv = getattr(torch.nn.functional, f"conv{dims}d")
        return [conv(padded, weight, bias, strides, 0, dilations, groups).numpy()]
    # conv_transpose: the full transposed convolution, cropped by the pads.
    transpose = getattr(torch.nn.functional, f"conv_transpose{dims}d")
    full = transpose(x, weight, bias, strides, 0, 0, groups, dilations)
    crop = tuple(slice(before, size - after) for (before, after), size in zip(pads, full.shape[2:], strict=True))
    return [full[(..., *crop)].numpy()]


def _instance_norm_f64(op: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = inputs["x"].astype(np.float64)
    axes = tuple(range(2, x.ndim))
    centred = x - x.mean(axis=axes, keepdims=True)
    out = centred / np.sqrt((centred**2).mean(axis=axes, keepdims=True) + float(op.epsilon.val))
    channel = (1, -1) + (1,) * len(axes)
    gamma, beta = _tensor(op, "gamma"), _tensor(op, "beta")
    if gamma is not None:
        out = out * gamma.numpy().reshape(channel)
    return [out if beta is None else out + beta.numpy().reshape(channel)]


def _l2_norm_f64(op: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = inputs["x"].astype(np.float64)
    flat = x.reshape(int(np.prod(x.shape[:-3])), -1)
    return [(flat / np.sqrt((flat**2).sum(axis=1, keepdims=True) + float(op.epsilon.val))).reshape(x.shape)]


@dataclass(frozen=True)
class RoundedCase:
    """A failing row: the op test (module under the op tests, opset) and the dtypes it fails with."""

    op_type: str
    module: str
    opset: Any
    recompute: Callable[[Any, dict[str, np.ndarray]], list[np.ndarray]]
    run: Callable[[Any, BackendConfig, tuple[type, type]], Any]
    dtypes: tuple[type, type]
    """(input, weights or parameters)."""


F16, F32 = np.float16, np.float32
CONV_WITH_BIAS_AND_GROUPS = {
    "padding": (2, 2, 2),
    "DHWKdKhKw": (5, 5, 5, 2, 2, 2),
    "stride": (2, 1, 1),
    "dilation": (1, 1, 1),
    "has_bias": True,
    "groups": 2,
    "symbolic": False,
}
CONV_TRANSPOSE_DILATED = {
    "padding": (1, 2, 3),
    "DHWKdKhKw": (7, 7, 7, 2, 2, 2),
    "stride": (2, 2, 2),
    "dilation": (2, 1, 1),
    "has_bias": True,
    "groups": 1,
    "test_symbolic": True,
    "test_output_shape": False,
}


def _conv(dim: str) -> Callable[[Any, BackendConfig, tuple[type, type]], Any]:
    return lambda m, be, dt: m.TestConv().test_builder_to_backend_stress(CPU, be, dim, CONV_WITH_BIAS_AND_GROUPS, dt)


def _conv_transpose(dim: str) -> Callable[[Any, BackendConfig, tuple[type, type]], Any]:
    return lambda m, be, dt: m.TestConvTranspose().test_builder_to_backend_stress(
        CPU, be, dim, CONV_TRANSPOSE_DILATED, dt)  # fmt: skip


def _instance_norm(m: Any, be: BackendConfig, dt: tuple[type, type]) -> Any:
    return m.TestNormalizationInstanceNorm().test_builder_to_backend_smoke(CPU, be, dt)


def _instance_norm_gamma_beta(m: Any, be: BackendConfig, dt: tuple[type, type]) -> Any:
    return m.TestNormalizationInstanceNorm().test_builder_to_backend_smoke_with_gamma_and_beta(CPU, be, dt)


def _l2_norm(m: Any, be: BackendConfig, dt: tuple[type, type]) -> Any:
    return m.TestNormalizationL2Norm().test_builder_to_backend_stress(CPU, be, 4, 1e-4, dt)


# One failing parametrization of each kind in the full run (conformance/README.md), as the op test builds it.
iOS14, iOS17 = ct.target.iOS15, ct.target.iOS17  # the iOS14 op tests run at the iOS15 opset here
ROUNDED = {
    "iOS14-conv2d-fp16": RoundedCase("conv", "iOS14.test_conv", iOS14, _conv_f64, _conv("conv2d"), (F16, F16)),
    "iOS14-conv_transpose3d-fp16": RoundedCase(
        "conv_transpose", "iOS14.test_conv", iOS14, _conv_f64, _conv_transpose("conv3d"), (F16, F16)),
    "iOS14-instance_norm-fp16": RoundedCase(
        "instance_norm", "iOS14.test_normalization", iOS14, _instance_norm_f64, _instance_norm, (F16, F16)),
    "iOS14-l2_norm-fp16": RoundedCase(
        "l2_norm", "iOS14.test_normalization", iOS14, _l2_norm_f64, _l2_norm, (F16, F16)),
    "iOS17-conv2d-fp16-weights": RoundedCase(
        "conv", "iOS17.test_conv", iOS17, _conv_f64, _conv("conv2d"), (F32, F16)),
    "iOS17-conv_transpose2d-fp16-input": RoundedCase(
        "conv_transpose", "iOS17.test_conv", iOS17, _conv_f64, _conv_transpose("conv2d"), (F16, F32)),
    "iOS17-conv_transpose3d-fp16-weights": RoundedCase(
        "conv_transpose", "iOS17.test_conv", iOS17, _conv_f64, _conv_transpose("conv3d"), (F32, F16)),
    "iOS17-instance_norm-fp16-input": RoundedCase(
        "instance_norm", "iOS17.test_normalization", iOS17, _instance_norm_f64, _instance_norm, (F16, F32)),
    "iOS17-l2_norm-fp16-input": RoundedCase(
        "l2_norm", "iOS17.test_normalization", iOS17, _l2_norm_f64, _l2_norm, (F16, F32)),
    "iOS17-instance_norm-fp16-gamma-beta": RoundedCase(
        "instance_norm", "iOS17.test_normalization", iOS17, _instance_norm_f64, _instance_norm_gamma_beta, (F32, F16)),
}  # fmt: skip


def _rounded_case(request: pytest.FixtureRequest, dtypes: tuple[type, type]) -> Captured:
    case: RoundedCase = request.param
    monkeypatch = request.getfixturevalue("monkeypatch")
    package = "coremltools.converters.mil.mil.ops.tests"
    module = importlib.import_module(f"{package}.{case.module}")
    # iOS17's classes run the iOS14 test bodies (super()), which call their own module's run_compare_builder.
    compares = module if hasattr(module, "run_compare_builder") else importlib.import_module(
        f"{package}.iOS14.{case.module.split('.')[1]}")  # fmt: skip
    # The tests draw from numpy's and torch's global generators: seeded, both twins hold the same draws.
    np.random.seed(17)
    torch.manual_seed(17)
    (captured,) = _capture(monkeypatch, compares, lambda: case.run(module, _backend(case.opset), dtypes))
    return captured


@pytest.fixture(params=list(ROUNDED.values()), ids=list(ROUNDED))
def rounded(request: pytest.FixtureRequest) -> tuple[RoundedCase, Captured, Captured]:
    return request.param, _rounded_case(request, (F32, F32)), _rounded_case(request, request.param.dtypes)


def test_rounded_case_fp32_twin_validates_the_float64_recomputation(rounded):
    case, fp32, _ = rounded
    recomputed = case.recompute(fp32.op(case.op_type), fp32.inputs)
    for ours, executor, expected in zip(recomputed, fp32.predict(), fp32.expected, strict=True):
        np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(executor, expected, atol=ATOL, rtol=RTOL)


def test_rounded_case_reference_is_out_of_reach_of_the_package(rounded):
    case, _, failing = rounded
    op = failing.op(case.op_type)
    fp16 = ct.converters.mil.mil.types.fp16
    held = [var.dtype for var in op.inputs.values() if not isinstance(var, (list, tuple))]
    assert fp16 in held  # the package holds fp16 values where the reference did not round them
    out_fp16 = op.outputs[0].dtype == fp16
    recomputed = case.recompute(op, failing.inputs)
    for ours, out in zip(recomputed, failing.predict(), strict=True):
        # The executor is the exact computation on the package's contents, to the output's precision.
        np.testing.assert_allclose(out, ours, rtol=FP16_ULP if out_fp16 else 1e-6, atol=2.0**-24 if out_fp16 else 1e-7)
    # The best an fp16 output can hold is the exact value rounded to fp16; an fp32 output, the exact value.
    best = [ours.astype(np.float16) if out_fp16 else ours for ours in recomputed]
    assert not all(_within_test_tolerance(b, e) for b, e in zip(best, failing.expected, strict=True))


# ============================================================================ local_response_norm smoke


def _lrn_f64(x: np.ndarray, size: int, alpha: float, beta: float, k: float, before: int, after: int) -> np.ndarray:
    """local_response_norm with a window of `before` channels before and `after` after each channel."""
    squares = np.pad(x.astype(np.float64) ** 2, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    window = sum(squares[:, i : i + x.shape[1]] for i in range(before + after + 1))
    return x / (k + alpha / size * window) ** beta


@pytest.mark.parametrize("size", [2, 3])
def test_local_response_norm_smoke_expects_no_neighbouring_channel_where_the_stress_test_does(monkeypatch, size):
    """The smoke test's hand-written values (sizes 2 and 3, on a (1, 3, 2) input) divide each element
    by its own square only, as if no neighbouring channel were in the window; the stress test's
    reference, torch's LocalResponseNorm, sums size // 2 channels before and (size - 1) // 2 after.
    No window meets both; the executor follows the stress test, whose rows all pass."""
    from coremltools.converters.mil.mil.ops.tests.iOS14 import test_normalization

    lrn = test_normalization.TestNormalizationLocalResponseNorm()
    backend = _backend(ct.target.iOS15)
    (smoke,) = _capture(monkeypatch, test_normalization, lambda: lrn.test_builder_to_backend_smoke(CPU, backend))
    np.random.seed(17)
    (stress,) = _capture(monkeypatch, test_normalization, lambda: lrn.test_builder_to_backend_stress(
        CPU, backend, 4, size, 0.01, 0.75, 1.0, (np.float32, np.float32)))  # fmt: skip
    torch_window = (size // 2, (size - 1) // 2)
    x, expected = smoke.inputs["x"], smoke.expected[size - 2]
    own_only = _lrn_f64(x, size, 1e-4, 0.75, 1.0, 0, 0)  # alpha: the smoke's (the default for size 2)
    np.testing.assert_allclose(own_only, expected, atol=ATOL, rtol=RTOL)
    assert not _within_test_tolerance(_lrn_f64(x, size, 1e-4, 0.75, 1.0, *torch_window), expected)
    x, expected = stress.inputs["x"], stress.expected[0]
    np.testing.assert_allclose(_lrn_f64(x, size, 0.01, 0.75, 1.0, *torch_window), expected, atol=ATOL, rtol=RTOL)
    assert not _within_test_tolerance(_lrn_f64(x, size, 0.01, 0.75, 1.0, 0, 0), expected)
    np.testing.assert_allclose(stress.predict()[0], stress.expected[0], atol=ATOL, rtol=RTOL)


# ============================================================================ iOS18 sparse constexprs, fp16 data


@pytest.mark.parametrize("op_type", ["constexpr_sparse_to_dense", "constexpr_lut_to_sparse", "joint"])
def test_sparse_constexpr_reference_adds_in_fp16_where_the_program_adds_in_fp32(monkeypatch, op_type):
    """iOS18 constexpr_sparse_to_dense / constexpr_lut_to_sparse stress and their joint use
    (TestJointCompressionOps.test_sparse_lut), fp32 backend, fp16 data or LUT: the program casts
    the decompressed fp16 values to fp32 and adds the fp32 input (ones), but the expected values
    are `decompress(...) + 1` in numpy fp16 arithmetic, the sum rounded to fp16 (a step of 9.8e-4
    between 1 and 2). The fp32 sum, which the executor returns, misses them by up to half a step;
    the same test with fp32 data passes."""
    from coremltools.converters.mil.mil.ops.defs.iOS18 import compression
    from coremltools.converters.mil.mil.ops.tests.iOS18 import test_compression

    def run_test(dtype: str) -> Captured:
        np.random.seed(17)
        backend = _backend(ct.target.iOS18)
        if op_type == "constexpr_sparse_to_dense":
            test = lambda: test_compression.TestConstexprSparseToDense().test_builder_to_backend_stress(  # noqa: E731
                CPU, backend, 0.5, dtype)
        elif op_type == "constexpr_lut_to_sparse":
            test = lambda: test_compression.TestConstexprLutToSparse().test_builder_to_backend_stress(  # noqa: E731
                CPU, backend, 2, (0, 1, 1, 1), 1, 0.5, dtype)
        else:
            test = lambda: test_compression.TestJointCompressionOps().test_sparse_lut(  # noqa: E731
                CPU, backend, 2, (0, 2, 0, 0), 1, 0.5, dtype)
        (captured,) = _capture(monkeypatch, test_compression, test)
        return captured

    def exact_sum(captured: Captured) -> np.ndarray:
        assert captured.op("add").outputs[0].dtype == ct.converters.mil.mil.types.fp32
        if op_type == "constexpr_sparse_to_dense":
            op = captured.op(op_type)
            return compression.constexpr_sparse_to_dense.decompress(op.nonzero_data.val.astype(np.float64),
                                                                    op.mask.val) + 1  # fmt: skip
        op = captured.op("constexpr_lut_to_sparse")
        axis = None if op.vector_axis is None else op.vector_axis.val
        mask, data = compression.constexpr_lut_to_sparse.decompress(
            op.indices_mask.val, op.indices_nonzero_data.val, op.lut.val.astype(np.float64), axis)  # fmt: skip
        return (data if op_type == "constexpr_lut_to_sparse" else
                compression.constexpr_sparse_to_dense.decompress(data, mask)) + 1  # fmt: skip

    fp32 = run_test("fp32")
    np.testing.assert_allclose(fp32.predict()[0], fp32.expected[0], atol=ATOL, rtol=RTOL)
    fp16 = run_test("fp16")
    exact = exact_sum(fp16)
    (executor,) = fp16.predict()
    np.testing.assert_array_equal(executor, exact.astype(np.float32))  # the fp32 add: the exact sum, rounded once
    np.testing.assert_array_equal(fp16.expected[0], exact.astype(np.float16))  # the reference: the sum in fp16
    assert not _within_test_tolerance(exact, fp16.expected[0])
