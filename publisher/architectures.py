"""Architectures: the shipped architecture config (``configs/``) of each known Hub repository.

``publisher plan`` sizes a Hub recipe without downloading anything: it builds the models on the meta
device from the config this checkout ships for the repository (``configs/README.md`` says which is
which). ``configs/`` sits at the repository root, beside the package, so a wheel install has none:
:func:`architecture` then says so and plan prints ``?``.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

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
}


def architecture(repo: str) -> Path:
    """The shipped architecture config folder of Hub repository ``repo``.

    Args:
        repo (`str`):
            A Hub repo id, as a recipe's ``source``, ``source.vae`` or ``source.controlnet`` names it.

    Returns:
        `Path`: the folder under ``configs/``, laid out like the repository without its weights.

    Raises:
        `LookupError`: no architecture is known for ``repo``, or ``configs/`` is not installed; the
        message says which, as one line.
    """
    if repo not in ARCHITECTURES:
        raise LookupError(f"no architecture config is known for {repo} (publisher/architectures.py)")
    if not CONFIGS.is_dir():
        raise LookupError(f"the architecture configs (configs/) are not installed beside the package, as in a "
                          f"wheel install: run plan from a checkout to size {repo}")
    return CONFIGS / ARCHITECTURES[repo]
