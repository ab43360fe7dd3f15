"""Compress: apply a recipe's scheme to a converted package with `coremltools.optimize.coreml`.

The constexpr ops and the bit packing are coremltools' own, so Core ML decompresses the weights
just in time exactly as it does for Apple's published models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coremltools as ct
from coremltools.optimize.coreml import (
    OpLinearQuantizerConfig,
    OpMagnitudePrunerConfig,
    OpPalettizerConfig,
    OptimizationConfig,
    linear_quantize_weights,
    palettize_weights,
    prune_weights,
)

from publisher.components import component_spec
from publisher.coremltools_fixes import install_coremltools_fixes
from publisher.mixed_bit import Analysis, Calibration, MixedBitRecipe, analyze, build_recipe
from publisher.package_weights import SKIPPED_OP_TYPES, Weight, program_weights
from publisher.palettize import palettize_config
from publisher.recipe import MixedBits, Override, Palettize, Prune, Quantize, Scheme


@dataclass(frozen=True)
class CompressedComponent:
    package: Path
    seconds: float
    mixed: MixedBitRecipe | None = None
    """The mixed-bit recipe applied, when the scheme has one: worth keeping beside the report."""
    compressed_weights: int | None = None
    """Weights stored compressed (decompressed by a ``constexpr_*`` op): 0 when ``weight_threshold`` or the
    overrides left every weight as it was; None when not counted."""


def compressed_weight_count(spec: Any) -> int:
    """The ``constexpr_*`` ops of the main function: each one decompresses one stored weight."""
    blocks = spec.mlProgram.functions["main"].block_specializations.values()
    return sum(op.type.startswith("constexpr_") for block in blocks for op in block.operations)


def skipped_op_types(component: str) -> tuple[str, ...]:
    """The op types whose weights stay uncompressed in ``component`` unless an override names them."""
    return () if component and component_spec(component).compress_embeddings else SKIPPED_OP_TYPES


def _last_match(weight: Weight, overrides: tuple[Override, ...]) -> Override | None:
    return next((o for o in reversed(overrides) if weight.matches(o.pattern)), None)


def matched_weights(weights: list[Weight], overrides: tuple[Override, ...]) -> dict[str, Override]:
    """Weight name -> the override deciding its compression."""
    return {w.name: o for w in weights if (o := _last_match(w, overrides)) is not None}


def _by_reader(weights: list[Weight], configs: dict[str, Any], default: Any, skipped: tuple[str, ...]
               ) -> dict[str, Any]:
    """``op_name_configs`` giving each named weight its config (``default`` is the global one)."""
    # Keyed by the reading ops, not the constants: a constant compressed by an earlier pass is
    # replaced by constexpr ops of new names, while its readers keep theirs.
    by_name = {w.name: w for w in weights}
    named = {reader: config for name, config in configs.items() for reader in by_name[name].consumers}

    def fallback(*op_types: str) -> Any:
        return None if set(op_types) & set(skipped) else default

    # coremltools refuses a constant whose readers have different configs, and its const
    # deduplication makes such constants of equal tensors (a random-weight SDXL UNet's zero biases,
    # read by a LayerNorm and by a palettized linear): they are keyed by their own name, which
    # coremltools looks up before their readers'.
    for weight in weights:
        seen = [named.get(reader, fallback(kind)) for reader, kind in zip(weight.consumers, weight.consumer_types,
                                                                           strict=True)]
        if any(config != seen[0] for config in seen):
            named[weight.name] = configs.get(weight.name, fallback(*weight.consumer_types))
    return named


def palettizer_config(palettize: Palettize, weight_threshold: int):

    if palettize.mixed is not None:
        raise ValueError("a mixed-bit palettization has no single config: see compress_package")
    grouped = palettize.granularity == "per_grouped_channel"
    if palettize.mode == "kmeans":
        # Our exact 1-D k-means through coremltools' custom LUT hook: same constexpr ops and packing,
        # a fraction of the time of coremltools' own k-means (benchmarks/palettize.py).
        return palettize_config(palettize.nbits, granularity=palettize.granularity,
                                group_size=palettize.group_size if grouped else None,
                                weight_threshold=weight_threshold)
    return OpPalettizerConfig(
        mode=palettize.mode,
        nbits=palettize.nbits,
        granularity=palettize.granularity,
        group_size=palettize.group_size if grouped else 32,
        weight_threshold=weight_threshold,
    )


def quantizer_config(quantize: Quantize, weight_threshold: int):

    return OpLinearQuantizerConfig(
        mode="linear_symmetric",
        dtype="int8" if quantize.nbits == 8 else "int4",
        granularity=quantize.granularity,
        block_size=quantize.block_size if quantize.granularity == "per_block" else 32,
        weight_threshold=weight_threshold,
    )


def pruner_config(prune: Prune, weight_threshold: int):

    if prune.n_m is not None:
        return OpMagnitudePrunerConfig(n_m_ratio=tuple(prune.n_m), weight_threshold=weight_threshold)
    return OpMagnitudePrunerConfig(target_sparsity=prune.sparsity, weight_threshold=weight_threshold)


def _mixed(scheme: Scheme) -> MixedBits:
    mixed = scheme.palettize.mixed if scheme.palettize else None
    if mixed is None:
        raise ValueError("the scheme has no mixed-bit palettization")
    return mixed


def mixed_analysis(package: Path, scheme: Scheme, calibration: Calibration) -> Analysis:
    """The mixed-bit pre-analysis of ``package`` for ``scheme``: what every target is allocated from."""
    mixed = _mixed(scheme)
    overridden = matched_weights(program_weights(package), scheme.overrides)
    return analyze(package, calibration, scheme.weight_threshold, mixed.candidates, mixed.groups, exclude=overridden)


def mixed_recipe(package: Path, scheme: Scheme, component: str, calibration: Calibration | None,
                 analysis: Analysis | None = None) -> MixedBitRecipe:
    """The stored mixed-bit recipe of ``scheme``, or one built now for its target on ``calibration``
    (from ``analysis`` when given: see :func:`mixed_analysis`)."""
    mixed = _mixed(scheme)
    if mixed.recipe is not None:
        return MixedBitRecipe.load(mixed.recipe)
    if calibration is None:
        raise ValueError("a mixed-bit target needs calibration inputs (publisher.mixed_bit.calibration)")
    analysis = analysis or mixed_analysis(package, scheme, calibration)
    return build_recipe(package, calibration, component, target_bits=mixed.target_bits,
                        target_psnr=mixed.target_psnr, analysis=analysis)


def stage_configs(package: Path, scheme: Scheme, mixed: MixedBitRecipe | None = None,
                  skipped: tuple[str, ...] = SKIPPED_OP_TYPES) -> dict[str, Any]:
    """The ``OptimizationConfig`` of each pass to run (``prune``, ``palettize``, ``quantize``), in that order.

    The component's own stages are global configs; a mixed-bit recipe and the overrides become
    per-op configs (overrides win), so a pass runs when any of them asks for it.
    """

    threshold = scheme.weight_threshold
    weights = program_weights(package) if (mixed or scheme.overrides) else []
    per_weight: dict[str, dict[str, Any]] = {"prune": {}, "palettize": {}, "quantize": {}}
    if mixed is not None:
        known = {w.name for w in weights}
        unknown = sorted(set(mixed.layers) - known)
        if unknown:
            raise ValueError(
                f"the mixed-bit recipe names {len(unknown)} weights the package lacks, e.g. {unknown[0]!r}"
            )
        palettizers = {bits: palettize_config(bits, weight_threshold=threshold) for bits in set(mixed.layers.values())}
        per_weight["palettize"] = {name: palettizers[bits] for name, bits in mixed.layers.items()}
    makers = {"prune": pruner_config, "palettize": palettizer_config, "quantize": quantizer_config}
    for name, override in matched_weights(weights, scheme.overrides).items():
        for stage, maker in makers.items():
            given = getattr(override, stage)
            per_weight[stage][name] = maker(given, threshold) if given is not None else None
    configs = {}
    for stage, maker in makers.items():
        given = getattr(scheme, stage)
        base = maker(given, threshold) if given is not None and not (stage == "palettize" and mixed) else None
        named = _by_reader(weights, per_weight[stage], base, skipped)
        if base is None and not any(config is not None for config in named.values()):
            continue
        configs[stage] = OptimizationConfig(global_config=base, op_type_configs=dict.fromkeys(skipped),
                                            op_name_configs=named)
    return configs


def compress_package(package: Path, scheme: Scheme, out: Path, component: str = "",
                     calibration: Calibration | None = None, analysis: Analysis | None = None) -> CompressedComponent:
    """Write ``package`` compressed with ``scheme`` to ``out``. A ``none`` scheme copies nothing:
    the caller keeps the original package.

    A mixed-bit palettization with a target (not a stored recipe) is allocated from ``analysis``, or
    analysed here on ``calibration`` (see :func:`publisher.mixed_bit.calibration`); the result
    carries the recipe.
    """

    started = time.perf_counter()
    install_coremltools_fixes()
    mixed = None
    if scheme.palettize and scheme.palettize.mixed:
        mixed = mixed_recipe(package, scheme, component, calibration, analysis)
    configs = stage_configs(package, scheme, mixed, skipped_op_types(component))
    model = ct.models.MLModel(str(package), skip_model_load=True)
    if "prune" in configs:
        model = prune_weights(model, configs["prune"])
    if "palettize" in configs:
        # Pruned weights keep their sparsity under palettization only with joint compression (iOS18).
        model = palettize_weights(model, configs["palettize"], joint_compression="prune" in configs)
    if "quantize" in configs:
        model = linear_quantize_weights(model, configs["quantize"])
    model.save(str(out))
    return CompressedComponent(out, time.perf_counter() - started, mixed, compressed_weight_count(model.get_spec()))
