"""A content-addressed cache of stage outputs, so an interrupted or repeated run resumes.

Each entry's key is the hash of exactly what determines the output: the relevant part of the
recipe, the hashes of the input artifacts and the tool versions. An entry is written into a
temporary folder and renamed into place when complete, so a run killed mid-write never leaves an
entry that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from publisher.report import tool_versions

STAGES = ("convert", "compress", "chunk", "reference", "parity", "images")
META = "entry.json"


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


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    path: Path
    created: float
    size: int
    label: str


class StageCache:
    """Finished stage outputs under ``root/<stage>/<key>/``; ``force`` names stages to recompute."""

    def __init__(self, root: Path | None = None, *, force: frozenset[str] = frozenset(), enabled: bool = True):
        self.root = root or default_root()
        self.force = force
        self.enabled = enabled

    def lookup(self, stage: str, key: str) -> Path | None:
        if not self.enabled or stage in self.force or "all" in self.force:
            return None
        entry = self.root / stage / key
        return entry if (entry / META).is_file() else None

    @contextmanager
    def store(self, stage: str, key: str, label: str) -> Iterator[Path]:
        """Yield a private folder to write the entry into; publish it atomically on success."""
        if not self.enabled:
            with tempfile.TemporaryDirectory(prefix=f"{stage}-") as scratch:
                yield Path(scratch)
            return
        final = self.root / stage / key
        final.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            yield scratch
            (scratch / META).write_text(json.dumps({"stage": stage, "label": label, "created": time.time()}))
            if final.exists():  # recomputed with --force: replace the old entry
                shutil.rmtree(final)
            scratch.rename(final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def entries(self) -> list[Entry]:
        found = []
        for stage in STAGES:
            for entry in sorted((self.root / stage).glob("*")):
                meta = entry / META
                if not meta.is_file():
                    continue
                info = json.loads(meta.read_text())
                size = sum(file.stat().st_size for file in entry.rglob("*") if file.is_file())
                found.append(Entry(stage, entry.name, entry, info["created"], size, info["label"]))
        return found

    def prune(self, *, older_than_days: float | None = None) -> tuple[int, int]:
        """Delete entries (all, or those older than the given age) and abandoned partial writes.

        Returns (entries removed, bytes freed).
        """
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        removed = freed = 0
        for entry in self.entries():
            if cutoff is None or entry.created < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)
                removed, freed = removed + 1, freed + entry.size
        for stage in STAGES:
            for partial in (self.root / stage).glob(".*"):
                shutil.rmtree(partial, ignore_errors=True)
        return removed, freed
