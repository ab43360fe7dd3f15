"""Architectures: the shipped architecture config (``configs/``) of each known Hub repository.

``publisher plan`` sizes a Hub recipe without downloading anything: it builds the models on the meta
device from the config the package ships for the repository (``configs/README.md`` says which is
which), and a single-file checkpoint loads into its family's. The configs are package data
(``publisher/configs``, linked from the repository root as ``configs/``), so a wheel install has them too.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"

# Hub repo id -> its folder under configs/: a pipeline (model_index.json) or one model (config.json).
ARCHITECTURES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21-base",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
    "stabilityai/stable-diffusion-xl-refiner-1.0": "sdxl-refiner",
    "stabilityai/sdxl-turbo": "sdxl-turbo",
    "lllyasviel/control_v11p_sd15_canny": "controlnet-sd15",
    "lllyasviel/control_v11f1p_sd15_depth": "controlnet-sd15",
    # SDXL's VAE retrained to stay finite in float16: the same AutoencoderKL architecture, new weights.
    "madebyollin/sdxl-vae-fp16-fix": "sdxl-base/vae",
    # Causal language models (config.json alone: a transformers model folder).
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
    "Qwen/Qwen2.5-1.5B": "qwen2.5-1.5b",
    "mistralai/Mistral-7B-v0.3": "mistral-7b-v0.3",
    "tiiuae/falcon-7b": "falcon-7b",
}


def architecture(repo: str) -> Path:
    """The shipped architecture config folder of Hub repository ``repo``.

    Args:
        repo (`str`):
            A Hub repo id, as a recipe's ``source``, ``source.vae`` or ``source.controlnet`` names it.

    Returns:
        `Path`: the folder under ``configs/``, laid out like the repository without its weights.

    Raises:
        `LookupError`: no architecture is known for ``repo``; the message says so, as one line.
    """
    if repo not in ARCHITECTURES:
        raise LookupError(f"no architecture config is known for {repo} (publisher/architectures.py)")
    return CONFIGS / ARCHITECTURES[repo]
