"""Our histogram palettizer vs coremltools' ``mode="kmeans"`` on the full-size SD 1.5 UNet.

The UNet is diffusers' ``UNet2DConditionModel()`` with its default config (the SD 1.5 architecture)
and torch's default random initialisation (seed 0); every weight with more than 2048 elements
is cast to fp16, which is what a converted fp16 ML program holds. Both methods run through
coremltools' own ``palettize_weights.blockwise_compress`` (ours as ``mode="CUSTOM"`` with
``publisher.palettize.lut_function``), tensor by tensor and alternately, so that both pay the same
stacking, casting and machine-load costs; the SSE is measured on coremltools' decompression of
each result against the fp16 weight.

Per-grouped-channel k-means in coremltools takes hours on two cores, so it runs on every
``--grouped-every``-th eligible tensor only; its full-model time is extrapolated from its
measured seconds per group, separately for groups under 10,000 elements (scikit-learn k-means)
and the rest (kmeans1d), times the number of such groups in the model. Ours runs on all of them.

Ours runs as a publish runs it, with ``install_coremltools_fixes()`` (which hands a weight's groups to
``palettize_groups`` at once) and its default threads; ``--threads 1`` measures it on one core.
``--coremltools grouped`` (or ``none``) skips coremltools' per-tensor k-means (about 7 min), and
``PYTHONPATH=<another tree>`` measures that tree's palettizer with this script, for a before/after
table from one machine.

``--model`` adds one whole-model pass of ``palettize_weights`` with our config on an already
converted fp16 UNet ``.mlpackage`` (converting takes about 3.5 min and 7 GB).

Heavy (about 5 GB for the weights, more for ``--model``): run it as
``flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/palettize.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Before coremltools (imported by publisher.palettize) loads tqdm: no progress bars in the table.
os.environ.setdefault("TQDM_DISABLE", "1")

import publisher.palettize  # noqa: E402
from publisher.coremltools_fixes import install_coremltools_fixes  # noqa: E402
from publisher.palettize import lut_function, palettize, palettize_config  # noqa: E402

SKLEARN_BELOW = 10_000  # coremltools' kmeans uses scikit-learn for tensors (groups) under this size


@dataclass
class Tally:
    """Seconds, SSE and compressed bytes summed over tensors for one method."""

    seconds: float = 0.0
    sse: float = 0.0
    nbytes: float = 0.0
    groups: int = 0
    seconds_by_kind: dict[str, float] = field(default_factory=dict)
    groups_by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.seconds += other.seconds
        self.sse += other.sse
        self.nbytes += other.nbytes
        self.groups += other.groups
        for kind, seconds in other.seconds_by_kind.items():
            self.seconds_by_kind[kind] = self.seconds_by_kind.get(kind, 0.0) + seconds
            self.groups_by_kind[kind] = self.groups_by_kind.get(kind, 0) + other.groups_by_kind[kind]


def unet_weights(threshold: int) -> list[tuple[str, np.ndarray]]:
    """fp16 copies of the SD 1.5 UNet's weights with more than ``threshold`` elements."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel()
    weights = [
        (name, p.detach().to(torch.float16).numpy().copy())
        for name, p in model.named_parameters()
        if p.numel() > threshold
    ]
    del model
    gc.collect()
    return weights


def run(weight: np.ndarray, mode: str, nbits: int, block_sizes: list[int]) -> Tally:
    """Palettize one weight through coremltools with ``mode``: time, SSE and size of the result."""
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    custom = mode == "CUSTOM"
    start = time.perf_counter()
    params = palettize_weights.blockwise_compress(
        weight, mode, None if custom else nbits, block_sizes, lut_function(nbits) if custom else None
    )
    seconds = time.perf_counter() - start
    # Groups are cut along axis 0; coremltools' own decompress materializes a LUT per element.
    groups = params.lut.shape[0]
    lut = params.lut.reshape(groups, -1).astype(np.float64)
    dense = np.take_along_axis(lut, params.indices.reshape(groups, -1).astype(np.intp), axis=1)
    kind = "sklearn" if weight.size // groups < SKLEARN_BELOW else "kmeans1d"
    return Tally(
        seconds=seconds,
        sse=float(np.sum((dense.reshape(weight.shape) - weight.astype(np.float64)) ** 2)),
        nbytes=weight.size * nbits / 8 + params.lut.size * 2,
        groups=groups,
        seconds_by_kind={kind: seconds},
        groups_by_kind={kind: groups},
    )


def per_tensor(weights: list[tuple[str, np.ndarray]], nbits: int, coremltools: bool) -> tuple[Tally, Tally]:
    ours, theirs = Tally(), Tally()
    for index, (name, weight) in enumerate(weights):
        blocks = [0] * weight.ndim
        ours.add(run(weight, "CUSTOM", nbits, blocks))
        if coremltools:
            theirs.add(run(weight, "KMEANS", nbits, blocks))
        print(f"  per-tensor {index + 1}/{len(weights)} {name} {weight.shape}", flush=True)
    return ours, theirs


def grouped(
    weights: list[tuple[str, np.ndarray]], nbits: int, group_size: int, every: int, coremltools: bool
) -> tuple[Tally, Tally, Tally, dict[str, int]]:
    """Ours on every eligible weight; ours and coremltools' on every ``every``-th one.

    Eligible: at least 2-D with an output-channel count divisible by ``group_size`` (coremltools
    leaves the others uncompressed; 1-D biases would get 16-element groups with 64-entry LUTs).
    Also returns how many groups of each kind (scikit-learn or kmeans1d in coremltools) all
    eligible weights have.
    """
    eligible = [(n, w) for n, w in weights if w.ndim >= 2 and w.shape[0] % group_size == 0]
    ours_all, ours_subset, theirs_subset, groups_all = Tally(), Tally(), Tally(), {}
    for index, (name, weight) in enumerate(eligible):
        blocks = [group_size] + [0] * (weight.ndim - 1)
        result = run(weight, "CUSTOM", nbits, blocks)
        ours_all.add(result)
        if index % every == 0:
            ours_subset.add(result)
            if coremltools:
                theirs_subset.add(run(weight, "KMEANS", nbits, blocks))
        for kind, count in result.groups_by_kind.items():
            groups_all[kind] = groups_all.get(kind, 0) + count
        print(f"  grouped {index + 1}/{len(eligible)} {name} {weight.shape}", flush=True)
    return ours_all, ours_subset, theirs_subset, groups_all


def analysis_errors(weights: list[tuple[str, np.ndarray]], widths: list[int]) -> tuple[float, float, float]:
    """The mixed-bit analysis' first step (every weight's LUT and squared error at every width), the way it
    was computed (one ``palettize`` per width, the error summed over the elements) and with
    ``palette_errors`` (one histogram, the error summed over distinct values), alternating weight by weight.
    Returns both times and the largest relative difference between their errors."""
    from publisher.palettize import palette_errors

    elementwise = histogram = worst = 0.0
    for _, weight in weights:
        start = time.perf_counter()
        before = []
        for nbits in widths:
            lut, indices = palettize(weight, nbits)
            before.append(float(np.sum((lut[indices].astype(np.float64) - weight.reshape(-1)) ** 2)))
        elementwise += time.perf_counter() - start
        start = time.perf_counter()
        after = [error for _, error in palette_errors(weight, widths)]
        histogram += time.perf_counter() - start
        worst = max([worst] + [abs(a - b) / b for a, b in zip(after, before, strict=True) if b])
    return elementwise, histogram, worst


def whole_model(path: Path, nbits: int) -> dict[str, float]:
    """One ``palettize_weights`` pass with our config on a converted model; its time and size."""
    import coremltools as ct
    from coremltools.optimize.coreml import OptimizationConfig, palettize_weights

    model = ct.models.MLModel(str(path), skip_model_load=True)
    start = time.perf_counter()
    compressed = palettize_weights(model, OptimizationConfig(global_config=palettize_config(nbits)))
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "unet.mlpackage"
        compressed.save(str(out))
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        shutil.rmtree(out)
    return {"seconds": seconds, "megabytes": size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nbits", type=int, default=6)
    parser.add_argument("--group-size", type=int, default=16)
    parser.add_argument("--grouped-every", type=int, default=32, help="coremltools grouped k-means subset")
    parser.add_argument("--limit", type=int, default=0, help="only the first N weights (smoke test)")
    parser.add_argument("--model", type=Path, help="converted fp16 UNet .mlpackage for a whole-model pass")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--analysis-widths", type=int, nargs="*", default=[],
                        help="also time the mixed-bit analysis' errors at these widths (e.g. 8 6 4 2 1)")
    parser.add_argument("--threads", type=int, help="threads for our palettizer (default: every core)")
    parser.add_argument("--coremltools", choices=["all", "grouped", "none"], default="all",
                        help="which coremltools k-means runs to time beside ours")
    args = parser.parse_args()
    install_coremltools_fixes()
    if args.threads:
        publisher.palettize._WORKERS = args.threads
    print(f"palettizer: {publisher.palettize.__file__}, threads {getattr(publisher.palettize, '_WORKERS', 1)}")

    weights = unet_weights(threshold=2048)
    if args.limit:
        weights = weights[: args.limit]
    params = sum(w.size for _, w in weights)
    print(f"{len(weights)} weights, {params / 1e6:.1f} M parameters", flush=True)

    ours, theirs = per_tensor(weights, args.nbits, args.coremltools == "all")
    ours_g, ours_gs, theirs_gs, groups_all = grouped(weights, args.nbits, args.group_size, args.grouped_every,
                                                     args.coremltools != "none")
    errors = analysis_errors(weights, args.analysis_widths) if args.analysis_widths else None
    del weights
    gc.collect()
    whole = whole_model(args.model, args.nbits) if args.model else None

    per_group = {
        kind: theirs_gs.seconds_by_kind[kind] / theirs_gs.groups_by_kind[kind] for kind in theirs_gs.groups_by_kind
    }
    theirs_g_estimate = sum(per_group.get(kind, 0.0) * count for kind, count in groups_all.items())
    g = args.group_size
    rows = [
        ("per-tensor, all weights", ours.seconds, theirs.seconds, ours.sse, theirs.sse, ours.nbytes, theirs.nbytes, ""),
        (
            f"grouped ({g} ch), subset 1/{args.grouped_every}",
            ours_gs.seconds,
            theirs_gs.seconds,
            ours_gs.sse,
            theirs_gs.sse,
            None,
            None,
            f"{theirs_gs.groups} groups",
        ),
        (
            f"grouped ({g} ch), all weights",
            ours_g.seconds,
            theirs_g_estimate,
            ours_g.sse,
            None,
            ours_g.nbytes,
            None,
            f"{ours_g.groups} groups; coremltools time extrapolated",
        ),
    ]
    print()
    print(
        f"SD 1.5 UNet, random weights, {params / 1e6:.1f} M parameters in {args.limit or 'all'} weights > 2048, "
        f"{args.nbits}-bit palettization"
    )
    print()
    print(
        "| scheme | ours (s) | coremltools kmeans (s) | time ratio | ours SSE | coremltools SSE | SSE ratio "
        "| ours MB | coremltools MB | note |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, t_ours, t_theirs, s_ours, s_theirs, b_ours, b_theirs, note in rows:

        def num(value: float | None, fmt: str) -> str:
            return "—" if value is None else format(value, fmt)

        ratio = num(t_theirs / t_ours if t_theirs else None, ".1f")
        sse_ratio = num(s_ours / s_theirs if s_theirs else None, ".5f")
        print(
            f"| {label} | {t_ours:.1f} | {num(t_theirs, '.1f')} | {ratio}x | {s_ours:.4f} | {num(s_theirs, '.4f')} "
            f"| {sse_ratio} | {num(b_ours and b_ours / 1e6, '.1f')} | {num(b_theirs and b_theirs / 1e6, '.1f')} "
            f"| {note} |"
        )
    if whole:
        print(
            f"| whole-model `palettize_weights` (ours) | {whole['seconds']:.1f} | — | — | — | — | — "
            f"| {whole['megabytes']:.1f} | — | saved .mlpackage |"
        )
    if errors:
        print(
            f"| mixed-bit analysis errors at {args.analysis_widths} bits: elementwise (before) | {errors[0]:.1f} | — "
            f"| — | — | — | — | — | — | |"
        )
        print(
            f"| mixed-bit analysis errors: palette_errors | {errors[1]:.1f} | — | {errors[0] / errors[1]:.1f}x "
            f"vs elementwise | — | — | — | — | — | largest relative error difference {errors[2]:.1e} |"
        )
    print()
    print("coremltools grouped seconds per group: " + ", ".join(f"{k} {v:.3f}" for k, v in per_group.items()))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "per_tensor": {"ours": vars(ours), "coremltools": vars(theirs)},
                    "grouped_all_ours": vars(ours_g),
                    "grouped_subset": {"ours": vars(ours_gs), "coremltools": vars(theirs_gs)},
                    "grouped_coremltools_estimate_seconds": theirs_g_estimate,
                    "whole_model": whole,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
