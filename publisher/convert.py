"""Convert: one diffusers component -> one Core ML ML Program (`.mlpackage`).

The traced module and the inputs and outputs are the component's wrapper and contract
(:mod:`publisher.wrappers`), Apple's ml-stable-diffusion's, so their Python and Swift pipelines load
our packages unchanged (see README, "Core ML I/O contract").
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

import coremltools as ct
import numpy as np
import torch

from publisher import VERSION_KEY, __version__
from publisher.attention import Attention
from publisher.checkpoint import Assembly
from publisher.child_process import LIBRARY_LOGGERS, mirror_parent
from publisher.components import component_spec
from publisher.coremltools_fixes import install_coremltools_fixes
from publisher.errors import PublisherError
from publisher.language_model import (
    CAUSAL_MASK,
    EXPORTER_KEY,
    INPUT_IDS,
    KEY_CACHE,
    LOGITS,
    VALUE_CACHE,
    StatefulCausalLM,
    causal_mask,
)
from publisher.language_model_source import FAMILIES, LanguageModelSource, load_language_model_source
from publisher.recipe import Recipe, load_recipe
from publisher.source import LoadedSource, load_source, release_memory
from publisher.wrappers import ComponentIO, component_io, feature_description, reference_module

APPLE_LICENSE_NOTE = "Please refer to the model card of the source model"


@dataclass(frozen=True)
class ConvertedComponent:
    component: str
    package: Path
    parameters: int
    seconds: float
    peak_rss: int | None = None
    """Peak resident memory of the converting process in bytes; known when it converted this component alone."""


def example_inputs(io: ComponentIO, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: token ids in range, timesteps inside the training schedule."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in io.inputs:
        if spec.name == "input_ids":
            tensors.append(torch.randint(0, vocab_size, spec.shape, generator=generator).to(torch.float32))
        elif spec.name == "timestep":
            tensors.append(torch.full(spec.shape, 999.0))
        else:
            tensors.append(torch.randn(spec.shape, generator=generator))
    return tuple(tensors)


# ---------------------------------------------------------------------------------------------
# Conversion


def deployment_target(recipe: Recipe):

    return getattr(ct.target, recipe.conversion.minimum_deployment_target.value)


# Tracing runs the model once. At 512 px that forward is most of a VAE's conversion (tens of
# seconds; four times that at SDXL's 1024 px), so the VAE is traced on 8x8 latents and converted at
# the recipe's shapes: it is convolutional, its trace records shapes as operations on the input's
# size, and coremltools infers every shape from the ct.convert inputs (a size the trace had baked in
# would fail that inference). The denoisers stay traced at full size: split_einsum_v2 decides its
# query chunks from the sequence length seen while tracing. The table says which are traced small.
TRACE_LATENT = 8


def convert_component(
    recipe: Recipe, source: LoadedSource, component: str, package: Path, attention: Attention = "original"
) -> ConvertedComponent:
    """Trace ``component`` (its transformers computing with ``attention``) and convert it to an
    ML Program saved at ``package``."""
    install_coremltools_fixes()
    started = time.perf_counter()
    module = reference_module(source, component, attention)
    parameters = sum(parameter.numel() for parameter in module.parameters())
    io = component_io(recipe, source, component)
    traced_io = component_io(recipe, source, component, TRACE_LATENT * source.vae_scale_factor) \
        if component_spec(component).traced_small else io
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(module, example_inputs(traced_io, source.tokenizer.vocab_size), check_trace=False)
    # The trace's forward pass leaves its activations in glibc's free lists; hand them back before
    # coremltools makes its copies of the weights (about a third of a GB for SD 1.5's UNet).
    release_memory()
    half = recipe.conversion.precision_for(component) == "float16"
    model = ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=[ct.TensorType(name=spec.name, shape=spec.shape, dtype=spec.dtype) for spec in io.inputs],
        # Apple's converter declares every output float32, and Swift reads ControlNet outputs as Float buffers:
        # a float16 output there is a wrong read. The cast is the program's last op; weights stay float16.
        outputs=[ct.TensorType(name=name, dtype=np.float32) for name in io.outputs],
        minimum_deployment_target=deployment_target(recipe),
        compute_precision=ct.precision.FLOAT16 if half else ct.precision.FLOAT32,
        # Loading compiles the model with Core ML, which exists only on macOS.
        skip_model_load=True,
    )
    del traced
    release_memory()
    describe(model, recipe, source, component)
    model.save(str(package))
    del model
    release_memory()
    return ConvertedComponent(component, package, parameters, time.perf_counter() - started)


def describe(model: ct.models.MLModel, recipe: Recipe, source: LoadedSource, component: str) -> None:
    """The metadata Apple's converter writes (torch2coreml.py): author, license, version, descriptions of every
    feature, and the converting tool's version under its own key."""
    model.author = APPLE_LICENSE_NOTE + f" ({recipe.model_version})"
    model.license = recipe.card.license or source.license or "see the source model's card"
    model.version = recipe.model_version
    model.short_description = f"Stable Diffusion {component} converted by coreml-publisher"
    for name in (*model.input_description, *model.output_description):
        description = feature_description(name)
        if description and name in model.input_description:
            model.input_description[name] = description
        elif description:
            model.output_description[name] = description
    model.user_defined_metadata[VERSION_KEY] = __version__


# ---------------------------------------------------------------------------------------------
# A language model: one stateful program


def convert_language_model(recipe: Recipe, source: LanguageModelSource, package: Path) -> tuple[int, float]:
    """Trace the stateful wrapper (:class:`publisher.language_model.StatefulCausalLM`) and convert it to an iOS18
    ML Program at ``package``, with the I/O contract :mod:`publisher.language_model` states.

    Returns:
        `tuple[int, float]`: the model's parameter count and the conversion's seconds.
    """
    install_coremltools_fixes()
    started = time.perf_counter()
    model = source.model()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    context = recipe.conversion.context_length
    wrapper = StatefulCausalLM(model, context).eval()
    example = (torch.zeros((1, 2), dtype=torch.int32), torch.from_numpy(causal_mask(2, 2)).float())
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    query = ct.RangeDim(lower_bound=1, upper_bound=recipe.conversion.max_input_length or context, default=1)
    end = ct.RangeDim(lower_bound=1, upper_bound=context, default=1)
    state_type = ct.TensorType(shape=tuple(getattr(wrapper, KEY_CACHE).shape), dtype=np.float16)
    half = recipe.conversion.precision == "float16"
    converted = ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=[ct.TensorType(name=INPUT_IDS, shape=(1, query), dtype=np.int32),
                ct.TensorType(name=CAUSAL_MASK, shape=(1, 1, query, end), dtype=np.float16)],
        outputs=[ct.TensorType(name=LOGITS, dtype=np.float32)],
        states=[ct.StateType(wrapped_type=state_type, name=KEY_CACHE),
                ct.StateType(wrapped_type=state_type, name=VALUE_CACHE)],
        minimum_deployment_target=getattr(ct.target, recipe.conversion.minimum_deployment_target.value),
        compute_precision=ct.precision.FLOAT16 if half else ct.precision.FLOAT32,
        skip_model_load=True,  # loading compiles with Core ML, which exists only on macOS
    )
    del traced, wrapper, model
    describe_language_model(converted, recipe, source)
    converted.save(str(package))
    return parameters, time.perf_counter() - started


def describe_language_model(model: ct.models.MLModel, recipe: Recipe, source: LanguageModelSource) -> None:
    """Metadata swift-transformers reads (the repo to fetch config and tokenizer from) and the card's facts."""
    model.author = f"Converted by coreml-publisher from {recipe.source.repo or recipe.name}"
    model.license = recipe.card.license or source.license or "see the source model's card"
    model.version = recipe.model_version
    model.short_description = f"{FAMILIES[source.family].display} causal language model with a stateful KV cache"
    model.input_description[INPUT_IDS] = "Token ids of the new tokens: the whole prompt, then one token per step"
    model.input_description[CAUSAL_MASK] = ("Additive attention mask (1, 1, new tokens, cached + new tokens):"
                                            " its last axis sets how many cache positions the call sees")
    model.output_description[LOGITS] = "Next-token scores at each new position (1, new tokens, vocabulary)"
    metadata = model.user_defined_metadata
    metadata[f"{EXPORTER_KEY}.name"] = recipe.target.repo
    metadata[f"{EXPORTER_KEY}.task"] = "text-generation"
    metadata[f"{EXPORTER_KEY}.architecture"] = source.model_classes["language_model"]
    metadata[f"{EXPORTER_KEY}.framework"] = "pytorch"
    metadata[f"{EXPORTER_KEY}.precision"] = recipe.conversion.precision
    metadata[f"{EXPORTER_KEY}.context_length"] = str(recipe.conversion.context_length)
    window = getattr(source.config, "sliding_window", None)
    if window and getattr(source.config, "use_sliding_window", True):
        metadata[f"{EXPORTER_KEY}.sliding_window"] = str(window)
    metadata[VERSION_KEY] = __version__


# ---------------------------------------------------------------------------------------------
# One component per process


def convert_in_subprocess(recipe_file: Path, component: str, attention: Attention, package: Path,
                          assembly: Assembly | None = None) -> ConvertedComponent:
    """:func:`convert_component` in a fresh process that loads only the model ``component`` needs.

    The process's peak memory is this one component's (reported as ``peak_rss``), and all of it
    goes back to the operating system when the process ends: a whole recipe then fits in the memory
    of its largest component. Logging, warning filters and the temporary folder follow this process.
    ``assembly`` is the pipeline assembled for the recipe's source, when it needed one.
    """

    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    with ProcessPoolExecutor(
        max_workers=1,
        mp_context=_conversion_context(),
        initializer=mirror_parent,
        initargs=(os.getpid(), levels, list(warnings.filters), tempfile.tempdir),
    ) as pool:
        future = pool.submit(_convert_alone, Path(recipe_file), component, attention, Path(package), assembly)
        try:
            return future.result()
        except BrokenProcessPool:
            raise PublisherError(
                f"converting {component} ({attention}) stopped the converting process: out of memory, or killed"
            ) from None


def _conversion_context() -> multiprocessing.context.BaseContext:
    """Where conversions start: forked from a forkserver that imported their libraries once (on Linux).

    A fork of this process would inherit its memory, so a conversion starts from a process that holds
    only the libraries (:mod:`publisher.conversion_libraries`). Those read the environment when imported
    (huggingface_hub its endpoint and cache folders), so a server started under another environment is
    replaced. Elsewhere each conversion is spawned: macOS's system frameworks, which coremltools loads
    there, are not safe to fork.
    """
    global _server_environment
    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    environment = dict(os.environ)
    with _server_lock:
        if _server_environment != environment:
            stop_conversion_server()
            context.set_forkserver_preload(["publisher.conversion_libraries"])
            _server_environment = environment
    return context


def stop_conversion_server() -> None:
    """Stop the forkserver of the conversions, giving back the memory of its libraries (about 0.4 GB)."""
    global _server_environment
    from multiprocessing import forkserver

    with _server_lock:
        # multiprocessing starts its forkserver on first use and keeps it for the life of the process: it
        # has no public way to stop it; this is the one its own tests use. The next conversion starts a new one.
        forkserver._forkserver._stop()
        _server_environment = None


_server_lock = threading.RLock()  # reentered: a changed environment stops the server it replaces
_server_environment: dict[str, str] | None = None


def _convert_alone(recipe_file: Path, component: str, attention: Attention, package: Path,
                   assembly: Assembly | None) -> ConvertedComponent:
    recipe = load_recipe(recipe_file)
    if component_spec(component).role == "language_model":
        parameters, seconds = convert_language_model(recipe, load_language_model_source(recipe), package)
        return ConvertedComponent(component, package, parameters, seconds, peak_rss=_peak_rss())
    source = load_source(recipe, models=(component_spec(component).model,), assembly=assembly)
    converted = convert_component(recipe, source, component, package, attention)
    return replace(converted, peak_rss=_peak_rss())


def _peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux's ``ru_maxrss`` survives fork and exec, so a conversion would report the size of the
    process it was started from; the address space's own high-water mark (``VmHWM``) is this process's:
    what it shares with the forkserver it was forked from (the libraries) and what it maps itself.
    """

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
