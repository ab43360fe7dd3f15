"""Random-weight full-size sources for the benchmarks, built from the architecture configs in
`configs/` and cached under `build/random/` until those configs change."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "random"


def _stale(out: Path, configs: Path, marker: str) -> bool:
    stamp = max(file.stat().st_mtime for file in configs.rglob("*") if file.is_file())
    return not (out / marker).is_file() or out.stat().st_mtime < stamp


def pipeline(configs: Path) -> Path:
    """The random-weight pipeline built from ``configs``.

    Built in a child process: memory the build leaves allocated would otherwise sit in the
    benchmark's process, and in its measured peak.
    """
    out = CACHE / configs.name
    if _stale(out, configs, "model_index.json"):
        subprocess.run([sys.executable, "-m", "publisher", "synthesize", "-q", str(configs), str(out)], check=True)
    return out


def controlnet(configs: Path) -> Path:
    """A random-weight ControlNet built from ``configs/config.json``, in a child process."""
    out = CACHE / configs.name
    if _stale(out, configs, "config.json"):
        code = ("import sys, torch; from diffusers import ControlNetModel; torch.manual_seed(0); "
                "ControlNetModel.from_config(ControlNetModel.load_config(sys.argv[1])).save_pretrained(sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, str(configs), str(out)], check=True)
    return out


def language_model(configs: Path) -> Path:
    """The random-weight causal LM built from ``configs/config.json``, with the tiny family tokenizer beside it.

    The real tokenizer is not shipped (no network); the tiny one's ids are a subset of every full-size vocabulary,
    so the prompts tokenize into valid ids and the run's cost does not depend on which ids they are.
    """
    out = CACHE / configs.name
    if _stale(out, configs, "model.safetensors.index.json") and _stale(out, configs, "model.safetensors"):
        subprocess.run([sys.executable, "-m", "publisher", "synthesize", "-q", str(configs), str(out)], check=True)
        family = json.loads((configs / "config.json").read_text())["model_type"]
        tiny = ROOT / "configs" / f"tiny-{family}"
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tiny / name).is_file():
                shutil.copyfile(tiny / name, out / name)
    return out


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    cpu = models[0] if models else platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, Python {platform.python_version()}"
