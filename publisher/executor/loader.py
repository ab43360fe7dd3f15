"""Load an .mlpackage's ML Program on any OS and compile it into a list of torch steps.

The spec comes from `MLModel(..., skip_model_load=True).get_spec()` and the pymil Program from
coremltools' milproto loader reading the package's own `weights/` blobs, so the executor runs the
exact bytes that ship. Constants and decompressed constexpr weights are materialized once, here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coremltools as ct
import numpy as np
import torch
from coremltools import proto
from coremltools.converters.mil.frontend.milproto import load as milproto
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

from publisher.executor.constexpr import DECOMPRESSORS, as_tensor
from publisher.executor.errors import ExecutorError, UnsupportedOpError
from publisher.executor.fusion import fuse, update_states_in_place
from publisher.executor.ops import OPS
from publisher.executor.steps import CompiledBlock, Step, ValueInfo, plan_release

_OPSET_NAMES = {"CoreML5": "iOS15", "CoreML6": "iOS16", "CoreML7": "iOS17", "CoreML8": "iOS18"}
_OPSET_TARGETS = {key: getattr(ct.target, name) for key, name in _OPSET_NAMES.items()}

# MIL dtype -> dtype the executor holds values in. torch lacks arithmetic on uint16/uint32, so
# those are held widened (their values fit) and narrowed again for the caller.
_HOLD_DTYPES = {
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bool": torch.bool,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "uint16": torch.int32,
    "int32": torch.int32,
    "uint32": torch.int64,
    "int64": torch.int64,
}


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the Program declares it."""

    name: str
    shape: tuple[int | str, ...]
    """Static dimensions as ints; symbolic ones as their symbol's name."""
    dtype: str
    """MIL dtype name: fp16, fp32, int32, bool, ..."""

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype of this tensor's values."""
        return np.dtype("bool" if self.dtype == "bool" else _NUMPY_NAMES.get(self.dtype, self.dtype))

    @property
    def hold_dtype(self) -> torch.dtype:
        """The dtype the executor holds this tensor's values in."""
        return _HOLD_DTYPES[self.dtype]

    @property
    def is_static(self) -> bool:
        """True when every dimension is known."""
        return all(isinstance(d, int) for d in self.shape)


_NUMPY_NAMES = {"fp16": "float16", "fp32": "float32", "fp64": "float64"}


@dataclass
class LoadedProgram:
    """An ML Program's main function, compiled for the torch executor."""

    path: Path
    function: Any = field(repr=False)
    """The pymil Function (kept for introspection: ops, declared types)."""
    opset: str
    inputs: dict[str, TensorSpec]
    outputs: list[TensorSpec]
    steps: list[Step] = field(repr=False)
    constants: dict[str, torch.Tensor] = field(repr=False)
    states: dict[str, TensorSpec] = field(default_factory=dict)
    """State inputs (iOS18 StateType), held across calls by an ExecutorState rather than passed in."""
    load_seconds: float = 0.0
    """Reading the spec and weights and rebuilding the pymil Program."""
    decompress_seconds: float = 0.0
    """Materializing constants and decompressing constexpr weights."""

    @property
    def op_types(self) -> set[str]:
        """The compute op types this program runs (constants excluded), nested blocks' included."""
        return {t for step in self.steps for t in step.op_types()}


def _type_name(var: Any) -> str:
    return types.builtin_to_string(var.dtype)


def _static_shape(var: Any) -> tuple[int, ...] | None:
    shape = tuple(var.shape)
    if all(isinstance(d, (int, np.integer)) for d in shape):
        return tuple(int(d) for d in shape)
    return None


def _spec(name: str, var: Any) -> TensorSpec:
    shape = tuple(int(d) if isinstance(d, (int, np.integer)) else str(d) for d in var.shape)
    return TensorSpec(name=name, shape=shape, dtype=_type_name(var))


def _value_info(var: Any, component: str, opset: str, op_type: str, declared: str | None = None) -> ValueInfo:
    """`declared`: the package's dtype for the value where the reader was given another (see
    _accept_what_core_ml_accepts); results are rounded to what the package declares."""
    is_list = types.is_list(var.sym_type)
    element = var.elem_type if is_list else var.sym_type
    if element is None or (not types.is_tensor(element) and not types.is_scalar(element)):
        raise UnsupportedOpError(op_type, opset, component, f"output '{var.name}' is not a tensor")
    dtype_name = declared or types.builtin_to_string(element.get_primitive() if types.is_tensor(element) else element)
    dtype = _HOLD_DTYPES.get(dtype_name)
    if dtype is None:
        raise UnsupportedOpError(op_type, opset, component, f"output dtype {dtype_name}")
    return ValueInfo(var.name, dtype, None if is_list else _static_shape(var), is_list)


def _read_program(path: Path) -> tuple[Any, Any, dict[str, str]]:
    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExecutorError(f"{path}: not an ML Program (model type {spec.WhichOneof('Type')})")
    narrowed = _accept_what_core_ml_accepts(spec)
    program = milproto.load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir or "")
    return spec, program, narrowed


def _accept_what_core_ml_accepts(spec: Any) -> dict[str, str]:
    """Rewrite, in the spec read from the package, what Core ML runs but coremltools' reader rejects.

    A variadic-rank value (fill with a shape of unknown length) becomes rank 1 of unknown size: the
    reader cannot represent variadic ranks, and the executor never relies on declared shapes that
    are not static. Mixed dtypes within one type domain (batch_norm with fp16 mean/variance and the
    converter's fp32 default epsilon) get their constant operands widened (exact), see
    _unify_type_domains. Returns the values redeclared fp32, by name, with their declared dtype.
    """
    narrowed: dict[str, str] = {}
    for function in spec.mlProgram.functions.values():
        dtypes = {value.name: value.type.tensorType.dataType for value in function.inputs}
        for block in function.block_specializations.values():
            for value_type in _value_types(block):
                tensor = value_type.tensorType
                if any(d.WhichOneof("dimension") == "unknown" and d.unknown.variadic for d in tensor.dimensions):
                    del tensor.dimensions[:]
                    tensor.rank = 1
                    tensor.dimensions.add().unknown.variadic = False
            narrowed.update(_unify_type_domains(block, _OPSET_TARGETS.get(function.opset), dtypes))
    return narrowed


_FP16, _FP32 = (proto.MIL_pb2.DataType.Value(name) for name in ("FLOAT16", "FLOAT32"))


def _unify_type_domains(block: Any, target: Any, dtypes: dict[str, int]) -> dict[str, str]:
    """Widen fp16 constants that share a type domain with fp32 operands, in place; see the caller.

    The op's outputs declared fp16 in that domain are redeclared fp32 (what the reader infers), and
    returned by name with their declared dtype: the executor still rounds them to it.
    """
    consts = {op.outputs[0].name: op for op in block.operations if op.type == "const"}
    narrowed: dict[str, str] = {}
    for op in block.operations:
        dtypes.update({output.name: output.type.tensorType.dataType for output in op.outputs})
        op_cls = SSAOpRegistry.core_ops.get(op.type, {}).get(target)
        if op_cls is None:
            continue
        domains: dict[str, list[str]] = {}
        for name, argument in op.inputs.items():
            input_type = op_cls.input_spec.input_types.get(name)
            if len(argument.arguments) == 1 and getattr(input_type, "type_domain_id", None) is not None:
                domains.setdefault(input_type.type_domain_id, []).append(argument.arguments[0].name)
        for values in domains.values():
            halves = [v for v in values if dtypes.get(v) == _FP16]
            if not halves or _FP32 not in {dtypes.get(v) for v in values} or any(v not in consts for v in halves):
                continue
            if not all([_widen_const(consts[v]) for v in halves]):
                continue
            dtypes.update(dict.fromkeys(halves, _FP32))
            # The reader types the outputs after the runtime operand; a domain of constants alone
            # (iOS17 batch_norm's parameters) does not type them.
            if all(v in consts for v in values):
                continue
            for output in op.outputs:
                if output.type.tensorType.dataType == _FP16:
                    output.type.tensorType.dataType = dtypes[output.name] = _FP32
                    narrowed[output.name] = "fp16"
    return narrowed


def _widen_const(op: Any) -> bool:
    """Rewrite an fp16 const holding an immediate value as fp32 (exact); False for file weights."""
    tensor_type = op.outputs[0].type.tensorType
    value = op.attributes["val"]
    if value.WhichOneof("value") != "immediateValue":
        return False
    tensor = value.immediateValue.tensor
    widened = np.frombuffer(tensor.bytes.values, dtype=np.float16).astype(np.float32)
    tensor.ClearField("bytes")
    tensor.floats.values.extend(widened.tolist())
    tensor_type.dataType = value.type.tensorType.dataType = _FP32
    return True


def _value_types(block: Any) -> Any:
    for op in block.operations:
        for output in op.outputs:
            yield output.type
        for nested in op.blocks:
            yield from _value_types(nested)


def load_program(package: Path | str) -> LoadedProgram:
    """Load `package` (.mlpackage) into a LoadedProgram: weights read and decompressed, ops resolved.

    Raises UnsupportedOpError naming the op, its opset and the package for any op the executor
    does not implement, and ExecutorError when the package cannot be read.
    """
    path = Path(package)
    component = str(path)
    if not path.exists():
        raise ExecutorError(f"{path}: no such model package")
    start = time.perf_counter()
    try:
        spec, program, narrowed = _read_program(path)
    except ExecutorError:
        raise
    except Exception as exc:
        raise ExecutorError(f"{path}: cannot read the ML Program: {exc}") from exc
    function_name = spec.description.defaultFunctionName or "main"
    function = program.functions[function_name]
    opset_key = spec.mlProgram.functions[function_name].opset
    opset = _OPSET_NAMES.get(opset_key, opset_key)
    loaded_at = time.perf_counter()

    inputs: dict[str, TensorSpec] = {}
    states: dict[str, TensorSpec] = {}
    for name, var in function.inputs.items():
        (states if types.is_state(var.sym_type) else inputs)[name] = _spec(name, var)
    output_names = [o.name for o in spec.description.output] or [v.name for v in function.outputs]
    outputs = [_spec(name, var) for name, var in zip(output_names, function.outputs, strict=True)]

    compiler = _Compiler(component, opset, narrowed)
    with torch.inference_mode():
        steps = compiler.ops(function.operations)
    keep = {v.name for v in function.outputs} | set(states)
    steps = update_states_in_place(fuse(steps, keep), keep)
    plan_release(steps, keep)
    done = time.perf_counter()
    return LoadedProgram(
        path=path,
        function=function,
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        steps=steps,
        states=states,
        constants=compiler.constants,
        load_seconds=loaded_at - start,
        decompress_seconds=done - loaded_at,
    )


class _Compiler:
    """Compiles a function's ops, and recursively their nested blocks, into steps.

    Constants and decompressed constexpr weights are collected program-wide (value names are
    unique in a program), wherever the block that defines them.
    """

    def __init__(self, component: str, opset: str, narrowed: dict[str, str]) -> None:
        self.component = component
        self.opset = opset
        self.narrowed = narrowed
        self.constants: dict[str, torch.Tensor] = {}
        self.raw: dict[str, Any] = {}
        """Value of each constant (a numpy array, or a str), by name."""

    def ops(self, operations: Any) -> list[Step]:
        steps = []
        for op in operations:
            if op.op_type == "const":
                var = op.outputs[0]
                self.raw[var.name] = var.val
                if not isinstance(var.val, str):
                    self.constants[var.name] = as_tensor(var.val)
            elif op.op_type.startswith("constexpr_"):
                self._decompress(op)
            else:
                steps.append(self._compile(op))
        return steps

    def _decompress(self, op: Any) -> None:
        decompress = DECOMPRESSORS.get(op.op_type)
        if decompress is None:
            raise UnsupportedOpError(op.op_type, self.opset, self.component)
        # Constant inputs go in as their numpy values, outputs of earlier constexpr ops as tensors.
        args = {
            name: self.raw[var.name] if var.name in self.raw else self.constants[var.name]
            for name, var in op.inputs.items()
        }
        result = decompress(args)
        results = result if isinstance(result, tuple) else (result,)
        for var, tensor in zip(op.outputs, results, strict=True):
            declared = _HOLD_DTYPES.get(_type_name(var))
            if declared is not None and declared.is_floating_point and tensor.dtype != declared:
                tensor = tensor.to(declared)
            self.constants[var.name] = tensor

    def _bind(self, var: Any) -> Any:
        # A constant tensor, None for a string constant, or the name of a value computed at run time.
        if var.name in self.raw:
            return self.constants.get(var.name)
        return self.constants.get(var.name, var.name)

    def _compile(self, op: Any) -> Step:
        impl = OPS.get(op.op_type)
        if impl is None:
            raise UnsupportedOpError(op.op_type, self.opset, self.component)
        inputs: dict[str, Any] = {}
        raw_inputs: dict[str, Any] = {}
        for name, value in op.inputs.items():
            if isinstance(value, (tuple, list)):
                inputs[name] = tuple(self._bind(v) for v in value)
                if all(v.name in self.raw for v in value):
                    raw_inputs[name] = tuple(self.raw[v.name] for v in value)
            else:
                if value.name in self.raw:
                    raw_inputs[name] = self.raw[value.name]
                inputs[name] = self._bind(value)
        outputs = tuple(
            _value_info(v, self.component, self.opset, op.op_type, self.narrowed.get(v.name)) for v in op.outputs
        )
        state_target = op.inputs["state"].name if op.op_type == "coreml_update_state" else None
        return Step(
            op_type=op.op_type,
            name=op.name,
            fn=impl.fn,
            native_half=impl.native_half,
            inputs=inputs,
            raw=raw_inputs,
            outputs=outputs,
            out_dtypes=tuple(o.dtype for o in outputs),
            state_target=state_target,
            blocks=tuple(self._block(block) for block in op.blocks),
        )

    def _block(self, block: Any) -> CompiledBlock:
        inputs = tuple(v.name for v in block.inputs)
        steps = self.ops(block.operations)
        outputs = tuple(self._bind(v) for v in block.outputs)
        output_names = [ref for ref in outputs if isinstance(ref, str)]
        local = set(inputs) | {info.name for step in steps for info in step.outputs}
        free = frozenset(set().union(*(step.reads() for step in steps), output_names) - local)
        steps = fuse(steps, free | set(output_names))
        plan_release(steps, free | set(output_names))
        return CompiledBlock(
            inputs=inputs,
            steps=steps,
            outputs=outputs,
            free=free,
            scoped=tuple(name for name in dict.fromkeys([*inputs, *output_names]) if name in local),
        )
