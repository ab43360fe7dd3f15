"""A content-addressed cache of stage outputs, so an interrupted or repeated run resumes.

Each entry's key is the hash of exactly what determines the output: the relevant part of the
recipe, the hashes of the input artifacts and the tool versions. An entry is written into a hidden
scratch folder and renamed into place when complete, and an entry is removed by renaming it to a
hidden name first, so a run killed at any point never leaves an entry that looks finished. Hidden
folders carry the id of the process that made them: the next run (or ``cache prune``) deletes those
whose process is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from publisher.report import tool_versions

STAGES = ("source", "convert", "analysis", "compress", "chunk", "reference", "parity", "images")
META = "entry.json"
SHARED_MEMORY = Path("/dev/shm")
# multiprocessing names its semaphores /mp-<random>; joblib's loky, once imported (coremltools imports
# it through scikit-learn), renames every SemLock of the process /loky-<pid>-<random>. A lock of a spawn or
# forkserver context (the conversion's process pool, tqdm's lock) is not unlinked until its process ends:
# a run killed together with its resource tracker (a cancelled CI job kills the process group) leaves them.
SEMAPHORES = ("sem.mp-*", "sem.loky-*")


def default_root() -> Path:
    """``$COREML_PUBLISHER_CACHE``, else the XDG cache folder (like huggingface_hub's own cache)."""
    configured = os.environ.get("COREML_PUBLISHER_CACHE")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "coreml-publisher"


def hash_path(path: Path) -> str:
    """sha256 over a file, or over a folder's relative paths and file contents in sorted order."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def make_key(stage: str, parts: dict[str, Any]) -> str:
    canonical = json.dumps({"stage": stage, "tools": tool_versions(), **parts}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _private_name(key: str) -> str:
    return f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _owner_alive(folder: Path) -> bool:
    """Whether the process named in a hidden folder's name (see :func:`_private_name`) still runs.

    A pid is reused, and in a CI container every job's publisher may get the same one: the owner
    is the process with that pid only if it started before the folder was made or renamed.
    """
    parts = folder.name.split(".")
    if len(parts) < 4 or not parts[2].isdigit():
        return False  # not named by this cache: nobody's
    try:
        started = psutil.Process(int(parts[2])).create_time()
        touched = folder.lstat().st_ctime
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, FileNotFoundError):
        return True  # someone else's, or already gone: not ours to delete
    # create_time is derived from boot time and clock ticks: allow for its rounding.
    return started <= touched + 1


def _manifest(folder: Path) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): path.stat().st_size
            for path in sorted(folder.rglob("*")) if path.is_file() and path != folder / META}


def _read_meta(entry: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("files"), dict) else None


def _problem(entry: Path, info: dict[str, Any] | None) -> str | None:
    """What is wrong with an entry, or None when its files are those recorded when it was stored.

    Sizes, not hashes: what breaks an entry is an interrupted removal, a full disk or a hand that
    deleted or truncated something, all of which change a size or a name; hashing the gigabytes of
    a UNet on every lookup would cost more than most stages save.
    """
    if info is None:
        return f"{META} is missing, unreadable or from an older version"
    found, recorded = _manifest(entry), info["files"]
    for name in sorted(recorded.keys() | found.keys()):
        if name not in found:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was not stored with it"
        if found[name] != recorded[name]:
            return f"{name} has {found[name]} bytes, not {recorded[name]}"
    return None


def _remove_leaked_semaphores() -> None:
    """Delete multiprocessing's named semaphores (see ``SEMAPHORES``) that no process maps.

    A process maps every semaphore it opened until it closes it, and a semaphore's name is only
    ever opened by processes handed it by one that holds it: one that nobody maps is unreachable.
    Only this user's semaphores are considered (``/dev/shm`` is sticky, and this user's processes
    are the ones whose maps can be read).
    """
    if not SHARED_MEMORY.is_dir():
        return  # not Linux: named semaphores live elsewhere, and this cleanup is not needed there
    user = os.geteuid()
    candidates = {}
    for path in (path for pattern in SEMAPHORES for path in SHARED_MEMORY.glob(pattern)):
        try:
            status = path.lstat()
        except FileNotFoundError:
            continue
        if status.st_uid == user:
            candidates[path] = status.st_ino
    if not candidates:
        return
    # By inode: glibc maps a semaphore under a temporary name before it links it to its own, so the
    # maps show "/dev/shm/sem.XXXXXX (deleted)".
    mapped = set()
    for pid in psutil.pids():
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # gone, or another user's
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(f"{SHARED_MEMORY}/"):
                mapped.add(int(fields[4]))
    for path, inode in candidates.items():
        if inode not in mapped:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    path: Path
    created: float
    size: int
    label: str
    recipe: str | None
    """The recipe whose run made the entry (any recipe with the same key reuses it)."""
    problem: str | None
    """Why the entry cannot be reused (see :func:`_problem`), None when it is whole."""


class StageCache:
    """Finished stage outputs under ``root/<stage>/<key>/``; ``force`` names stages to recompute."""

    def __init__(self, root: Path | None = None, *, force: frozenset[str] = frozenset()):
        self.root = root or default_root()
        self.force = force
        self._cleaned = False

    def lookup(self, stage: str, key: str, *, on_broken: Callable[[str], None] | None = None) -> Path | None:
        """The finished entry of ``stage`` under ``key``, or None (also when forced or broken).

        Args:
            stage: one of ``STAGES``.
            key: the entry's key (see :func:`make_key`).
            on_broken: called with what is wrong when an entry is there but cannot be reused; the
                caller recomputes it, and storing it replaces the broken one.

        Returns:
            The entry's folder, or None.
        """
        if stage in self.force or "all" in self.force:
            return None
        self._clean_once()
        entry = self.root / stage / key
        if not entry.is_dir():
            return None
        problem = _problem(entry, _read_meta(entry))
        if problem is not None:
            if on_broken is not None:
                on_broken(problem)
            return None
        return entry

    @contextmanager
    def store(self, stage: str, key: str, label: str, *, recipe: str | None = None) -> Iterator[Path]:
        """Yield a private folder to write the entry into; publish it atomically on success.

        Args:
            stage: one of ``STAGES``.
            key: the entry's key (see :func:`make_key`).
            label: what the entry holds, for ``cache ls``.
            recipe: the name of the recipe being run, for ``cache ls``.

        Yields:
            The folder to write the entry's files into.
        """
        self._clean_once()
        final = self.root / stage / key
        final.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}.{os.getpid()}.", dir=final.parent))
        retired = None
        try:
            yield scratch
            meta = {"stage": stage, "label": label, "recipe": recipe, "created": time.time(),
                    "files": _manifest(scratch)}
            (scratch / META).write_text(json.dumps(meta))
            if final.exists():  # recomputed (--force, or broken): the old entry goes in one rename too
                retired = final.rename(final.with_name(_private_name(key)))
            scratch.rename(final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """Every entry, whole or broken; hidden folders (writes and removals under way) are not entries.

        Returns:
            The entries, by stage then key.
        """
        found = []
        for stage in STAGES:
            for entry in sorted((self.root / stage).glob("[!.]*")):
                info = _read_meta(entry)
                known = info or {}
                size = sum(file.stat().st_size for file in entry.rglob("*") if file.is_file())
                found.append(Entry(stage, entry.name, entry, known.get("created", entry.stat().st_mtime), size,
                                   known.get("label", "?"), known.get("recipe"), _problem(entry, info)))
        return found

    def prune(self, *, older_than_days: float | None = None) -> tuple[int, int]:
        """Delete entries (all, or broken ones and those older than the given age), then what killed
        runs left: their partial writes and removals, and their semaphores.

        Args:
            older_than_days: keep whole entries younger than this; None deletes every entry.

        Returns:
            (entries removed, bytes freed).
        """
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        removed = freed = 0
        for entry in self.entries():
            if cutoff is None or entry.created < cutoff or entry.problem is not None:
                self._remove(entry.path)
                removed, freed = removed + 1, freed + entry.size
        self._remove_abandoned()
        return removed, freed

    def _remove_abandoned(self) -> None:
        """Delete the hidden folders whose process is gone, and semaphores that nobody holds.

        A live run's are kept: its scratch folders name its process, and its semaphores are mapped.
        """
        for stage in STAGES:
            for folder in (self.root / stage).glob(".*"):
                if not _owner_alive(folder):
                    shutil.rmtree(folder, ignore_errors=True)
        _remove_leaked_semaphores()

    def _clean_once(self) -> None:
        # Once per run, on first use: a run that finds everything cached still cleans up after a killed one.
        if not self._cleaned:
            self._cleaned = True
            self._remove_abandoned()

    def _remove(self, entry: Path) -> None:
        """Take an entry out of use in one rename, then delete it: a kill while deleting leaves a
        hidden folder, never an entry that looks finished without its content."""
        retired = entry.with_name(_private_name(entry.name))
        try:
            entry.rename(retired)
        except FileNotFoundError:  # another prune got there first
            return
        shutil.rmtree(retired, ignore_errors=True)
