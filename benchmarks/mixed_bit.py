"""Mixed-bit palettization: pre-analysis time and the curve (average bits vs PSNR) beside uniform palettization's.

Tiny UNet of the demo recipe by default (about two minutes); the full-size SD 1.5 UNet (random
weights from configs/sd15) with ``--full`` (~10 GB, tens of minutes on 2 cores; the pipeline and the
conversion are cached under build/). On a shared machine run it under the heavy-job lock:

    flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/mixed_bit.py --full

The pre-analysis of another tree (the code before a change), on the same package and cases:

    PYTHONPATH=<tree> .venv/bin/python benchmarks/mixed_bit.py --full --analysis-only --save-analysis <dir>

PSNR is Apple's, of the executor (fp32 hold) on the package weights palettized as the apply step
writes them, against the fp32 torch reference, worst over the calibration cases; both methods are
measured in the same run on the same cases.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "examples" / "tiny-sd-palettized.yaml"
CACHE = ROOT / "build" / "mixed-bit-bench"
TARGETS = (6.0, 5.0, 4.5, 4.0, 3.0, 2.5)
FULL_RECIPE = """\
name: sd15-random
source: {{path: {source}}}
target: {{repo: bench/sd15-random}}
conversion: {{components: [text_encoder, unet], image_size: 512}}
"""


def _quiet() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def _full_recipe() -> Path:
    from publisher.synthetic import build_pipeline

    source = CACHE / "sd15"
    if not (source / "model_index.json").is_file():
        build_pipeline(ROOT / "configs" / "sd15", source)
    recipe = CACHE / "sd15-random.yaml"
    recipe.write_text(FULL_RECIPE.format(source=source))
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size SD 1.5 UNet instead of the tiny one")
    parser.add_argument("--cases", type=int, default=None,
                        help="calibration cases (parity timesteps) to use; default all (tiny), 1 (full)")
    parser.add_argument("--groups", type=int, default=None, help="gain groups; default mixed_bit.DEFAULT_GROUPS")
    parser.add_argument("--analysis-only", action="store_true", help="stop after the pre-analysis table")
    parser.add_argument("--save-analysis", type=Path, default=None, metavar="DIR",
                        help="write the analysis there (to compare two trees' results: PYTHONPATH=<tree> runs another)")
    args = parser.parse_args()
    _quiet()

    from publisher import mixed_bit
    from publisher.convert import convert_component
    from publisher.recipe import load_recipe
    from publisher.source import load_source

    CACHE.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(_full_recipe() if args.full else DEMO)
    threshold = recipe.compression.unet.weight_threshold if not args.full else 2048
    source = load_source(recipe, ("unet", "text_encoder"))
    with tempfile.TemporaryDirectory() as scratch:
        package = (CACHE / "sd15-unet.mlpackage") if args.full else Path(scratch) / "unet.mlpackage"
        if not package.exists():
            started = time.perf_counter()
            convert_component(recipe, source, "unet", package)
            print(f"converted the UNet in {time.perf_counter() - started:.0f} s")
        calib = mixed_bit.calibration(recipe, source, "unet")
        cases = args.cases or (1 if args.full else len(calib.inputs))
        calib = mixed_bit.Calibration(calib.inputs[:cases], calib.outputs[:cases])
        del source

        analysis = mixed_bit.analyze(package, calib, threshold, groups=args.groups or mixed_bit.DEFAULT_GROUPS)
        size = int(analysis.sizes.sum())
        seconds = analysis.seconds
        print(f"\n{'full-size SD 1.5' if args.full else 'tiny'} UNet: {len(analysis.layers)} weights,"
              f" {size / 1e6:.1f} M elements palettized; {cases} calibration case(s),"
              f" {len({layer.group for layer in analysis.layers})} gain groups, threshold {threshold}\n")
        print("| pre-analysis | load (s) | k-means, all widths (s) | gains (s) | total (s) |")
        print("|---|---:|---:|---:|---:|")
        print(f"| candidates {list(analysis.candidates)} | {seconds['load']:.1f} | {seconds['kmeans']:.1f}"
              f" | {seconds['gains']:.1f} | {seconds['total']:.1f} |\n")
        if args.save_analysis:
            args.save_analysis.mkdir(parents=True, exist_ok=True)
            analysis.save(args.save_analysis)
        if args.analysis_only:
            return

        rows = []
        for nbits in analysis.candidates:
            measured = mixed_bit.measure(package, calib, {layer.name: nbits for layer in analysis.layers}, analysis)
            rows.append(("uniform", float(nbits), None, measured, None))
        for target in TARGETS:
            started = time.perf_counter()
            built = mixed_bit.build_recipe(package, calib, "unet", target_bits=target, analysis=analysis)
            # What a re-publish aiming at this target spends before applying it, the analysis being cached.
            allocated = time.perf_counter() - started
            # A bits target is not verified by the build (the parity gate is): measured here alike.
            measured = mixed_bit.measure(package, calib, built.layers, analysis)
            rows.append((f"mixed (target {target:g})", built.average_bits, built.predicted_psnr, measured, allocated))
        print("| method | average bits | predicted PSNR (dB) | measured PSNR (dB) | allocation (s) |")
        print("|---|---:|---:|---:|---:|")
        for method, bits, predicted, measured, took in sorted(rows, key=lambda row: -row[1]):
            shown = f"{predicted:.1f}" if predicted is not None else "-"
            print(f"| {method} | {bits:.2f} | {shown} | {measured:.1f} | {'-' if took is None else f'{took:.1f}'} |")


if __name__ == "__main__":
    main()
