"""Package weights: the tensor constants of a converted package and the ops that read them.

Compression picks configs per weight from this list, and the mixed-bit analysis picks the weights it
allocates bits to: both read it here (it sat in compress.py, which mixed_bit.py imported back).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil.frontend.milproto import load as milproto

# Apple leaves embedding tables (`gather`) uncompressed: palettized embeddings cost text-encoder
# quality for little size.
SKIPPED_OP_TYPES = ("gather",)


@dataclass(frozen=True)
class Weight:
    """A constant of the program and the ops reading it."""

    name: str
    consumers: tuple[str, ...]
    consumer_types: tuple[str, ...]
    size: int
    floating: bool

    def compressible(self, weight_threshold: int) -> bool:
        """What coremltools compresses by default: float tensors above the threshold, not embeddings."""
        return (self.floating and self.size > weight_threshold and bool(self.consumers)
                and not set(self.consumer_types) & set(SKIPPED_OP_TYPES))

    def matches(self, pattern: str) -> bool:
        return any(fnmatchcase(name, pattern) for name in (self.name, *self.consumers))


def program_weights(package: Path) -> list[Weight]:
    """Every tensor constant of the package's main function, in program order."""
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = milproto.load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir or "")
    weights = []
    for op in program.functions["main"].operations:
        value = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(value, np.ndarray) and value.size > 1:
            readers = op.outputs[0].child_ops
            weights.append(Weight(op.name, tuple(r.name for r in readers), tuple(r.op_type for r in readers),
                                  int(value.size), bool(np.issubdtype(value.dtype, np.floating))))
    return weights
