"""The stage cache survives kills at any point, detects broken entries, and keys every input.

Kill points are made deterministic by running the cache in a child process whose ``shutil.rmtree``
or ``Path.rename`` sends it SIGKILL at the chosen moment: no ``finally`` or cleanup runs, as in a
real ``kill -9``.
"""

from __future__ import annotations

import _multiprocessing
import json
import multiprocessing.synchronize
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from publisher import cli
from publisher.cache import META, StageCache
from tests.conftest import DEMO_RECIPE, ROOT, TINY_SOURCE

OLD, NEW = b"old content " * 100, b"new content " * 100
SHARED_MEMORY = Path("/dev/shm")


def _store(cache: StageCache, content: bytes, key: str = "k") -> Path:
    with cache.store("convert", key, "original/unet", recipe="tiny") as folder:
        (folder / "model.mlpackage" / "Data").mkdir(parents=True)
        (folder / "model.mlpackage" / "Data" / "weight.bin").write_bytes(content)
        (folder / "meta.json").write_text("{}")
    return cache.root / "convert" / key


def _killed_during(root: Path, action: str, kill_in: str) -> None:
    """Run ``action`` on the cache at ``root`` in a child that kills itself with SIGKILL inside
    ``kill_in`` (``rmtree``, after deleting one file, or ``rename``)."""
    script = textwrap.dedent(f"""
        import os, pathlib, shutil, signal
        from publisher.cache import StageCache
        from tests.test_cache import NEW, _store

        def rmtree(path, *args, **kwargs):
            next(p for p in pathlib.Path(path).rglob("*") if p.is_file() and p.name != {META!r}).unlink()
            os.kill(os.getpid(), signal.SIGKILL)

        def rename(self, target):
            os.kill(os.getpid(), signal.SIGKILL)

        cache = StageCache(pathlib.Path({str(root)!r}))
        if {kill_in!r} == "rmtree":
            shutil.rmtree = rmtree
        else:
            pathlib.Path.rename = rename
        {action}
    """)
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr


def _listed(root: Path, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COREML_PUBLISHER_CACHE", str(root))
    assert cli.main(["cache", "ls"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("action", ["cache.prune()", "_store(cache, NEW)"], ids=["prune", "force"])
def test_a_kill_while_an_entry_is_removed_never_leaves_an_entry_without_content(tmp_path, action, capsys,
                                                                                 monkeypatch):
    entry = _store(StageCache(tmp_path), OLD)
    _killed_during(tmp_path, action, kill_in="rmtree")

    found = StageCache(tmp_path).lookup("convert", "k")
    if action == "cache.prune()":
        assert found is None
    else:  # the new entry was in place before the old one's files were deleted
        assert found == entry and (entry / "model.mlpackage" / "Data" / "weight.bin").read_bytes() == NEW
    listed = _listed(tmp_path, capsys, monkeypatch)
    assert f"{1 if found else 0} entries" in listed, listed
    # What the killed run was deleting is hidden, and the next prune finishes the job.
    StageCache(tmp_path).prune()
    assert list((tmp_path / "convert").iterdir()) == []


def test_a_kill_just_before_an_entry_is_published_leaves_a_miss_that_ls_does_not_list(tmp_path, capsys,
                                                                                    monkeypatch):
    _killed_during(tmp_path, "_store(cache, NEW)", kill_in="rename")
    (scratch,) = (tmp_path / "convert").iterdir()
    assert (scratch / META).is_file()  # complete but for its rename: still not an entry

    assert StageCache(tmp_path).lookup("convert", "k") is None
    assert "0 entries" in _listed(tmp_path, capsys, monkeypatch)
    StageCache(tmp_path).prune()
    assert list((tmp_path / "convert").iterdir()) == []


def test_the_next_run_removes_abandoned_writes_but_not_a_live_runs(tmp_path):
    _killed_during(tmp_path, "_store(cache, NEW)", kill_in="rename")
    cache = StageCache(tmp_path)
    with cache.store("convert", "live", "original/vae_decoder") as folder:
        (folder / "blob").write_bytes(b"x")
        # Another run starts meanwhile: the dead run's write goes, this live one stays.
        assert StageCache(tmp_path).lookup("convert", "k") is None
        assert [p.name for p in (tmp_path / "convert").iterdir()] == [folder.name]
        StageCache(tmp_path).prune()
        assert folder.is_dir()
    assert cache.lookup("convert", "live") == tmp_path / "convert" / "live"


def _truncate(entry: Path) -> None:
    weight = entry / "model.mlpackage" / "Data" / "weight.bin"
    weight.write_bytes(weight.read_bytes()[:-1])


BREAKAGES = {
    "truncated": (_truncate, "weight.bin"),
    "removed": (lambda entry: (entry / "meta.json").unlink(), "meta.json"),
    "added": (lambda entry: (entry / "stray").write_text("x"), "stray"),
    "meta garbled": (lambda entry: (entry / META).write_text('{"files": '), META),
    "meta removed": (lambda entry: (entry / META).unlink(), META),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_entry_is_a_miss_and_says_why(tmp_path, breakage, capsys, monkeypatch):
    break_entry, named = BREAKAGES[breakage]
    cache = StageCache(tmp_path)
    entry = _store(cache, OLD)
    assert cache.lookup("convert", "k") == entry
    break_entry(entry)

    assert cache.lookup("convert", "k") is None
    problems = []
    assert cache.lookup("convert", "k", on_broken=problems.append) is None
    assert len(problems) == 1 and named in problems[0], problems
    assert "broken" in _listed(tmp_path, capsys, monkeypatch)
    # Recomputing replaces it with a whole entry.
    assert _store(cache, NEW) == entry and cache.lookup("convert", "k") == entry


def test_ls_names_each_entrys_recipe(tmp_path, capsys, monkeypatch):
    _store(StageCache(tmp_path), OLD)
    listed = _listed(tmp_path, capsys, monkeypatch)
    assert "original/unet" in listed and "tiny" in listed.split("original/unet")[1], listed


# ---------------------------------------------------------------------------------------------
# Semaphores left in /dev/shm


needs_shm = pytest.mark.skipif(not SHARED_MEMORY.is_dir(), reason="no /dev/shm on this system")


def _named_semaphore() -> tuple[_multiprocessing.SemLock, Path]:
    """A semaphore named as multiprocessing names them, and not unlinked: what a spawn-context lock
    holds until its process ends, and leaves behind when the process and its resource tracker are
    killed together (a cancelled CI job kills the whole process group)."""
    name = multiprocessing.synchronize.SemLock._make_name()
    return _multiprocessing.SemLock(1, 1, 1, name, False), SHARED_MEMORY / f"sem.{name.lstrip('/')}"


@needs_shm
@pytest.mark.parametrize("cleaner", ["cache prune", "the next run"])
def test_semaphores_of_killed_runs_are_removed_and_only_those(tmp_path, monkeypatch, cleaner):
    script = textwrap.dedent("""
        import os, signal
        from tests.test_cache import _named_semaphore
        print(_named_semaphore()[1], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    leaked = Path(child.stdout.strip())
    live, held = _named_semaphore()
    try:
        assert leaked.exists() and held.exists()
        if cleaner == "cache prune":
            monkeypatch.setenv("COREML_PUBLISHER_CACHE", str(tmp_path))
            assert cli.main(["cache", "prune"]) == 0
        else:
            assert StageCache(tmp_path).lookup("convert", "k") is None
        assert not leaked.exists()
        assert held.exists()  # still mapped by this live process
    finally:
        _multiprocessing.sem_unlink(live.name)
        leaked.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Keys: every input that reaches an entry's bytes


def _recipe(folder: Path, name: str, change: Callable[[dict], None] | None = None) -> Path:
    """The demo at its cheapest that still embeds the recipe's name in a package: one text encoder,
    palettized, no images; or the demo with ``change`` made to it."""
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["name"] = name
    recipe["source"]["path"] = str(TINY_SOURCE)
    if change is None:
        recipe["conversion"]["components"] = ["text_encoder"]
        recipe["compression"] = {"text_encoder": recipe["compression"]["text_encoder"]}
        recipe["parity"]["image_steps"] = 0
    else:
        change(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


class _Asked(Exception):
    pass


def _key_parts(tmp_path: Path, monkeypatch, change: Callable[[dict], None], stage: str, component: str | None,
               call: Callable) -> dict:
    """The key parts of the first ``stage`` entry (of ``component``, when given) that ``call(run)`` asks
    the cache for, in a run of the demo with ``change`` made to it. Every other stage is answered with
    a passing entry, and torch references are not computed: this is about keys, not their values."""
    from publisher import pipeline
    from publisher.monitor import Monitor
    from publisher.recipe import load_recipe
    from publisher.source import load_source

    recipe = load_recipe(_recipe(tmp_path / "recipes", "keyed", change))
    run = pipeline.Run(recipe, load_source(recipe, models=()), pipeline.source_identity(recipe),
                       StageCache(tmp_path / "cache"), Monitor(quiet=True), tmp_path)
    passing = tmp_path / "entry"
    passing.mkdir(exist_ok=True)
    (passing / "psnr.json").write_text('{"fp32": 100.0}')
    np.savez(passing / "images.npz")

    def cached(run, asked: str, parts: dict, label: str, produce) -> Path:
        if asked == stage and component in (None, parts.get("component")):
            raise _Asked(parts)
        return passing

    monkeypatch.setattr(pipeline, "cached", cached)
    monkeypatch.setattr(pipeline, "reference", lambda run, component: None)
    monkeypatch.setattr(pipeline, "analyse", lambda *args: None)
    with pytest.raises(_Asked) as asked:
        call(pipeline, run)
    return asked.value.args[0]


def _package(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).write_bytes(name.encode())
    return tmp_path / name


def _steps(count: int) -> Callable[[dict], None]:
    def change(recipe: dict) -> None:
        recipe["parity"]["image_steps"] = count
        recipe["compression"]["unet"] = {"palettize": {"mixed": {"target_bits": 4.5, "candidates": [2, 4, 8]}}}

    return change


def _without_vae(recipe: dict) -> None:
    recipe["conversion"]["components"] = ["text_encoder", "unet"]
    recipe["compression"] = {}


def test_a_mixed_bit_analysis_is_keyed_on_its_calibration_cases(tmp_path, monkeypatch):
    """The UNet's calibration cases are steps of the reference images' denoising: their number of
    steps changes the analysis, and so the package."""
    def compress(pipeline, run):
        package = _package(tmp_path, "converted")
        built = pipeline.BuiltComponent("unet", package, package, 0, 0.0, 0.0)
        pipeline.compress(run, run.recipe.variants[0], "unet", built)

    keys = [_key_parts(tmp_path / str(steps), monkeypatch, _steps(steps), "compress", None, compress)
            for steps in (4, 8)]
    assert keys[0] != keys[1]


def test_parity_is_keyed_on_the_cases_it_measures(tmp_path, monkeypatch):
    """Without the VAE decoder no images are drawn, and the UNet is measured on cases of its own."""
    def check(pipeline, run):
        packages = {component: (_package(tmp_path, component),) for component in run.recipe.conversion.components}
        pipeline.check_parity(run, pipeline.Build(by_variant={"original": packages}))

    keys = [_key_parts(tmp_path / str(index), monkeypatch, change, "parity", "unet", check)
            for index, change in enumerate((lambda recipe: None, _without_vae))]
    assert keys[0] != keys[1]


def test_images_are_keyed_on_the_variant_folder_they_are_saved_under(tmp_path, monkeypatch):
    def draw(pipeline, run):
        folder = run.recipe.variants[0].folder_name
        pipeline.variant_images(run, folder, {}, {}, {}, {})

    def renamed(recipe: dict) -> None:
        recipe["variants"][0]["folder"] = "renamed"

    keys = [_key_parts(tmp_path / str(index), monkeypatch, change, "images", None, draw)
            for index, change in enumerate((lambda recipe: None, renamed))]
    assert keys[0] != keys[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _without_costs(files: dict[str, bytes]) -> dict[str, object]:
    """The files but the card, with the report's measured costs left out: they are measured anew by
    whichever run computes a stage. The card renders the report."""
    kept: dict[str, object] = {name: data for name, data in files.items() if name != "README.md"}
    report = json.loads(files["publish_report.json"])
    report.pop("stages")
    for variant in report["variants"]:
        for component in variant["components"]:
            component.pop("convert_seconds"), component.pop("compress_seconds")
    kept["publish_report.json"] = report
    return kept


@pytest.fixture(scope="module")
def published_a(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(recipe folder, its cache, its output) of the cheap recipe published once as ``name-a``."""
    root = tmp_path_factory.mktemp("renamed")
    out = root / "out-a"
    from publisher.pipeline import publish

    publish(_recipe(root / "recipes", "name-a"), out, quiet=True, cache=StageCache(root / "cache"))
    return root / "recipes", root / "cache", out


def test_a_renamed_recipe_publishes_from_a_warm_cache_what_a_cold_one_does(published_a, tmp_path, capsys):
    from publisher.pipeline import publish

    recipes, warm_cache, _ = published_a
    renamed = _recipe(recipes, "name-b")
    publish(renamed, tmp_path / "warm", cache=StageCache(warm_cache))
    warm_log = capsys.readouterr().err
    publish(renamed, tmp_path / "cold", quiet=True, cache=StageCache(tmp_path / "cold-cache"))

    assert "reference text_encoder (cached)" in warm_log, warm_log  # the warm run did reuse its cache
    warm, cold = _files(tmp_path / "warm"), _files(tmp_path / "cold")
    assert any(b"name-b" in data for name, data in cold.items() if ".mlpackage/" in name)
    assert _without_costs(warm) == _without_costs(cold)


def test_a_publish_recomputes_a_broken_entry_and_publishes_the_same_bytes(published_a, tmp_path, capsys):
    from publisher.pipeline import publish

    recipes, cache_root, first = published_a
    cache = StageCache(cache_root)
    (compressed,) = [entry for entry in cache.entries() if entry.stage == "compress" and entry.recipe == "name-a"]
    weights = next(compressed.path.rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    publish(recipes / "name-a.yaml", tmp_path / "again", cache=cache)
    log = capsys.readouterr().err
    assert "compress original/text_encoder" in log and "broken" in log and "weight.bin" in log, log
    assert _without_costs(_files(tmp_path / "again")) == _without_costs(_files(first))
