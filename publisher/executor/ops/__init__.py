"""The op table: one small torch function per MIL op type, registered by name.

Every function receives an `OpArgs` view of the op's inputs and returns a tensor (or a tuple of
tensors for multi-output ops). Tensors come in the dtype the executor holds them in; the executor
then casts each result to the dtype the Program declares for it (fp16 mode) or to fp32 (fp32 mode).

Ops registered with `native_half=True` are single torch calls whose CPU half-precision kernels
compute in fp32 and round once (elementwise math, softmax, sum/mean/max/min), or that only move
data: in fp16 mode they run on fp16 tensors directly, which gives the result of computing in fp32
and rounding once, without fp32 copies. All other ops receive their floating-point inputs widened
to fp32; matmul among them, as torch's half matmul on CPUs without fp16 arithmetic (AVX512-FP16,
AMX) takes 45 times as long as widening and multiplying in fp32 (measured on an AMD EPYC). The
UNet's attention avoids the copies another way: it runs fused (publisher.executor.fusion).

One module per op family, as coremltools organises its MIL op definitions
(coremltools/converters/mil/mil/ops/defs), whose semantics they follow. Importing this package
registers every family.
"""

from publisher.executor.ops import (  # noqa: F401  (each module registers its ops on import)
    activation,
    control_flow,
    conv,
    elementwise_binary,
    elementwise_unary,
    image_resizing,
    linear,
    normalization,
    pool,
    quantization,
    random,
    recurrent,
    reduction,
    scatter_gather,
    states,
    tensor_operation,
    tensor_transformation,
    transformers,
)
from publisher.executor.ops.registry import OPS, OpArgs, OpFn, OpImpl, Result, Scratch, register

__all__ = ["OPS", "OpArgs", "OpFn", "OpImpl", "Result", "Scratch", "register"]
