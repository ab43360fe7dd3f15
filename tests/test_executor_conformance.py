"""coremltools' own MIL op tests, predictions routed to the executor (conformance/plugin.py).

The fast subset runs here (about a minute on two busy cores); the full harness is a separate
command (conformance/README.md). The sabotage test proves the tests' numeric comparison really
runs against the executor's outputs.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import pytest
import torch

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

pytest.importorskip("coremltools")

from conformance.plugin import FAST_FILES, OP_TESTS, RECIPE_OPS, Outcome  # noqa: E402
from publisher.executor.ops import OPS, OpImpl  # noqa: E402


class _Collector:
    """Keeps the conformance plugin's outcomes of a nested pytest run."""

    outcomes: dict[str, tuple[str, Outcome]]

    def pytest_sessionfinish(self, session: Any) -> None:
        self.outcomes = dict(session.config.pluginmanager.get_plugin("conformance-executor").outcomes)


def _run_op_tests(*args: str) -> tuple[int, dict[str, tuple[str, Outcome]]]:
    collector = _Collector()
    code = pytest.main(
        ["-p", "conformance.plugin", "--conformance-fast", "-q", "-p", "no:cacheprovider", *args],
        plugins=[collector],
    )
    return int(code), collector.outcomes


def test_the_fast_subset_passes_and_executes_every_op_the_recipes_use():
    code, outcomes = _run_op_tests(*(str(OP_TESTS / f) for f in FAST_FILES))
    statuses = {nodeid: status for nodeid, (status, _) in outcomes.items()}
    assert code == 0, {n: s for n, s in statuses.items() if s != "passed"}
    assert set(statuses.values()) == {"passed"}
    executed = set().union(*(o.op_types for status, o in outcomes.values() if status == "passed"))
    assert RECIPE_OPS <= executed, f"not executed by a passing op test: {sorted(RECIPE_OPS - executed)}"


def test_a_broken_executor_op_fails_the_op_tests_that_use_it(monkeypatch):
    def broken_add(a):
        return torch.add(a["x"], a["y"]) + 1

    monkeypatch.setitem(OPS, "add", OpImpl(broken_add, native_half=True))
    code, outcomes = _run_op_tests(
        str(OP_TESTS / "iOS14" / "test_elementwise_binary.py"), "-k", "test_builder_to_backend_smoke and (add or sub)"
    )
    statuses = {
        (re.search(r"mode=(\w+)\]", nodeid)[1], re.search(r"precision='(\w+)'", nodeid)[1]): status
        for nodeid, (status, _) in outcomes.items()
    }
    assert code == 1
    assert statuses == {
        ("add", "fp16"): "wrong",
        ("add", "fp32"): "wrong",
        ("sub", "fp16"): "passed",
        ("sub", "fp32"): "passed",
    }


class _Selection:
    """Keeps the node ids a nested pytest run selected."""

    nodeids: list[str]

    def pytest_collection_finish(self, session: Any) -> None:
        self.nodeids = [item.nodeid for item in session.items]


def _selected(*args: str) -> list[str]:
    selection = _Selection()
    path = str(OP_TESTS / "iOS14" / "test_elementwise_binary.py")
    code = pytest.main(["-p", "conformance.plugin", "--collect-only", "-q", "-p", "no:cacheprovider", path, *args],
                       plugins=[selection])  # fmt: skip
    assert code == 0
    return selection.nodeids


def test_shards_split_the_selection_between_them():
    whole = _selected()
    first, second = _selected("--conformance-shard", "0/2"), _selected("--conformance-shard", "1/2")
    assert len(whole) > 10
    assert first == whole[0::2] and second == whole[1::2]


@pytest.mark.parametrize("shard", ["2/2", "1", "a/2", "-1/2"])
def test_a_bad_shard_is_a_usage_error(shard):
    code = pytest.main(["-p", "conformance.plugin", "--collect-only", "-q", "--conformance-shard", shard,
                        str(OP_TESTS / "iOS14" / "test_elementwise_binary.py")])  # fmt: skip
    assert code == pytest.ExitCode.USAGE_ERROR
