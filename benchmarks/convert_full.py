"""Convert full-size SD 1.5 components (random weights, real architecture) and print each one's
wall time and peak RSS.

The pipeline is built from `configs/sd15` with seeded random weights (`publisher.synthetic`), so no
network is needed; conversion time and memory depend on the architecture, not on the weights. Each
component converts in its own process (`publisher.convert.convert_in_subprocess`, as a publish run
does), so each peak RSS is that component's alone. Needs ~7 GB for the UNet and ~6 minutes on
2 cores; on a shared machine run it under the heavy-job lock:

    flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/convert_full.py

The random-weight pipeline (~4.3 GB) is cached under build/random/; packages go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from random_sources import ROOT, machine, pipeline

COMPONENTS = ("text_encoder", "vae_decoder", "vae_encoder", "unet")


def write_recipe(folder: Path, source: Path, precision: str) -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"name: convert-full\nsource:\n  path: {source}\ntarget:\n  repo: benchmarks/convert-full\n"
        f"conversion:\n  components: [{', '.join(COMPONENTS)}]\n  precision: {precision}\n"
    )
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=ROOT / "configs" / "sd15")
    parser.add_argument("--attention", default="original", choices=("original", "split_einsum", "split_einsum_v2"))
    parser.add_argument("--precision", default="float16", choices=("float16", "float32"))
    parser.add_argument("--components", nargs="+", default=list(COMPONENTS), choices=COMPONENTS)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    from publisher.convert import convert_in_subprocess

    started = time.perf_counter()
    source = pipeline(args.configs)
    print(f"random-weight pipeline {source} ready in {time.perf_counter() - started:.0f} s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="convert-full-") as work:
        recipe = write_recipe(Path(work), source, args.precision)
        for component in args.components:
            started = time.perf_counter()
            converted = convert_in_subprocess(recipe, component, args.attention, Path(work) / f"{component}.mlpackage")
            wall = time.perf_counter() - started
            size = sum(file.stat().st_size for file in converted.package.rglob("*") if file.is_file())
            rows.append((component, converted.parameters, wall, converted.seconds, converted.peak_rss, size))
            print(f"  {component}: {wall:.0f} s", flush=True)

    print(f"\nmachine: {machine()}")
    print(f"{args.configs.name}, {args.precision}, attention {args.attention}, one process per component\n")
    print("| component | parameters | wall (s) | convert (s) | peak RSS (GiB) | package (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for component, parameters, wall, seconds, peak, size in rows:
        print(f"| {component} | {parameters / 1e6:.0f} M | {wall:.0f} | {seconds:.0f} | {peak / 2**30:.2f} | "
              f"{size / 1e6:.0f} |")


if __name__ == "__main__":
    main()
