"""Convert: one diffusers component -> one Core ML ML Program (`.mlpackage`).

Inputs and outputs follow Apple's ml-stable-diffusion contract so their Python and Swift
pipelines load our packages unchanged (see README, "Core ML I/O contract").
"""

from __future__ import annotations

import builtins
import ctypes
import functools
import logging
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from publisher.attention import Attention, with_attention
from publisher.errors import PublisherError
from publisher.recipe import Recipe
from publisher.source import LoadedSource, release_memory

APPLE_LICENSE_NOTE = "Please refer to the model card of the source model"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: type[np.generic]


@dataclass(frozen=True)
class ComponentIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ConvertedComponent:
    component: str
    package: Path
    parameters: int
    seconds: float
    peak_rss: int | None = None
    """Peak resident memory of the converting process in bytes; known when it converted this component alone."""


# ---------------------------------------------------------------------------------------------
# Reference modules: what gets traced, and what parity compares against


class TextEncoder(torch.nn.Module):
    """``input_ids`` -> (``last_hidden_state`` | ``hidden_embeds``, ``pooled_outputs``)."""

    def __init__(self, text_encoder: torch.nn.Module, hidden_layer: int | None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.hidden_layer = hidden_layer

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = input_ids.to(torch.int64)
        if self.hidden_layer is None:
            output = self.text_encoder(input_ids, return_dict=True)
            return output.last_hidden_state, output.pooler_output
        # SDXL conditions on the penultimate layer; the pooled output is the projected one when present.
        output = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        pooled = output.text_embeds if getattr(output, "text_embeds", None) is not None else output.pooler_output
        return output.hidden_states[self.hidden_layer], pooled


def _added_conditions(model: torch.nn.Module, added: tuple[torch.Tensor, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """SDXL's micro-conditioning (``time_ids``) and pooled text (``text_embeds``), when the model takes them."""
    if model.config.addition_embed_type != "text_time":
        return {}
    time_ids, text_embeds = added
    return {"added_cond_kwargs": {"time_ids": time_ids, "text_embeds": text_embeds}}


class UNet(torch.nn.Module):
    """Apple's UNet contract: ``encoder_hidden_states`` arrives as (B, C, 1, S).

    With ``residuals`` it is Apple's ``control-unet``: the last inputs are the ControlNet's
    ``additional_residual_*`` outputs (summed over ControlNets by the caller), down blocks then mid block.
    """

    def __init__(self, unet: torch.nn.Module, residuals: int = 0) -> None:
        super().__init__()
        self.unet = unet
        self.residuals = residuals

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *extra: torch.Tensor
    ) -> torch.Tensor:
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        split = len(extra) - self.residuals
        kwargs: dict[str, object] = _added_conditions(self.unet, extra[:split])
        if self.residuals:
            kwargs["down_block_additional_residuals"] = extra[split:-1]
            kwargs["mid_block_additional_residual"] = extra[-1]
        return self.unet(sample, timestep, hidden, return_dict=False, **kwargs)[0]


class ControlNet(torch.nn.Module):
    """``sample``, ``timestep``, ``encoder_hidden_states`` (B, C, 1, S), ``controlnet_cond`` (the
    conditioning image in [0, 1]) -> ``additional_residual_*``, the control-unet's extra inputs.

    The conditioning scale multiplies every residual, so callers apply it to the outputs.
    """

    def __init__(self, controlnet: torch.nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        *added: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        down, mid = self.controlnet(
            sample, timestep, hidden, controlnet_cond, return_dict=False, **_added_conditions(self.controlnet, added)
        )
        return (*down, mid)


class VAEDecoder(torch.nn.Module):
    """``z`` (unscaled latents) -> ``image`` in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z) if self.post_quant_conv is not None else z)


class VAEEncoder(torch.nn.Module):
    """``x`` (image in [-1, 1]) -> ``latent`` (the posterior's moments: mean and log-variance)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments


def reference_module(source: LoadedSource, component: str, attention: Attention = "original") -> torch.nn.Module:
    """The fp32 torch module converted for ``component``.

    With the default ``original`` attention it is also the reference parity compares against:
    the other attentions compute the same function in the Neural Engine's layout.
    """
    pipe = source.pipe
    hidden_layer = -2 if source.family == "sdxl" else None
    modules = {
        "text_encoder": lambda: TextEncoder(pipe.text_encoder, hidden_layer),
        "text_encoder_2": lambda: TextEncoder(pipe.text_encoder_2, hidden_layer),
        "unet": lambda: UNet(with_attention(pipe.unet, attention)),
        "control_unet": lambda: UNet(
            with_attention(pipe.unet, attention), residuals=len(residual_shapes(pipe.unet.config, batch=1, latent=64))
        ),
        "controlnet": lambda: ControlNet(with_attention(source.controlnet, attention)),
        "vae_decoder": lambda: VAEDecoder(pipe.vae),
        "vae_encoder": lambda: VAEEncoder(pipe.vae),
    }
    return modules[component]().eval()


def image_size(recipe: Recipe, source: LoadedSource) -> int:
    return recipe.conversion.image_size or source.pipe.unet.config.sample_size * source.vae_scale_factor


def residual_shapes(config: Any, batch: int, latent: int) -> list[tuple[int, ...]]:
    """Shapes of the residuals a ControlNet adds to a UNet of ``config``: every down-block output
    (after conv_in, each resnet, each downsampler), then the mid block's."""
    channels = config.block_out_channels
    layers = config.layers_per_block
    size = latent
    shapes = [(batch, channels[0], size, size)]
    for index, block_channels in enumerate(channels):
        count = layers if isinstance(layers, int) else layers[index]
        shapes += [(batch, block_channels, size, size)] * count
        if index < len(channels) - 1:
            size = (size + 1) // 2  # stride-2, padding-1 convolution
            shapes.append((batch, block_channels, size, size))
    return [*shapes, (batch, channels[-1], size, size)]


def _denoiser_inputs(
    source: LoadedSource, config: Any, batch: int, latent: int, sequence: int, dtype: type[np.generic]
) -> list[TensorSpec]:
    """The inputs the UNet and ControlNets share: latents, timestep, text, SDXL's added conditions."""
    inputs = [
        TensorSpec("sample", (batch, config.in_channels, latent, latent), dtype),
        TensorSpec("timestep", (batch,), dtype),
        TensorSpec("encoder_hidden_states", (batch, config.cross_attention_dim, 1, sequence), dtype),
    ]
    if config.addition_embed_type == "text_time":
        # text_embeds is the projected pooled output of the last text encoder; time_ids holds what is
        # left of the projection's input: 6 sizes for SDXL base, 5 (with the aesthetic score) for the refiner.
        text_embeds = source.pipe.text_encoder_2.config.projection_dim
        time_ids = (config.projection_class_embeddings_input_dim - text_embeds) // config.addition_time_embed_dim
        inputs += [
            TensorSpec("time_ids", (batch, time_ids), dtype),
            TensorSpec("text_embeds", (batch, text_embeds), dtype),
        ]
    return inputs


def residual_names(count: int) -> tuple[str, ...]:
    """Apple's names, shared by the ControlNet's outputs and the control-unet's inputs."""
    return tuple(f"additional_residual_{index}" for index in range(count))


def component_io(recipe: Recipe, source: LoadedSource, component: str, size: int | None = None) -> ComponentIO:
    """Names, shapes and dtypes of a component's Core ML inputs and outputs, for images of ``size``
    pixels (default: the recipe's)."""
    pipe = source.pipe
    # Apple feeds fp16 arrays to the fp16 UNet and VAE; token ids stay float32 (coremltools#1423),
    # as their Swift TextEncoder passes MLShapedArray<Float32>.
    float_dtype = np.float16 if recipe.conversion.precision_for(component) == "float16" else np.float32
    latent = (size or image_size(recipe, source)) // source.vae_scale_factor
    pixels = latent * source.vae_scale_factor
    batch = recipe.conversion.unet_batch
    sequence = source.tokenizer.model_max_length
    if component in ("text_encoder", "text_encoder_2"):
        first = "hidden_embeds" if source.family == "sdxl" else "last_hidden_state"
        return ComponentIO((TensorSpec("input_ids", (1, sequence), np.float32),), (first, "pooled_outputs"))
    if component in ("unet", "control_unet"):
        inputs = _denoiser_inputs(source, pipe.unet.config, batch, latent, sequence, float_dtype)
        if component == "control_unet":
            shapes = residual_shapes(pipe.unet.config, batch, latent)
            names = residual_names(len(shapes))
            inputs += [TensorSpec(name, shape, float_dtype) for name, shape in zip(names, shapes, strict=True)]
        return ComponentIO(tuple(inputs), ("noise_pred",))
    if component == "controlnet":
        config = source.controlnet.config
        inputs = _denoiser_inputs(source, config, batch, latent, sequence, float_dtype)
        inputs.insert(3, TensorSpec("controlnet_cond", (batch, 3, pixels, pixels), float_dtype))
        return ComponentIO(tuple(inputs), residual_names(len(residual_shapes(config, batch, latent))))
    if component == "vae_decoder":
        channels = pipe.vae.config.latent_channels
        return ComponentIO((TensorSpec("z", (1, channels, latent, latent), float_dtype),), ("image",))
    if component == "vae_encoder":
        return ComponentIO((TensorSpec("x", (1, 3, pixels, pixels), float_dtype),), ("latent",))
    raise ValueError(f"unknown component {component!r}")


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
# coremltools fixes


def _install_numpy2_cast_fix() -> None:
    """coremltools 9.0 + NumPy >= 2.4: ``aten::Int`` on a folded 1-element array fails.

    Its frontend calls ``int(x.val)`` on a shape-(1,) array, which NumPy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"; apple/coremltools#2633). diffusers'
    attention hits it. Re-registering the two casting ops is the narrowest fix: the rest of the
    frontend is untouched, and the override is a no-op on NumPy versions that still allow it.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def cast(context, node, to_python: type, dtype_name: str) -> None:
        x = _get_inputs(context, node, expected=1)[0]
        if len(x.shape) > 0 and not all(dim == 1 for dim in x.shape):
            raise ValueError("input to cast must be either a scalar or a length 1 tensor")
        if x.can_be_folded_to_const():
            result = mb.const(val=to_python(np.asarray(x.val).reshape(())), name=node.name)
        elif len(x.shape) > 0:
            result = mb.cast(x=mb.squeeze(x=x, name=node.name + "_item"), dtype=dtype_name, name=node.name)
        else:
            result = mb.cast(x=x, dtype=dtype_name, name=node.name)
        context.add(result, node.name)

    def _int(context, node) -> None:
        cast(context, node, builtins.int, "int32")

    def _bool(context, node) -> None:
        cast(context, node, builtins.bool, "bool")

    # Same registry names as coremltools' own functions, so these replace them exactly.
    register_torch_op(_int, torch_alias=["int"], override=True)
    register_torch_op(_bool, torch_alias=["bool"], override=True)


def fits_fp16(value: Any) -> bool:
    """Whether the finite part of ``value`` (magnitudes under 1e38) lies within fp16's range.

    What coremltools' fp16 pass asks of every fp32 constant, answered with two masked reductions:
    its own check indexes the values through ``np.where`` (five int64 index arrays for a conv weight,
    40 bytes per element), which took about a third of SD 1.5's UNet conversion.
    """
    value = np.asarray(value)
    return not (np.max(value, where=value < 1e38, initial=0.0) > 65504
                or np.min(value, where=value > -1e38, initial=0.0) < -65504)


def _install_fp16_overflow_fix() -> None:
    """coremltools 9.0's ``FP16ComputePrecision.fp16_overflow`` with :func:`fits_fp16` as its check."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    def fp16_overflow(op: Any) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, list | tuple) else [inputs]:
                if (var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                        and not fits_fp16(var.op.val.val)):
                    return True
        return False

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)


@functools.cache
def install_coremltools_fixes() -> None:
    """Install the fixes once per process, before the first conversion."""
    _install_numpy2_cast_fix()
    _install_fp16_overflow_fix()


# ---------------------------------------------------------------------------------------------
# Conversion


def deployment_target(recipe: Recipe):
    import coremltools as ct

    return getattr(ct.target, recipe.conversion.minimum_deployment_target.value)


# Tracing runs the model once. At 512 px that forward is most of a VAE's conversion (tens of
# seconds; four times that at SDXL's 1024 px), so the VAE is traced on 8x8 latents and converted at
# the recipe's shapes: it is convolutional, its trace records shapes as operations on the input's
# size, and coremltools infers every shape from the ct.convert inputs (a size the trace had baked in
# would fail that inference). The denoisers stay traced at full size: split_einsum_v2 decides its
# query chunks from the sequence length seen while tracing.
TRACED_SMALL = ("vae_decoder", "vae_encoder")
TRACE_LATENT = 8


def convert_component(
    recipe: Recipe, source: LoadedSource, component: str, package: Path, attention: Attention = "original"
) -> ConvertedComponent:
    """Trace ``component`` (its transformers computing with ``attention``) and convert it to an
    ML Program saved at ``package``."""
    import coremltools as ct

    install_coremltools_fixes()
    started = time.perf_counter()
    module = reference_module(source, component, attention)
    parameters = sum(parameter.numel() for parameter in module.parameters())
    io = component_io(recipe, source, component)
    traced_io = component_io(recipe, source, component, TRACE_LATENT * source.vae_scale_factor) \
        if component in TRACED_SMALL else io
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
        outputs=[ct.TensorType(name=name) for name in io.outputs],
        minimum_deployment_target=deployment_target(recipe),
        compute_precision=ct.precision.FLOAT16 if half else ct.precision.FLOAT32,
        # Loading compiles the model with Core ML, which exists only on macOS.
        skip_model_load=True,
    )
    del traced
    release_memory()
    model.author = APPLE_LICENSE_NOTE + f" ({recipe.model_version})"
    model.version = recipe.model_version
    model.short_description = f"Stable Diffusion {component} converted by coreml-publisher"
    model.save(str(package))
    del model
    release_memory()
    return ConvertedComponent(component, package, parameters, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# One component per process


def convert_in_subprocess(recipe_file: Path, component: str, attention: Attention, package: Path) -> ConvertedComponent:
    """:func:`convert_component` in a fresh process that loads only the model ``component`` needs.

    The process's peak memory is this one component's (reported as ``peak_rss``), and all of it
    goes back to the operating system when the process ends: a whole recipe then fits in the memory
    of its largest component. Logging, warning filters and the temporary folder follow this process.
    """
    levels = {name: logging.getLogger(name).level for name in _LIBRARY_LOGGERS}
    context = multiprocessing.get_context("spawn")  # a fork would inherit this process's memory
    with ProcessPoolExecutor(
        max_workers=1,
        mp_context=context,
        initializer=_mirror_parent,
        initargs=(os.getpid(), levels, list(warnings.filters), tempfile.tempdir),
    ) as pool:
        future = pool.submit(_convert_alone, Path(recipe_file), component, attention, Path(package))
        try:
            return future.result()
        except BrokenProcessPool:
            raise PublisherError(
                f"converting {component} ({attention}) stopped the converting process: out of memory, or killed"
            ) from None


_LIBRARY_LOGGERS = ("coremltools", "torch", "transformers", "diffusers", "huggingface_hub")
_PR_SET_PDEATHSIG = 1


def _mirror_parent(parent: int, levels: dict[str, int], filters: list[Any], tempdir: str | None) -> None:
    if sys.platform.startswith("linux"):
        # A killed publish must not leave a conversion running on, holding gigabytes: the kernel
        # kills this process when its parent dies (PR_SET_PDEATHSIG).
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = filters
    tempfile.tempdir = tempdir


def _convert_alone(recipe_file: Path, component: str, attention: Attention, package: Path) -> ConvertedComponent:
    from publisher.recipe import load_recipe
    from publisher.source import COMPONENT_MODEL, load_source

    recipe = load_recipe(recipe_file)
    source = load_source(recipe, models=(COMPONENT_MODEL[component],))
    converted = convert_component(recipe, source, component, package, attention)
    return replace(converted, peak_rss=_peak_rss())


def _peak_rss() -> int:
    """This process's peak resident memory in bytes.

    Linux's ``ru_maxrss`` survives fork and exec, so a spawned child would report its parent's size
    at the fork; the address space's own high-water mark (``VmHWM``) starts afresh at exec.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
