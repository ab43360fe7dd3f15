"""Source: load the diffusers pipeline a recipe names, and learn what it is (family, license)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from publisher.errors import PublisherError, RecipeError
from publisher.recipe import Recipe

Family = Literal["sd1", "sd2", "sdxl"]


@dataclass(frozen=True)
class SourceInfo:
    """What the source is, read from its configs alone (cheap: no weights)."""

    family: Family | None
    components: tuple[str, ...]
    license: str | None


@dataclass
class LoadedSource:
    """The loaded reference pipeline, in fp32 and eval mode."""

    pipe: Any
    family: Family
    license: str | None
    revision: str | None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def tokenizer_files(self) -> list[Path]:
        """``vocab.json`` and ``merges.txt``, which Apple's Swift pipeline reads beside the models.

        diffusers loads Hub sources from a local snapshot, so the tokenizer's ``name_or_path`` is a
        folder either way.
        """
        folder = Path(self.pipe.tokenizer.name_or_path)
        files = [folder / "vocab.json", folder / "merges.txt"]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise PublisherError(f"the source tokenizer in {folder} has no {' or '.join(missing)}")
        return files


def detect_family(model_index: dict[str, Any], unet_config: dict[str, Any] | None) -> Family:
    """SDXL pipelines name themselves; SD 2.x differs from 1.x by its 1024-wide text embeddings."""
    if "XL" in str(model_index.get("_class_name", "")) or "text_encoder_2" in model_index:
        return "sdxl"
    if unet_config and unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _license_from_card(card_path: Path) -> str | None:
    if not card_path.is_file():
        return None
    from huggingface_hub import ModelCard

    license_id = ModelCard.load(card_path).data.to_dict().get("license")
    return str(license_id) if license_id else None


def inspect_source(recipe: Recipe) -> SourceInfo:
    """Read the source's configs without loading weights, and check the recipe fits them.

    A Hub source cannot be inspected offline: its family is the recipe's (if given) and the
    component check happens when it is loaded.
    """
    source = recipe.source
    if source.path is None:
        return SourceInfo(family=source.family, components=(), license=None)
    index = _read_json(source.path / "model_index.json") or {}
    present = tuple(name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None)
    family = source.family or detect_family(index, _read_json(source.path / "unet" / "config.json"))
    _check_components(recipe, present, family)
    return SourceInfo(family=family, components=present, license=_license_from_card(source.path / "README.md"))


def _check_components(recipe: Recipe, present: tuple[str, ...], family: Family) -> None:
    for component in recipe.conversion.components:
        model = "vae" if component.startswith("vae_") else component
        if model not in present:
            raise RecipeError(
                f"{recipe.file}: conversion.components: {component!r} is not in the source pipeline "
                f"(it has {', '.join(sorted(present))})"
            )
    if "text_encoder_2" in recipe.conversion.components and family != "sdxl":
        raise RecipeError(f"{recipe.file}: conversion.components: text_encoder_2 needs an sdxl source, not {family}")


def load_source(recipe: Recipe) -> LoadedSource:
    """Load the pipeline with diffusers' own loader (a local folder or a pinned Hub revision)."""
    import torch
    from diffusers import DiffusionPipeline

    info = inspect_source(recipe)
    source = recipe.source
    location = str(source.path) if source.path is not None else source.repo
    try:
        pipe = DiffusionPipeline.from_pretrained(
            location, revision=source.revision, torch_dtype=torch.float32, safety_checker=None
        )
    except OSError as exc:
        raise PublisherError(f"cannot load the source pipeline {location}: {str(exc).splitlines()[0]}") from None
    license_id = info.license
    if source.repo is not None:
        license_id = _hub_license(source.repo, source.revision)
        index = {name: True for name in pipe.components}
        family = source.family or detect_family(
            {**index, "_class_name": type(pipe).__name__}, dict(pipe.unet.config)
        )
        _check_components(recipe, tuple(name for name, value in pipe.components.items() if value is not None), family)
    else:
        family = info.family or "sd1"
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return LoadedSource(pipe=pipe, family=family, license=license_id, revision=source.revision)


def _hub_license(repo: str, revision: str | None) -> str | None:
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(repo, revision=revision).data.to_dict().get("license")
    except Exception:  # a missing card must not fail a conversion; the recipe can name the license
        return None
