"""Shared fixtures: the demo recipe is published once per session and inspected by many tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep the test log readable: coremltools and tqdm narrate every conversion otherwise.
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "recipes" / "examples" / "tiny-sd-palettized.yaml"
TINY_SOURCE = ROOT / "recipes" / "examples" / "tiny-sd"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Tests never read or fill the user's stage cache; subprocesses inherit the variable."""
    root = tmp_path_factory.mktemp("stage-cache")
    os.environ["COREML_PUBLISHER_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def demo_output(tmp_path_factory) -> Path:
    """The demo recipe published end to end (about a minute on two cores)."""
    from publisher.pipeline import publish

    out = tmp_path_factory.mktemp("demo") / "tiny-sd-palettized"
    publish(DEMO_RECIPE, out, quiet=True)
    return out
