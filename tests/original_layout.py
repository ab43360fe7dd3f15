"""Tiny checkpoints and LoRAs in the layouts found outside diffusers, written from a diffusers pipeline.

Single-file loading (``from_single_file``) and LoRA fusing read files that diffusers did not write: LDM/SGM
checkpoints and kohya LoRAs. Real ones are gigabytes and the Hub is unreachable, so the tests write tiny ones
from the random-weight pipelines of ``configs/tiny-*-original``. The key mapping here is the inverse of
diffusers' (``diffusers/loaders/single_file_utils.py``, ``lora_conversion_utils.py``) written without its
tables, so a round trip through diffusers checks both directions rather than one table against itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each family's text encoders sit in the file and in which layout: "hf" is transformers' CLIPTextModel
# (OpenAI CLIP-L, as LDM's FrozenCLIPEmbedder saved it), "openclip" is open_clip's (OpenCLIP-H and bigG).
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
    "sdxl_refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", "openclip")},
}
# kohya trains SD 1.x/2.x on the diffusers UNet but SDXL on SGM's, so its SDXL LoRAs name UNet modules
# `input_blocks_4_1_...`; its text encoder prefix is lora_te_ for SD 1.x/2.x and lora_te1_/lora_te2_ for SDXL.
KOHYA_SDXL_FAMILIES = ("sdxl", "sdxl_refiner")
KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")

UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# open_clip's learned temperature after training (ln 100); the text-only checkpoints keep it.
OPENCLIP_LOGIT_SCALE = math.log(100.0)


def original_state_dict(pipe, family: str) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoders under the key names of ``family``'s original checkpoints.

    Besides the weights, the file carries what real ones carry inside the component prefixes that diffusers'
    converters read and must skip: the CLIP ``position_ids`` buffer, open_clip's ``logit_scale`` and, for SD 2.x,
    the ``text_projection`` and last resblock that SD 2.x never uses (it reads the penultimate layer, so its
    diffusers text encoder has one layer fewer than the file).

    Args:
        pipe: a diffusers pipeline of ``family`` (float32).
        family: one of ``FAMILIES``.

    Returns:
        The state dict, tensors shared with the pipeline where no reshaping was needed.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    unet_names = _unet_prefixes(pipe.unet.config)
    state = {UNET_PREFIX + _ldm_name(key, unet_names): value for key, value in pipe.unet.state_dict().items()}
    vae_names = _vae_prefixes(pipe.vae.config)
    for key, value in pipe.vae.state_dict().items():
        if "attentions" in key and value.ndim == 2:
            value = value[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convolutions
        state[VAE_PREFIX + _ldm_name(key, vae_names)] = value
    for component, (prefix, layout) in TEXT_ENCODERS[family].items():
        weights = _text_model_state_dict(getattr(pipe, component))
        if layout == "openclip":
            weights = _openclip_state_dict(weights, getattr(pipe, component).config, penultimate=family == "sd2")
        state.update({prefix + key: value for key, value in weights.items()})
    return state


def ema_copy(value: torch.Tensor) -> torch.Tensor:
    """The EMA weight ``write_checkpoint(..., ema=True)`` stores for a UNet weight.

    Negated, so a test can tell which of the two copies a loader read.
    """
    return -value


def write_checkpoint(
    state_dict: dict[str, torch.Tensor], path: Path, dtype: torch.dtype = torch.float32, ema: bool = False
) -> Path:
    """Save an original-layout state dict as one safetensors file.

    Args:
        state_dict: from ``original_state_dict``.
        path: the file to write.
        dtype: floating tensors are cast to it, as fp16 releases are; integer buffers keep their type.
        ema: also write the UNet's EMA copy (``ema_copy`` of each weight) as LDM's ``LitEma`` saves it:
            ``model_ema.`` plus the parameter name without its dots, and the ``decay``/``num_updates`` buffers.
            diffusers reads it with ``extract_ema=True`` and the ``model.diffusion_model.`` copy otherwise.

    Returns:
        ``path``.
    """
    tensors = dict(state_dict)
    if ema:
        for key, value in state_dict.items():
            if key.startswith(UNET_PREFIX):
                tensors["model_ema." + key.removeprefix("model.").replace(".", "")] = ema_copy(value)
        tensors["model_ema.decay"] = torch.tensor(0.9999)
        tensors["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    tensors = {
        key: (value.to(dtype) if value.is_floating_point() else value).contiguous() for key, value in tensors.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def peft_lora(pipe, rank: int, seed: int, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """A LoRA over the pipeline's UNet and text encoders in diffusers' PEFT format (what ``save_lora_weights`` writes).

    Text encoder keys keep the ``text_model.`` level that older transformers had and LoRA files in the wild carry
    (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight``); diffusers drops it for the
    flattened ``CLIPTextModel``. There is no alpha, so PEFT's default alpha = rank applies (scale 1).

    Args:
        pipe: the pipeline the LoRA is for; its Linear layers named by ``targets`` get one.
        rank: the LoRA rank.
        seed: seeds the factors; both A and B are non-zero so fusing changes every targeted weight.
        targets: the last components of the module names to adapt (``to_out.0`` counts as one).

    Returns:
        ``{component.module.lora_A.weight: A, component.module.lora_B.weight: B}``.
    """
    lora = {}
    for (component, name), (down, up) in _lora_factors(pipe, rank, seed, targets).items():
        lora[f"{component}.{name}.lora_A.weight"] = down
        lora[f"{component}.{name}.lora_B.weight"] = up
    return lora


def kohya_lora(
    pipe, rank: int, seed: int, family: str, alpha: float = 1.0, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> dict[str, torch.Tensor]:
    """The LoRA of ``peft_lora(pipe, rank, seed, targets)`` in the kohya/webui format, with a network alpha.

    SD 1.x/2.x: ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` and
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. SDXL: SGM UNet names
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and ``lora_te1_``/``lora_te2_``.

    Args:
        pipe: the pipeline the LoRA is for.
        rank: the LoRA rank.
        seed: the same seed gives the same factors as ``peft_lora``.
        family: one of ``FAMILIES``; picks the UNet naming and text encoder prefixes.
        alpha: kohya's ``network_alpha`` (default 1, kohya's own), so the update is scaled by ``alpha / rank``.
        targets: as for ``peft_lora``.

    Returns:
        ``{name.lora_down.weight, name.lora_up.weight, name.alpha}`` for each adapted module.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    sgm_names = _unet_prefixes(pipe.unet.config) if family in KOHYA_SDXL_FAMILIES else None
    lora = {}
    for (component, name), (down, up) in _lora_factors(pipe, rank, seed, targets).items():
        if component == "unet":
            prefix = "lora_unet_"
            name = _ldm_name(name, sgm_names) if sgm_names else name
        else:
            prefix = KOHYA_TEXT_PREFIXES[component] if family in KOHYA_SDXL_FAMILIES else "lora_te_"
        key = prefix + name.replace(".", "_")
        lora[f"{key}.lora_down.weight"] = down
        lora[f"{key}.lora_up.weight"] = up
        lora[f"{key}.alpha"] = torch.tensor(float(alpha))
    return lora


def expected_fused(
    pipe, lora: dict[str, torch.Tensor], scale: float, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """The weights fusing ``lora`` at ``scale`` must produce: ``W + scale * alpha / rank * B @ A``.

    Call it before loading the LoRA: it reads the pipeline's current weights.

    Args:
        pipe: the pipeline, not yet carrying the LoRA.
        lora: a LoRA in ``peft_lora``'s form.
        scale: the ``lora_scale`` given to ``fuse_lora``.
        alpha: the network alpha (kohya); ``None`` is PEFT's default, alpha = rank.

    Returns:
        ``{component.module.weight: expected}`` keyed as the component's ``state_dict()`` names it.
    """
    fused = {}
    for key, down in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        component, name = key.removesuffix(".lora_A.weight").split(".", 1)
        model = getattr(pipe, component)
        if not hasattr(model, "text_model"):
            name = name.removeprefix("text_model.")
        up = lora[key.replace(".lora_A.", ".lora_B.")]
        rank = down.shape[0]
        weight = model.get_submodule(name).weight.detach()
        factor = scale * (rank if alpha is None else alpha) / rank
        fused[f"{component}.{name}.weight"] = weight + factor * (up @ down)
    return fused


def _lora_factors(
    pipe, rank: int, seed: int, targets: tuple[str, ...]
) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Seeded (A, B) per targeted Linear layer, keyed by component and the module name a LoRA file uses."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        # LoRA files name text encoder modules under `text_model.`, whichever transformers wrote them.
        level = "" if component == "unet" or hasattr(model, "text_model") else "text_model."
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(name.endswith("." + target) for target in targets):
                down = torch.randn(rank, module.in_features, generator=generator) * 0.1
                up = torch.randn(module.out_features, rank, generator=generator) * 0.1
                factors[(component, level + name)] = (down.to(module.weight.dtype), up.to(module.weight.dtype))
    return factors


def _ldm_name(name: str, prefixes: dict[str, tuple[str, dict[str, str]]]) -> str:
    """A diffusers parameter or module name in the original layout, by its longest mapped prefix."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            target, inner = prefixes[head]
            tail = ".".join(parts[cut:])
            for old, new in inner.items():
                if tail == old or tail.startswith(old + "."):
                    tail = new + tail[len(old) :]
                    break
            return f"{target}.{tail}"
    raise KeyError(f"no original-layout name for {name!r}")


def _unet_prefixes(config) -> dict[str, tuple[str, dict[str, str]]]:
    """Diffusers UNet module prefixes -> (LDM prefix, renames inside it), from the block structure.

    LDM numbers every resnet, attention and resampler stage in one ``input_blocks``/``output_blocks`` list:
    ``input_blocks.0`` is ``conv_in``, then ``layers_per_block`` stages per down block, each ``.0`` resnet and
    ``.1`` attention, then its downsampler; an up block has one more stage and its upsampler sits after the
    stage's attention (``.2``) or, without one, after its resnet (``.1``).
    """
    layers = config.layers_per_block
    same = {}
    table = {
        "conv_in": ("input_blocks.0.0", same),
        "time_embedding.linear_1": ("time_embed.0", same),
        "time_embedding.linear_2": ("time_embed.2", same),
        "add_embedding.linear_1": ("label_emb.0.0", same),
        "add_embedding.linear_2": ("label_emb.0.2", same),
        "mid_block.resnets.0": ("middle_block.0", UNET_RESNET_NAMES),
        "mid_block.attentions.0": ("middle_block.1", same),
        "mid_block.resnets.1": ("middle_block.2", UNET_RESNET_NAMES),
        "conv_norm_out": ("out.0", same),
        "conv_out": ("out.2", same),
    }
    for block in range(len(config.block_out_channels)):
        for layer in range(layers):
            stage = 1 + block * (layers + 1) + layer
            table[f"down_blocks.{block}.resnets.{layer}"] = (f"input_blocks.{stage}.0", UNET_RESNET_NAMES)
            table[f"down_blocks.{block}.attentions.{layer}"] = (f"input_blocks.{stage}.1", same)
        table[f"down_blocks.{block}.downsamplers.0.conv"] = (f"input_blocks.{(block + 1) * (layers + 1)}.0.op", same)
        for layer in range(layers + 1):
            stage = block * (layers + 1) + layer
            table[f"up_blocks.{block}.resnets.{layer}"] = (f"output_blocks.{stage}.0", UNET_RESNET_NAMES)
            table[f"up_blocks.{block}.attentions.{layer}"] = (f"output_blocks.{stage}.1", same)
        upsampler = 2 if config.up_block_types[block].startswith("CrossAttn") else 1
        table[f"up_blocks.{block}.upsamplers.0"] = (f"output_blocks.{block * (layers + 1) + layers}.{upsampler}", same)
    return table


def _vae_prefixes(config) -> dict[str, tuple[str, dict[str, str]]]:
    """Diffusers VAE module prefixes -> (LDM prefix, renames inside it); LDM numbers decoder blocks bottom-up."""
    same = {}
    table = {name: (name, same) for name in ("quant_conv", "post_quant_conv")}
    for coder in ("encoder", "decoder"):
        table.update({f"{coder}.{name}": (f"{coder}.{name}", same) for name in ("conv_in", "conv_out")})
        table[f"{coder}.conv_norm_out"] = (f"{coder}.norm_out", same)
        table[f"{coder}.mid_block.resnets.0"] = (f"{coder}.mid.block_1", VAE_RESNET_NAMES)
        table[f"{coder}.mid_block.resnets.1"] = (f"{coder}.mid.block_2", VAE_RESNET_NAMES)
        table[f"{coder}.mid_block.attentions.0"] = (f"{coder}.mid.attn_1", VAE_ATTENTION_NAMES)
    blocks = len(config.block_out_channels)
    for block in range(blocks):
        for layer in range(config.layers_per_block + 1):
            table[f"encoder.down_blocks.{block}.resnets.{layer}"] = (
                f"encoder.down.{block}.block.{layer}",
                VAE_RESNET_NAMES,
            )
            table[f"decoder.up_blocks.{block}.resnets.{layer}"] = (
                f"decoder.up.{blocks - 1 - block}.block.{layer}",
                VAE_RESNET_NAMES,
            )
        table[f"encoder.down_blocks.{block}.downsamplers.0"] = (f"encoder.down.{block}.downsample", same)
        table[f"decoder.up_blocks.{block}.upsamplers.0"] = (f"decoder.up.{blocks - 1 - block}.upsample", same)
    return table


def _text_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The text encoder's weights named as older transformers named them (``text_model.*``), with ``position_ids``.

    transformers stopped saving ``position_ids`` (4.31) and later flattened ``CLIPTextModel`` (no ``text_model``
    level; diffusers dates it to 5.6); checkpoints in the wild predate both.
    """
    weights = model.state_dict()
    if not hasattr(model, "text_model"):
        weights = {f"text_model.{key}": value for key, value in weights.items()}
    weights["text_model.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
    return weights


def _openclip_state_dict(weights: dict[str, torch.Tensor], config, penultimate: bool) -> dict[str, torch.Tensor]:
    """``text_model.*`` weights in open_clip's layout: q, k and v stacked in ``in_proj``, ``text_projection`` as x @ P.

    ``penultimate`` (SD 2.x) adds what the file has and the diffusers model lacks: a last resblock and a
    ``text_projection``, seeded random (``text_projection``'s first dimension must be the width: diffusers
    splits ``in_proj`` by it).
    """
    layers = config.num_hidden_layers
    state = {
        "token_embedding.weight": weights["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": weights["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": weights["text_model.final_layer_norm.weight"],
        "ln_final.bias": weights["text_model.final_layer_norm.bias"],
        "logit_scale": torch.tensor(OPENCLIP_LOGIT_SCALE),
    }
    for layer in range(layers):
        source, target = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            state[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [weights[f"{source}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            for hf_name, openclip_name in OPENCLIP_LAYER_NAMES.items():
                state[f"{target}{openclip_name}.{kind}"] = weights[f"{source}{hf_name}.{kind}"]
    if "text_projection.weight" in weights:
        state["text_projection"] = weights["text_projection.weight"].T.contiguous()
    if penultimate:
        generator = torch.Generator().manual_seed(0)
        last = f"transformer.resblocks.{layers - 1}."
        for key in [key for key in state if key.startswith(last)]:
            state[key.replace(last, f"transformer.resblocks.{layers}.")] = (
                torch.randn(state[key].shape, generator=generator) * 0.02
            )
        state["text_projection"] = torch.randn(config.hidden_size, config.projection_dim, generator=generator) * 0.02
    return state
