"""Run an external tool (git, xcrun, sysctl) and turn its failure into one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

from publisher.errors import PublisherError


def run_tool(command: list[str], cwd: Path | None = None) -> str:
    """Run a tool and return its stdout; a failure becomes one line naming the command and its error."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PublisherError(f"{command[0]} is not installed or not on PATH") from None
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise PublisherError(f"`{' '.join(command[:3])}` failed: {reason}")
    return done.stdout
