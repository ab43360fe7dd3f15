"""``publisher plan``: what a recipe will build and roughly how big, without loading any weights."""

from __future__ import annotations

import json
from pathlib import Path

from publisher.assemble import package_path
from publisher.recipe import Recipe, Scheme, load_recipe
from publisher.source import inspect_source

_MODEL_FOLDER = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
                 "control_unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}


def bits_per_weight(scheme: Scheme) -> float:
    """The storage cost of one weight under ``scheme``, ignoring tables and small tensors."""
    bits = 16.0
    if scheme.palettize and scheme.palettize.mixed:
        mixed = scheme.palettize.mixed
        # A PSNR target's width is known only after the analysis: the widest candidate bounds it.
        bits = mixed.target_bits or (_recipe_bits(mixed.recipe) if mixed.recipe else max(mixed.candidates))
    elif scheme.palettize:
        bits = scheme.palettize.nbits
    elif scheme.quantize:
        bits = scheme.quantize.nbits
    if scheme.prune:
        density = 1 - (scheme.prune.sparsity or (scheme.prune.n_m[0] / scheme.prune.n_m[1]))
        bits = bits * density + 1  # a 1-bit mask marks the kept weights
    return bits


def _recipe_bits(path: Path) -> float:
    try:
        return float(json.loads(path.read_text())["average_bits"])
    except (OSError, ValueError, KeyError, TypeError):
        return 16.0


def count_parameters(model_folder: Path | None, component: str) -> int | None:
    """Instantiate the component on the meta device from its config: exact counts, no memory."""
    if model_folder is None or not (model_folder / "config.json").is_file():
        return None
    config_file = model_folder / "config.json"
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    config = json.loads(config_file.read_text())
    with init_empty_weights():
        if "_class_name" in config:
            cls = getattr(diffusers, config["_class_name"])
            model = cls.from_config(config)
        else:
            model = getattr(transformers, config["architectures"][0])(
                transformers.AutoConfig.from_pretrained(model_folder)
            )
    if component == "vae_decoder":
        parts = [model.decoder, model.post_quant_conv]
    elif component == "vae_encoder":
        parts = [model.encoder, model.quant_conv]
    else:
        parts = [model]
    return sum(parameter.numel() for part in parts if part is not None for parameter in part.parameters())


def model_folder(recipe: Recipe, component: str) -> Path | None:
    """The local folder holding the component's config, when the recipe's sources are local."""
    if component == "controlnet":
        return recipe.source.controlnet.path
    if component.startswith("vae_") and recipe.source.vae is not None:
        return recipe.source.vae.path
    return recipe.source.path / _MODEL_FOLDER[component] if recipe.source.path else None


def describe_plan(recipe_file: str | Path) -> str:
    recipe: Recipe = load_recipe(recipe_file)
    info = inspect_source(recipe)
    source = recipe.source
    lines = [
        f"recipe   {recipe.name} ({recipe.file.name}, sha256 {recipe.sha256[:12]})",
        f"source   {source.repo or source.path}" + (f" @ {source.revision}" if source.revision else ""),
        f"family   {info.family or 'detected when loaded'}",
        f"target   {recipe.target.repo}" + (" (private)" if recipe.target.private else ""),
        f"convert  {recipe.conversion.precision}, {recipe.conversion.minimum_deployment_target.value}, "
        f"UNet batch {recipe.conversion.unet_batch}" + (", UNet in two chunks" if recipe.conversion.chunk_unet else ""),
        "",
        f"{'package':<80} {'scheme':<40} {'params':>12} {'size':>10}",
    ]
    total = 0.0
    for variant in recipe.variants:
        for component in recipe.conversion.components:
            scheme = recipe.compression.for_component(component)
            params = count_parameters(model_folder(recipe, component), component)
            size = params * bits_per_weight(scheme) / 8 / 2**20 if params else None
            total += size or 0.0
            package = package_path(variant.folder_name, recipe, component)
            if component == "unet" and recipe.conversion.chunk_unet:
                package = package.replace("_unet.mlpackage", "_unet_chunk1/2.mlpackage")
            lines.append(
                f"{package:<80} "
                f"{scheme.describe():<40} {params if params is not None else '?':>12} "
                + (f"{'≈' + format(size, '.1f') + ' MiB':>10}" if size is not None else f"{'?':>10}")
            )
    lines.append("")
    lines.append(f"expected weights in all: ≈{total:.1f} MiB" if total else "sizes are known once the source loads")
    return "\n".join(lines)
