"""Interrupted runs resume from the stage cache, and reruns publish the same bytes.

One chain of runs is killed with SIGKILL at seeded random moments inside conversion, compression,
parity and assembly, then rerun to completion; the result is compared with the session's
uninterrupted demo publish, which used its own cache.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from publisher.cache import StageCache
from tests.conftest import DEMO_RECIPE, ROOT

# (line that must appear first, the stage that then runs and gets killed). Each line comes where a
# run goes on in one thread: the other components' conversions run beside the UNet's compression, in
# a timing-dependent order, and are joined before the text encoder is compressed.
KILL_POINTS = [
    ("convert original/unet", "the UNet's compression and the text encoder's conversion beside it"),
    ("compress original/text_encoder", "compression of the VAE decoder"),
    ("compress original/vae_decoder", "compression of the VAE encoder"),
    ("parity original/vae_encoder", "UNet parity"),
    ("images original", "assembly"),
]


def _publish(out: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "publisher", "publish", str(DEMO_RECIPE), "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COREML_PUBLISHER_CACHE": str(cache)},
    )


def _run_until_killed(out: Path, cache: Path, trigger: str, delay: float) -> tuple[list[str], int]:
    process = _publish(out, cache)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        if line.startswith("✓") and trigger in line:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            break
    return lines, process.wait(timeout=60)


def _complete_entries(cache: Path) -> int:
    # A scratch folder killed just before its rename holds an entry.json too: only whole entries count.
    return sum(1 for entry in StageCache(cache).entries() if entry.problem is None)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_runs_resume_and_match_an_uninterrupted_run(demo_output: Path, tmp_path: Path):
    cache, out = tmp_path / "cache", tmp_path / "out" / "tiny"
    rng = random.Random(20261126)
    for trigger, inside in KILL_POINTS:
        finished_before = _complete_entries(cache)
        lines, returncode = _run_until_killed(out, cache, trigger, delay=rng.uniform(0.0, 0.6))
        if returncode == 0 or (inside == "assembly" and out.exists()):
            # Assembly takes a fraction of a second and ends in one rename: the run may finish, or
            # be killed after the rename, before the signal lands. Either way the output is whole.
            assert inside == "assembly" and (out / "publish_report.json").is_file()
        else:
            assert returncode == -signal.SIGKILL
            assert not out.exists(), f"a run killed during {inside} left {out}"
        cached_lines = [line for line in lines if line.endswith("(cached)")]
        # Every stage finished by the earlier runs was reused, none was recomputed.
        assert len(cached_lines) == finished_before, lines
        assert [entry.problem for entry in StageCache(cache).entries() if entry.problem] == []

    finished = _complete_entries(cache)
    final = _publish(out, cache)
    output = final.communicate(timeout=600)[0]
    assert final.returncode == 0, output
    assert output.count("(cached)") == finished
    # Nothing half-written is left beside the output either.
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]

    resumed, reference = _files(out), _files(demo_output)
    assert resumed.keys() == reference.keys()
    differing = sorted(name for name in resumed if resumed[name] != reference[name])
    # The packages, images, tokenizer and recipe are byte-identical. The report and the card carry
    # wall times and peak memory, measured anew by whichever run computed each stage.
    assert set(differing) <= {"publish_report.json", "README.md"}, differing
    resumed_report = json.loads(resumed["publish_report.json"])
    reference_report = json.loads(reference["publish_report.json"])
    for report in (resumed_report, reference_report):
        report.pop("stages")
        for variant in report["variants"]:
            for component in variant["components"]:
                component.pop("convert_seconds"), component.pop("compress_seconds")
    assert resumed_report == reference_report


def test_rerun_with_a_warm_cache_recomputes_nothing_and_publishes_the_same_bytes(demo_output: Path, tmp_path):
    """The session cache already holds every stage of the demo: a second publish is all hits."""
    out = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "publisher", "publish", str(DEMO_RECIPE), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    stage_lines = [line for line in result.stderr.splitlines() if line[:1] in "✓↷"]
    recomputed = [line for line in stage_lines if line.startswith("✓")
                  and not line.startswith(("✓ load source", "✓ render card", "✓ assemble"))]
    assert recomputed == []
    assert _files(out) == _files(demo_output)


def test_force_recomputes_the_named_stage_only(tmp_path, isolated_cache, demo_output):
    cache = StageCache(isolated_cache, force=frozenset({"parity"}))
    assert cache.lookup("parity", "x") is None
    convert_entries = [entry for entry in cache.entries() if entry.stage == "convert"]
    assert convert_entries and cache.lookup("convert", convert_entries[0].key) == convert_entries[0].path


def test_cache_cli_lists_and_prunes(tmp_path):
    root = tmp_path / "cache"
    cache = StageCache(root)
    with cache.store("convert", "abc", "original/unet") as folder:
        (folder / "blob").write_bytes(b"x" * 2048)
    (root / "convert" / ".partial-write").mkdir()
    env = {**os.environ, "COREML_PUBLISHER_CACHE": str(root)}
    listed = subprocess.run([sys.executable, "-m", "publisher", "cache", "ls"], capture_output=True, text=True,
                            env=env, check=True)
    assert "convert" in listed.stdout and "original/unet" in listed.stdout and "1 entries" in listed.stdout
    pruned = subprocess.run([sys.executable, "-m", "publisher", "cache", "prune"], capture_output=True, text=True,
                            env=env, check=True)
    assert pruned.stdout.startswith("removed 1 entries")
    assert list((root / "convert").iterdir()) == []


def test_interrupted_store_leaves_no_entry(tmp_path):
    cache = StageCache(tmp_path)
    with pytest.raises(RuntimeError), cache.store("compress", "k", "label") as folder:
        (folder / "half").write_text("written")
        raise RuntimeError("killed")
    assert cache.lookup("compress", "k") is None
    assert list((tmp_path / "compress").iterdir()) == []
