"""One component's compression stage (`compress_package`, as a publish runs it): this tree against another.

The component of a shipped recipe is converted once, on random full-size weights (as `full_scale.py`
builds them), and kept at `--package`. Each round then compresses it with this tree and with the
baseline tree (`--baseline TREE`, a checkout of another commit put first on PYTHONPATH), interleaved,
each in a fresh process: its wall time, its peak anonymous memory (sampled every 50 ms: what the
kernel cannot drop under a runner's memory limit), its peak RSS, and a hash of the package as the
publish assembles it (`make_deterministic`), so that a change of speed or memory shows whether the
output changed with it:

    flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/compress_stage.py \
        recipes/qwen2.5-1.5b-palettized.yaml language_model --package build/qwen-lm.mlpackage \
        --baseline /tmp/before-tree --rounds 2

A mixed-bit target needs the analysis' calibration: `mixed_bit.py` measures that scheme.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from full_scale import CONFIGS, random_recipe
from random_sources import ROOT, machine

from publisher.recipe import load_recipe

GB = 1e9

# Runs in the measured process, with the tree under test first on PYTHONPATH.
_COMPRESS = """
import json, sys
from pathlib import Path

from full_scale import _anonymous_rss, tree_peak
from publisher.assemble import make_deterministic
from publisher.cache import hash_path
from publisher.compress import compress_package
from publisher.recipe import load_recipe

recipe_file, component, package, out = sys.argv[1:5]
scheme = load_recipe(Path(recipe_file)).compression.for_component(component)
with tree_peak(_anonymous_rss) as anonymous:
    seconds = compress_package(Path(package), scheme, Path(out), component=component).seconds
make_deterministic(Path(out))
# This address space's high-water mark: ru_maxrss would carry the benchmark's from the fork.
rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "anonymous": anonymous[0], "rss": rss, "hash": hash_path(Path(out))[:16]}))
"""


def convert_once(recipe: Path, component: str, package: Path) -> None:
    """Convert ``component`` of ``recipe`` (its random-weight source) to ``package``, in a process of its own."""
    code = ("import sys; from pathlib import Path; from publisher.convert import convert_in_subprocess; "
            "convert_in_subprocess(Path(sys.argv[1]), sys.argv[2], 'original', Path(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, str(recipe), component, str(package)], check=True)


def compress_once(recipe: Path, component: str, package: Path, tree: Path | None) -> dict:
    """One compression of ``package`` in a fresh process, with ``tree``'s package when given."""
    env = dict(os.environ)
    # The tree under test first; this folder for the memory sampler full_scale.py measures with.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree) if tree else None, str(Path(__file__).parent),
                                                      env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="compress-stage-", dir=package.parent) as scratch:
        command = [sys.executable, "-c", _COMPRESS, str(recipe), component, str(package),
                   str(Path(scratch) / "out.mlpackage")]
        done = subprocess.run(command, env=env, check=True, capture_output=True, text=True, cwd=scratch)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path, help="a shipped recipe")
    parser.add_argument("component", help="the component to compress, e.g. language_model or unet")
    parser.add_argument("--package", type=Path, required=True,
                        help="the converted component: made here first when it does not exist")
    parser.add_argument("--baseline", type=Path, required=True, help="another tree of this project, the baseline")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    scheme = load_recipe(args.recipe).compression.for_component(args.component)
    if scheme.is_none:
        raise SystemExit(f"{args.recipe.name} leaves {args.component} uncompressed: nothing to measure")
    if scheme.palettize and scheme.palettize.mixed and scheme.palettize.mixed.recipe is None:
        raise SystemExit(f"{args.recipe.name} allocates {args.component}'s bits from an analysis: see mixed_bit.py")
    package = args.package.resolve()
    with tempfile.TemporaryDirectory(prefix="compress-stage-recipe-") as work:
        random = random_recipe(args.recipe, ROOT / "configs" / CONFIGS[args.recipe.stem], ["original"], Path(work))
        if not package.exists():
            print(f"converting {args.component} to {package}", file=sys.stderr)
            convert_once(random, args.component, package)
        runs: dict[str, list[dict]] = {"baseline": [], "this tree": []}
        for round_number in range(args.rounds):
            for name, tree in (("baseline", args.baseline.resolve()), ("this tree", None)):
                runs[name].append(compress_once(random, args.component, package, tree))
                run = runs[name][-1]
                print(f"round {round_number + 1}: {name} {run['seconds']:.1f} s, {run['anonymous'] / GB:.2f} GB",
                      file=sys.stderr)

    before = statistics.median(run["seconds"] for run in runs["baseline"])
    before_memory = max(run["anonymous"] for run in runs["baseline"])
    print(f"\n{machine()}; {args.recipe.name}, {args.component}, {args.rounds} interleaved rounds "
          "(wall: median; memory: the highest round)\n")
    print("| tree | compress (s), each round | median (s) | x baseline | peak anonymous (GB) | x baseline "
          "| peak RSS (GB) | package hash |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, measured in runs.items():
        rounds = ", ".join(f"{run['seconds']:.1f}" for run in measured)
        median = statistics.median(run["seconds"] for run in measured)
        anonymous = max(run["anonymous"] for run in measured)
        rss = max(run["rss"] for run in measured)
        hashes = ", ".join(sorted({run["hash"] for run in measured}))
        print(f"| {name} | {rounds} | {median:.1f} | {median / before:.2f} | {anonymous / GB:.2f} "
              f"| {anonymous / before_memory:.2f} | {rss / GB:.2f} | {hashes} |")


if __name__ == "__main__":
    main()
