"""Run a LoadedProgram's steps with torch, holding values in fp32 or in the declared dtypes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from publisher.executor.errors import ExecutorError
from publisher.executor.loader import LoadedProgram, TensorSpec, load_program
from publisher.executor.ops import OpArgs, Scratch
from publisher.executor.steps import CompiledBlock, Step, ValueInfo

Mode = Literal["fp32", "fp16"]


def _bind_input(spec: TensorSpec, value: Any, mode: Mode) -> torch.Tensor:
    array = np.asarray(value)
    if spec.is_static and tuple(array.shape) != spec.shape:
        raise ExecutorError(f"input '{spec.name}': shape {tuple(array.shape)}, the model declares {spec.shape}")
    # The model receives its inputs in the declared dtype (fp16 for iOS16+ FLOAT16 models), whatever
    # the mode: rounding them is part of what the artifact does.
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=spec.numpy_dtype))
    if spec.dtype in ("uint16", "uint32"):
        tensor = tensor.long()
    if mode == "fp32" and tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


def _widen(tensor: torch.Tensor, mode: Mode) -> torch.Tensor:
    return tensor.float() if mode == "fp32" and tensor.is_floating_point() else tensor


def _conform(tensor: torch.Tensor, info: ValueInfo, mode: Mode, step: Step) -> torch.Tensor:
    if info.is_list:
        return tensor
    target = torch.float32 if mode == "fp32" and info.is_float else info.dtype
    if tensor.dtype != target:
        tensor = tensor.to(target)
    if info.shape is not None and tuple(tensor.shape) != info.shape:
        raise ExecutorError(
            f"op {step.op_type} '{step.name}' produced shape {tuple(tensor.shape)} for '{info.name}',"
            f" the program declares {info.shape}"
        )
    return tensor


def _resolve(ref: Any, env: dict[str, torch.Tensor]) -> Any:
    if isinstance(ref, str):
        return env[ref]
    if isinstance(ref, tuple):
        return tuple(env[r] if isinstance(r, str) else r for r in ref)
    return ref


class ExecutorState:
    """The values of a stateful program's state inputs, kept between calls (Core ML's MLState).

    Created by `make_state`, zero-filled as Core ML's are, and updated in place by each `run` that
    receives it. Values are held in the dtype the program declares (fp16 states stay fp16 in every
    mode: rounding into the state is part of what the artifact does).
    """

    def __init__(self, program: LoadedProgram) -> None:
        self.program_path = program.path
        self._specs = dict(program.states)
        self._values = {name: torch.zeros(spec.shape, dtype=spec.hold_dtype) for name, spec in self._specs.items()}

    def read_state(self, name: str) -> np.ndarray:
        """A copy of state `name`'s current value."""
        return _output_array(self._values[self._known(name)], self._specs[name])

    def write_state(self, name: str, value: np.ndarray) -> None:
        """Replace state `name`'s value (same shape as declared)."""
        spec = self._specs[self._known(name)]
        self._values[name] = _bind_input(spec, value, "fp16")

    def _known(self, name: str) -> str:
        if name not in self._specs:
            raise ExecutorError(f"{self.program_path}: no state named {name!r} (states: {sorted(self._specs)})")
        return name


class _Execution:
    """One call's values (`env`, by name) and mode, shared by the program's steps and nested blocks."""

    def __init__(self, loaded: LoadedProgram, mode: Mode, env: dict[str, Any]) -> None:
        self.loaded = loaded
        self.mode = mode
        self.widen_all = mode == "fp32"
        self.env = env
        self.scratch = Scratch()

    def steps(self, steps: list[Step]) -> None:
        env, loaded, mode = self.env, self.loaded, self.mode
        for step in steps:
            args = OpArgs(
                {name: _resolve(ref, env) for name, ref in step.inputs.items()},
                step.raw,
                self.widen_all or not step.native_half,
                step.out_dtypes,
                tuple(partial(self.block, block) for block in step.blocks),
                self.scratch,
            )
            try:
                result = step.fn(args)
            except ExecutorError:
                raise
            except Exception as exc:
                raise ExecutorError(f"{loaded.path}: op {step.op_type} '{step.name}' failed: {exc}") from exc
            results = result if isinstance(result, tuple) else (result,)
            if len(results) != len(step.outputs):
                raise ExecutorError(
                    f"op {step.op_type} '{step.name}' produced {len(results)} outputs,"
                    f" the program declares {len(step.outputs)}"
                )
            for info, tensor in zip(step.outputs, results, strict=True):
                env[info.name] = _conform(tensor, info, mode, step)
            if step.state_target is not None:
                stored = results[0].to(loaded.states[step.state_target].hold_dtype)
                env[step.state_target] = _widen(stored, mode)
            for name in step.release:
                del env[name]

    def block(self, block: CompiledBlock, values: Sequence[Any]) -> tuple[Any, ...]:
        """Run a nested block on `values` (its inputs, in order); its outputs."""
        env = self.env
        env.update(zip(block.inputs, values, strict=True))
        self.steps(block.steps)
        outputs = tuple(_resolve(ref, env) for ref in block.outputs)
        for name in block.scoped:
            env.pop(name, None)
        return outputs


def make_state(program: LoadedProgram) -> ExecutorState:
    """A fresh, zero-filled state for `program`, to pass to successive `run` calls."""
    if not program.states:
        raise ExecutorError(f"{program.path}: the model has no state inputs")
    return ExecutorState(program)


def _output_array(tensor: torch.Tensor, spec: TensorSpec) -> np.ndarray:
    # Always a copy: an output may be a view of a constant or of the caller's input array.
    if tensor.is_floating_point():
        return tensor.float().numpy().copy()
    return tensor.numpy().astype(spec.numpy_dtype)


def _bind(loaded: LoadedProgram, inputs: Mapping[str, np.ndarray], mode: Mode,
          state: ExecutorState | None) -> dict[str, Any]:
    if mode not in ("fp32", "fp16"):
        raise ValueError(f"mode must be 'fp32' or 'fp16', not {mode!r}")
    unknown = set(inputs) - set(loaded.inputs)
    missing = set(loaded.inputs) - set(inputs)
    if unknown or missing:
        raise ExecutorError(
            f"{loaded.path}: inputs do not match the model (missing {sorted(missing)}, unknown {sorted(unknown)})"
        )
    if loaded.states and state is None:
        raise ExecutorError(f"{loaded.path}: the model is stateful: pass state=make_state(program)")
    if state is not None and state._specs != loaded.states:
        raise ExecutorError(f"{loaded.path}: the state was made for another model ({state.program_path})")
    env = {name: _bind_input(spec, inputs[name], mode) for name, spec in loaded.inputs.items()}
    if state is not None:
        env.update({name: _widen(value, mode) for name, value in state._values.items()})
    return env


def _outputs(loaded: LoadedProgram, env: dict[str, Any]) -> dict[str, np.ndarray]:
    out_vars = [v.name for v in loaded.function.outputs]
    return {
        spec.name: _output_array(env[var] if var in env else loaded.constants[var], spec)
        for spec, var in zip(loaded.outputs, out_vars, strict=True)
    }


def run(
    program: LoadedProgram | Path | str,
    inputs: Mapping[str, np.ndarray],
    mode: Mode = "fp32",
    state: ExecutorState | None = None,
) -> dict[str, np.ndarray]:
    """Execute the program's main function on `inputs`; outputs keyed by the model's output names.

    mode "fp32" holds every value in fp32; mode "fp16" rounds each op's outputs to the dtype the
    Program declares (so fp16 programs compute in fp16 precision, op by op). Floating-point outputs
    are returned as float32 arrays, integer and bool outputs in their declared dtype.

    A stateful program (iOS18 state inputs) needs `state`, from `make_state(program)`: it is read at
    the start and holds the program's coreml_update_state writes after the call, as Core ML's
    `predict(..., state=...)` does.
    """
    loaded = program if isinstance(program, LoadedProgram) else load_program(program)
    with torch.inference_mode():
        env = _bind(loaded, inputs, mode, state)
        _Execution(loaded, mode, env).steps(loaded.steps)
        if state is not None:
            for name, spec in loaded.states.items():
                state._values[name] = env[name].to(spec.hold_dtype)
        return _outputs(loaded, env)


@dataclass(frozen=True)
class Snapshot:
    """The values a run held just before one of its steps (the program's ``steps[step]``)."""

    program: LoadedProgram
    step: int
    mode: Mode
    values: dict[str, Any]


def run_with_snapshots(
    program: LoadedProgram,
    inputs: Mapping[str, np.ndarray],
    at: Iterable[int],
    mode: Mode = "fp32",
) -> tuple[dict[str, np.ndarray], dict[int, Snapshot]]:
    """`run`, also keeping the values live before each step index in `at`, for `resume`.

    A caller that changes constants only read from some step on (a weight swapped into the steps'
    inputs) resumes from a snapshot taken before that step and gets what a whole run would give, for
    the cost of the steps after it. Values are never changed in place, so a snapshot shares its tensors
    with the run and with the other snapshots rather than copying them. Stateless programs only.
    """
    if program.states:
        raise ExecutorError(f"{program.path}: a stateful program's runs cannot be resumed (its state moves on)")
    boundaries = sorted(set(at))
    if boundaries and not 0 <= boundaries[0] <= boundaries[-1] < len(program.steps):
        raise ValueError(f"step indices must lie in [0, {len(program.steps)}): {boundaries}")
    snapshots = {}
    with torch.inference_mode():
        env = _bind(program, inputs, mode, None)
        execution = _Execution(program, mode, env)
        done = 0
        for boundary in boundaries:
            execution.steps(program.steps[done:boundary])
            snapshots[boundary] = Snapshot(program, boundary, mode, dict(env))
            done = boundary
        execution.steps(program.steps[done:])
        return _outputs(program, env), snapshots


def resume(snapshot: Snapshot) -> dict[str, np.ndarray]:
    """The program's outputs, running its steps from the snapshot's on (with the constants they hold now)."""
    with torch.inference_mode():
        env = dict(snapshot.values)
        _Execution(snapshot.program, snapshot.mode, env).steps(snapshot.program.steps[snapshot.step:])
        return _outputs(snapshot.program, env)
