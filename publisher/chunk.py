"""Chunk: split a UNet package in two, as Apple's iOS consumers expect of UNets above ~6 bits.

coremltools' ``bisect_model`` cuts the program where the weights are halved; the first chunk's
outputs that the second needs become the second's inputs, alongside the original inputs it reads.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from publisher.errors import PublisherError

CHUNKS = ("chunk1", "chunk2")


def chunk_names(component: str) -> tuple[str, ...]:
    """Apple's component names for the chunks: ``unet_chunk1``, ``unet_chunk2``."""
    return tuple(f"{component}_{chunk}" for chunk in CHUNKS)


def whole_component(component: str) -> str:
    """``unet`` for ``unet_chunk1`` and ``unet_chunk2``; any other component for itself."""
    for chunk in CHUNKS:
        if component.endswith(f"_{chunk}"):
            return component.removesuffix(f"_{chunk}")
    return component


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
    import coremltools as ct

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
