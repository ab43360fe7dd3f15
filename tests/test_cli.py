"""The command line as a newcomer meets it: every argument explained, flags only where they act, bad
input as one line with exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from publisher.cli import build_parser, main
from tests.conftest import DEMO_RECIPE

# Commands whose work narrates through coremltools' own progress: `--verbose` shows it.
VERBOSE_COMMANDS = {"publish", "bench-device"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_argument_has_help(command: str):
    parser = _subcommands()[command]
    missing = [action.dest for action in parser._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_verbose_only_where_it_shows_something(command: str):
    flags = {flag for action in _subcommands()[command]._actions for flag in action.option_strings}
    assert ("--verbose" in flags) == (command in VERBOSE_COMMANDS)


def test_out_naming_a_file_is_bad_input(tmp_path: Path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert main(["publish", str(DEMO_RECIPE), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.txt exists and is not a coreml-publisher output" in err
    assert out.read_text() == "mine"


def test_a_closed_pipe_is_not_a_traceback():
    """`publisher plan RECIPE | head -1`: the reader stops early."""
    command = f"{sys.executable} -m publisher plan {DEMO_RECIPE} | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.stdout.startswith("recipe")
