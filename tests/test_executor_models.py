"""Tiny diffusers / transformers models converted by coremltools, run by the executor, vs torch.

PSNR uses Apple's definition, 20*log10((max|ref| + 1e-5) / (rmse + 1e-10)), against the fp32
torch output. An fp32 program run in fp32 mode must agree to float rounding (> 90 dB); fp16
programs land around 60-75 dB with these random weights and must stay above 55 dB in both modes.
"""

from __future__ import annotations

import functools
import logging
import warnings

import numpy as np
import pytest
import torch

warnings.filterwarnings("ignore")
logging.getLogger("coremltools").setLevel(logging.ERROR)

ct = pytest.importorskip("coremltools")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from publisher.coremltools_fixes import install_coremltools_fixes  # noqa: E402
from publisher.executor import load_program, run  # noqa: E402


def psnr(reference: np.ndarray, output: np.ndarray) -> float:
    rmse = float(np.sqrt(np.mean((reference.astype(np.float64) - output.astype(np.float64)) ** 2)))
    return 20 * float(np.log10((np.abs(reference).max() + 1e-5) / (rmse + 1e-10)))


class TensorsOnly(torch.nn.Module):
    """Wraps a model so that tracing sees a function of tensors returning a tuple of tensors."""

    def __init__(self, model: torch.nn.Module, call) -> None:
        super().__init__()
        self.model = model
        self.call = call

    def forward(self, *args):
        return self.call(self.model, *args)


def _unet():
    model = diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    inputs = {
        "sample": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([999.0, 10.0]),
        "encoder_hidden_states": torch.randn(2, 7, 32),
    }
    return model, lambda m, s, t, e: (m(s, t, e, return_dict=False)[0],), inputs


def _vae_decoder():
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    return model, lambda m, z: (m.decode(z, return_dict=False)[0],), {"z": torch.randn(1, 4, 8, 8)}


def _vae_encoder():
    model, _, _ = _vae_decoder()
    return model, lambda m, x: (m.quant_conv(m.encoder(x)),), {"x": torch.randn(1, 3, 16, 16)}


def _text_encoder():
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=77,
        eos_token_id=999,
    )
    model = transformers.CLIPTextModel(config)
    ids = torch.randint(1, 998, (1, 77))
    ids[0, 12] = 999
    return model, lambda m, i: tuple(m(i, return_dict=False)[:2]), {"input_ids": ids}


MODELS = {"unet": _unet, "vae_decoder": _vae_decoder, "vae_encoder": _vae_encoder, "text_encoder": _text_encoder}
# (model, precision, target). The iOS18 UNet exercises the fused scaled_dot_product_attention op in
# a real model, the VAE encoder the downsampling path; both are slow extras (-m slow).
VARIANTS = [
    ("unet", "fp32", "iOS16"),
    ("unet", "fp16", "iOS16"),
    ("vae_decoder", "fp32", "iOS16"),
    ("vae_decoder", "fp16", "iOS16"),
    ("text_encoder", "fp32", "iOS16"),
    ("text_encoder", "fp16", "iOS16"),
    pytest.param("unet", "fp16", "iOS18", marks=pytest.mark.slow),
    pytest.param("vae_encoder", "fp16", "iOS16", marks=pytest.mark.slow),
]
_IDS = ["-".join(v.values if hasattr(v, "values") else v) for v in VARIANTS]


@functools.cache
def traced(name: str) -> tuple:
    """The traced model `name`, its example inputs and torch's fp32 outputs (traced once per session)."""
    install_coremltools_fixes()
    torch.manual_seed(0)
    model, call, inputs = MODELS[name]()
    wrapped = TensorsOnly(model.eval(), call).eval()
    with torch.no_grad():
        reference = [r.numpy() for r in wrapped(*inputs.values())]
        return torch.jit.trace(wrapped, tuple(inputs.values()), strict=False, check_trace=False), inputs, reference


@pytest.mark.parametrize(("name", "precision", "target"), VARIANTS, ids=_IDS)
def test_converted_model_matches_torch(name, precision, target, tmp_path):
    module, inputs, reference = traced(name)
    model = ct.convert(
        module,
        inputs=[
            ct.TensorType(name=k, shape=v.shape, dtype=np.int32 if v.dtype == torch.int64 else np.float32)
            for k, v in inputs.items()
        ],
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
    )
    package = tmp_path / f"{name}.mlpackage"
    model.save(str(package))
    program = load_program(package)
    if target == "iOS18" and name == "unet":
        assert "scaled_dot_product_attention" in program.op_types
    feeds = {k: v.numpy().astype(np.int32 if v.dtype == torch.int64 else np.float32) for k, v in inputs.items()}
    threshold = 90.0 if precision == "fp32" else 55.0
    results = {mode: list(run(program, feeds, mode=mode).values()) for mode in ("fp32", "fp16")}
    for mode, outputs in results.items():
        assert len(outputs) == len(reference)
        for ref, out in zip(reference, outputs, strict=True):
            assert out.shape == ref.shape
            assert psnr(ref, out) > threshold, f"{mode} mode: {psnr(ref, out):.1f} dB"
    if precision == "fp16":
        # Rounding every op to fp16 must cost precision relative to holding values in fp32.
        assert psnr(reference[0], results["fp32"][0]) > psnr(reference[0], results["fp16"][0])
