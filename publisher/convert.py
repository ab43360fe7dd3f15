"""Convert: one diffusers component -> one Core ML ML Program (`.mlpackage`).

Inputs and outputs follow Apple's ml-stable-diffusion contract so their Python and Swift
pipelines load our packages unchanged (see README, "Core ML I/O contract").
"""

from __future__ import annotations

import builtins
import functools
import gc
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from publisher.recipe import Recipe
from publisher.source import LoadedSource

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


class UNet(torch.nn.Module):
    """Apple's UNet contract: ``encoder_hidden_states`` arrives as (B, C, 1, S)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.added_conditions = unet.config.addition_embed_type == "text_time"

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        kwargs = {}
        if self.added_conditions:
            time_ids, text_embeds = added
            kwargs["added_cond_kwargs"] = {"time_ids": time_ids, "text_embeds": text_embeds}
        return self.unet(sample, timestep, hidden, return_dict=False, **kwargs)[0]


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


def reference_module(source: LoadedSource, component: str) -> torch.nn.Module:
    """The fp32 torch module whose function the Core ML package must reproduce."""
    pipe = source.pipe
    hidden_layer = -2 if source.family == "sdxl" else None
    modules = {
        "text_encoder": lambda: TextEncoder(pipe.text_encoder, hidden_layer),
        "text_encoder_2": lambda: TextEncoder(pipe.text_encoder_2, hidden_layer),
        "unet": lambda: UNet(pipe.unet),
        "vae_decoder": lambda: VAEDecoder(pipe.vae),
        "vae_encoder": lambda: VAEEncoder(pipe.vae),
    }
    return modules[component]().eval()


def image_size(recipe: Recipe, source: LoadedSource) -> int:
    return recipe.conversion.image_size or source.pipe.unet.config.sample_size * source.vae_scale_factor


def component_io(recipe: Recipe, source: LoadedSource, component: str) -> ComponentIO:
    """Names, shapes and dtypes of a component's Core ML inputs and outputs."""
    pipe = source.pipe
    half = recipe.conversion.precision == "float16"
    # Apple feeds fp16 arrays to the fp16 UNet and VAE; token ids stay float32 (coremltools#1423),
    # as their Swift TextEncoder passes MLShapedArray<Float32>.
    float_dtype = np.float16 if half else np.float32
    latent = image_size(recipe, source) // source.vae_scale_factor
    latent_channels = pipe.vae.config.latent_channels
    pixels = latent * source.vae_scale_factor
    batch = recipe.conversion.unet_batch
    sequence = pipe.tokenizer.model_max_length
    if component in ("text_encoder", "text_encoder_2"):
        first = "hidden_embeds" if source.family == "sdxl" else "last_hidden_state"
        return ComponentIO((TensorSpec("input_ids", (1, sequence), np.float32),), (first, "pooled_outputs"))
    if component == "unet":
        unet = pipe.unet.config
        inputs = [
            TensorSpec("sample", (batch, unet.in_channels, latent, latent), float_dtype),
            TensorSpec("timestep", (batch,), float_dtype),
            TensorSpec("encoder_hidden_states", (batch, unet.cross_attention_dim, 1, sequence), float_dtype),
        ]
        if unet.addition_embed_type == "text_time":
            time_ids = 6
            text_embeds = unet.projection_class_embeddings_input_dim - time_ids * unet.addition_time_embed_dim
            inputs += [
                TensorSpec("time_ids", (batch, time_ids), float_dtype),
                TensorSpec("text_embeds", (batch, text_embeds), float_dtype),
            ]
        return ComponentIO(tuple(inputs), ("noise_pred",))
    if component == "vae_decoder":
        return ComponentIO((TensorSpec("z", (1, latent_channels, latent, latent), float_dtype),), ("image",))
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
# coremltools' torch frontend fix


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


@functools.cache
def install_frontend_fixes() -> None:
    """Register the frontend fixes once per process, before the first conversion."""
    _install_numpy2_cast_fix()


# ---------------------------------------------------------------------------------------------
# Conversion


def deployment_target(recipe: Recipe):
    import coremltools as ct

    return getattr(ct.target, recipe.conversion.minimum_deployment_target.value)


def convert_component(recipe: Recipe, source: LoadedSource, component: str, package: Path) -> ConvertedComponent:
    """Trace ``component`` and convert it to an ML Program saved at ``package``."""
    import coremltools as ct

    install_frontend_fixes()
    started = time.perf_counter()
    module = reference_module(source, component)
    parameters = sum(parameter.numel() for parameter in module.parameters())
    io = component_io(recipe, source, component)
    vocab_size = source.pipe.tokenizer.vocab_size if hasattr(source.pipe, "tokenizer") else 1
    with torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(module, example_inputs(io, vocab_size), check_trace=False)
    precision = ct.precision.FLOAT16 if recipe.conversion.precision == "float16" else ct.precision.FLOAT32
    model = ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=[ct.TensorType(name=spec.name, shape=spec.shape, dtype=spec.dtype) for spec in io.inputs],
        outputs=[ct.TensorType(name=name) for name in io.outputs],
        minimum_deployment_target=deployment_target(recipe),
        compute_precision=precision,
        # Loading compiles the model with Core ML, which exists only on macOS.
        skip_model_load=True,
    )
    del traced
    gc.collect()
    model.author = APPLE_LICENSE_NOTE + f" ({recipe.model_version})"
    model.version = recipe.model_version
    model.short_description = f"Stable Diffusion {component} converted by coreml-publisher"
    model.save(str(package))
    del model
    gc.collect()
    return ConvertedComponent(component, package, parameters, time.perf_counter() - started)
