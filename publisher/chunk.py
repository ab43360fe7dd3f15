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
    for chunk_path in chunks:
        keep_description(package, chunk_path)
    return chunks[0], chunks[1]


def keep_description(whole: Path, chunk: Path) -> None:
    """Give a chunk its whole package's metadata (author, license, version, our version key) and the
    descriptions of the features they share: ``bisect_model`` writes the chunks' specs without them."""
    from coremltools.proto import Model_pb2

    def spec_file(package: Path) -> Path:
        return package / "Data" / "com.apple.CoreML" / "model.mlmodel"

    source, spec = Model_pb2.Model(), Model_pb2.Model()
    source.ParseFromString(spec_file(whole).read_bytes())
    spec.ParseFromString(spec_file(chunk).read_bytes())
    spec.description.metadata.CopyFrom(source.description.metadata)
    described = {feature.name: feature.shortDescription
                 for feature in (*source.description.input, *source.description.output)}
    for feature in (*spec.description.input, *spec.description.output):
        feature.shortDescription = described.get(feature.name, feature.shortDescription)
    spec_file(chunk).write_bytes(spec.SerializeToString())
