"""Publish a shipped recipe at full size on random weights; print each stage's wall time and peak RSS.

The recipe's source is swapped for a random-weight pipeline built from the matching architecture
config in `configs/` (no network; time and memory depend on the architecture, not the weights).
Everything else (variants, conversion, compression, parity, card) is the shipped recipe's, and the
run is `publisher publish` itself, with an empty stage cache and no upload. A recipe's separate VAE
is dropped (the fixed fp16 SDXL VAE has the pipeline VAE's architecture). Peaks are the whole
process tree's, children included, sampled every 50 ms.

`--memory-limit 16` runs the publish inside a 16 GB memory cgroup (root, Linux), as on a hosted
runner with that much RAM: the kernel reclaims page cache at the cap, mapped weight files included,
and kills the run if what it cannot reclaim exceeds it.

    flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/full_scale.py \
        recipes/stable-diffusion-v1-5.yaml --variants original

`--apple-baseline CHECKOUT` then runs Apple's converter (`torch2coreml` from CHECKOUT, a clone of
apple/ml-stable-diffusion) on the same random-weight folder, one process per component with the
recipe's settings where it has a flag, and prints its time and peaks beside the publish's, with the
ratios; each process's peaks are its own tree's, sampled alike. `benchmarks/apple_baseline.py` says
what to install for it and what its flags cannot match:

    flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/full_scale.py \
        recipes/stable-diffusion-v1-5.yaml --variants original --apple-baseline /tmp/ml-stable-diffusion
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import yaml
from apple_baseline import AppleRun, apple_plan, check_converter, converter_env, fp16_view
from random_sources import ROOT, controlnet, language_model, machine, pipeline

if TYPE_CHECKING:
    from publisher.report import StageCost

CONFIGS = {
    "stable-diffusion-v1-5": "sd15",
    "stable-diffusion-2-1-base": "sd21-base",
    "stable-diffusion-xl-base-1.0": "sdxl-base",
    "stable-diffusion-xl-refiner-1.0": "sdxl-refiner",
    "sdxl-turbo": "sdxl-turbo",
    "controlnet-sd15-canny": "sd15",
    "controlnet-sd15-depth": "sd15",
    "llama-3.2-1b-int4": "llama-3.2-1b",
    "qwen2.5-1.5b-palettized": "qwen2.5-1.5b",
    "mistral-7b-v0.3-int4": "mistral-7b-v0.3",
    "falcon-7b-int8": "falcon-7b",
}
# Issue 7's targets on a 2-core, 24 GB machine: (wall seconds, peak bytes); None where none is set.
TARGETS = {
    "stable-diffusion-v1-5": (8 * 60, 8e9),
    "stable-diffusion-xl-base-1.0": (None, 16e9),
    # Language models' issue: convert + compress + parity + card of the 1B int4 package.
    "llama-3.2-1b-int4": (15 * 60, 12e9),
}
GB = 1e9


def random_recipe(recipe_file: Path, configs: Path, variants: list[str] | None, work: Path) -> Path:
    """The shipped recipe with its source replaced by the random-weight pipeline of ``configs``."""
    recipe = yaml.safe_load(recipe_file.read_text())
    if recipe.get("task") == "text-generation":
        recipe["source"] = {"path": str(language_model(configs))}
        # Random weights give near-uniform logits whose top-1 token is noise: parity is measured (its cost is part
        # of the run) and reported, not gated.
        recipe["parity"] = {**recipe.get("parity", {}), "min_psnr": 0, "min_token_agreement": 0}
        out = work / recipe_file.name
        out.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
        return out
    source = {"path": str(pipeline(configs)), "family": recipe["source"].get("family")}
    if "controlnet" in recipe["source"]:
        source["controlnet"] = {"path": str(controlnet(ROOT / "configs" / "controlnet-sd15"))}
    recipe["source"] = {key: value for key, value in source.items() if value is not None}
    if variants:
        recipe["variants"] = [variant for variant in recipe["variants"] if variant["attention"] in variants]
    out = work / recipe_file.name
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def _anonymous_rss(process: psutil.Process) -> int:
    """Resident anonymous memory of the process tree: what the kernel cannot drop under pressure.
    RSS also counts file pages, such as safetensors weights that torch maps instead of copying."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            status = Path(f"/proc/{member.pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon:")), 0)
    return total


@contextmanager
def tree_peak(measure: Callable[[psutil.Process], int], process: psutil.Process | None = None
              ) -> Iterator[list[int]]:
    """Sample ``measure(process)`` every 50 ms; the peak is in the yielded list's item.

    Args:
        measure: the memory of a process tree, e.g. :func:`_anonymous_rss`.
        process: the tree's root (default: this process).
    """
    peak, stop, process = [0], threading.Event(), process or psutil.Process()

    def sample() -> None:
        while not stop.wait(0.05):
            # A child sampled as it exits is gone: that sample is skipped, not an error in this thread.
            with suppress(psutil.Error):
                peak[0] = max(peak[0], measure(process))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


@contextmanager
def memory_cgroup(limit: float) -> Iterator[Path]:
    """This process, and every child it starts, in a cgroup v1 memory group capped at ``limit`` bytes."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").is_file():
        raise SystemExit("--memory-limit needs Linux's cgroup v1 memory controller at /sys/fs/cgroup/memory")
    group = root / f"coreml-publisher-{os.getpid()}"
    try:
        group.mkdir()
        # Bring along what this process already holds (imports, about 0.5 GB): v1 leaves it charged
        # to the old group otherwise. Kernels from 6.x refuse to (the setting is deprecated): the
        # cap then shrinks by that much, so that the run and its imports still share ``limit``.
        try:
            (group / "memory.move_charge_at_immigrate").write_text("3")
        except OSError:
            limit -= psutil.Process().memory_info().rss
        (group / "memory.limit_in_bytes").write_text(str(int(limit)))
        (group / "cgroup.procs").write_text(str(os.getpid()))
        # A page is charged to the group that first read it: drop the page cache so the weight
        # files the run maps count against its own limit, not against whoever read them before.
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except PermissionError:
        raise SystemExit("--memory-limit needs root: it creates a memory cgroup") from None
    try:
        yield group
    finally:
        # Back to the root with whatever else is still inside (multiprocessing's resource tracker
        # outlives the run's children): a group with a process in it cannot be removed (EBUSY).
        for pid in (group / "cgroup.procs").read_text().split():
            with suppress(ProcessLookupError):
                (root / "cgroup.procs").write_text(pid)
        group.rmdir()


def ratio(value: float, target: float | None) -> str:
    return f"{value / target:.2f}x" if target else "–"


@dataclass(frozen=True)
class AppleCost:
    """One torch2coreml process's wall time and peaks (bytes); ``error`` is its last output line if it failed."""

    run: AppleRun
    seconds: float
    peak_rss: int
    peak_anonymous: int
    error: str | None


def run_apple(checkout: Path, runs: list[AppleRun], logs: Path) -> list[AppleCost]:
    """Run torch2coreml's processes one after another, each measured alone.

    Args:
        checkout: the apple/ml-stable-diffusion clone.
        runs: the processes (:func:`apple_baseline.apple_plan`).
        logs: a folder for their output (it is long: coremltools' progress and warnings).

    Returns:
        Their costs, in order.
    """
    # The tree sum that the publish's stages sample (publisher.monitor), here over the child's tree alone:
    # this process's own memory is not the converter's.
    from publisher.monitor import tree_rss

    logs.mkdir(parents=True, exist_ok=True)
    costs = []
    for run in runs:
        log = logs / f"{run.label.replace(' ', '-')}.log"
        started = time.perf_counter()
        with log.open("w") as output:
            child = psutil.Popen([sys.executable, *run.args], env=converter_env(checkout), stdout=output,
                                 stderr=subprocess.STDOUT)
            with tree_peak(tree_rss, child) as rss, tree_peak(_anonymous_rss, child) as anonymous:
                child.wait()
        seconds = time.perf_counter() - started
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        error = (lines[-1].strip() if lines else f"exit status {child.returncode}") if child.returncode else None
        costs.append(AppleCost(run, seconds, rss[0], anonymous[0], error))
        print(f"Apple's torch2coreml, {run.label}: {seconds:.0f} s, peak RSS {rss[0] / GB:.2f} GB"
              + (f", failed: {error}" if error else ""), file=sys.stderr)
    return costs


def print_apple(ours: StageCost, ours_anonymous: int, costs: list[AppleCost], shared_flags: str,
                unmatched: list[str]) -> None:
    """The publish's whole run beside Apple's processes, one row each, and the ratios of the totals."""
    print(f"\nApple's torch2coreml on the same weights, one process per component, all with {shared_flags}:\n")
    print("| run | wall (s) | peak RSS (GB) | peak anonymous RSS (GB) |")
    print("|---|---:|---:|---:|")
    print(f"| ours: the whole publish (conversion, compression, parity, images, card) | {ours.seconds:.0f} | "
          f"{ours.peak_rss_bytes / GB:.2f} | {ours_anonymous / GB:.2f} |")
    for cost in costs:
        wall = f"{cost.seconds:.0f}" + (f" (failed: {cost.error})" if cost.error else "")
        print(f"| Apple: {cost.run.label} (`{cost.run.flags}`) | {wall} | {cost.peak_rss / GB:.2f} | "
              f"{cost.peak_anonymous / GB:.2f} |")
    # The processes run one after another: their times add up, their peaks do not.
    seconds = sum(cost.seconds for cost in costs)
    peak = max(cost.peak_rss for cost in costs)
    anonymous = max(cost.peak_anonymous for cost in costs)
    print(f"| **Apple: {len(costs)} processes** (times summed, the largest peak) | **{seconds:.0f}** | "
          f"**{peak / GB:.2f}** | **{anonymous / GB:.2f}** |")
    print(f"\nours / Apple: wall {ratio(ours.seconds, seconds)}, peak RSS {ratio(ours.peak_rss_bytes, peak)}, "
          f"peak anonymous RSS {ratio(ours_anonymous, anonymous)}")
    if unmatched:
        print(f"not matched by torch2coreml's flags: {'; '.join(unmatched)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path, help="a shipped recipe, e.g. recipes/stable-diffusion-v1-5.yaml")
    parser.add_argument("--configs", type=Path, help="architecture configs (default: the recipe's, from CONFIGS)")
    parser.add_argument("--variants", nargs="+", help="keep only these attention variants of the recipe")
    parser.add_argument("--memory-limit", type=float, metavar="GB", help="run inside a memory cgroup of this size")
    parser.add_argument("--out", type=Path, help="keep the published folder here (default: removed with the run)")
    parser.add_argument("--apple-baseline", type=Path, metavar="CHECKOUT",
                        help="then run Apple's torch2coreml from this apple/ml-stable-diffusion clone on the same "
                             "weights and print it beside the publish (benchmarks/apple_baseline.py)")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.apple_baseline:
        # Before the publish: a baseline that cannot run says so now, not minutes later.
        if yaml.safe_load(args.recipe.read_text()).get("task") == "text-generation":
            raise SystemExit("--apple-baseline: Apple's torch2coreml converts diffusion pipelines, not language models")
        check_converter(args.apple_baseline)

    from publisher.cache import StageCache
    from publisher.monitor import Monitor
    from publisher.pipeline import publish
    from publisher.recipe import load_recipe

    configs = args.configs or ROOT / "configs" / CONFIGS[args.recipe.stem]
    wall_target, peak_target = TARGETS.get(args.recipe.stem, (None, None))
    # A fresh clone has no build/ yet.
    (ROOT / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="full-scale-", dir=ROOT / "build") as work:
        recipe = random_recipe(args.recipe, configs, args.variants, Path(work))
        monitor = Monitor()
        with ExitStack() as stack:
            group = stack.enter_context(memory_cgroup(args.memory_limit * GB)) if args.memory_limit else None
            with monitor.stage("whole run"), tree_peak(_anonymous_rss) as anonymous:
                report = publish(recipe, args.out or Path(work) / "out", cache=StageCache(Path(work) / "cache"))
            if group is not None:
                charged = int((group / "memory.max_usage_in_bytes").read_text())
                hits = int((group / "memory.failcnt").read_text())
        if args.apple_baseline:
            published = load_recipe(recipe)
            view = fp16_view(published.source.path, Path(work) / "apple-source")
            plan = apple_plan(published, report, view, Path(work) / "apple")
            apple = run_apple(args.apple_baseline, plan.runs, Path(work) / "apple-logs")
    total = monitor.costs[-1]

    print(f"\nmachine: {machine()}")
    print(f"{args.recipe.name} on {configs.name} random weights, variants: "
          f"{', '.join(variant.folder for variant in report.variants)}\n")
    print("| stage | wall (s) | peak RSS (GB) |")
    print("|---|---:|---:|")
    for cost in report.stages:
        print(f"| {cost.stage} | {cost.seconds:.0f} | {cost.peak_rss_bytes / GB:.2f} |")
    print(f"| **whole run** (with loading, assembly, card) | **{total.seconds:.0f}** | "
          f"**{total.peak_rss_bytes / GB:.2f}** |")
    if args.memory_limit:
        print(f"\npublished inside a {args.memory_limit:g} GB memory cgroup: peak charge {charged / GB:.2f} GB "
              f"(page cache included), the cap reached {hits} times (each time the kernel reclaimed cache)")
    if anonymous[0]:
        print(f"\npeak anonymous RSS of the whole run (not counting mapped weight files): {anonymous[0] / GB:.2f} GB")
    if report.task == "text-generation":
        (component,) = report.variants[0].components
        # Issue 20's size target: int4 in blocks of 32 stores 4 bits and one float16 scale per 32 weights.
        expected = component.parameters * 4.5 / 8
        print(f"\npackage weights {component.compressed_bytes / GB:.3f} GB, parameters x 4.5 bits / 8 = "
              f"{expected / GB:.3f} GB: {component.compressed_bytes / expected:.4f}x")
    if wall_target or peak_target:
        wall = f"{ratio(total.seconds, wall_target)} of {wall_target} s" if wall_target else "none"
        peak = f"{ratio(total.peak_rss_bytes, peak_target)} of {peak_target / GB:.0f} GB" if peak_target else "none"
        print(f"\nrun / target: wall {wall}, peak RSS {peak}")
    if args.apple_baseline:
        print_apple(total, anonymous[0], apple, plan.shared_flags, plan.unmatched)
        failed = [cost.run.label for cost in apple if cost.error]
        if failed:
            raise SystemExit(f"Apple's torch2coreml failed on {', '.join(failed)} (its error is in the table): "
                             "its totals above stop at the failure")


if __name__ == "__main__":
    main()
