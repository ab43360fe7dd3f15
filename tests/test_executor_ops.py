"""Per-op tests of the executor against independent reference semantics (numpy / torch).

Each case builds one MIL op with the Builder. Cases are grouped into a few programs (one per
opset / precision), each converted to an .mlpackage once and run once through the executor, so
the ~170 cases cost a handful of conversions. Conversion uses the empty pass pipeline: the op
under test reaches the package exactly as built (no folding or fusion), which each case checks.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program, types  # noqa: E402

from publisher.errors import PublisherError  # noqa: E402
from publisher.executor import SUPPORTED_OPS, ExecutorError, UnsupportedOpError, load_program, run  # noqa: E402
from publisher.executor.ops import OPS  # noqa: E402
from publisher.executor.ops.control_flow import TensorList  # noqa: E402

RNG = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def uniform(low: float, high: float, *shape: int) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def ints(low: int, high: int, *shape: int) -> np.ndarray:
    return RNG.integers(low, high, shape).astype(np.int32)


@dataclass
class Case:
    """One op under test: its runtime inputs, how to build it, and the reference result."""

    name: str
    op: str
    inputs: dict[str, np.ndarray]
    build: Callable[..., Any]
    ref: Callable[..., Any]
    tol: float = 1e-5
    exact: bool = False
    mode: str = "fp32"
    outputs: list[str] = field(default_factory=list)


GROUPS: dict[str, tuple[Any, list[Case]]] = {}


def case(group: str, name: str, op: str, inputs: dict[str, np.ndarray], build, ref, **kw) -> None:
    target = {
        "iOS16": ct.target.iOS16,
        "iOS17": ct.target.iOS17,
        "iOS18": ct.target.iOS18,
        "fp16": ct.target.iOS16,
    }
    GROUPS.setdefault(group, (target[group], []))[1].append(Case(name, op, inputs, build, ref, **kw))


_MIL_DTYPES = {np.float32: types.fp32, np.float16: types.fp16, np.int32: types.int32, np.bool_: types.bool}


def _convert_group(group: str, tmp_dir) -> tuple[Any, dict[str, dict[str, np.ndarray]]]:
    """Build one program holding every case of `group`, convert it, run it; outputs per case."""
    target, cases = GROUPS[group]
    placeholders = {}
    for i, c in enumerate(cases):
        for name, value in c.inputs.items():
            placeholders[f"c{i}_{name}"] = mb.placeholder(shape=value.shape, dtype=_MIL_DTYPES[value.dtype.type])
    with Function(placeholders, opset_version=target) as func:
        outputs = []
        for i, c in enumerate(cases):
            built = c.build(**{name: func.inputs[f"c{i}_{name}"] for name in c.inputs})
            built = list(built) if isinstance(built, (tuple, list)) else [built]
            c.outputs = [v.name for v in built]
            outputs.extend(built)
        func.set_outputs(outputs)
    program = Program()
    program.add_function("main", func)
    precision = ct.precision.FLOAT16 if group == "fp16" else ct.precision.FLOAT32
    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=target,
        compute_precision=precision,
        pass_pipeline=ct.PassPipeline.EMPTY,
    )
    package = tmp_dir / f"{group}.mlpackage"
    model.save(str(package))
    loaded = load_program(package)
    feeds = {f"c{i}_{n}": v for i, c in enumerate(cases) for n, v in c.inputs.items()}
    results = {mode: run(loaded, feeds, mode=mode) for mode in ("fp32", "fp16")}
    return loaded, results


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, tuple[Any, dict[str, dict[str, np.ndarray]]]]:
    tmp = tmp_path_factory.mktemp("ops")
    return {group: _convert_group(group, tmp) for group in GROUPS}


# ============================================================================ elementwise binary

X, Y = randn(2, 3, 4), randn(3, 1)
Y_SAME = np.where(RNG.random((2, 3, 4)) < 0.3, X, randn(2, 3, 4))
for _op, _ref in {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "floor_div": np.floor_divide,
    "mod": np.mod,
}.items():
    case(
        "iOS16",
        f"{_op}-broadcast",
        _op,
        {"x": X, "y": Y},
        lambda x, y, _op=_op: getattr(mb, _op)(x=x, y=y),
        lambda x, y, _ref=_ref: _ref(x, y),
    )
for _op, _ref in {"floor_div": np.floor_divide, "mod": np.mod, "add": np.add}.items():
    case(
        "iOS16",
        f"{_op}-int",
        _op,
        {"x": ints(-20, 20, 7), "y": np.array([3, -3, 5, -5, 7, 2, -2], np.int32)},
        lambda x, y, _op=_op: getattr(mb, _op)(x=x, y=y),
        lambda x, y, _ref=_ref: _ref(x, y),
        exact=True,
    )
case(
    "iOS16",
    "pow",
    "pow",
    {"x": uniform(0.1, 3, 2, 5), "y": randn(2, 5)},
    lambda x, y: mb.pow(x=x, y=y),
    lambda x, y: np.power(x, y),
    tol=1e-5,
)
for _op, _ref in {
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
}.items():
    case(
        "iOS16",
        _op,
        _op,
        {"x": X, "y": Y_SAME},
        lambda x, y, _op=_op: getattr(mb, _op)(x=x, y=y),
        lambda x, y, _ref=_ref: _ref(x, y),
        exact=True,
    )
BOOL_A, BOOL_B = RNG.random((3, 4)) < 0.5, RNG.random((3, 4)) < 0.5
for _op, _ref in {
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}.items():
    case(
        "iOS16",
        _op,
        _op,
        {"x": BOOL_A, "y": BOOL_B},
        lambda x, y, _op=_op: getattr(mb, _op)(x=x, y=y),
        lambda x, y, _ref=_ref: _ref(x, y),
        exact=True,
    )

# ============================================================================ elementwise unary

_erf = np.vectorize(math.erf)
for _op, (_x, _ref) in {
    "abs": (randn(3, 4), np.abs),
    "acos": (uniform(-0.99, 0.99, 3, 4), np.arccos),
    "asin": (uniform(-0.99, 0.99, 3, 4), np.arcsin),
    "atan": (randn(3, 4), np.arctan),
    "atanh": (uniform(-0.9, 0.9, 3, 4), np.arctanh),
    "ceil": (randn(3, 4) * 3, np.ceil),
    "cos": (randn(3, 4), np.cos),
    "cosh": (randn(3, 4), np.cosh),
    "erf": (randn(3, 4), _erf),
    "exp": (randn(3, 4), np.exp),
    "exp2": (randn(3, 4), np.exp2),
    "floor": (randn(3, 4) * 3, np.floor),
    "round": (np.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 2.51, -2.7], np.float32), np.round),
    "sign": (np.array([-2.0, 0.0, 3.0, -0.1], np.float32), np.sign),
    "sin": (randn(3, 4), np.sin),
    "sinh": (randn(3, 4), np.sinh),
    "sqrt": (uniform(0, 4, 3, 4), np.sqrt),
    "square": (randn(3, 4), np.square),
    "tan": (uniform(-1.2, 1.2, 3, 4), np.tan),
    "tanh": (randn(3, 4), np.tanh),
    "relu": (randn(3, 4), lambda x: np.maximum(x, 0)),
    "relu6": (randn(3, 4) * 5, lambda x: np.clip(x, 0, 6)),
    "sigmoid": (randn(3, 4), lambda x: 1 / (1 + np.exp(-x))),
    "silu": (randn(3, 4), lambda x: x / (1 + np.exp(-x))),
    "softplus": (randn(3, 4) * 3, lambda x: np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)),
    "softsign": (randn(3, 4), lambda x: x / (1 + np.abs(x))),
}.items():
    case("iOS16", _op, _op, {"x": _x}, lambda x, _op=_op: getattr(mb, _op)(x=x), lambda x, _ref=_ref: _ref(x))
    # fp16 programs run these on fp16 tensors: the result must be the fp32 result rounded once.
    case(
        "fp16",
        f"{_op}-fp16",
        _op,
        {"x": _x.astype(np.float16)},
        lambda x, _op=_op: getattr(mb, _op)(x=x),
        lambda x, _ref=_ref: _ref(x.astype(np.float32)).astype(np.float16),
        tol=1e-3,
        mode="fp16",
    )
case(
    "iOS16",
    "logical_not",
    "logical_not",
    {"x": BOOL_A},
    lambda x: mb.logical_not(x=x),
    lambda x: np.logical_not(x),
    exact=True,
)
case(
    "iOS16",
    "clip",
    "clip",
    {"x": randn(3, 4) * 3},
    lambda x: mb.clip(x=x, alpha=-1.0, beta=2.0),
    lambda x: np.minimum(np.maximum(x, -1.0), 2.0),
)
case(
    "iOS16",
    "threshold",
    "threshold",
    {"x": randn(3, 4)},
    lambda x: mb.threshold(x=x, alpha=0.3),
    lambda x: np.maximum(x, 0.3),
)
case(
    "iOS16",
    "inverse-epsilon",
    "inverse",
    {"x": uniform(0.5, 2, 3, 4)},
    lambda x: mb.inverse(x=x, epsilon=0.25),
    lambda x: 1 / (x + 0.25),
)
case(
    "iOS16",
    "log-epsilon",
    "log",
    {"x": uniform(0.0, 2, 3, 4)},
    lambda x: mb.log(x=x, epsilon=0.5),
    lambda x: np.log(x + 0.5),
)
case(
    "iOS16",
    "rsqrt-epsilon",
    "rsqrt",
    {"x": uniform(0.0, 2, 3, 4)},
    lambda x: mb.rsqrt(x=x, epsilon=0.5),
    lambda x: 1 / np.sqrt(x + 0.5),
)
case(
    "iOS16",
    "rsqrt-default-epsilon",
    "rsqrt",
    {"x": uniform(0.5, 2, 3, 4)},
    lambda x: mb.rsqrt(x=x),
    lambda x: 1 / np.sqrt(x + 1e-12),
)
case(
    "iOS16",
    "cast-fp32-int32-truncates",
    "cast",
    {"x": np.array([-2.7, -0.5, 0.5, 2.7, 3.0], np.float32)},
    lambda x: mb.cast(x=x, dtype="int32"),
    lambda x: x.astype(np.int32),
    exact=True,
)
case(
    "iOS16",
    "cast-int32-fp32",
    "cast",
    {"x": ints(-5, 5, 6)},
    lambda x: mb.cast(x=x, dtype="fp32"),
    lambda x: x.astype(np.float32),
    exact=True,
)
case(
    "iOS16",
    "cast-fp32-bool",
    "cast",
    {"x": np.array([0.0, 1.5, -2.0, 0.0], np.float32)},
    lambda x: mb.cast(x=x, dtype="bool"),
    lambda x: x != 0,
    exact=True,
)

# ============================================================================ activations

A = randn(2, 3, 4, 5)
ALPHA_C, BETA_C = uniform(0.1, 1, 3), uniform(0.5, 2, 3)
for _mode, _ref in {
    "EXACT": lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2))),
    "TANH_APPROXIMATION": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
    "SIGMOID_APPROXIMATION": lambda x: x / (1 + np.exp(-1.702 * x)),
}.items():
    case(
        "iOS16",
        f"gelu-{_mode}",
        "gelu",
        {"x": A},
        lambda x, _mode=_mode: mb.gelu(x=x, mode=_mode),
        lambda x, _ref=_ref: _ref(x),
    )
case(
    "iOS16",
    "elu",
    "elu",
    {"x": A},
    lambda x: mb.elu(x=x, alpha=0.7),
    lambda x: np.where(x > 0, x, 0.7 * (np.exp(x) - 1)),
)
case(
    "iOS16",
    "leaky_relu",
    "leaky_relu",
    {"x": A},
    lambda x: mb.leaky_relu(x=x, alpha=0.2),
    lambda x: np.where(x >= 0, x, 0.2 * x),
)
case(
    "iOS16",
    "thresholded_relu",
    "thresholded_relu",
    {"x": A},
    lambda x: mb.thresholded_relu(x=x, alpha=0.3),
    lambda x: np.where(x < 0.3, 0, x),
)
case(
    "iOS16",
    "clamped_relu",
    "clamped_relu",
    {"x": A * 4},
    lambda x: mb.clamped_relu(x=x, alpha=0.5, beta=3.0),
    lambda x: np.minimum(np.maximum(x, 0), 3.0) + np.minimum(np.minimum(x, 0) * 0.5, 3.0),
)
case(
    "iOS16",
    "linear_activation",
    "linear_activation",
    {"x": A},
    lambda x: mb.linear_activation(x=x, alpha=1.5, beta=-0.5),
    lambda x: 1.5 * x - 0.5,
)
case(
    "iOS16",
    "prelu",
    "prelu",
    {"x": A},
    lambda x: mb.prelu(x=x, alpha=ALPHA_C),
    lambda x: np.maximum(x, 0) + np.minimum(x, 0) * ALPHA_C.reshape(1, 3, 1, 1),
)
case(
    "iOS16",
    "scaled_tanh",
    "scaled_tanh",
    {"x": A},
    lambda x: mb.scaled_tanh(x=x, alpha=2.0, beta=0.5),
    lambda x: 2.0 * np.tanh(0.5 * x),
)
case(
    "iOS16",
    "sigmoid_hard",
    "sigmoid_hard",
    {"x": A * 3},
    lambda x: mb.sigmoid_hard(x=x, alpha=0.2, beta=0.5),
    lambda x: np.clip(0.2 * x + 0.5, 0, 1),
)
case(
    "iOS16",
    "softplus_parametric",
    "softplus_parametric",
    {"x": A},
    lambda x: mb.softplus_parametric(x=x, alpha=ALPHA_C, beta=BETA_C),
    lambda x: ALPHA_C.reshape(1, 3, 1, 1) * np.log(1 + np.exp(x * BETA_C.reshape(1, 3, 1, 1))),
)
for _axis in (1, -1):
    case(
        "iOS16",
        f"softmax-axis{_axis}",
        "softmax",
        {"x": A * 3},
        lambda x, _axis=_axis: mb.softmax(x=x, axis=_axis),
        lambda x, _axis=_axis: (
            np.exp(x - x.max(_axis, keepdims=True)) / np.exp(x - x.max(_axis, keepdims=True)).sum(_axis, keepdims=True)
        ),
    )

# ============================================================================ linear algebra

W_LIN, B_LIN = randn(6, 5), randn(6)
case(
    "iOS16",
    "linear-bias-rank3",
    "linear",
    {"x": randn(2, 3, 5)},
    lambda x: mb.linear(x=x, weight=W_LIN, bias=B_LIN),
    lambda x: x @ W_LIN.T + B_LIN,
)
case(
    "iOS16",
    "linear-no-bias",
    "linear",
    {"x": randn(4, 5)},
    lambda x: mb.linear(x=x, weight=W_LIN),
    lambda x: x @ W_LIN.T,
)
case(
    "iOS16",
    "matmul-transpose-y-broadcast",
    "matmul",
    {"x": randn(2, 3, 4, 5), "y": randn(3, 6, 5)},
    lambda x, y: mb.matmul(x=x, y=y, transpose_y=True),
    lambda x, y: x @ np.swapaxes(y, -1, -2),
)
case(
    "iOS16",
    "matmul-transpose-x",
    "matmul",
    {"x": randn(2, 5, 4), "y": randn(2, 5, 3)},
    lambda x, y: mb.matmul(x=x, y=y, transpose_x=True),
    lambda x, y: np.swapaxes(x, -1, -2) @ y,
)
case(
    "iOS16",
    "matmul-vector",
    "matmul",
    {"x": randn(4), "y": randn(4, 3)},
    lambda x, y: mb.matmul(x=x, y=y),
    lambda x, y: x @ y,
)
case(
    "iOS16",
    "einsum-nchw-nwhu",
    "einsum",
    {"x": randn(2, 3, 4, 5), "y": randn(2, 5, 4, 6)},
    lambda x, y: mb.einsum(values=(x, y), equation="nchw,nwhu->nchu"),
    lambda x, y: np.einsum("nchw,nwhu->nchu", x, y),
    tol=1e-4,
)


def _conv_ref(x, w, b, stride, dilation, pads, groups):
    """Reference conv: pads applied explicitly as [(begin, end)] per spatial dim, outer dim first."""
    xt = torch.from_numpy(x)
    flat = [p for pair in reversed(pads) for p in pair]
    xt = F.pad(xt, flat)
    conv = {1: F.conv1d, 2: F.conv2d}[x.ndim - 2]
    bt = None if b is None else torch.from_numpy(b)
    return conv(xt, torch.from_numpy(w), bt, stride, 0, dilation, groups).numpy()


W_CONV, B_CONV = randn(4, 3, 3, 3), randn(4)
W_CONV_EVEN = randn(4, 3, 2, 4)
W_CONV_G = randn(6, 2, 3, 3)
IMG = randn(2, 3, 7, 8)
case(
    "iOS16",
    "conv-valid",
    "conv",
    {"x": IMG},
    lambda x: mb.conv(x=x, weight=W_CONV, bias=B_CONV, pad_type="valid"),
    lambda x: _conv_ref(x, W_CONV, B_CONV, 1, 1, [(0, 0), (0, 0)], 1),
    tol=1e-4,
)
case(
    "iOS16",
    "conv-custom-asymmetric",
    "conv",
    {"x": IMG},
    lambda x: mb.conv(x=x, weight=W_CONV, pad_type="custom", pad=[0, 2, 1, 0]),
    lambda x: _conv_ref(x, W_CONV, None, 1, 1, [(0, 2), (1, 0)], 1),
    tol=1e-4,
)
# Even kernel (2, 4) with stride 2 on (7, 8): total pads (1, 2) -> same puts the odd one after.
case(
    "iOS16",
    "conv-same-even-kernel-stride2",
    "conv",
    {"x": IMG},
    lambda x: mb.conv(x=x, weight=W_CONV_EVEN, pad_type="same", strides=[2, 2]),
    lambda x: _conv_ref(x, W_CONV_EVEN, None, 2, 1, [(0, 1), (1, 1)], 1),
    tol=1e-4,
)
case(
    "iOS16",
    "conv-same_lower-even-kernel",
    "conv",
    {"x": IMG},
    lambda x: mb.conv(x=x, weight=W_CONV_EVEN, pad_type="same_lower"),
    lambda x: _conv_ref(x, W_CONV_EVEN, None, 1, 1, [(1, 0), (2, 1)], 1),
    tol=1e-4,
)
case(
    "iOS16",
    "conv-dilated-same",
    "conv",
    {"x": IMG},
    lambda x: mb.conv(x=x, weight=W_CONV, pad_type="same", dilations=[2, 1]),
    lambda x: _conv_ref(x, W_CONV, None, 1, (2, 1), [(2, 2), (1, 1)], 1),
    tol=1e-4,
)
case(
    "iOS16",
    "conv-groups",
    "conv",
    {"x": randn(1, 4, 5, 5)},
    lambda x: mb.conv(x=x, weight=W_CONV_G, groups=2, pad_type="custom", pad=[1, 1, 1, 1]),
    lambda x: _conv_ref(x, W_CONV_G, None, 1, 1, [(1, 1), (1, 1)], 2),
    tol=1e-4,
)
W_CONV1D = randn(5, 3, 3)
case(
    "iOS16",
    "conv1d-stride",
    "conv",
    {"x": randn(2, 3, 9)},
    lambda x: mb.conv(x=x, weight=W_CONV1D, strides=[2], pad_type="valid"),
    lambda x: _conv_ref(x, W_CONV1D, None, 2, 1, [(0, 0)], 1),
    tol=1e-4,
)


def _conv_transpose_ref(x, w, b, stride, pads, groups=1):
    """Direct scatter-add definition of transposed conv, then crop `pads` [(begin, end)] per dim."""
    n, c_in, h, wd = x.shape
    c_out_g, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    full = np.zeros((n, c_out_g * groups, (h - 1) * stride + kh, (wd - 1) * stride + kw), np.float64)
    c_in_g = c_in // groups
    for g in range(groups):
        for ci in range(g * c_in_g, (g + 1) * c_in_g):
            for i in range(h):
                for j in range(wd):
                    patch = x[:, ci, i, j][:, None, None, None] * w[ci][None]
                    full[
                        :,
                        g * c_out_g : (g + 1) * c_out_g,
                        i * stride : i * stride + kh,
                        j * stride : j * stride + kw,
                    ] += patch
    (t, bo), (le, r) = pads
    out = full[:, :, t : full.shape[2] - bo, le : full.shape[3] - r]
    if b is not None:
        out = out + b.reshape(1, -1, 1, 1)
    return out.astype(np.float32)


W_CT, B_CT = randn(3, 2, 3, 3), randn(2)
W_CT_G = randn(4, 3, 2, 2)
case(
    "iOS16",
    "conv_transpose-valid-stride2",
    "conv_transpose",
    {"x": randn(1, 3, 4, 5)},
    lambda x: mb.conv_transpose(x=x, weight=W_CT, bias=B_CT, strides=[2, 2]),
    lambda x: _conv_transpose_ref(x, W_CT, B_CT, 2, [(0, 0), (0, 0)]),
    tol=1e-4,
)
case(
    "iOS16",
    "conv_transpose-custom-pads",
    "conv_transpose",
    {"x": randn(1, 3, 4, 5)},
    lambda x: mb.conv_transpose(x=x, weight=W_CT, strides=[2, 2], pad_type="custom", pad=[1, 0, 0, 2]),
    lambda x: _conv_transpose_ref(x, W_CT, None, 2, [(1, 0), (0, 2)]),
    tol=1e-4,
)
case(
    "iOS16",
    "conv_transpose-groups",
    "conv_transpose",
    {"x": randn(2, 4, 3, 3)},
    lambda x: mb.conv_transpose(x=x, weight=W_CT_G, groups=2),
    lambda x: _conv_transpose_ref(x, W_CT_G, None, 1, [(0, 0), (0, 0)], groups=2),
    tol=1e-4,
)
case(
    "iOS16",
    "conv_transpose-output_shape",
    "conv_transpose",
    {"x": randn(1, 3, 4, 4)},
    lambda x: mb.conv_transpose(
        x=x, weight=W_CT, strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1], output_shape=[1, 2, 8, 8]
    ),
    # torch ConvTranspose2d(padding=1, output_padding=1): crop 1 before, extend to 8 after.
    lambda x: F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(W_CT), None, 2, 1, 1).numpy(),
    tol=1e-4,
)

# ============================================================================ normalization

NORM_X = randn(2, 3, 4, 5) * 2 + 1
MEAN_C, VAR_C, GAMMA_C, BETA_NC = randn(3), uniform(0.5, 2, 3), randn(3), randn(3)


def _c(v):
    return v.reshape(1, -1, 1, 1)


case(
    "iOS16",
    "batch_norm",
    "batch_norm",
    {"x": NORM_X},
    lambda x: mb.batch_norm(x=x, mean=MEAN_C, variance=VAR_C, gamma=GAMMA_C, beta=BETA_NC, epsilon=1e-3),
    lambda x: (x - _c(MEAN_C)) / np.sqrt(_c(VAR_C) + 1e-3) * _c(GAMMA_C) + _c(BETA_NC),
)
case(
    "iOS16",
    "instance_norm",
    "instance_norm",
    {"x": NORM_X},
    lambda x: mb.instance_norm(x=x, gamma=GAMMA_C, beta=BETA_NC, epsilon=1e-4),
    lambda x: (
        (x - x.mean((2, 3), keepdims=True)) / np.sqrt(x.var((2, 3), keepdims=True) + 1e-4) * _c(GAMMA_C) + _c(BETA_NC)
    ),
)


def _layer_norm_ref(x, axes, gamma, beta, eps):
    axes = tuple(sorted(a % x.ndim for a in axes))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    out = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)
    return out * gamma.reshape(shape) + beta.reshape(shape)


G_LN, B_LN = randn(4, 5), randn(4, 5)
case(
    "iOS16",
    "layer_norm-trailing-negative-axes",
    "layer_norm",
    {"x": NORM_X},
    lambda x: mb.layer_norm(x=x, axes=[-1, -2], gamma=G_LN, beta=B_LN, epsilon=1e-5),
    lambda x: _layer_norm_ref(x, [-2, -1], G_LN, B_LN, 1e-5),
    tol=1e-4,
)
case(
    "iOS16",
    "layer_norm-channel-axis",
    "layer_norm",
    {"x": NORM_X},
    lambda x: mb.layer_norm(x=x, axes=[1], gamma=GAMMA_C, beta=BETA_NC, epsilon=1e-5),
    lambda x: _layer_norm_ref(x, [1], GAMMA_C, BETA_NC, 1e-5),
    tol=1e-4,
)
case(
    "iOS16",
    "l2_norm",
    "l2_norm",
    {"x": randn(2, 3, 4, 5)},
    lambda x: mb.l2_norm(x=x, epsilon=1e-6),
    lambda x: x / np.sqrt((x**2).sum((1, 2, 3), keepdims=True) + 1e-6),
)

# ============================================================================ reductions

R = randn(2, 3, 4)
for _op, _ref in {
    "reduce_sum": np.sum,
    "reduce_mean": np.mean,
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: np.abs(x).sum(axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt((x**2).sum(axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: (x**2).sum(axis, keepdims=keepdims),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.exp(x).sum(axis, keepdims=keepdims)),
}.items():
    case(
        "iOS16",
        f"{_op}-axes-keep",
        _op,
        {"x": R},
        lambda x, _op=_op: getattr(mb, _op)(x=x, axes=[0, -1], keep_dims=True),
        lambda x, _ref=_ref: _ref(x, axis=(0, 2), keepdims=True),
        tol=1e-5,
    )
    case(
        "iOS16",
        f"{_op}-all",
        _op,
        {"x": R},
        lambda x, _op=_op: getattr(mb, _op)(x=x),
        lambda x, _ref=_ref: _ref(x, axis=None, keepdims=False),
        tol=1e-5,
    )
case(
    "iOS16",
    "reduce_log_sum",
    "reduce_log_sum",
    {"x": uniform(0.1, 2, 2, 3, 4)},
    lambda x: mb.reduce_log_sum(x=x, axes=[1]),
    lambda x: np.log(x.sum(1)),
)
ARG_X = np.array([[1, 3, 3, 0], [2, 2, -1, -1]], np.float32)
case(
    "iOS16",
    "reduce_argmax-first-of-ties",
    "reduce_argmax",
    {"x": ARG_X},
    lambda x: mb.reduce_argmax(x=x, axis=1),
    lambda x: np.argmax(x, 1).astype(np.int32),
    exact=True,
)
case(
    "iOS16",
    "reduce_argmin-keep",
    "reduce_argmin",
    {"x": ARG_X},
    lambda x: mb.reduce_argmin(x=x, axis=-1, keep_dims=True),
    lambda x: np.argmin(x, -1)[:, None].astype(np.int32),
    exact=True,
)
case(
    "iOS17",
    "reduce_argmax-int32-input",
    "reduce_argmax",
    {"x": ints(0, 5, 3, 6)},
    lambda x: mb.reduce_argmax(x=x, axis=-1),
    lambda x: np.argmax(x, -1).astype(np.int32),
    exact=True,
)

# ============================================================================ pooling

POOL = randn(1, 2, 7, 6)


def _pool_ref(x, kernel, stride, pads, kind, exclude=False):
    flat = [p for pair in reversed(pads) for p in pair]
    xt = torch.from_numpy(x)
    if kind == "max":
        return F.max_pool2d(F.pad(xt, flat, value=-math.inf), kernel, stride).numpy()
    summed = F.avg_pool2d(F.pad(xt, flat), kernel, stride) * kernel[0] * kernel[1]
    if kind == "l2":
        return np.sqrt(F.avg_pool2d(F.pad(xt**2, flat), kernel, stride).numpy() * kernel[0] * kernel[1])
    count = F.avg_pool2d(F.pad(torch.ones_like(xt), flat), kernel, stride) * kernel[0] * kernel[1]
    return (summed / (count if exclude else kernel[0] * kernel[1])).numpy()


case(
    "iOS16",
    "avg_pool-valid-stride",
    "avg_pool",
    {"x": POOL},
    lambda x: mb.avg_pool(x=x, kernel_sizes=[2, 3], strides=[2, 1], pad_type="valid"),
    lambda x: _pool_ref(x, (2, 3), (2, 1), [(0, 0), (0, 0)], "avg"),
)
case(
    "iOS16",
    "avg_pool-same-include-padding",
    "avg_pool",
    {"x": POOL},
    lambda x: mb.avg_pool(x=x, kernel_sizes=[2, 2], strides=[1, 1], pad_type="same"),
    lambda x: _pool_ref(x, (2, 2), (1, 1), [(0, 1), (0, 1)], "avg"),
)
case(
    "iOS16",
    "avg_pool-custom-exclude-padding",
    "avg_pool",
    {"x": POOL},
    lambda x: mb.avg_pool(
        x=x,
        kernel_sizes=[3, 3],
        strides=[2, 2],
        pad_type="custom",
        pad=[1, 1, 0, 1],
        exclude_padding_from_average=True,
    ),
    lambda x: _pool_ref(x, (3, 3), (2, 2), [(1, 1), (0, 1)], "avg", exclude=True),
)
case(
    "iOS16",
    "max_pool-same_lower",
    "max_pool",
    {"x": POOL},
    lambda x: mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[1, 1], pad_type="same_lower"),
    lambda x: _pool_ref(x, (2, 2), (1, 1), [(1, 0), (1, 0)], "max"),
    exact=True,
)
case(
    "iOS16",
    "l2_pool",
    "l2_pool",
    {"x": POOL},
    lambda x: mb.l2_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid"),
    lambda x: _pool_ref(x, (2, 2), (2, 2), [(0, 0), (0, 0)], "l2"),
)

# ============================================================================ resizing

RES = randn(1, 2, 3, 4)


def _lerp_ref(x, grid_h, grid_w):
    """Bilinear sampling of the last two dims at explicit grid positions (clamped to the input)."""

    def along(v, axis, grid):
        n = v.shape[axis]
        g = np.clip(grid, 0, n - 1)
        lo = np.floor(g).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (g - lo).reshape([-1 if a == axis % v.ndim else 1 for a in range(v.ndim)])
        return np.take(v, lo, axis) * (1 - w) + np.take(v, hi, axis) * w

    return along(along(x.astype(np.float64), -2, grid_h), -1, grid_w).astype(np.float32)


def _grid(mode, n_in, n_out):
    i = np.arange(n_out, dtype=np.float64)
    if mode == "STRICT_ALIGN_CORNERS":
        return i * (n_in - 1) / (n_out - 1)
    if mode == "DEFAULT":
        return i * (n_in - n_in / n_out) / (n_out - 1)
    if mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        return 0.5 * delta + i * delta
    return i * n_in / n_out + 0.5 * n_in / n_out - 0.5


case(
    "iOS16",
    "upsample_nearest_neighbor-x2",
    "upsample_nearest_neighbor",
    {"x": RES},
    lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3),
    lambda x: x.repeat(2, axis=2).repeat(3, axis=3),
    exact=True,
)
case(
    "iOS16",
    "upsample_nearest_neighbor-fractional",
    "upsample_nearest_neighbor",
    {"x": RES},
    lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=1.5, scale_factor_width=2.5),
    lambda x: x[:, :, (np.arange(4) / 1.5).astype(int)][:, :, :, (np.arange(10) / 2.5).astype(int)],
    exact=True,
)
# Fractional scales sample by input/output size (the output size is floor(size * scale)), not 1/scale.
case(
    "iOS16",
    "upsample_nearest_neighbor-fractional-by-size",
    "upsample_nearest_neighbor",
    {"x": np.array([[[1.5, -2.5, 3.5]]], np.float32)},
    lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=1.0, scale_factor_width=1.12),
    lambda x: x,
    exact=True,
)
case(
    "iOS16",
    "upsample_bilinear-half_pixel-fractional",
    "upsample_bilinear",
    {"x": np.array([[[0.0, 1.0]]], np.float32)},
    lambda x: mb.upsample_bilinear(x=x, scale_factor_height=1.0, scale_factor_width=2.6, align_corners=False),
    lambda x: np.array([[[0.0, 0.1, 0.5, 0.9, 1.0]]], np.float32),
)
case(
    "iOS16",
    "upsample_bilinear-legacy-fractional",
    "upsample_bilinear",
    {"x": np.array([[[0.0, 1.0]]], np.float32)},
    lambda x: mb.upsample_bilinear(
        x=x, scale_factor_height=1.0, scale_factor_width=2.6, align_corners=False, half_pixel_centers=False
    ),
    lambda x: np.array([[[0.0, 0.4, 0.8, 1.0, 1.0]]], np.float32),
)
case(
    "iOS16",
    "resize_nearest_neighbor",
    "resize_nearest_neighbor",
    {"x": RES},
    lambda x: mb.resize_nearest_neighbor(x=x, target_size_height=5, target_size_width=2),
    lambda x: F.interpolate(torch.from_numpy(x), size=(5, 2), mode="nearest").numpy(),
    exact=True,
)
case(
    "iOS16",
    "upsample_bilinear-align_corners",
    "upsample_bilinear",
    {"x": RES},
    lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2, scale_factor_width=2, align_corners=True),
    lambda x: F.interpolate(torch.from_numpy(x), scale_factor=2, mode="bilinear", align_corners=True).numpy(),
)
case(
    "iOS16",
    "upsample_bilinear-half_pixel",
    "upsample_bilinear",
    {"x": RES},
    lambda x: mb.upsample_bilinear(x=x, scale_factor_height=2, scale_factor_width=2, align_corners=False),
    lambda x: F.interpolate(torch.from_numpy(x), scale_factor=2, mode="bilinear", align_corners=False).numpy(),
)
case(
    "iOS16",
    "upsample_bilinear-legacy",
    "upsample_bilinear",
    {"x": RES},
    lambda x: mb.upsample_bilinear(
        x=x, scale_factor_height=2, scale_factor_width=2, align_corners=False, half_pixel_centers=False
    ),
    lambda x: _lerp_ref(x, np.arange(6) / 2, np.arange(8) / 2),
)
for _mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS"):
    _g = "STRICT_ALIGN_CORNERS" if _mode == "ALIGN_CORNERS" else _mode
    case(
        "iOS16",
        f"resize_bilinear-{_mode}",
        "resize_bilinear",
        {"x": RES},
        lambda x, _mode=_mode: mb.resize_bilinear(x=x, target_size_height=5, target_size_width=7, sampling_mode=_mode),
        lambda x, _g=_g: _lerp_ref(x, _grid(_g, 3, 5), _grid(_g, 4, 7)),
    )

# ============================================================================ gather / scatter

GX = randn(4, 5, 3)
case(
    "iOS16",
    "gather-axis1-negative-indices",
    "gather",
    {"x": GX, "indices": np.array([[0, -1], [2, -5]], np.int32)},
    lambda x, indices: mb.gather(x=x, indices=indices, axis=1),
    lambda x, indices: np.take(x, indices, axis=1),
    exact=True,
)
case(
    "iOS16",
    "gather-batch_dims",
    "gather",
    {"x": GX, "indices": ints(0, 5, 4, 2)},
    lambda x, indices: mb.gather(x=x, indices=indices, axis=1, batch_dims=1),
    lambda x, indices: np.stack([np.take(x[b], indices[b], axis=0) for b in range(4)]),
    exact=True,
)
case(
    "iOS16",
    "gather-embedding-int",
    "gather",
    {"indices": ints(0, 10, 1, 6)},
    lambda indices: mb.gather(x=np.arange(30, dtype=np.float32).reshape(10, 3), indices=indices, axis=0),
    lambda indices: np.arange(30, dtype=np.float32).reshape(10, 3)[indices],
    exact=True,
)
case(
    "iOS16",
    "gather_along_axis",
    "gather_along_axis",
    {"x": GX, "indices": ints(-5, 5, 4, 2, 3)},
    lambda x, indices: mb.gather_along_axis(x=x, indices=indices, axis=1),
    lambda x, indices: np.take_along_axis(x, np.where(indices < 0, indices + 5, indices), 1),
    exact=True,
)
case(
    "iOS16",
    "gather_nd-pooled-output",
    "gather_nd",
    {"x": randn(2, 7, 3), "indices": np.array([[0, 4], [1, 6]], np.int32)},
    lambda x, indices: mb.gather_nd(x=x, indices=indices),
    lambda x, indices: x[indices[:, 0], indices[:, 1]],
    exact=True,
)
case(
    "iOS16",
    "gather_nd-batch_dims",
    "gather_nd",
    {"x": GX, "indices": ints(0, 3, 4, 2, 2)},
    lambda x, indices: mb.gather_nd(x=x, indices=indices, batch_dims=1),
    lambda x, indices: np.stack([x[b][indices[b][:, 0], indices[b][:, 1]] for b in range(4)]),
    exact=True,
)
SD = randn(5, 3)


def _scatter_ref(data, idx, upd, mode):
    out = data.copy()
    for k, i in enumerate(idx):
        out[i] = {
            "update": upd[k],
            "add": out[i] + upd[k],
            "mul": out[i] * upd[k],
            "max": np.maximum(out[i], upd[k]),
            "sub": out[i] - upd[k],
            "min": np.minimum(out[i], upd[k]),
        }[mode]
    return out


for _mode in ("update", "add", "sub", "mul", "max", "min"):
    _idx = np.array([3, 0], np.int32) if _mode == "update" else np.array([3, 0, 3], np.int32)
    case(
        "iOS16",
        f"scatter-{_mode}",
        "scatter",
        {"data": SD, "updates": randn(len(_idx), 3)},
        lambda data, updates, _mode=_mode, _idx=_idx: mb.scatter(data=data, indices=_idx, updates=updates, mode=_mode),
        lambda data, updates, _mode=_mode, _idx=_idx: _scatter_ref(data, _idx, updates, _mode),
    )
case(
    "iOS16",
    "scatter-axis1-add",
    "scatter",
    {"data": SD, "updates": randn(5, 2)},
    lambda data, updates: mb.scatter(data=data, indices=np.array([2, -3], np.int32), updates=updates, axis=1),
    lambda data, updates: _scatter_ref(data.T, [2, 0], updates.T, "add").T,
)
case(
    "iOS16",
    "scatter_along_axis-add",
    "scatter_along_axis",
    {"data": SD, "updates": randn(2, 3)},
    lambda data, updates: mb.scatter_along_axis(
        data=data, indices=np.array([[1, 0, 4], [1, 2, 4]], np.int32), updates=updates, axis=0
    ),
    lambda data, updates: _along_add(data, np.array([[1, 0, 4], [1, 2, 4]]), updates),
)


def _along_add(data, idx, upd):
    out = data.copy()
    for i in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            out[idx[i, j], j] += upd[i, j]
    return out


case(
    "iOS16",
    "scatter_along_axis-update",
    "scatter_along_axis",
    {"data": SD, "updates": randn(5, 1)},
    lambda data, updates: mb.scatter_along_axis(
        data=data,
        indices=np.array([[2], [1], [0], [2], [1]], np.int32),
        updates=updates,
        axis=1,
        mode="update",
    ),
    lambda data, updates: _put_along(data, np.array([[2], [1], [0], [2], [1]]), updates),
)


def _put_along(data, idx, upd):
    out = data.copy()
    np.put_along_axis(out, idx, upd, axis=1)
    return out


case(
    "iOS16",
    "scatter_nd-add",
    "scatter_nd",
    {"data": randn(3, 4, 2), "updates": randn(3, 2)},
    lambda data, updates: mb.scatter_nd(
        data=data, indices=np.array([[0, 1], [2, 3], [0, 1]], np.int32), updates=updates
    ),
    lambda data, updates: _nd_add(data, [(0, 1), (2, 3), (0, 1)], updates),
)


def _nd_add(data, coords, upd):
    out = data.copy()
    for k, c in enumerate(coords):
        out[c] += upd[k]
    return out


# ============================================================================ tensor operations

T = randn(2, 3, 4)
case("iOS16", "identity", "identity", {"x": T}, lambda x: mb.identity(x=x), lambda x: x, exact=True)
case(
    "iOS16",
    "select",
    "select",
    {"cond": RNG.random((3, 4)) < 0.5, "a": randn(3, 4), "b": randn(1, 4)},
    lambda cond, a, b: mb.select(cond=cond, a=a, b=b),
    lambda cond, a, b: np.where(cond, a, b),
    exact=True,
)
case(
    "iOS16",
    "concat-negative-axis",
    "concat",
    {"x": T, "y": randn(2, 3, 2)},
    lambda x, y: mb.concat(values=(x, y), axis=-1),
    lambda x, y: np.concatenate([x, y], -1),
    exact=True,
)
case(
    "iOS16",
    # A shape built from scalar sizes, as the torch frontend makes a stateful LLM's cache slice end: gather
    # gives rank-0 values and concat takes them as one-element vectors.
    "concat-scalars",
    "concat",
    {"x": ints(0, 9, 3)},
    lambda x: mb.concat(values=(mb.gather(x=x, indices=0, axis=0), mb.gather(x=x, indices=2, axis=0)), axis=0),
    lambda x: x[[0, 2]],
    exact=True,
)
case(
    "iOS16",
    "concat-interleave",
    "concat",
    {"x": T, "y": randn(2, 3, 4)},
    lambda x, y: mb.concat(values=(x, y), axis=1, interleave=True),
    lambda x, y: np.stack([x, y], 2).reshape(2, 6, 4),
    exact=True,
)
case(
    "iOS16",
    "split-num_splits",
    "split",
    {"x": T},
    lambda x: mb.split(x=x, num_splits=2, axis=-1),
    lambda x: tuple(np.split(x, 2, -1)),
    exact=True,
)
case(
    "iOS16",
    "split-sizes",
    "split",
    {"x": T},
    lambda x: mb.split(x=x, split_sizes=[1, 3], axis=2),
    lambda x: (x[..., :1], x[..., 1:]),
    exact=True,
)
case(
    "iOS16",
    "stack",
    "stack",
    {"x": T, "y": randn(2, 3, 4)},
    lambda x, y: mb.stack(values=(x, y), axis=-1),
    lambda x, y: np.stack([x, y], -1),
    exact=True,
)
case(
    "iOS16",
    "shape",
    "shape",
    {"x": T},
    lambda x: mb.shape(x=x),
    lambda x: np.array(x.shape, np.int32),
    exact=True,
)
case(
    "iOS16",
    "fill",
    "fill",
    {},
    lambda: mb.fill(shape=np.array([2, 3], np.int32), value=1.5),
    lambda: np.full((2, 3), 1.5, np.float32),
    exact=True,
)
case(
    "iOS16",
    "fill_like",
    "fill_like",
    {"x": T},
    lambda x: mb.fill_like(ref_tensor=x, value=-2.0),
    lambda x: np.full(x.shape, -2.0, np.float32),
    exact=True,
)
case(
    "iOS16",
    "range_1d-float",
    "range_1d",
    {},
    lambda: mb.range_1d(start=np.float32(1.0), end=np.float32(3.0), step=np.float32(0.5)),
    lambda: np.arange(1.0, 3.0, 0.5, dtype=np.float32),
    exact=True,
)
case(
    "iOS16",
    "range_1d-int-runtime-end",
    "range_1d",
    {"end": np.array([7], np.int32)},
    lambda end: mb.range_1d(start=np.int32(1), end=mb.squeeze(x=end), step=np.int32(2)),
    lambda end: np.arange(1, 7, 2, dtype=np.int32),
    exact=True,
)
case(
    "iOS16",
    "tile",
    "tile",
    {"x": T},
    lambda x: mb.tile(x=x, reps=[2, 1, 3]),
    lambda x: np.tile(x, (2, 1, 3)),
    exact=True,
)
for _mode, _np_mode in {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.items():
    case(
        "iOS16",
        f"pad-{_mode}",
        "pad",
        {"x": T},
        lambda x, _mode=_mode: mb.pad(x=x, pad=np.array([1, 2, 3, 0], np.int32), mode=_mode, constant_val=0.5),
        lambda x, _np_mode=_np_mode: np.pad(
            x,
            [(0, 0), (1, 2), (3, 0)],
            _np_mode,
            **({"constant_values": 0.5} if _np_mode == "constant" else {}),
        ),
        exact=True,
    )
case(
    "iOS16",
    "band_part",
    "band_part",
    {"x": randn(2, 5, 5)},
    lambda x: mb.band_part(x=x, lower=1, upper=2),
    lambda x: x * (np.tril(np.ones((5, 5)), 2) * np.triu(np.ones((5, 5)), -1)),
    exact=True,
)
for _excl in (False, True):
    for _rev in (False, True):

        def _cumsum_ref(x, _excl=_excl, _rev=_rev):
            v = x[:, ::-1] if _rev else x
            out = np.cumsum(v, 1)
            if _excl:
                out = np.concatenate([np.zeros_like(out[:, :1]), out[:, :-1]], 1)
            return out[:, ::-1] if _rev else out

        case(
            "iOS16",
            f"cumsum-exclusive{_excl}-reverse{_rev}",
            "cumsum",
            {"x": randn(2, 5)},
            lambda x, _excl=_excl, _rev=_rev: mb.cumsum(x=x, axis=1, exclusive=_excl, reverse=_rev),
            _cumsum_ref,
        )
case(
    "iOS16",
    "non_zero",
    "non_zero",
    {"x": np.array([[0, 1.5, 0], [2, 0, 3]], np.float32)},
    lambda x: mb.non_zero(x=x),
    lambda x: np.transpose(np.nonzero(x)).astype(np.int32),
    exact=True,
)
case(
    "iOS16",
    "one_hot-axis0",
    "one_hot",
    {"indices": np.array([[0, 2], [3, 1]], np.int32)},
    lambda indices: mb.one_hot(indices=indices, one_hot_vector_size=4, axis=0, on_value=2.0, off_value=-1.0),
    lambda indices: np.moveaxis(np.where(np.eye(4)[indices] > 0, 2.0, -1.0), -1, 0).astype(np.float32),
    exact=True,
)
SORT_X = np.array([[3, 1, 2, 1], [0, 5, 5, 4]], np.float32)
case(
    "iOS16",
    "argsort-descending-stable",
    "argsort",
    {"x": SORT_X},
    lambda x: mb.argsort(x=x, axis=-1),
    lambda x: np.argsort(-x, axis=-1, kind="stable").astype(np.int32),
    exact=True,
)
case(
    "iOS16",
    "argsort-ascending",
    "argsort",
    {"x": SORT_X},
    lambda x: mb.argsort(x=x, axis=1, ascending=True),
    lambda x: np.argsort(x, axis=1, kind="stable").astype(np.int32),
    exact=True,
)
case(
    "iOS16",
    "topk",
    "topk",
    {"x": SORT_X},
    lambda x: mb.topk(x=x, k=2, axis=-1),
    lambda x: (np.array([[3, 2], [5, 5]], np.float32), np.array([[0, 2], [1, 2]], np.int32)),
    exact=True,
)
case(
    "iOS16",
    "topk-ascending-values-only",
    "topk",
    {"x": SORT_X},
    lambda x: mb.topk(x=x, k=3, axis=1, ascending=True, return_indices=False),
    lambda x: np.sort(x, 1)[:, :3],
    exact=True,
)
case(
    "iOS16",
    "flatten2d",
    "flatten2d",
    {"x": T},
    lambda x: mb.flatten2d(x=x, axis=-1),
    lambda x: x.reshape(6, 4),
    exact=True,
)

# ============================================================================ shape transformations

case(
    "iOS16",
    "reshape-zero-and-minus-one",
    "reshape",
    {"x": T},
    lambda x: mb.reshape(x=x, shape=[0, -1, 2]),
    lambda x: x.reshape(2, 6, 2),
    exact=True,
)
case(
    "iOS16",
    "reshape_like",
    "reshape_like",
    {"x": randn(24), "r": randn(2, 3, 4)},
    lambda x, r: mb.reshape_like(x=x, ref_tensors=(r, r), begins=(0, 1), ends=(1, 3), end_masks=(False, True)),
    lambda x, r: x.reshape(2, 3, 4),
    exact=True,
)
case(
    "iOS16",
    "expand_dims-negative",
    "expand_dims",
    {"x": T},
    lambda x: mb.expand_dims(x=x, axes=[-1, 0]),
    lambda x: x[None, ..., None],
    exact=True,
)
case(
    "iOS16",
    "squeeze-axes",
    "squeeze",
    {"x": randn(1, 3, 1, 2)},
    lambda x: mb.squeeze(x=x, axes=[-2]),
    lambda x: x[:, :, 0],
    exact=True,
)
case(
    "iOS16",
    "squeeze-all",
    "squeeze",
    {"x": randn(1, 3, 1, 2)},
    lambda x: mb.squeeze(x=x),
    lambda x: x[0, :, 0],
    exact=True,
)
case(
    "iOS16",
    "transpose-negative-perm",
    "transpose",
    {"x": T},
    lambda x: mb.transpose(x=x, perm=[-1, 0, 1]),
    lambda x: np.transpose(x, (2, 0, 1)),
    exact=True,
)
case(
    "iOS16",
    "reverse",
    "reverse",
    {"x": T},
    lambda x: mb.reverse(x=x, axes=[0, -1]),
    lambda x: x[::-1, :, ::-1],
    exact=True,
)
S = randn(4, 5, 6)
case(
    "iOS16",
    "slice_by_index-masks-negative",
    "slice_by_index",
    {"x": S},
    lambda x: mb.slice_by_index(
        x=x,
        begin=[1, -4, 0],
        end=[3, 0, -1],
        stride=[1, 2, 2],
        begin_mask=[False, False, True],
        end_mask=[False, True, False],
    ),
    lambda x: x[1:3, -4::2, :-1:2],
    exact=True,
)
case(
    "iOS16",
    "slice_by_index-negative-stride-squeeze",
    "slice_by_index",
    {"x": S},
    lambda x: mb.slice_by_index(
        x=x,
        begin=[-1, 4, 2],
        end=[0, 0, 0],
        stride=[-1, -2, 1],
        end_mask=[False, True, False],
        squeeze_mask=[False, False, True],
    ),
    lambda x: x[-1:0:-1, 4::-2, 2],
    exact=True,
)
case(
    "iOS16",
    "slice_by_size",
    "slice_by_size",
    {"x": S},
    # A negative begin counts from the end; size -1 takes the rest (not combined: pymil's shape
    # inference gets that combination wrong, so no package can declare it).
    lambda x: mb.slice_by_size(x=x, begin=[1, -3, 2], size=[2, 2, -1]),
    lambda x: x[1:3, -3:-1, 2:],
    exact=True,
)
D2S = randn(1, 8, 2, 3)
case(
    "iOS16",
    "depth_to_space",
    "depth_to_space",
    {"x": D2S},
    lambda x: mb.depth_to_space(x=x, block_size=2),
    # TF DepthToSpace (DCR) defined on NHWC, applied through the NCHW <-> NHWC transposes.
    lambda x: np.transpose(
        np.transpose(x, (0, 2, 3, 1)).reshape(1, 2, 3, 2, 2, 2).transpose(0, 1, 3, 2, 4, 5).reshape(1, 4, 6, 2),
        (0, 3, 1, 2),
    ),
    exact=True,
)
case(
    "iOS16",
    "space_to_depth",
    "space_to_depth",
    {"x": randn(1, 2, 4, 6)},
    lambda x: mb.space_to_depth(x=x, block_size=2),
    lambda x: np.transpose(
        np.transpose(x, (0, 2, 3, 1)).reshape(1, 2, 2, 3, 2, 2).transpose(0, 1, 3, 2, 4, 5).reshape(1, 2, 3, 8),
        (0, 3, 1, 2),
    ),
    exact=True,
)
case(
    "iOS16",
    "pixel_shuffle",
    "pixel_shuffle",
    {"x": D2S},
    lambda x: mb.pixel_shuffle(x=x, upscale_factor=2),
    lambda x: x.reshape(1, 2, 2, 2, 2, 3).transpose(0, 1, 4, 2, 5, 3).reshape(1, 2, 4, 6),
    exact=True,
)
case(
    "iOS16",
    "pixel_unshuffle",
    "pixel_unshuffle",
    {"x": randn(1, 2, 4, 6)},
    lambda x: mb.pixel_unshuffle(x=x, downscale_factor=np.uint32(2)),
    lambda x: x.reshape(1, 2, 2, 2, 3, 2).transpose(0, 1, 3, 5, 2, 4).reshape(1, 8, 2, 3),
    exact=True,
)
case(
    "iOS16",
    "sliding_windows",
    "sliding_windows",
    {"x": randn(2, 7, 3)},
    lambda x: mb.sliding_windows(x=x, axis=1, size=3, stride=2),
    lambda x: np.stack([x[:, i : i + 3] for i in range(0, 5, 2)], 1),
    exact=True,
)

# ============================================================================ iOS17 quantization, iOS18 ops

QX = randn(2, 3, 4) * 3
Q_SCALE, Q_ZP = uniform(0.02, 0.05, 3), np.array([0, 10, -5], np.int8)
case(
    "iOS17",
    "quantize-int8-per-channel",
    "quantize",
    {"x": QX},
    lambda x: mb.quantize(input=x, scale=Q_SCALE, zero_point=Q_ZP, axis=1, output_dtype="int8"),
    lambda x: np.clip(np.round(x / Q_SCALE.reshape(1, 3, 1)) + Q_ZP.reshape(1, 3, 1), -128, 127).astype(np.int8),
    exact=True,
)
case(
    "iOS17",
    "dequantize-uint8",
    "dequantize",
    {"x": QX},
    lambda x: mb.dequantize(
        input=mb.quantize(input=x, scale=np.float32(0.1), zero_point=np.uint8(128), output_dtype="uint8"),
        scale=np.float32(0.1),
        zero_point=np.uint8(128),
    ),
    lambda x: ((np.clip(np.round(x / np.float32(0.1)) + 128, 0, 255) - 128) * np.float32(0.1)).astype(np.float32),
)
SDPA_Q, SDPA_K, SDPA_V = randn(2, 3, 5, 4), randn(2, 3, 6, 4), randn(2, 3, 6, 4)


def _sdpa_ref(q, k, v, m=None):
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if m is not None:
        scores = scores + (np.where(m, 0, -np.inf) if m.dtype == bool else m)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


CAUSAL = np.tril(np.ones((5, 6), bool))
case(
    "iOS18",
    "scaled_dot_product_attention",
    "scaled_dot_product_attention",
    {"q": SDPA_Q, "k": SDPA_K, "v": SDPA_V},
    lambda q, k, v: mb.scaled_dot_product_attention(query=q, key=k, value=v),
    _sdpa_ref,
    tol=1e-4,
)
case(
    "iOS18",
    "scaled_dot_product_attention-bool-mask",
    "scaled_dot_product_attention",
    {"q": SDPA_Q, "k": SDPA_K, "v": SDPA_V, "m": CAUSAL},
    lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m),
    _sdpa_ref,
    tol=1e-4,
)
case(
    "iOS18",
    "scaled_dot_product_attention-float-mask",
    "scaled_dot_product_attention",
    {"q": SDPA_Q, "k": SDPA_K, "v": SDPA_V, "m": randn(5, 6)},
    lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m),
    _sdpa_ref,
    tol=1e-4,
)
case(
    "iOS18",
    "slice_update",
    "slice_update",
    {"x": S, "u": randn(2, 4, 6)},
    lambda x, u: mb.slice_update(
        x=x,
        update=u,
        begin=np.array([1, 4, 0], np.int32),
        end=np.array([3, 0, 6], np.int32),
        stride=np.array([1, -1, 1], np.int32),
    ),
    lambda x, u: _set(x, (slice(1, 3), slice(4, 0, -1), slice(0, 6)), u),
    exact=True,
)


def _set(x, key, u):
    out = x.copy()
    out[key] = u
    return out


# iOS17 lets linear/matmul mix an fp32 input with an fp16 or int32 constant (the result takes the
# non-constant operand's dtype), and lets reshape's 0s match input dims counted from the right.
W16 = randn(5, 4).astype(np.float16)
case(
    "iOS17",
    "linear-fp16-weight",
    "linear",
    {"x": randn(2, 4)},
    lambda x: mb.linear(x=x, weight=W16, bias=np.ones(5, np.float16)),
    lambda x: x @ W16.astype(np.float32).T + 1,
)
Y_INT = ints(-5, 5, 4, 3)
case(
    "iOS17",
    "matmul-int32-y",
    "matmul",
    {"x": randn(2, 4)},
    lambda x: mb.matmul(x=x, y=Y_INT),
    lambda x: x @ Y_INT.astype(np.float32),
)
case(
    "iOS17",
    "reshape-zeros-from-the-right",
    "reshape",
    {"x": randn(2, 50)},
    lambda x: mb.reshape(x=x, shape=[1, 0, -1, 0]),
    lambda x: x.reshape(1, 1, 2, 50),
    exact=True,
)

# ============================================================================ image resizing, sampling


GRID_X = randn(2, 3, 4, 5)
case(
    "iOS16",
    "crop",
    "crop",
    {"x": GRID_X},
    lambda x: mb.crop(x=x, crop_height=[1, 2], crop_width=[0, 3]),
    lambda x: x[..., 1:2, 0:2],
    exact=True,
)
RAMP = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)


def _ramp_at(rows, cols, pad=None):
    # RAMP[r, c] = 4r + c, so bilinear sampling of it is exact; positions outside read `pad`.
    rows, cols = np.asarray(rows)[:, None], np.asarray(cols)[None, :]
    value = 4 * rows + cols
    if pad is not None:
        value = np.where((rows >= 0) & (rows <= 3) & (cols >= 0) & (cols <= 3), value, pad)
    return value.astype(np.float32)


case(
    "iOS17",
    "crop_resize-boxes-pad",
    "crop_resize",
    {"x": RAMP},
    lambda x: mb.crop_resize(
        x=x,
        boxes=np.array([[1, 1, 2, 2], [0.5, 0.0, 2.5, 6.0]], np.float32),
        box_indices=np.array([0, 0], np.int32),
        target_height=3,
        target_width=2,
        sampling_mode="ALIGN_CORNERS",
        pad_value=-1.0,
    ),
    lambda x: np.stack([_ramp_at([1, 1.5, 2], [1, 2], -1), _ramp_at([0.5, 1.5, 2.5], [0, 6], -1)]).reshape(2, 1, 3, 2),
)
SAMPLE_X, SAMPLE_AT = randn(2, 3, 4, 5), uniform(-1.3, 1.3, 2, 3, 6, 2)


def _grid_sample(x, grid, padding, align):
    return F.grid_sample(
        torch.from_numpy(x), torch.from_numpy(grid), mode="bilinear", padding_mode=padding, align_corners=align
    ).numpy()


# Without align_corners torch reflects about the pixel edges; MIL pads the pixel grid itself
# ("|1, 2, 3| -> |2, 3, 2, 1, 2, 3, 2, 1, 2|"), which torch's reflection matches only when aligned.
for _padding, _torch_padding, _aligns in (
    ("constant", "zeros", (True, False)),
    ("border", "border", (True, False)),
    ("reflection", "reflection", (True,)),
):
    for _align in _aligns:
        case(
            "iOS16",
            f"resample-{_padding}-align={_align}",
            "resample",
            {"x": SAMPLE_X, "at": SAMPLE_AT},
            lambda x, at, _padding=_padding, _align=_align: mb.resample(
                x=x,
                coordinates=at,
                sampling_mode="bilinear",
                padding_mode=_padding,
                padding_value=0.0,
                coordinates_mode="normalized_minus_one_to_one",
                align_corners=_align,
            ),
            lambda x, at, _torch_padding=_torch_padding, _align=_align: _grid_sample(x, at, _torch_padding, _align),
            tol=1e-5,
        )
THETA = np.array([[0.8, -0.3, 0.1, 0.2, 1.1, -0.2], [1.2, 0.1, 0.0, -0.1, 0.9, 0.3]], np.float32)
case(
    "iOS16",
    "affine",
    "affine",
    {"x": SAMPLE_X, "m": THETA},
    lambda x, m: mb.affine(
        x=x,
        transform_matrix=m,
        output_height=3,
        output_width=7,
        sampling_mode="bilinear",
        padding_mode="constant",
        padding_value=0.0,
        coordinates_mode="normalized_minus_one_to_one",
        align_corners=True,
    ),
    lambda x, m: _grid_sample(
        x,
        F.affine_grid(torch.from_numpy(m.reshape(2, 2, 3)), [2, 3, 3, 7], align_corners=True).numpy(),
        "zeros",
        True,
    ),
    tol=1e-5,
)
case(
    "iOS17",
    "resize-linear-align-corners",
    "resize",
    {"x": GRID_X},
    lambda x: mb.resize(
        x=x, shape=[7, 3], resized_dims=np.uint32(2), interpolation_mode="LINEAR", sampling_mode="ALIGN_CORNERS"
    ),
    lambda x: F.interpolate(torch.from_numpy(x), size=(7, 3), mode="bilinear", align_corners=True).numpy(),
)
case(
    "iOS17",
    "resize-nearest-one-dim",
    "resize",
    {"x": np.array([[-6.0, 9.0]], np.float32)},
    lambda x: mb.resize(
        x=x, shape=[3], resized_dims=np.uint32(1), interpolation_mode="NEAREST_NEIGHBOR", sampling_mode="DEFAULT"
    ),
    # DEFAULT samples 2 -> 3 at 0, 2/3, 4/3, rounded to the nearest input.
    lambda x: np.array([[-6.0, 9.0, 9.0]], np.float32),
    exact=True,
)

# ============================================================================ normalization, layout


def _lrn_ref(x, size, alpha, beta, k):
    channels = x.shape[1]
    out = np.empty_like(x)
    for c in range(channels):
        window = x[:, max(0, c - size // 2) : min(channels, c + (size - 1) // 2 + 1)]
        out[:, c] = x[:, c] / (k + alpha / size * np.square(window).sum(axis=1)) ** beta
    return out


case(
    "iOS16",
    "local_response_norm",
    "local_response_norm",
    {"x": randn(2, 6, 3, 3)},
    lambda x: mb.local_response_norm(x=x, size=4, alpha=0.3, beta=0.6, k=1.5),
    lambda x: _lrn_ref(x, 4, 0.3, 0.6, 1.5),
)


def _reverse_sequence_ref(x, lengths):
    out = x.copy()
    for b, n in enumerate(lengths):
        out[:n, b] = x[:n, b][::-1]
    return out


case(
    "iOS16",
    "reverse_sequence-seq0-batch1",
    "reverse_sequence",
    {"x": randn(5, 3, 2), "lengths": np.array([5, 0, 3], np.int32)},
    lambda x, lengths: mb.reverse_sequence(x=x, lengths=lengths, seq_axis=0, batch_axis=1),
    _reverse_sequence_ref,
    exact=True,
)
S2B_X = randn(2, 3, 4, 3)


def _space_to_batch_ref(x, bh, bw):
    n, c, h, w = x.shape
    out = np.empty((bh * bw * n, c, h // bh, w // bw), x.dtype)
    for i in range(bh):
        for j in range(bw):
            out[(i * bw + j) * n : (i * bw + j + 1) * n] = x[:, :, i::bh, j::bw]
    return out


case(
    "iOS16",
    "space_to_batch",
    "space_to_batch",
    {"x": S2B_X},
    lambda x: mb.space_to_batch(x=x, block_shape=[2, 2], paddings=[[0, 0], [1, 0]]),
    lambda x: _space_to_batch_ref(np.pad(x, [(0, 0), (0, 0), (0, 0), (1, 0)]), 2, 2),
    exact=True,
)


def _batch_to_space_ref(x, bh, bw):
    b, c, h, w = x.shape
    n = b // (bh * bw)
    out = np.empty((n, c, h * bh, w * bw), x.dtype)
    for i in range(bh):
        for j in range(bw):
            out[:, :, i::bh, j::bw] = x[(i * bw + j) * n : (i * bw + j + 1) * n]
    return out


case(
    "iOS16",
    "batch_to_space",
    "batch_to_space",
    {"x": randn(8, 3, 2, 2)},
    lambda x: mb.batch_to_space(x=x, block_shape=[2, 2], crops=[[0, 1], [1, 0]]),
    lambda x: _batch_to_space_ref(x, 2, 2)[:, :, 0:3, 1:4],
    exact=True,
)


# ============================================================================ recurrent

SEQ_X, SEQ_H, SEQ_C = randn(4, 2, 3), randn(2, 5), randn(2, 5)
RNN_W, RNN_R, RNN_B = randn(5, 3), randn(5, 5), randn(5)


def _rnn_ref(x, h):
    outputs = []
    for t in reversed(range(x.shape[0])):
        h = np.tanh(x[t] @ RNN_W.T + h @ RNN_R.T + RNN_B)
        outputs.append(h)
    return np.stack(outputs), h


case(
    "iOS16",
    "rnn-reverse",
    "rnn",
    {"x": SEQ_X, "h": SEQ_H},
    lambda x, h: mb.rnn(
        x=x, initial_h=h, weight_ih=RNN_W, weight_hh=RNN_R, bias=RNN_B, direction="reverse", output_sequence=True
    ),
    _rnn_ref,
    tol=1e-5,
)
with torch.random.fork_rng():
    torch.manual_seed(0)
    TORCH_GRU = torch.nn.GRU(3, 5).requires_grad_(False)
    TORCH_LSTM = torch.nn.LSTM(3, 5, bidirectional=True).requires_grad_(False)


def _rzn_to_ron(t):
    # torch orders GRU gates (reset, update, new); MIL (reset, output, update).
    r, z, n = np.split(t.numpy(), 3)
    return np.concatenate([r, n, z])


def _ifgo_to_ifog(t):
    # torch orders LSTM gates (input, forget, cell, output); MIL (input, forget, output, cell).
    i, f, g, o = np.split(t.numpy(), 4)
    return np.concatenate([i, f, o, g])


case(
    "iOS18",
    "gru-reset-after-vs-torch",
    "gru",
    {"x": SEQ_X, "h": SEQ_H},
    lambda x, h: mb.gru(
        x=x,
        initial_h=h,
        weight_ih=_rzn_to_ron(TORCH_GRU.weight_ih_l0),
        weight_hh=_rzn_to_ron(TORCH_GRU.weight_hh_l0),
        input_bias=_rzn_to_ron(TORCH_GRU.bias_ih_l0),
        bias=_rzn_to_ron(TORCH_GRU.bias_hh_l0),
        reset_after=True,
        output_sequence=True,
    ),
    lambda x, h: _gru_ref(x, h),
    tol=1e-5,
)


def _gru_ref(x, h):
    out, hn = TORCH_GRU(torch.from_numpy(x), torch.from_numpy(h)[None])
    return out.numpy(), hn[0].numpy()


def _lstm_ref(x, h, c):
    # Both directions start from (h, c); MIL concatenates the directions along the hidden axis.
    both = [torch.from_numpy(v)[None].expand(2, *v.shape) for v in (h, c)]
    out, (hn, cn) = TORCH_LSTM(torch.from_numpy(x), tuple(both))
    return out.numpy(), torch.cat(list(hn), -1).numpy(), torch.cat(list(cn), -1).numpy()


case(
    "iOS16",
    "lstm-bidirectional-vs-torch",
    "lstm",
    {"x": SEQ_X, "h": SEQ_H, "c": SEQ_C},
    lambda x, h, c: mb.lstm(
        x=x,
        initial_h=mb.concat(values=[h, h], axis=-1),
        initial_c=mb.concat(values=[c, c], axis=-1),
        weight_ih=_ifgo_to_ifog(TORCH_LSTM.weight_ih_l0),
        weight_hh=_ifgo_to_ifog(TORCH_LSTM.weight_hh_l0),
        bias=_ifgo_to_ifog(TORCH_LSTM.bias_ih_l0 + TORCH_LSTM.bias_hh_l0),
        weight_ih_back=_ifgo_to_ifog(TORCH_LSTM.weight_ih_l0_reverse),
        weight_hh_back=_ifgo_to_ifog(TORCH_LSTM.weight_hh_l0_reverse),
        bias_back=_ifgo_to_ifog(TORCH_LSTM.bias_ih_l0_reverse + TORCH_LSTM.bias_hh_l0_reverse),
        direction="bidirectional",
        output_sequence=True,
    ),
    _lstm_ref,
    tol=1e-5,
)

# ============================================================================ control flow, lists

P_X = randn(3)
for _pred in (True, False):
    case(
        "iOS16",
        f"cond-{str(_pred).lower()}",
        "cond",
        {"p": np.array([_pred]), "x": P_X},
        # The false branch returns an enclosing value as it is.
        lambda p, x: mb.cond(
            pred=mb.squeeze(x=p),
            _true_fn=lambda: (mb.add(x=x, y=1.0), mb.mul(x=x, y=2.0)),
            _false_fn=lambda: (x, mb.mul(x=x, y=-2.0)),
        ),
        lambda p, x: (x + 1, 2 * x) if p[0] else (x, -2 * x),
        exact=True,
    )
case(
    "iOS16",
    "while_loop-power",
    "while_loop",
    {"x": P_X, "n": np.array([3.0], np.float32)},
    lambda x, n: mb.while_loop(
        _cond=lambda r, i: mb.less(x=i, y=n),
        _body=lambda r, i: (mb.mul(x=r, y=x), mb.add(x=i, y=1.0)),
        loop_vars=(x, np.zeros(1, np.float32)),
    ),
    lambda x, n: (x**4, n),
)


def _nested_loops(x, y):
    # while i < j: (while 2i < i + 2: i += 1); i += 2
    def inner(i):
        return mb.while_loop(
            _cond=lambda k: mb.less(x=mb.mul(x=k, y=2.0), y=mb.add(x=k, y=2.0)),
            _body=lambda k: mb.add(x=k, y=1.0),
            loop_vars=(i,),
        )

    return mb.while_loop(
        _cond=lambda i, j: mb.less(x=i, y=j), _body=lambda i, j: (mb.add(x=inner(i), y=2.0), j), loop_vars=(x, y)
    )


def _nested_loops_ref(x, y):
    i = float(x[0])
    while i < y[0]:
        while 2 * i < i + 2:
            i += 1
        i += 2
    return np.array([i], np.float32), y


case(
    "iOS16",
    "while_loop-nested",
    "while_loop",
    {"x": np.array([0.0], np.float32), "y": np.array([9.0], np.float32)},
    _nested_loops,
    _nested_loops_ref,
    exact=True,
)
L_A, L_B = randn(2), randn(2)
case(
    "iOS16",
    "make_list-unwritten-reads-zero",
    "make_list",
    {"a": L_A},
    lambda a: mb.list_read(ls=mb.make_list(init_length=2, elem_shape=(2,)), index=1),
    lambda a: np.zeros(2, np.float32),
    exact=True,
)
case(
    "iOS16",
    "list_read-what-was-written",
    "list_read",
    {"a": L_A},
    lambda a: mb.list_read(
        ls=mb.list_write(ls=mb.make_list(init_length=2, elem_shape=(2,)), index=1, value=a), index=1
    ),
    lambda a: a,
    exact=True,
)


def _write_past_the_end(a, b):
    ls = mb.list_write(ls=mb.make_list(init_length=2, elem_shape=(2,)), index=0, value=a)
    return mb.list_gather(ls=mb.list_write(ls=ls, index=4, value=b), indices=[4, 0, 3])


case(
    "iOS16",
    "list_write-past-the-end-grows-the-list",
    "list_write",
    {"a": L_A, "b": L_B},
    _write_past_the_end,
    lambda a, b: np.stack([b, a, np.zeros(2, np.float32)]),
    exact=True,
)
case(
    "iOS16",
    "list_scatter",
    "list_scatter",
    {"v": randn(2, 2)},
    lambda v: mb.list_read(
        ls=mb.list_scatter(ls=mb.make_list(init_length=3, elem_shape=(2,)), indices=[2, 0], value=v), index=2
    ),
    lambda v: v[0],
    exact=True,
)


def _append_in_loop(n, u):
    # Appends u * i for i = 0 .. n-1 to a list of length 1, then gathers the whole list.
    def body(i, ls):
        return mb.add(x=i, y=1), mb.list_write(ls=ls, index=i, value=mb.mul(x=u, y=mb.cast(x=i, dtype="fp32")))

    _, ls = mb.while_loop(
        _cond=lambda i, ls: mb.less(x=mb.cast(x=i, dtype="fp32"), y=n),
        _body=body,
        loop_vars=(0, mb.make_list(init_length=1, elem_shape=(2,))),
    )
    length = mb.list_length(ls=ls)
    return mb.list_gather(ls=ls, indices=mb.range_1d(start=0, end=length, step=1)), length


case(
    "iOS16",
    "list_gather-of-a-loop-built-list",
    "list_gather",
    {"n": np.array([3.0], np.float32), "u": L_A},
    _append_in_loop,
    lambda n, u: (np.stack([u * i for i in range(3)]), np.int32(3)),
    exact=True,
)
case(
    "iOS16",
    "list_length",
    "list_length",
    {"a": L_A},
    lambda a: mb.list_length(ls=mb.list_write(ls=mb.make_list(init_length=1, elem_shape=(2,)), index=3, value=a)),
    lambda a: np.int32(4),
    exact=True,
)


def test_a_fixed_length_list_refuses_an_index_past_its_end():
    fixed = TensorList((None, None), (2,), torch.float32, dynamic=False)
    np.testing.assert_array_equal(fixed.write({1: torch.ones(2)}).read(1), np.ones(2))
    with pytest.raises(ExecutorError, match="fixed-length"):
        fixed.write({2: torch.ones(2)})
    with pytest.raises(ExecutorError, match="out of range"):
        fixed.read(2)


# ============================================================================ non_maximum_suppression


def _iou(a, b):
    # Boxes as (x_center, y_center, width, height); empty boxes overlap nothing.
    lo = np.maximum(a[:2] - a[2:] / 2, b[:2] - b[2:] / 2)
    hi = np.minimum(a[:2] + a[2:] / 2, b[:2] + b[2:] / 2)
    inter = np.prod(np.clip(hi - lo, 0, None))
    if a[2] * a[3] <= 0 or b[2] * b[3] <= 0:
        return 0.0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _nms_ref(boxes, scores, iou_threshold, score_threshold, max_boxes, per_class):
    """NMS as coremltools' op tests define it (their TensorFlow reference, written out): each
    class's boxes suppressed apart when per_class, the survivors merged best score first."""
    n, count, classes = scores.shape
    out = (np.zeros((n, max_boxes, 4)), np.zeros((n, max_boxes, classes)), -np.ones((n, max_boxes)), np.zeros(n))
    for b in range(n):
        best, label = scores[b].max(-1), scores[b].argmax(-1)
        groups = [np.flatnonzero(label == c) for c in np.unique(label)] if per_class else [np.arange(count)]
        kept = []
        for group in groups:
            chosen = []
            for i in sorted(group, key=lambda i: -best[i]):
                if (score_threshold is None or best[i] > score_threshold) and all(
                    _iou(boxes[b, i], boxes[b, j]) <= iou_threshold for j in chosen
                ):
                    chosen.append(i)
            kept += chosen
        kept = sorted(kept, key=lambda i: -best[i])[:max_boxes] or [int(best.argmax())]
        k = len(kept)
        out[0][b, :k], out[1][b, :k], out[2][b, :k], out[3][b] = boxes[b, kept], scores[b, kept], kept, k
    return out


NMS_BOXES = np.concatenate([uniform(0, 10, 2, 24, 2), uniform(1, 6, 2, 24, 2)], -1)
NMS_BOXES[0, 3, 2] = 0.0  # an empty box
NMS_SCORES = RNG.permutation(2 * 24 * 3).reshape(2, 24, 3).astype(np.float32) / 10 - 7
for _per_class in (False, True):
    case(
        "iOS16",
        f"non_maximum_suppression-iOS15{'-per-class' if _per_class else ''}",
        "non_maximum_suppression",
        {"boxes": NMS_BOXES, "scores": NMS_SCORES},
        lambda boxes, scores, _p=_per_class: mb.non_maximum_suppression(
            boxes=boxes, scores=scores, iou_threshold=0.1, score_threshold=-2.0, max_boxes=12, per_class_suppression=_p
        ),
        lambda boxes, scores, _p=_per_class: _nms_ref(boxes, scores, 0.1, -2.0, 12, _p),
        exact=True,
    )
    case(
        "iOS17",
        f"non_maximum_suppression-iOS17{'-per-class' if _per_class else ''}",
        "non_maximum_suppression",
        {"boxes": NMS_BOXES.transpose(0, 2, 1).copy(), "scores": NMS_SCORES.transpose(0, 2, 1).copy()},
        lambda boxes, scores, _p=_per_class: mb.non_maximum_suppression(
            boxes=boxes, scores=scores, iou_threshold=0.3, max_boxes=30, per_class_suppression=_p
        ),
        lambda boxes, scores, _p=_per_class: tuple(
            out.transpose(0, 2, 1) if out.ndim == 3 else out
            for out in _nms_ref(boxes.transpose(0, 2, 1), scores.transpose(0, 2, 1), 0.3, None, 30, _p)[:3]
        ),
        exact=True,
    )
case(
    "iOS16",
    "non_maximum_suppression-none-above-the-threshold",
    "non_maximum_suppression",
    {"boxes": NMS_BOXES, "scores": NMS_SCORES},
    lambda boxes, scores: mb.non_maximum_suppression(
        boxes=boxes, scores=scores, iou_threshold=0.5, score_threshold=100.0, max_boxes=3
    ),
    lambda boxes, scores: _nms_ref(boxes, scores, 0.5, 100.0, 3, False),
    exact=True,
)


# ============================================================================ fp16 programs

H_X, H_Y = randn(2, 3, 4).astype(np.float16), randn(2, 3, 4).astype(np.float16)
for _op, _ref in {"add": np.add, "mul": np.multiply, "real_div": np.divide, "sub": np.subtract}.items():
    case(
        "fp16",
        f"{_op}-fp16",
        _op,
        {"x": H_X, "y": H_Y},
        lambda x, y, _op=_op: getattr(mb, _op)(x=x, y=y),
        lambda x, y, _ref=_ref: _ref(x, y),
        exact=True,
        mode="fp16",
    )
W_H = randn(5, 4).astype(np.float16)
case(
    "fp16",
    "linear-fp16-rounds-once",
    "linear",
    {"x": H_X},
    lambda x: mb.linear(x=x, weight=W_H),
    lambda x: (x.astype(np.float64) @ W_H.T.astype(np.float64)).astype(np.float16),
    mode="fp16",
    tol=2e-3,
)
case(
    "fp16",
    "softmax-fp16",
    "softmax",
    {"x": H_X},
    lambda x: mb.softmax(x=x, axis=-1),
    lambda x: torch.softmax(torch.from_numpy(x).float(), -1).half().numpy(),
    mode="fp16",
    exact=True,
)
case(
    "fp16",
    "fp32-mode-holds-fp32",
    "mul",
    {"x": H_X, "y": H_Y},
    lambda x, y: mb.mul(x=x, y=mb.mul(x=y, y=y)),
    lambda x, y: x.astype(np.float32) * (y.astype(np.float32) * y.astype(np.float32)),
    mode="fp32",
)
case(
    "fp16",
    "fp16-mode-rounds-each-op",
    "mul",
    {"x": H_X, "y": H_Y},
    lambda x, y: mb.mul(x=x, y=mb.mul(x=y, y=y)),
    lambda x, y: x * (y * y),
    mode="fp16",
    exact=True,
)

ALL_CASES = [(g, c) for g, (_, cases) in GROUPS.items() for c in cases]


@pytest.mark.parametrize(("group", "case_"), ALL_CASES, ids=[f"{g}:{c.name}" for g, c in ALL_CASES])
def test_op_matches_reference(group, case_, executed):
    program, results = executed[group]
    assert case_.op in program.op_types, f"{case_.op} did not reach the package"
    outputs = results[case_.mode]
    got = [outputs[name] for name in case_.outputs]
    expected = case_.ref(**case_.inputs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        e = np.asarray(e)
        assert g.shape == e.shape, f"shape {g.shape} != {e.shape}"
        if case_.exact:
            np.testing.assert_array_equal(g, e.astype(g.dtype) if e.dtype != g.dtype and e.dtype.kind == "f" else e)
        else:
            np.testing.assert_allclose(g, e, rtol=case_.tol, atol=case_.tol)


# Ops that need a stateful program, which a case group cannot hold (tests/test_executor_states.py),
# and random ops, checked by distribution (tests/test_executor_random.py).
TESTED_ELSEWHERE = {
    "read_state",
    "coreml_update_state",
    "random_bernoulli",
    "random_categorical",
    "random_normal",
    "random_uniform",
}


def test_every_op_in_the_table_is_tested():
    tested = {c.op for _, c in ALL_CASES} | TESTED_ELSEWHERE
    assert SUPPORTED_OPS - tested == set()


def test_unknown_op_raises_naming_op_opset_and_package(tmp_path, monkeypatch):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 4, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.topk(x=x, k=2)[0]

    package = tmp_path / "topk.mlpackage"
    ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        pass_pipeline=ct.PassPipeline.EMPTY,
    ).save(str(package))
    # Every op coremltools defines for ML Programs is in the table: take one out.
    monkeypatch.delitem(OPS, "topk")
    with pytest.raises(UnsupportedOpError) as info:
        load_program(package)
    assert isinstance(info.value, PublisherError)
    message = str(info.value)
    assert "topk" in message and "iOS17" in message and str(package) in message


def test_inputs_are_checked(executed):
    program, _ = executed["iOS16"]
    with pytest.raises(ExecutorError, match="missing"):
        run(program, {})
    name, spec = next(iter(program.inputs.items()))
    feeds = {n: np.zeros([d for d in s.shape], s.numpy_dtype) for n, s in program.inputs.items()}
    feeds[name] = np.zeros((*spec.shape, 1), spec.numpy_dtype)
    with pytest.raises(ExecutorError, match="shape"):
        run(program, feeds)


def test_each_intermediate_is_released_after_its_last_use(executed):
    program, _ = executed["fp16"]
    outputs = {v.name for v in program.function.outputs}
    released = [name for step in program.steps for name in step.release]
    assert len(released) == len(set(released))
    produced = {info.name for step in program.steps for info in step.outputs}
    assert produced - outputs <= set(released), "an intermediate is never released"
    assert not set(released) & outputs, "a model output was released"
    consumed_later = {}
    for index, step in enumerate(program.steps):
        for ref in step.inputs.values():
            for r in ref if isinstance(ref, tuple) else (ref,):
                if isinstance(r, str):
                    consumed_later[r] = index
    for index, step in enumerate(program.steps):
        for name in step.release:
            assert consumed_later.get(name, index) <= index, f"{name} released before its last use"


def _convert_one(tmp_path, name, input_specs, target, build):
    prog = mb.program(input_specs=input_specs, opset_version=target)(build)
    package = tmp_path / f"{name}.mlpackage"
    ct.convert(
        prog, convert_to="mlprogram", minimum_deployment_target=target, pass_pipeline=ct.PassPipeline.EMPTY
    ).save(str(package))
    return load_program(package)


SCATTER_DATA = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
SCATTER_UPDATES = np.array([[5, 6, 7], [8, 9, 10]], np.float32)


def _scatter_program(tmp_path, op, target, validate=None):
    extra = {} if validate is None else {"validate_indices": validate}
    depth = (1,) if op == "scatter_nd" else ()

    def build(data, indices, updates):
        return getattr(mb, op)(data=data, indices=indices, updates=updates, **extra)

    specs = [mb.TensorSpec((2, 3)), mb.TensorSpec((2, *depth), dtype=types.int32), mb.TensorSpec((2, 3))]
    return _convert_one(tmp_path, f"{op}-{target}-{validate}", specs, target, build)


def _scatter_feeds(op, indices):
    shaped = np.array(indices, np.int32).reshape((2, 1) if op == "scatter_nd" else (2,))
    return {"data": SCATTER_DATA, "indices": shaped, "updates": SCATTER_UPDATES}


@pytest.mark.parametrize("op", ["scatter", "scatter_nd"])
def test_scatter_indices_out_of_range(op, tmp_path):
    # iOS15/16: indices in [-D, D), negatives counted from the end; anything else cannot be computed.
    ios16 = _scatter_program(tmp_path, op, ct.target.iOS16)
    out = run(ios16, _scatter_feeds(op, [-1, 0]))[next(iter(ios16.outputs)).name]
    np.testing.assert_array_equal(out, [[9, 11, 13], [9, 11, 13]])
    with pytest.raises(ExecutorError, match="out of range"):
        run(ios16, _scatter_feeds(op, [2, 0]))
    # iOS17+: only [0, D) is valid. validate_indices=True fails as Core ML does; without it the
    # behaviour is undefined but memory safe: the out-of-range updates are dropped, never wrapped
    # or written into another element.
    checked = _scatter_program(tmp_path, op, ct.target.iOS17, validate=True)
    for bad in ([-1, 0], [2, 0]):
        with pytest.raises(ExecutorError, match="out of range"):
            run(checked, _scatter_feeds(op, bad))
    unchecked = _scatter_program(tmp_path, op, ct.target.iOS17, validate=False)
    for bad in ([-1, 0], [2, 0]):
        out = run(unchecked, _scatter_feeds(op, bad))[next(iter(unchecked.outputs)).name]
        np.testing.assert_array_equal(out, [[9, 11, 13], [4, 5, 6]])


def test_scatter_nd_never_aliases_an_out_of_range_coordinate_into_another_element(tmp_path):
    def build(data, indices, updates):
        return mb.scatter_nd(data=data, indices=indices, updates=updates, mode="update", validate_indices=False)

    specs = [mb.TensorSpec((2, 3)), mb.TensorSpec((1, 2), dtype=types.int32), mb.TensorSpec((1,))]
    program = _convert_one(tmp_path, "scatter_nd-depth2", specs, ct.target.iOS17, build)
    # (0, 3) flattens to element (1, 0) of a (2, 3) tensor; it must not be written there.
    feeds = {"data": SCATTER_DATA, "indices": np.array([[0, 3]], np.int32), "updates": np.array([99], np.float32)}
    np.testing.assert_array_equal(run(program, feeds)[next(iter(program.outputs)).name], SCATTER_DATA)


ATTN_Q, ATTN_K, ATTN_V = (RNG.standard_normal((1, 2, 40, 8)).astype(np.float16) for _ in range(3))


def _attention(q, k, v):
    weights = mb.softmax(x=mb.matmul(x=q, y=k, transpose_y=True), axis=-1)
    # The scores are an output too in the second sequence: it must not be fused.
    shared = mb.matmul(x=q, y=k, transpose_y=True)
    return mb.matmul(x=weights, y=v), mb.matmul(x=mb.softmax(x=shared, axis=-1), y=v), shared


def _attention_ops(q, k, v, rounded: bool):
    # Op by op as the executor runs each: matmul in fp32, softmax on the scores as held.
    as_held = (lambda t: t.half()) if rounded else (lambda t: t)
    q, k, v = (torch.from_numpy(t).float() for t in (q, k, v))
    weights = torch.softmax(as_held(q @ k.transpose(-1, -2)), -1)
    return as_held(weights.float() @ v).float().numpy()


def test_attention_is_fused_and_computes_what_its_ops_do(tmp_path, monkeypatch):
    spec = [mb.TensorSpec(shape=ATTN_Q.shape, dtype=types.fp16) for _ in range(3)]
    program = _convert_one(tmp_path, "attention", spec, ct.target.iOS16, _attention)
    fused = [step for step in program.steps if step.fused]
    assert [step.fused for step in fused] == [("matmul", "softmax")]
    assert [step.op_type for step in program.steps].count("softmax") == 1
    # Blocks of 3 query rows: 14 blocks, the last one short.
    monkeypatch.setattr("publisher.executor.fusion._SCORES_PER_BLOCK", 2 * 40 * 3)
    feeds = dict(zip(program.inputs, (ATTN_Q, ATTN_K, ATTN_V), strict=True))
    typed = run(program, feeds, mode="fp16")
    outputs = list(typed.values())
    np.testing.assert_array_equal(outputs[0], _attention_ops(ATTN_Q, ATTN_K, ATTN_V, rounded=True))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    wide = list(run(program, feeds, mode="fp32").values())
    np.testing.assert_allclose(wide[0], _attention_ops(ATTN_Q, ATTN_K, ATTN_V, rounded=False), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wide[0], wide[1], rtol=1e-5, atol=1e-6)
