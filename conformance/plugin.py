"""pytest plugin: coremltools' own MIL op tests, with Core ML's prediction replaced by the executor.

coremltools 9.0 ships its op tests in the wheel (coremltools/converters/mil/mil/ops/tests). Each
builds a MIL program, converts it to an .mlpackage and, on macOS only, compares
`MLModel.predict` with the test's expected values under the test's own tolerances. This plugin
makes that comparison run on Linux: `testing_utils` is told it runs on macOS 15, and
`MLModel.predict` / `MLModel.make_state` execute the converted package with
`publisher.executor` (typed mode: every op rounded to its declared dtype, as Core ML's CPU does).
Nothing in the wheel is edited, and tolerances are untouched.

Only ML Program backends are generated (the executor runs ML Programs, not neural networks), in
both precisions: the fp16 tests alone compare with atol 0.5 and would be weak evidence.

Each test is classified for the table (see `Outcome`): a failure is the executor's when an
executor call raised (unsupported op, crash) or when a prediction returned and the test's
comparison then failed (wrong numbers).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coremltools
import pytest

from publisher.executor import ExecutorError, UnsupportedOpError, load_program, make_state, run

OP_TESTS = Path(coremltools.__file__).parent / "converters" / "mil" / "mil" / "ops" / "tests"

# The fast subset (`--conformance-fast`, run by the default suite): op tests of every op that the
# shipped recipes' packages use (RECIPE_OPS, all iOS16 opset; tests/test_executor_conformance.py
# checks that the subset's passing tests execute each of them). Each entry is a test-id prefix and
# an optional parameter id it must contain; the first fp32 and the first fp16 match run.
RECIPE_OPS = frozenset(
    {
        "add", "cast", "concat", "conv", "cos", "einsum", "equal", "expand_dims", "gather", "gather_nd",
        "gelu", "layer_norm", "linear", "matmul", "mul", "pad", "real_div", "reduce_argmax", "reduce_mean",
        "reshape", "sigmoid", "silu", "sin", "slice_by_index", "softmax", "split", "sqrt", "square",
        "squeeze", "stack", "sub", "transpose", "upsample_nearest_neighbor",
    }
)  # fmt: skip
_BINARY = "iOS14/test_elementwise_binary.py::TestElementwiseBinary::test_builder_to_backend_smoke"
_UNARY = "iOS14/test_elementwise_unary.py::TestElementwiseUnary::test_builder_to_backend_smoke"
_REDUCE = "iOS14/test_reduction.py::TestReduction::test_builder_to_backend_smoke"
FAST_TESTS: tuple[tuple[str, str], ...] = (
    *((_BINARY, f"mode={m}]") for m in ("add", "mul", "sub", "real_div")),
    *((_UNARY, f"mode={m}]") for m in ("cast", "cos", "sin", "sqrt", "square")),
    *((_REDUCE, f"mode={m}]") for m in ("argmax", "mean")),
    ("iOS14/test_elementwise_binary.py::TestEqual::test_builder_to_backend_smoke", ""),
    ("iOS14/test_activation.py::TestGeLU::test_builder_to_backend_smoke", ""),
    ("iOS14/test_activation.py::TestSiLU::test_builder_to_backend_smoke", ""),
    ("iOS14/test_activation.py::TestSigmoid::test_builder_to_backend_smoke", ""),
    ("iOS14/test_activation.py::TestSoftmax::test_buidler_to_backend_smoke", ""),
    ("iOS14/test_conv.py::TestConv::test_builder_to_backend_stress", ""),
    ("iOS14/test_image_resizing.py::TestUpsampleNearestNeighbor::test_builder_to_backend_smoke", ""),
    ("iOS14/test_linear.py::TestLinear::test_builder_to_backend_smoke", ""),
    ("iOS14/test_linear.py::TestMatMul::test_builder_to_backend_smoke", ""),
    ("iOS14/test_linear.py::TestEinsum::test_builder_to_backend_smoke", ""),
    ("iOS14/test_normalization.py::TestNormalizationLayerNorm::test_builder_to_backend_smoke", ""),
    ("iOS14/test_scatter_gather.py::TestGather::test_builder_to_backend_smoke", ""),
    ("iOS14/test_scatter_gather.py::TestGatherNd::test_builder_to_backend_smoke", ""),
    ("iOS14/test_tensor_operation.py::TestConcat::test_builder_to_backend_numerical", ""),
    ("iOS14/test_tensor_operation.py::TestPad::test_builder_to_backend_smoke", ""),
    ("iOS14/test_tensor_transformation.py::TestSplit::test_builder_to_backend_smoke", ""),
    ("iOS14/test_tensor_transformation.py::TestStack::test_builder_to_backend_smoke", ""),
    ("iOS14/test_tensor_transformation.py::TestReshape::test_builder_to_backend_smoke", ""),
    ("iOS14/test_tensor_transformation.py::TestExpandDims::test_builder_to_backend_smoke", ""),
    ("iOS14/test_tensor_transformation.py::TestSqueeze::test_builder_to_backend_smoke", ""),
    ("iOS14/test_tensor_transformation.py::TestTranspose::test_builder_to_backend_smoke", ""),
    ("iOS14/test_tensor_transformation.py::TestSliceByIndex::test_builder_to_backend_smoke", ""),
    ("iOS16/test_constexpr_ops.py::TestConstexprLutToDense::test_builder_to_backend_smoke", ""),
)
FAST_FILES = tuple(sorted({prefix.split("::")[0] for prefix, _ in FAST_TESTS}))
"""The op test files holding FAST_TESTS, relative to OP_TESTS (pass these to pytest, so that
collection stays short)."""


@dataclass
class Outcome:
    """What one test did through the executor."""

    predictions: int = 0
    unsupported: str = ""
    crash: str = ""
    """An error the executor raised (a failure unless the test expected the prediction to fail)."""
    op_types: set[str] = field(default_factory=set)


_current: Outcome | None = None


def _family(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    parts = Path(path).parts
    return "/".join(parts[parts.index("tests") + 1 :]).removesuffix(".py") if "tests" in parts else path


def _mode() -> str:
    return os.environ.get("CONFORMANCE_MODE", "fp16")


def _program(model: Any) -> Any:
    program = getattr(model, "_conformance_program", None)
    if program is None:
        spec = model.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            # A test without a backend parameter that builds a neural network (the executor's domain
            # is ML Programs, as the collection's backend filter says): skipped, not the executor's.
            pytest.skip(f"a {spec.WhichOneof('Type')} model: the executor runs ML Programs")
        program = load_program(model.package_path)
        model._conformance_program = program
    return program


def _predict(self: Any, data: Any, state: Any = None) -> dict[str, Any]:
    outcome = _current if _current is not None else Outcome()
    try:
        program = _program(self)
        outcome.op_types |= program.op_types
        if isinstance(data, list):
            return [run(program, d, mode=_mode()) for d in data]  # type: ignore[return-value]
        result = run(program, dict(data), mode=_mode(), state=state)
    except UnsupportedOpError as exc:
        outcome.unsupported = outcome.unsupported or exc.op_type
        raise
    except ExecutorError as exc:
        outcome.crash = outcome.crash or f"{type(exc).__name__}: {exc}"[:200]
        # What Core ML's predict raises for a program it cannot compute (op tests expecting a
        # runtime failure, such as validated out-of-range indices, match this message).
        raise RuntimeError(f"Unable to compute the prediction using ML Program: {exc}") from exc
    except Exception as exc:
        outcome.crash = outcome.crash or f"{type(exc).__name__}: {exc}"[:200]
        raise
    outcome.predictions += 1
    return result


def _make_state(self: Any) -> Any:
    return make_state(_program(self))


class ConformancePlugin:
    """Patches the prediction seam for the session and tallies outcomes per op family."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.outcomes: dict[str, tuple[str, Outcome]] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    # ------------------------------------------------------------------ patching

    def _patch(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def install(self) -> None:
        from coremltools.converters.mil import testing_utils
        from coremltools.models import model as ct_model
        from coremltools.models import utils as ct_utils

        self._patch(testing_utils, "_IS_MACOS", True)
        # compare_backend predicts a package only on macOS 12+; tests skip ops newer than the OS.
        self._patch(ct_utils, "_macos_version", lambda: (15, 0))
        self._patch(ct_model.MLModel, "predict", _predict)
        self._patch(ct_model.MLModel, "make_state", _make_state)

    def uninstall(self) -> None:
        while self._saved:
            owner, name, value = self._saved.pop()
            setattr(owner, name, value)

    # ------------------------------------------------------------------ hooks

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        keep, drop = [], []
        for item in items:
            backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
            name = backend[0] if isinstance(backend, tuple) else getattr(backend, "backend", "mlprogram")
            (drop if name == "neuralnetwork" else keep).append(item)
        if config.getoption("conformance_fast"):
            keep, fast_drop = _fast_subset(keep)
            drop += fast_drop
        every = config.getoption("conformance_every")
        if every > 1:
            # A deterministic sample of a huge parametrization (recurrent, NMS stress): the same
            # tests before and after a change.
            drop += [item for i, item in enumerate(keep) if i % every]
            keep = keep[::every]
        index, count = config.getoption("conformance_shard")
        if count > 1:
            # The full harness takes hours on one core: one process per core, each every count-th
            # test (interleaved, so each shard gets a share of every family's slow tests).
            drop += [item for i, item in enumerate(keep) if i % count != index]
            keep = keep[index::count]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Any) -> Any:
        global _current
        _current = Outcome()
        try:
            yield
        finally:
            _current = None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Any:
        report = (yield).get_result()
        outcome = _current or Outcome()
        if report.when == "setup" and report.skipped:
            self._record(item.nodeid, "skipped", outcome)
        elif report.when == "call":
            if report.skipped:
                status = "skipped"
            elif report.passed:
                # A test may expect the prediction to fail (validated out-of-range indices).
                status = "passed" if outcome.predictions or outcome.crash else "no_prediction"
            elif outcome.unsupported:
                status = "unsupported"
            elif outcome.crash:
                status = "crash"
            else:
                status = "wrong" if outcome.predictions else "other"
            self._record(item.nodeid, status, outcome)

    def _record(self, nodeid: str, status: str, outcome: Outcome) -> None:
        self.outcomes[nodeid] = (status, outcome)
        log = self.config.getoption("conformance_log")
        if log:
            # One line per test as it finishes: a run stopped by a timeout still leaves its table.
            entry = {"nodeid": nodeid, "status": status, "detail": outcome.unsupported or outcome.crash}
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def table(self) -> str:
        return render_table(self.outcomes)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        table = self.table()
        terminalreporter.write_sep("=", "executor conformance")
        terminalreporter.write_line(table)
        path = self.config.getoption("conformance_table")
        if path:
            Path(path).write_text(table + "\n")


COLUMNS = ("run", "executed", "passed", "unsupported", "wrong", "crash", "other", "skipped")


def tally(outcomes: dict[str, tuple[str, Outcome]]) -> dict[str, Counter]:
    """Counts per op family. run: tests that were not skipped; executed: those that reached the
    executor (a prediction, or an unsupported op or crash in it); other: failures before any
    prediction (conversion or type inference, not the executor's)."""
    rows: dict[str, Counter] = {}
    for nodeid, (status, _) in outcomes.items():
        row = rows.setdefault(_family(nodeid), Counter())
        if status == "skipped":
            row["skipped"] += 1
            continue
        row["run"] += 1
        if status in ("passed", "wrong", "unsupported", "crash"):
            row["executed"] += 1
        if status in ("passed", "wrong", "unsupported", "crash", "other"):
            row[status] += 1
    return rows


def render_table(outcomes: dict[str, tuple[str, Outcome]]) -> str:
    rows = tally(outcomes)
    total: Counter = Counter()
    lines = ["| family | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for family in sorted(rows):
        total.update(rows[family])
        lines.append(f"| {family} | " + " | ".join(str(rows[family][c]) for c in COLUMNS) + " |")
    lines.append("| **total** | " + " | ".join(f"**{total[c]}**" for c in COLUMNS) + " |")
    return "\n".join(lines)


def _fast_subset(items: list[pytest.Item]) -> tuple[list[pytest.Item], list[pytest.Item]]:
    chosen: dict[tuple[str, str, str], pytest.Item] = {}
    for item in items:
        path, _, rest = item.nodeid.partition("::")
        test_id = f"{_family(path)}.py::{rest}"
        precision = "fp32" if "precision='fp32'" in test_id else "fp16"
        for prefix, marker in FAST_TESTS:
            if test_id.startswith(prefix) and marker in test_id:
                chosen.setdefault((prefix, marker, precision), item)
    keep = set(map(id, chosen.values()))
    return [i for i in items if id(i) in keep], [i for i in items if id(i) not in keep]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "executor conformance (coremltools op tests)")
    group.addoption("--conformance-fast", action="store_true", help="run only the fast subset (FAST_TESTS)")
    group.addoption(
        "--conformance-every", type=int, default=1, help="run every Nth selected test only (a fixed sample)"
    )
    group.addoption(
        "--conformance-shard",
        type=_shard,
        default=(0, 1),
        metavar="K/N",
        help="run shard K of N (0-based; merge the shards' logs with python -m conformance.table)",
    )
    group.addoption("--conformance-table", default="", help="write the per-family markdown table to this file")
    group.addoption("--conformance-log", default="", help="append one JSON line per finished test to this file")


def _shard(value: str) -> tuple[int, int]:
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise pytest.UsageError(f"--conformance-shard {value!r}: expected K/N with 0 <= K < N, e.g. 0/2")
    return int(index), int(count)


def set_op_test_environment() -> None:
    """What coremltools' testing_reqs reads once, when first imported: ML Programs only, and the fp32
    precision too. Call it before anything imports the op tests (a module imported earlier in the
    same process would keep coremltools' defaults for every later session)."""
    os.environ.setdefault("PYMIL_TEST_TARGETS", "mlprogram")
    os.environ.setdefault("INCLUDE_MIL_FP32_UNIT_TESTS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_configure(config: pytest.Config) -> None:
    set_op_test_environment()
    plugin = ConformancePlugin(config)
    plugin.install()
    config.pluginmanager.register(plugin, "conformance-executor")


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.pluginmanager.get_plugin("conformance-executor")
    if plugin is not None:
        plugin.uninstall()
    # Many op tests parametrize over one-shot iterators (itertools.product): a second session in the
    # same process (tests/test_executor_conformance.py) must import them afresh.
    package = "coremltools.converters.mil.mil.ops.tests."
    for name in [n for n in sys.modules if n.startswith(package) and n.rsplit(".", 1)[-1].startswith("test_")]:
        del sys.modules[name]
