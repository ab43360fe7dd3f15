"""Whole publishes of a small recipe (the demo's tiny SD pipeline by default): this tree against another.

At this size a publish is mostly process starts and library imports, which is what the test suite and
the README's demo wait on. Each round publishes with this tree and with the baseline tree
(`--baseline TREE`, a checkout of another commit put first on PYTHONPATH), interleaved, each from an
empty stage cache and without upload, and the table gives the median wall time and its ratio:

    flock /tmp/coreml-publisher-heavy.lock .venv/bin/python benchmarks/small_publish.py \
        --baseline /tmp/before-tree --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from random_sources import ROOT, machine

DEMO = ROOT / "recipes" / "examples" / "tiny-sd-palettized.yaml"


def publish_seconds(recipe: Path, tree: Path | None) -> float:
    """One `publisher publish -q` of ``recipe`` from an empty cache, with ``tree``'s package when given."""
    with tempfile.TemporaryDirectory(prefix="small-publish-") as scratch:
        env = {**os.environ, "COREML_PUBLISHER_CACHE": str(Path(scratch) / "cache")}
        if tree is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "publisher", "publish", "-q", str(recipe), "--out", str(Path(scratch) / "out")]
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, cwd=scratch)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=DEMO, help="a small recipe (default: the demo's)")
    parser.add_argument("--baseline", type=Path, required=True, help="another tree of this project, the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    times: dict[str, list[float]] = {"baseline": [], "this tree": []}
    for round_number in range(args.rounds):
        for name, tree in (("baseline", args.baseline.resolve()), ("this tree", None)):
            times[name].append(publish_seconds(args.recipe.resolve(), tree))
            print(f"round {round_number + 1}: {name} {times[name][-1]:.1f} s", file=sys.stderr)

    before = statistics.median(times["baseline"])
    print(f"\n{machine()}; {args.recipe.name}, {args.rounds} interleaved rounds, medians\n")
    print("| tree | publish (s), each round | median (s) | x baseline |")
    print("|---|---|---:|---:|")
    for name, seconds in times.items():
        rounds = ", ".join(f"{value:.1f}" for value in seconds)
        median = statistics.median(seconds)
        print(f"| {name} | {rounds} | {median:.1f} | {median / before:.2f} |")


if __name__ == "__main__":
    main()
