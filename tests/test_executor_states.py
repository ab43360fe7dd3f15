"""Stateful programs (iOS18 StateType): read_state / coreml_update_state, state kept across calls.

The program is a tiny KV cache: each call writes its token's vector at position `pos` of an fp16
state with slice_update on the state's read, stores it back, and returns the running sum over
positions. Calls at positions 0, 1 (prefill) then 2, 3 (decode) must leave the state as Core ML's
`make_state()` + `predict(..., state=...)` would.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from publisher.executor import ExecutorError, load_program, make_state, run, run_with_snapshots  # noqa: E402

POSITIONS, WIDTH = 4, 3


@pytest.fixture(scope="module")
def kv_program(tmp_path_factory):
    @mb.program(
        input_specs=[
            mb.StateTensorSpec((1, POSITIONS, WIDTH), dtype=types.fp16),
            mb.TensorSpec((1, 1, WIDTH), dtype=types.fp16),
            mb.TensorSpec((1,), dtype=types.int32),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(cache, token, pos):
        zero = np.array([0], np.int32)
        begin = mb.concat(values=[zero, pos, zero], axis=0)
        end = mb.add(x=begin, y=np.array([1, 1, WIDTH], np.int32))
        written = mb.slice_update(x=mb.read_state(input=cache), update=token, begin=begin, end=end)
        mb.coreml_update_state(state=cache, value=written)
        return mb.reduce_sum(x=written, axes=[1])

    package = tmp_path_factory.mktemp("states") / "kv.mlpackage"
    ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        pass_pipeline=ct.PassPipeline.EMPTY,
    ).save(str(package))
    return load_program(package)


def _step(program, state, position, token, mode="fp16"):
    feeds = {"token": token.reshape(1, 1, WIDTH), "pos": np.array([position], np.int32)}
    return next(iter(run(program, feeds, mode=mode, state=state).values()))


@pytest.mark.parametrize("mode", ["fp16", "fp32"])
def test_prefill_then_decode_writes_each_position_into_the_state(kv_program, mode):
    assert set(kv_program.states) == {"cache"} and set(kv_program.inputs) == {"token", "pos"}
    assert {"read_state", "coreml_update_state", "slice_update"} <= kv_program.op_types
    tokens = np.random.default_rng(0).standard_normal((POSITIONS, WIDTH)).astype(np.float32)
    state = make_state(kv_program)
    np.testing.assert_array_equal(state.read_state("cache"), np.zeros((1, POSITIONS, WIDTH)))
    expected = np.zeros((1, POSITIONS, WIDTH), np.float32)
    for position in range(POSITIONS):
        summed = _step(kv_program, state, position, tokens[position], mode)
        # The state holds fp16 whatever the mode: what a later call reads was rounded on the way in.
        expected[0, position] = tokens[position].astype(np.float16)
        np.testing.assert_array_equal(state.read_state("cache"), expected)
        np.testing.assert_allclose(summed, expected.sum(axis=1), rtol=2e-3, atol=2e-3)


def test_states_are_independent_and_writable(kv_program):
    first, second = make_state(kv_program), make_state(kv_program)
    _step(kv_program, first, 1, np.ones(WIDTH, np.float32))
    np.testing.assert_array_equal(second.read_state("cache"), np.zeros((1, POSITIONS, WIDTH)))
    preset = np.full((1, POSITIONS, WIDTH), 2.0, np.float32)
    second.write_state("cache", preset)
    summed = _step(kv_program, second, 0, np.zeros(WIDTH, np.float32))
    np.testing.assert_array_equal(summed, np.full((1, WIDTH), 2.0 * (POSITIONS - 1)))


def test_a_stateful_program_needs_its_own_state(kv_program, tmp_path):
    with pytest.raises(ExecutorError, match="stateful"):
        run(kv_program, {"token": np.zeros((1, 1, WIDTH), np.float32), "pos": np.array([0], np.int32)})
    with pytest.raises(ExecutorError, match="no state named"):
        make_state(kv_program).read_state("other")

    @mb.program(input_specs=[mb.TensorSpec((2,))], opset_version=ct.target.iOS18)
    def plain(x):
        return mb.relu(x=x)

    package = tmp_path / "plain.mlpackage"
    ct.convert(plain, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18).save(str(package))
    with pytest.raises(ExecutorError, match="no state inputs"):
        make_state(load_program(package))


def test_a_stateful_run_cannot_be_resumed(kv_program):
    feeds = {"token": np.ones((1, 1, WIDTH), np.float16), "pos": np.array([0], np.int32)}
    with pytest.raises(ExecutorError, match="a stateful program's runs cannot be resumed"):
        run_with_snapshots(kv_program, feeds, at=[0])
