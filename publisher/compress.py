"""Compress: apply a recipe's scheme to a converted package with `coremltools.optimize.coreml`.

The constexpr ops and the bit packing are coremltools' own, so Core ML decompresses the weights
just in time exactly as it does for Apple's published models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from publisher.recipe import Palettize, Prune, Quantize, Scheme

# Apple leaves embedding tables (`gather`) uncompressed: palettized embeddings cost text-encoder
# quality for little size.
SKIPPED_OP_TYPES = ("gather",)


@dataclass(frozen=True)
class CompressedComponent:
    package: Path
    seconds: float


def _op_type_configs() -> dict[str, None]:
    return dict.fromkeys(SKIPPED_OP_TYPES)


def palettizer_config(palettize: Palettize, weight_threshold: int):
    from coremltools.optimize.coreml import OpPalettizerConfig

    grouped = palettize.granularity == "per_grouped_channel"
    return OpPalettizerConfig(
        mode=palettize.mode,
        nbits=palettize.nbits,
        granularity=palettize.granularity,
        group_size=palettize.group_size if grouped else 32,
        weight_threshold=weight_threshold,
    )


def quantizer_config(quantize: Quantize, weight_threshold: int):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    return OpLinearQuantizerConfig(
        mode="linear_symmetric",
        dtype="int8" if quantize.nbits == 8 else "int4",
        granularity=quantize.granularity,
        block_size=quantize.block_size if quantize.granularity == "per_block" else 32,
        weight_threshold=weight_threshold,
    )


def pruner_config(prune: Prune, weight_threshold: int):
    from coremltools.optimize.coreml import OpMagnitudePrunerConfig

    if prune.n_m is not None:
        return OpMagnitudePrunerConfig(n_m_ratio=tuple(prune.n_m), weight_threshold=weight_threshold)
    return OpMagnitudePrunerConfig(target_sparsity=prune.sparsity, weight_threshold=weight_threshold)


def compress_package(package: Path, scheme: Scheme, out: Path) -> CompressedComponent:
    """Write ``package`` compressed with ``scheme`` to ``out``. A ``none`` scheme copies nothing:
    the caller keeps the original package."""
    import coremltools as ct
    from coremltools.optimize.coreml import (
        OptimizationConfig,
        linear_quantize_weights,
        palettize_weights,
        prune_weights,
    )

    started = time.perf_counter()
    model = ct.models.MLModel(str(package), skip_model_load=True)

    def config(op_config) -> OptimizationConfig:
        return OptimizationConfig(global_config=op_config, op_type_configs=_op_type_configs())

    threshold = scheme.weight_threshold
    if scheme.prune:
        model = prune_weights(model, config(pruner_config(scheme.prune, threshold)))
    if scheme.palettize:
        # Pruned weights keep their sparsity under palettization only with joint compression (iOS18).
        model = palettize_weights(
            model, config(palettizer_config(scheme.palettize, threshold)), joint_compression=bool(scheme.prune)
        )
    if scheme.quantize:
        model = linear_quantize_weights(model, config(quantizer_config(scheme.quantize, threshold)))
    model.save(str(out))
    return CompressedComponent(out, time.perf_counter() - started)
