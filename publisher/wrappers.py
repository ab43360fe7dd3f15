"""Wrappers: each component's torch module and Core ML I/O contract, registered by component name.

The module is what conversion traces and what parity compares against (with the default
``original`` attention: the other attentions compute the same function in the Neural Engine's
layout). The contract is Apple's ml-stable-diffusion's (``torch2coreml.py``): input and output names,
shapes and dtypes that its Python and Swift pipelines feed and read (README, "Core ML I/O contract").

A component in :data:`publisher.components.TABLE` registers one builder with :func:`wraps` and one
contract with :func:`contract`; conversion and parity both read them here, so parity never depends
on how a package was made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from publisher.attention import Attention, with_attention
from publisher.components import TABLE, component_names, component_spec
from publisher.recipe import Recipe
from publisher.source import LoadedSource


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
class IOContext:
    """What every contract is computed from: the recipe's shapes for one image size."""

    recipe: Recipe
    source: LoadedSource
    name: str
    float_dtype: type[np.generic]
    batch: int
    latent: int
    pixels: int
    sequence: int


ModuleBuilder = Callable[[LoadedSource, str, Attention], torch.nn.Module]
Contract = Callable[[IOContext], ComponentIO]
_MODULES: dict[str, ModuleBuilder] = {}
_CONTRACTS: dict[str, Contract] = {}


def wraps(*names: str) -> Callable[[ModuleBuilder], ModuleBuilder]:
    """Register the torch module builder of the components ``names``."""
    def register(builder: ModuleBuilder) -> ModuleBuilder:
        _MODULES.update(dict.fromkeys(names, builder))
        return builder
    return register


def contract(*names: str) -> Callable[[Contract], Contract]:
    """Register the Core ML I/O contract of the components ``names``."""
    def register(function: Contract) -> Contract:
        _CONTRACTS.update(dict.fromkeys(names, function))
        return function
    return register


def registered() -> tuple[set[str], set[str]]:
    """The components with a module builder, and those with a contract (a test holds both to the table)."""
    return set(_MODULES), set(_CONTRACTS)


# What each feature is, written into the packages as Apple's converter writes its own (torch2coreml.py sets
# input_description / output_description): Xcode's model viewer and coremltools show them.
FEATURE_DESCRIPTIONS = {
    "input_ids": "The token ids of the text, padded to the tokenizer's length (float32)",
    "last_hidden_state": "The text embeddings the denoiser attends to",
    "hidden_embeds": "The text embeddings (penultimate layer) the denoiser attends to",
    "pooled_outputs": "The pooled text embedding",
    "sample": "The noisy latents, one row per guidance branch",
    "timestep": "The diffusion timestep of each row",
    "encoder_hidden_states": "The text embeddings, laid out (B, C, 1, S)",
    "time_ids": "SDXL's micro-conditioning: original size, crop and target size (or aesthetic score)",
    "text_embeds": "SDXL's pooled text embedding",
    "controlnet_cond": "The conditioning image, in [0, 1]",
    "noise_pred": "The predicted noise of each row",
    "z": "The latents to decode, already divided by the VAE's scaling factor",
    "image": "The decoded image, in [-1, 1]",
    "x": "The image to encode, in [-1, 1]",
    "latent": "The encoded latents",
    "clip_input": "The image normalized and cropped by the source's feature extractor, channels first (BCHW)",
    "images": "The decoded images in [0, 1], channels last (BHWC)",
    "adjustment": "A bias added to the concept scores: higher flags more images",
    "filtered_images": "The input images, with those showing a flagged concept replaced by zeros",
    "has_nsfw_concepts": "1 for each image where the checker found a flagged concept",
    "concept_scores": "The scores before thresholding at zero (has_nsfw_concepts); tune adjustment with them",
}
RESIDUAL_DESCRIPTION = "A ControlNet residual: a down block's output (the last is the mid block's)"


def feature_description(name: str) -> str:
    return FEATURE_DESCRIPTIONS.get(name) or (RESIDUAL_DESCRIPTION if name.startswith("additional_residual_") else "")


def reference_module(source: LoadedSource, name: str, attention: Attention = "original") -> torch.nn.Module:
    """The fp32 torch module converted for component ``name``, and (with ``original`` attention) the
    reference parity compares against."""
    return _MODULES[name](source, name, attention).eval()


def image_size(recipe: Recipe, source: LoadedSource) -> int:
    return recipe.conversion.image_size or source.pipe.unet.config.sample_size * source.vae_scale_factor


def component_io(recipe: Recipe, source: LoadedSource, name: str, size: int | None = None) -> ComponentIO:
    """Names, shapes and dtypes of a component's Core ML inputs and outputs, for images of ``size``
    pixels (default: the recipe's)."""
    latent = (size or image_size(recipe, source)) // source.vae_scale_factor
    # Apple feeds fp16 arrays to the fp16 UNet and VAE; token ids stay float32 (coremltools#1423),
    # as their Swift TextEncoder passes MLShapedArray<Float32>.
    float_dtype = np.float16 if recipe.conversion.precision_for(name) == "float16" else np.float32
    context = IOContext(recipe, source, name, float_dtype, recipe.conversion.unet_batch, latent,
                        latent * source.vae_scale_factor, source.tokenizer.model_max_length)
    if name not in _CONTRACTS:
        raise ValueError(f"unknown component {name!r} (one of {', '.join(TABLE)})")
    return _CONTRACTS[name](context)


def source_model(source: LoadedSource, name: str) -> torch.nn.Module:
    """The source model component ``name`` is made from (the pipeline's, or the recipe's ControlNet)."""
    model = component_spec(name).model
    return source.controlnet if model == "controlnet" else getattr(source.pipe, model)


# ---------------------------------------------------------------------------------------------
# Text encoders


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


@wraps(*component_names("text_encoder"))
def _text_encoder(source: LoadedSource, name: str, attention: Attention) -> torch.nn.Module:
    return TextEncoder(source_model(source, name), -2 if source.family == "sdxl" else None)


@contract(*component_names("text_encoder"))
def _text_encoder_io(io: IOContext) -> ComponentIO:
    first = "hidden_embeds" if io.source.family == "sdxl" else "last_hidden_state"
    return ComponentIO((TensorSpec("input_ids", (1, io.sequence), np.float32),), (first, "pooled_outputs"))


# ---------------------------------------------------------------------------------------------
# Denoisers and ControlNets


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


def residual_names(count: int) -> tuple[str, ...]:
    """Apple's names, shared by the ControlNet's outputs and the control-unet's inputs."""
    return tuple(f"additional_residual_{index}" for index in range(count))


@wraps("unet")
def _unet(source: LoadedSource, name: str, attention: Attention) -> torch.nn.Module:
    return UNet(with_attention(source_model(source, name), attention))


@wraps("control_unet")
def _control_unet(source: LoadedSource, name: str, attention: Attention) -> torch.nn.Module:
    unet = source_model(source, name)
    return UNet(with_attention(unet, attention), residuals=len(residual_shapes(unet.config, batch=1, latent=64)))


@wraps("controlnet")
def _controlnet(source: LoadedSource, name: str, attention: Attention) -> torch.nn.Module:
    return ControlNet(with_attention(source_model(source, name), attention))


def _denoiser_inputs(io: IOContext, config: Any) -> list[TensorSpec]:
    """The inputs the UNet and ControlNets share: latents, timestep, text, SDXL's added conditions."""
    batch, dtype = io.batch, io.float_dtype
    inputs = [
        TensorSpec("sample", (batch, config.in_channels, io.latent, io.latent), dtype),
        TensorSpec("timestep", (batch,), dtype),
        TensorSpec("encoder_hidden_states", (batch, config.cross_attention_dim, 1, io.sequence), dtype),
    ]
    if config.addition_embed_type == "text_time":
        # text_embeds is the projected pooled output of the last text encoder; time_ids holds what is
        # left of the projection's input: 6 sizes for SDXL base, 5 (with the aesthetic score) for the refiner.
        text_embeds = io.source.pipe.text_encoder_2.config.projection_dim
        time_ids = (config.projection_class_embeddings_input_dim - text_embeds) // config.addition_time_embed_dim
        inputs += [
            TensorSpec("time_ids", (batch, time_ids), dtype),
            TensorSpec("text_embeds", (batch, text_embeds), dtype),
        ]
    return inputs


@contract("unet", "control_unet")
def _unet_io(io: IOContext) -> ComponentIO:
    config = source_model(io.source, io.name).config
    inputs = _denoiser_inputs(io, config)
    if io.name == "control_unet":
        shapes = residual_shapes(config, io.batch, io.latent)
        inputs += [TensorSpec(name, shape, io.float_dtype)
                   for name, shape in zip(residual_names(len(shapes)), shapes, strict=True)]
    return ComponentIO(tuple(inputs), ("noise_pred",))


@contract("controlnet")
def _controlnet_io(io: IOContext) -> ComponentIO:
    config = source_model(io.source, io.name).config
    inputs = _denoiser_inputs(io, config)
    inputs.insert(3, TensorSpec("controlnet_cond", (io.batch, 3, io.pixels, io.pixels), io.float_dtype))
    return ComponentIO(tuple(inputs), residual_names(len(residual_shapes(config, io.batch, io.latent))))


# ---------------------------------------------------------------------------------------------
# VAE


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


@wraps("vae_decoder")
def _vae_decoder(source: LoadedSource, name: str, attention: Attention) -> torch.nn.Module:
    return VAEDecoder(source_model(source, name))


@wraps("vae_encoder")
def _vae_encoder(source: LoadedSource, name: str, attention: Attention) -> torch.nn.Module:
    return VAEEncoder(source_model(source, name))


@contract("vae_decoder")
def _vae_decoder_io(io: IOContext) -> ComponentIO:
    channels = source_model(io.source, io.name).config.latent_channels
    return ComponentIO((TensorSpec("z", (1, channels, io.latent, io.latent), io.float_dtype),), ("image",))


@contract("vae_encoder")
def _vae_encoder_io(io: IOContext) -> ComponentIO:
    return ComponentIO((TensorSpec("x", (1, 3, io.pixels, io.pixels), io.float_dtype),), ("latent",))


# ---------------------------------------------------------------------------------------------
# Safety checker


class SafetyChecker(torch.nn.Module):
    """Apple's safety checker contract (torch2coreml.py ``convert_safety_checker``): ``clip_input`` (the feature
    extractor's normalized 224x224 crop, BCHW), ``images`` (the decoded images in [0, 1], BHWC), ``adjustment``
    (a bias on the concept scores) -> ``filtered_images`` (flagged images zeroed), ``has_nsfw_concepts``,
    ``concept_scores`` (the scores before thresholding at zero).

    diffusers' forward loops over images in Python and branches on the scores, which a trace would freeze:
    this is its vectorized form, as Apple's ``forward_coreml``.
    """

    def __init__(self, checker: torch.nn.Module) -> None:
        super().__init__()
        self.checker = checker

    def forward(self, clip_input: torch.Tensor, images: torch.Tensor,
                adjustment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        checker = self.checker
        image_embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        embeds = torch.nn.functional.normalize(image_embeds)
        special_cos = embeds @ torch.nn.functional.normalize(checker.special_care_embeds).T
        cos = embeds @ torch.nn.functional.normalize(checker.concept_embeds).T
        special_care = (special_cos - checker.special_care_embeds_weights + adjustment).gt(0).float().sum(1).gt(0)
        concept_scores = cos - checker.concept_embeds_weights + special_care.float()[:, None] * 0.01
        has_nsfw = concept_scores.gt(0).float().sum(1).gt(0).float()
        filtered = images * (1 - has_nsfw)[:, None, None, None]
        return filtered, has_nsfw, concept_scores


@wraps("safety_checker")
def _safety_checker(source: LoadedSource, name: str, attention: Attention) -> torch.nn.Module:
    return SafetyChecker(source_model(source, name))


@contract("safety_checker")
def _safety_checker_io(io: IOContext) -> ComponentIO:
    crop = clip_crop_size(io.source)
    return ComponentIO((
        TensorSpec("clip_input", (1, 3, crop, crop), io.float_dtype),
        TensorSpec("images", (1, io.pixels, io.pixels, 3), io.float_dtype),
        TensorSpec("adjustment", (1,), io.float_dtype),
    ), ("filtered_images", "has_nsfw_concepts", "concept_scores"))


def clip_crop_size(source: LoadedSource) -> int:
    """The side of the square the source's feature extractor crops images to for the safety checker (224)."""
    crop = source.pipe.feature_extractor.crop_size  # transformers 5: a SizeDict; 4: a dict or an int
    return int(getattr(crop, "height", None) or (crop["height"] if isinstance(crop, dict) else crop))
