"""Resuming a run from a snapshot of its values: the rest of the program, with the constants it holds now."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402

from publisher.executor import ExecutorError, load_program, resume, run, run_with_snapshots  # noqa: E402

WIDTH = 8


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """x -> linear(A) -> relu -> linear(B) -> + x: a skip value live across the second layer."""
    generator = np.random.default_rng(0)
    first, second = (generator.standard_normal((WIDTH, WIDTH)).astype(np.float32) for _ in range(2))

    @mb.program(input_specs=[mb.TensorSpec((2, WIDTH))], opset_version=ct.target.iOS16)
    def prog(x):
        hidden = mb.relu(x=mb.linear(x=x, weight=first, name="first"), name="act")
        return mb.add(x=mb.linear(x=hidden, weight=second, name="second"), y=x, name="out")

    package = tmp_path_factory.mktemp("resume") / "chain.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
               pass_pipeline=ct.PassPipeline.EMPTY).save(str(package))
    return load_program(package)


def _step_index(program, name: str) -> int:
    return next(i for i, step in enumerate(program.steps) if step.name == name)


def _swap_weight(program, name: str, value: np.ndarray) -> torch.Tensor:
    step = program.steps[_step_index(program, name)]
    original = step.inputs["weight"]
    step.inputs["weight"] = torch.from_numpy(value).to(original.dtype)
    return original


def test_a_resumed_run_gives_what_a_whole_run_gives_after_a_weight_swap(chain):
    inputs = {"x": np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)}
    second = _step_index(chain, "second")
    outputs, snapshots = run_with_snapshots(chain, inputs, at=[second, 0])
    np.testing.assert_array_equal(outputs["out"], run(chain, inputs)["out"])
    assert set(snapshots) == {0, second}

    original = _swap_weight(chain, "second", np.eye(WIDTH, dtype=np.float32))
    try:
        whole = run(chain, inputs)["out"]
        np.testing.assert_array_equal(resume(snapshots[second])["out"], whole)
        np.testing.assert_array_equal(resume(snapshots[0])["out"], whole)
        assert not np.allclose(whole, outputs["out"])
        # A snapshot stays as taken: resuming twice gives the same.
        np.testing.assert_array_equal(resume(snapshots[second])["out"], whole)
    finally:
        _swap_weight(chain, "second", original.numpy())


def test_a_snapshot_after_the_swapped_weights_reader_keeps_its_old_result(chain):
    # What makes a resume cheap is also what a caller must respect: steps before the snapshot are not rerun.
    inputs = {"x": np.ones((2, WIDTH), np.float32)}
    after_first = _step_index(chain, "first") + 1
    outputs, snapshots = run_with_snapshots(chain, inputs, at=[after_first])
    original = _swap_weight(chain, "first", np.zeros((WIDTH, WIDTH), np.float32))
    try:
        np.testing.assert_array_equal(resume(snapshots[after_first])["out"], outputs["out"])
        assert not np.allclose(run(chain, inputs)["out"], outputs["out"])
    finally:
        _swap_weight(chain, "first", original.numpy())


def test_snapshot_steps_must_be_in_the_program(chain):
    with pytest.raises(ValueError, match="step indices must lie in"):
        run_with_snapshots(chain, {"x": np.ones((2, WIDTH), np.float32)}, at=[len(chain.steps)])
    with pytest.raises(ExecutorError, match="inputs do not match"):
        run_with_snapshots(chain, {"y": np.ones((2, WIDTH), np.float32)}, at=[0])
