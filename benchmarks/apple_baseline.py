"""Apple's converter run like a recipe: the `torch2coreml` commands for `full_scale.py --apple-baseline`.

`full_scale.py RECIPE --apple-baseline CHECKOUT` publishes the recipe, then runs Apple's
`python -m python_coreml_stable_diffusion.torch2coreml` from CHECKOUT (a clone of
apple/ml-stable-diffusion) on the same random-weight pipeline folder, one process per component as
Apple's README does (`--convert-text-encoder`, `--convert-unet`, `--convert-vae-decoder`,
`--convert-vae-encoder`, `--convert-safety-checker`: those our publish converted), and prints both.

Prerequisites: torch2coreml imports diffusionkit (for SD3), which imports argmaxtools, beartype and
jaxtyping. Install them without their dependencies: the rest is not imported, and Apple's pins
(diffusers 0.30.2, transformers 4.44.2, numpy < 1.24), diffusionkit's mlx and argmaxtools' wandb
would replace this project's versions or add what no conversion uses. These five change none of
torch, coremltools, diffusers, transformers or numpy:

    git clone https://github.com/apple/ml-stable-diffusion /tmp/ml-stable-diffusion
    .venv/bin/pip install --no-deps diffusionkit==0.5.2 argmaxtools==0.1.23 beartype jaxtyping wadler-lindig

The flags follow the recipe where torch2coreml has one: `--attention-implementation` from the
variant (a UNet per variant; the other components once), `--quantize-nbits N` for a text encoder or
UNet whose recipe scheme is N-bit k-means palettization per tensor, `--min-deployment-target`,
`--latent-h/-w` from `image_size`, `--unet-batch-one`, `--chunk-unet`, `--xl-version` for SDXL.
What differs all the same:
- Apple's palettization is coremltools' own k-means (sklearn) with its default 2048-element weight
  threshold and embeddings (`gather`) left float; ours is an exact 1-D k-means through coremltools'
  custom-LUT hook at the recipe's `weight_threshold` (2048 unless the recipe says otherwise). Apple's
  converter palettizes text encoders and UNets only: a recipe's compressed VAE stays float16 there,
  and any other scheme (uniform, grouped channels, quantize, prune, mixed-bit) has no flag. The table
  names what was not matched.
- Apple's converter always converts in float16 (`precision: float32` has no flag), checks no
  parity, renders no image and writes no card: its time is conversion and compression only, ours the
  whole publish.
- It loads the pipeline with `variant="fp16"`, which the random folder does not have: it gets a view
  of the folder in which each weight file is linked under its fp16 name too. The files are the same
  float32 ones our publish reads, cast to float16 on load (the Hub's fp16 files would read half the bytes).
- coremltools 9.0's torch frontend fails on NumPy >= 2.4 (apple/coremltools#2633; every Apple
  component but the text encoder hits it here): each process installs this project's fix for that
  bug alone (`publisher.coremltools_fixes._install_numpy2_cast_fix`, same results), none of its
  speed fixes, so the baseline is coremltools' own code.
- It runs after our publish, with the weight files in the page cache; `--memory-limit` caps our
  publish only.

On this project's environment (torch 2.13, diffusers 0.42, transformers 5, coremltools 9.0) it
converts all four SD 1.x components with those two workarounds, warning about the untested torch
and the arguments diffusers deprecated or ignores (`torch_dtype`, `use_auth_token`). Its patch of
CLIP's causal mask (-1e4 for float16) replaces transformers 4 functions that transformers 5 no
longer calls: its text encoder is traced with transformers' own mask.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from publisher.recipe import Recipe
    from publisher.report import PublishReport

INSTALL = "pip install --no-deps diffusionkit==0.5.2 argmaxtools==0.1.23 beartype jaxtyping wadler-lindig"
MODULE = "python_coreml_stable_diffusion.torch2coreml"
# The bug fix alone (see the module docstring), then torch2coreml as `python -m` would run it.
LAUNCH = (
    "import runpy; from publisher.coremltools_fixes import _install_numpy2_cast_fix; _install_numpy2_cast_fix(); "
    f"runpy.run_module({MODULE!r}, run_name='__main__', alter_sys=True)"
)
# One torch2coreml flag per component; it converts both SDXL text encoders under the one flag.
FLAGS = {
    "text_encoder": "--convert-text-encoder",
    "text_encoder_2": "--convert-text-encoder",
    "unet": "--convert-unet",
    "vae_decoder": "--convert-vae-decoder",
    "vae_encoder": "--convert-vae-encoder",
    "safety_checker": "--convert-safety-checker",
}
# What --quantize-nbits palettizes (torch2coreml.quantize_weights), and the nbits it accepts.
QUANTIZED = {"text_encoder", "text_encoder_2", "unet"}
NBITS = {1, 2, 4, 6, 8}
# coremltools' OpPalettizerConfig default, which torch2coreml keeps: smaller weights stay float16.
WEIGHT_THRESHOLD = 2048
ATTENTION = {"original": "ORIGINAL", "split_einsum": "SPLIT_EINSUM", "split_einsum_v2": "SPLIT_EINSUM_V2"}
SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")


@dataclass(frozen=True)
class AppleRun:
    """One torch2coreml process.

    Attributes:
        label: what it converts: the component, and for a UNet of several variants the variant's folder.
        args: its command line after the interpreter.
        flags: its own flags (the component's, its attention, its compression), for the table.
    """

    label: str
    args: tuple[str, ...]
    flags: str


@dataclass(frozen=True)
class ApplePlan:
    """torch2coreml's processes for one publish.

    Attributes:
        runs: one per component (per variant for the UNet).
        shared_flags: the flags every process gets, but the source folder and the output folder.
        unmatched: what of the recipe torch2coreml's flags cannot express, in words.
    """

    runs: list[AppleRun]
    shared_flags: str
    unmatched: list[str]


def converter_env(checkout: Path) -> dict[str, str]:
    """This process's environment with ``checkout`` first on PYTHONPATH (the child processes' only)."""
    path = [str(checkout.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def check_converter(checkout: Path) -> None:
    """Exit with one line saying what to install when ``checkout``'s torch2coreml cannot run here.

    Args:
        checkout: a clone of apple/ml-stable-diffusion.

    Raises:
        SystemExit: the checkout is missing, or its converter does not import.
    """
    if not (checkout / "python_coreml_stable_diffusion" / "torch2coreml.py").is_file():
        raise SystemExit(f"--apple-baseline: no apple/ml-stable-diffusion checkout at {checkout}: "
                         f"git clone https://github.com/apple/ml-stable-diffusion {checkout}")
    # In a child, as the runs will import it: a failed import here costs seconds, not the publish before it.
    result = subprocess.run([sys.executable, "-c", f"import {MODULE}"], env=converter_env(checkout),
                            capture_output=True, text=True)
    if result.returncode:
        error = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no error message")
        raise SystemExit(f"--apple-baseline: Apple's converter does not import ({error.strip()}); "
                         f"install its prerequisites: {sys.executable} -m {INSTALL}")


def fp16_view(folder: Path, out: Path) -> Path:
    """A copy of ``folder`` made of symlinks, each weight file linked under its ``variant="fp16"`` name too.

    torch2coreml loads every pipeline with ``variant="fp16"``; diffusers and transformers name a variant's
    file by inserting it before the last suffix (``model.fp16.safetensors``), a sharded model's index too
    (``diffusion_pytorch_model.safetensors.index.fp16.json``), whose shards are read under the names it lists.

    Args:
        folder: a diffusers pipeline folder.
        out: where the view is made (must not exist).

    Returns:
        ``out``.
    """
    for file in folder.rglob("*"):
        if not file.is_file():
            continue
        link = out / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file.resolve())
        # A shard under a variant name too would be the layout diffusers warns is deprecated.
        if ".safetensors" in file.name and not SHARD.search(file.name):
            stem, suffix = file.name.rsplit(".", 1)
            link.with_name(f"{stem}.fp16.{suffix}").symlink_to(file.resolve())
    return out


def apple_plan(recipe: Recipe, report: PublishReport, source: Path, out: Path) -> ApplePlan:
    """The torch2coreml processes that convert what ``report`` published, with the recipe's settings.

    Args:
        recipe: the published recipe.
        report: its publish report.
        source: the pipeline folder torch2coreml loads (:func:`fp16_view` of the recipe's).
        out: a folder for the packages, one subfolder per process.

    Returns:
        The plan, its runs in the report's component order.
    """
    from publisher.components import whole_component

    conversion = recipe.conversion
    shared = ["--min-deployment-target", conversion.minimum_deployment_target.value]
    if conversion.image_size:
        latent = str(conversion.image_size // 8)
        shared += ["--latent-h", latent, "--latent-w", latent]
    if report.family == "sdxl":
        shared.append("--xl-version")
    unmatched = []
    if conversion.precision != "float16":
        unmatched.append(f"precision {conversion.precision} (torch2coreml converts in float16)")
    if conversion.unet_batch > 2:
        unmatched.append(f"unet_batch {conversion.unet_batch} (torch2coreml traces batch 2, or 1)")

    # A chunked UNet is reported chunk by chunk; torch2coreml converts it whole, then chunks it.
    components = list(dict.fromkeys(whole_component(item.component) for item in report.variants[0].components))
    unmatched += [f"{name} (no torch2coreml flag)" for name in components if name not in FLAGS]
    runs: list[AppleRun] = []
    converted: set[str] = set()
    for name in components:
        if name not in FLAGS or FLAGS[name] in converted:
            continue
        converted.add(FLAGS[name])
        scheme = recipe.compression.for_component(name)
        palettize = scheme.palettize
        matched = (name in QUANTIZED and palettize is not None and palettize.nbits in NBITS
                   and palettize.mode == "kmeans" and palettize.granularity == "per_tensor"
                   and not (scheme.prune or scheme.overrides))
        extra = ["--quantize-nbits", str(palettize.nbits)] if matched else []
        if not matched and not scheme.is_none:
            unmatched.append(f"{name}: {scheme.describe()} (left float16: no torch2coreml flag)")
        if matched and scheme.weight_threshold != WEIGHT_THRESHOLD:
            unmatched.append(f"{name}: weight_threshold {scheme.weight_threshold} "
                             f"(torch2coreml keeps {WEIGHT_THRESHOLD})")
        # The attention implementation changes the UNet alone: the other components convert once.
        for variant in report.variants if name == "unet" else report.variants[:1]:
            own = ["--attention-implementation", ATTENTION[variant.attention], FLAGS[name], *extra]
            if name == "unet" and conversion.unet_batch == 1:
                own.append("--unet-batch-one")
            if name == "unet" and conversion.chunk_unet:
                own.append("--chunk-unet")
            label = f"{name} {variant.folder}" if name == "unet" and len(report.variants) > 1 else name
            folder = out / label.replace(" ", "-")
            args = ("-c", LAUNCH, "--model-version", str(source), *shared, *own, "-o", str(folder))
            runs.append(AppleRun(label, args, " ".join(own)))
    return ApplePlan(runs, " ".join(shared), unmatched)
