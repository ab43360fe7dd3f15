"""Chunk: split a UNet package in two, as Apple's iOS consumers expect of UNets above ~6 bits.

coremltools' ``bisect_model`` cuts the program where the weights are halved; the first chunk's
outputs that the second needs become the second's inputs, alongside the original inputs it reads.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import coremltools as ct

from publisher.components import CHUNKS, whole_component
from publisher.errors import PublisherError


def chains(packages: Mapping[str, Path]) -> dict[str, tuple[Path, ...]]:
    """Packages by component, a chunked component's chunks gathered under its own name in run order:
    what parity runs for each component."""
    grouped: dict[str, tuple[Path, ...]] = {}
    for component in sorted(packages):  # chunk1 before chunk2
        whole = whole_component(component)
        grouped[whole] = (*grouped.get(whole, ()), packages[component])
    return {component: grouped[component] for component in dict.fromkeys(map(whole_component, packages))}


def chunk_package(package: Path, out: Path) -> tuple[Path, Path]:
    """Split ``package`` into ``out/chunk1.mlpackage`` and ``out/chunk2.mlpackage``."""
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        # Checking the chunks against the whole needs Core ML's runtime (macOS); the parity stage
        # runs the chained chunks through the executor instead.
        ct.models.utils.bisect_model(str(package), scratch, check_output_correctness=False)
        chunks = []
        for chunk in CHUNKS:
            made = Path(scratch) / f"{package.stem}_{chunk}.mlpackage"
            if not made.is_dir():
                raise PublisherError(f"coremltools' bisect_model did not write {made.name} for {package}")
            chunks.append(Path(shutil.move(made, out / f"{chunk}.mlpackage")))
    return chunks[0], chunks[1]
