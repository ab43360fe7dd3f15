"""The command line as a newcomer meets it: every argument explained, flags only where they act, bad
input as one line with exit 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from publisher.cli import build_parser, main
from tests.conftest import DEMO_RECIPE, ROOT

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


HUB_RECIPE = ROOT / "recipes" / "stable-diffusion-v1-5.yaml"


def test_a_hub_source_with_the_hub_unreachable_is_one_line_and_exit_4(tmp_path: Path):
    """No network: one line saying so, at once, instead of the client's retries and a misleading last line."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "COREML_PUBLISHER_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "publisher", "publish", str(HUB_RECIPE), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 4, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot reach the Hub at"), result.stderr
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stderr
    assert "Retry" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_quiet_publish_prints_its_result_and_nothing_else(tmp_path: Path):
    """-q keeps errors and final results: the folder a publish leaves is its result. Nothing else is
    printed, by the publisher or by the conversion's process (its libraries' import-time warnings)."""
    recipe = tmp_path / "recipe.yaml"
    text = DEMO_RECIPE.read_text().replace("path: tiny-sd", f"path: {DEMO_RECIPE.parent / 'tiny-sd'}")
    text = text[:text.index("compression:")] + "parity:\n  image_steps: 0\n"
    recipe.write_text(text.replace("components: [text_encoder, unet, vae_decoder, vae_encoder]",
                                   "components: [text_encoder]"))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "publisher", "publish", str(recipe), "--out", str(out), "-q"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"published folder ready: {out}\n"
    assert result.stderr == ""


def test_a_bad_recipe_is_reported_before_the_heavy_imports(tmp_path: Path):
    """validate runs first: a bad recipe costs no torch or coremltools import (seconds each)."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(DEMO_RECIPE.read_text().replace("nbits: 6", "nbits: 5", 1))
    probe = ("import sys; from publisher.cli import main; "
             f"code = main(['publish', {str(recipe)!r}, '--out', {str(tmp_path / 'out')!r}]); "
             "print(code, 'coremltools' in sys.modules, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
