"""Execute Core ML ML Programs (.mlpackage) on any OS with torch, op by op, from the exact package bytes.

    program = load_program(Path("unet.mlpackage"))
    outputs = run(program, {"sample": ..., "timestep": ..., "encoder_hidden_states": ...}, mode="fp16")

    state = make_state(program)            # stateful (iOS18 StateType) programs only
    run(program, prefill_inputs, state=state); run(program, decode_inputs, state=state)

    outputs, snapshots = run_with_snapshots(program, inputs, at=[120])   # then swap weights read from step 120 on
    resume(snapshots[120])                 # the rest of the program only

Core ML's own runtime exists only on macOS; this executor lets the parity gate check artifacts
anywhere. Ops the op table does not implement stop loading with UnsupportedOpError.
"""

from publisher.executor.errors import ExecutorError, UnsupportedOpError
from publisher.executor.loader import LoadedProgram, TensorSpec, load_program
from publisher.executor.ops import OPS
from publisher.executor.runtime import ExecutorState, Mode, Snapshot, make_state, resume, run, run_with_snapshots

SUPPORTED_OPS: frozenset[str] = frozenset(OPS)
"""MIL compute op types the executor implements (constexpr forms: see constexpr.DECOMPRESSORS)."""

__all__ = [
    "ExecutorError",
    "ExecutorState",
    "LoadedProgram",
    "Mode",
    "SUPPORTED_OPS",
    "Snapshot",
    "TensorSpec",
    "UnsupportedOpError",
    "load_program",
    "make_state",
    "resume",
    "run",
    "run_with_snapshots",
]
