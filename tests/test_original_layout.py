"""The original-layout fixtures (``tests/original_layout.py``) against diffusers' own readers.

Tests of single-file loading and LoRA fusing will trust these files, so first: each family's checkpoint loads
back through ``from_single_file`` to the very tensors it was written from (fp32, fp16 and EMA files), diffusers
recognises the family from its keys, and both LoRA formats fuse to ``W + scale * alpha / rank * B @ A``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors.torch import load_file, save_file

from publisher.synthetic import build_pipeline
from tests.conftest import ROOT
from tests.original_layout import (
    FAMILIES,
    ema_copy,
    expected_fused,
    kohya_lora,
    original_state_dict,
    peft_lora,
    write_checkpoint,
)

CONFIG_DIRS = {family: ROOT / "configs" / f"tiny-{family.replace('_', '-')}-original" for family in FAMILIES}
PIPELINES = {
    "sd1": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sdxl_refiner": StableDiffusionXLImg2ImgPipeline,
}
# What diffusers' `infer_diffusers_model_type` must call each file: the tiny configs keep the keys and widths
# it tests (SD 2.x's 1024-wide cross-attention, ten bigG resblocks), so family detection is exercised too.
MODEL_TYPES = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base", "sdxl_refiner": "xl_refiner"}
# Keys as the released checkpoints spell them, checked independently of what diffusers accepts.
LANDMARKS = {
    "sd1": [
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.2.conv2.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
    ],
    "sd2": [
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "cond_stage_model.model.token_embedding.weight",
        "cond_stage_model.model.positional_embedding",
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.2.mlp.c_proj.bias",
        "cond_stage_model.model.ln_final.weight",
        "cond_stage_model.model.text_projection",
    ],
    "sdxl": [
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn1.to_q.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
        "conditioner.embedders.1.model.text_projection",
    ],
    "sdxl_refiner": [
        "model.diffusion_model.label_emb.0.2.bias",
        "model.diffusion_model.output_blocks.8.2.conv.weight",
        "conditioner.embedders.0.model.text_projection",
    ],
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
RANK, SCALE, ALPHA = 4, 0.7, 2.0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per family, built once: the tiny pipeline saved like a Hub repository, and that folder loaded (read only)."""
    root = tmp_path_factory.mktemp("original-layout")
    cache: dict[str, tuple[Path, DiffusionPipeline]] = {}

    def get(family: str) -> tuple[Path, DiffusionPipeline]:
        if family not in cache:
            folder = build_pipeline(CONFIG_DIRS[family], root / family)
            cache[family] = (folder, load(folder))
        return cache[family]

    return get


def load(folder: Path) -> DiffusionPipeline:
    return DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)


def load_single_file(family: str, path: Path, **kwargs):
    """The offline single-file load: the architecture comes from the config folder, nothing from the Hub."""
    return PIPELINES[family].from_single_file(
        str(path), config=str(CONFIG_DIRS[family]), local_files_only=True, torch_dtype=torch.float32, **kwargs
    )


def tensors(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline's models, by component and ``state_dict`` name."""
    return {
        f"{name}.{key}": value
        for name in COMPONENTS
        if getattr(pipe, name, None) is not None
        for key, value in getattr(pipe, name).state_dict().items()
    }


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    differing = [key for key, value in expected.items() if actual[key].is_meta or not torch.equal(actual[key], value)]
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, e.g. {differing[:5]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_back_exactly(family, built, tmp_path):
    pipe = built(family)[1]
    state = original_state_dict(pipe, family)
    assert set(LANDMARKS[family]) <= state.keys()
    assert infer_diffusers_model_type(state) == MODEL_TYPES[family]

    path = write_checkpoint(state, tmp_path / f"{family}.safetensors")
    assert_same_tensors(tensors(load_single_file(family, path)), tensors(pipe))


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_checkpoint_loads_the_rounded_weights(family, built, tmp_path):
    pipe = built(family)[1]
    path = write_checkpoint(original_state_dict(pipe, family), tmp_path / "fp16.safetensors", dtype=torch.float16)
    stored = load_file(path)
    assert {value.dtype for value in stored.values() if value.is_floating_point()} == {torch.float16}
    assert {value.dtype for value in stored.values() if not value.is_floating_point()} <= {torch.int64}

    rounded = {key: value.half().float() for key, value in tensors(pipe).items()}
    assert_same_tensors(tensors(load_single_file(family, path)), rounded)


@pytest.mark.parametrize("family", FAMILIES)
def test_ema_checkpoint_loads_either_copy(family, built, tmp_path):
    pipe = built(family)[1]
    path = write_checkpoint(original_state_dict(pipe, family), tmp_path / "ema.safetensors", ema=True)
    original = tensors(pipe)
    ema = {key: ema_copy(value) if key.startswith("unet.") else value for key, value in original.items()}

    assert_same_tensors(tensors(load_single_file(family, path)), original)
    assert_same_tensors(tensors(load_single_file(family, path, extract_ema=True)), ema)


@pytest.mark.parametrize(("family", "form"), [("sd1", "peft"), ("sd1", "kohya"), ("sdxl", "peft"), ("sdxl", "kohya")])
def test_lora_fuses_to_the_expected_weights(family, form, built, tmp_path):
    pipe = load(built(family)[0])  # fusing writes into the weights
    peft = peft_lora(pipe, RANK, seed=1)
    if form == "peft":
        lora, alpha = peft, None
    else:
        lora, alpha = kohya_lora(pipe, RANK, seed=1, family=family, alpha=ALPHA), ALPHA
    expected = expected_fused(pipe, peft, SCALE, alpha=alpha)
    before = {key: value.clone() for key, value in tensors(pipe).items()}
    adapted = {name for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}
    assert {key.split(".")[0] for key in expected} == adapted
    assert min((expected[key] - before[key]).abs().max().item() for key in expected) > 1e-3

    path = tmp_path / f"{form}.safetensors"
    save_file(lora, str(path))
    pipe.load_lora_weights(str(path), adapter_name=f"{form}-fixture")
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()

    after = tensors(pipe)
    assert after.keys() == before.keys()
    off = {key: (after[key] - value).abs().max().item() for key, value in expected.items()}
    assert max(off.values()) <= 1e-5, sorted(off.items(), key=lambda item: -item[1])[:5]
    assert_same_tensors(
        {key: value for key, value in after.items() if key not in expected},
        {key: value for key, value in before.items() if key not in expected},
    )


def test_kohya_names_follow_the_trainer(built):
    """SD 1.x LoRAs name the diffusers UNet, SDXL ones SGM's; diffusers remaps the latter by the UNet config."""
    sd1 = kohya_lora(built("sd1")[1], RANK, seed=0, family="sd1")
    assert {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v.alpha",
        "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight",
    } <= sd1.keys()

    sdxl = kohya_lora(built("sdxl")[1], RANK, seed=0, family="sdxl")
    assert {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k.lora_up.weight",
        "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.alpha",
        "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_v.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_9_self_attn_out_proj.alpha",
    } <= sdxl.keys()
    assert not [key for key in sdxl if any(part in key for part in ("down_blocks", "mid_block", "up_blocks"))]
