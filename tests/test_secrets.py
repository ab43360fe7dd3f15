"""Secret hygiene: a real publish + push with a sentinel token leaves it nowhere.

The demo is published and pushed to the loopback Hub in a subprocess, as a user would run it, once
with a valid sentinel token and once with a rejected one; every file written, the stage cache, the
captured output and the error message are searched for the token.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import DEMO_RECIPE
from tests.hub.server import TokenInfo

pytest_plugins = ["tests.hub.fixtures"]

SENTINEL = "hf_SENTINELpublisherSECRET7h8j9k0l"
REJECTED = "hf_SENTINELrejectedSECRET1a2s3d4f"
NAMESPACE = "coreml-publisher"  # the demo recipe's target namespace


def _run(args: list[str], token: str, endpoint: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_TOKEN": token, "HF_ENDPOINT": endpoint}
    return subprocess.run([sys.executable, "-m", "publisher", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=900)


def _files_containing(root: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(path) for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


def test_token_never_leaks_into_outputs_logs_or_errors(hub_server, tmp_path: Path, isolated_cache: Path):
    hub_server.tokens[SENTINEL] = TokenInfo(NAMESPACE, "write")
    hub_server.namespaces.add(NAMESPACE)
    out = tmp_path / "published"

    pushed = _run(["publish", str(DEMO_RECIPE), "--out", str(out), "--push"], SENTINEL, hub_server.url, tmp_path)
    assert pushed.returncode == 0, pushed.stderr
    assert "published" in pushed.stdout and "verified" in pushed.stdout
    assert hub_server.snapshot(f"{NAMESPACE}/tiny-sd-palettized")  # it really reached the Hub

    rejected = _run(["push", str(out), "--repo", f"{NAMESPACE}/other"], REJECTED, hub_server.url, tmp_path)
    assert rejected.returncode == 4
    assert rejected.stderr.startswith("error: ") and rejected.stderr.count("\n") == 1

    for secret in (SENTINEL, REJECTED):
        for stream in (pushed.stdout, pushed.stderr, rejected.stdout, rejected.stderr):
            assert secret not in stream
        assert _files_containing(out, secret) == []
        assert _files_containing(isolated_cache, secret) == []
        assert _files_containing(tmp_path, secret) == []
    card = (out / "README.md").read_text()
    assert "hf_" not in card
