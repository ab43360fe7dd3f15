"""A language model's source: its family, config and tokenizer, read without torch; its weights on demand.

``validate`` and ``plan`` read what they need here from the files alone (a local folder, or for a Hub repo the
architecture config shipped in ``configs/``); the run loads the config and tokenizer once
(:func:`load_language_model_source`) and each stage that needs the weights loads them
(:meth:`LanguageModelSource.model`). The wrapper and the conversion are :mod:`publisher.language_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from publisher.errors import PublisherError, RecipeError
from publisher.layout import LANGUAGE_MODEL_FILES
from publisher.recipe import Recipe


@dataclass(frozen=True)
class LanguageModelFamily:
    """What the project knows about one causal-LM family (``config.json``'s ``model_type``)."""

    model_type: str
    display: str
    tiny_config: str
    """The tiny random-weight config folder under ``configs/`` the tests build this family from."""


FAMILIES: dict[str, LanguageModelFamily] = {
    entry.model_type: entry
    for entry in (
        LanguageModelFamily("llama", "Llama", "tiny-llama"),
        LanguageModelFamily("mistral", "Mistral", "tiny-mistral"),
        LanguageModelFamily("qwen2", "Qwen2", "tiny-qwen2"),
        LanguageModelFamily("falcon", "Falcon", "tiny-falcon"),
    )
}


# ---------------------------------------------------------------------------------------------
# Source


@dataclass
class LanguageModelSource:
    """A causal LM's config and tokenizer; :meth:`model` loads its weights (fp32, eval) when a stage needs them."""

    folder: Path
    """The local folder, or the Hub snapshot of the pinned revision (config, tokenizer, weights)."""
    config: Any
    tokenizer: Any
    family: str
    license: str | None
    revision: str | None
    warnings: list[str] = field(default_factory=list)
    model_classes: dict[str, str] = field(default_factory=dict)
    assembly: None = None

    def model(self) -> Any:
        """The model in float32 and eval mode (``AutoModelForCausalLM``, safetensors weights only)."""
        import torch
        from transformers import AutoModelForCausalLM

        try:
            # use_safetensors: a pickle is refused, not unpickled (torch.load on user input runs code).
            model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32, use_safetensors=True,
                                                         attn_implementation="sdpa")
        except OSError as exc:
            raise PublisherError(f"{self.folder}: the language model's weights do not load: {exc}") from None
        return model.eval().requires_grad_(False)

    def tokenizer_files(self) -> list[Path]:
        """The config and tokenizer files the repository publishes beside the package."""
        # swift-transformers downloads them from the repository the package's metadata names; transformers'
        # AutoTokenizer and GenerationConfig read the same names.
        return [self.folder / name for name in LANGUAGE_MODEL_FILES if (self.folder / name).is_file()]

    @property
    def context_limit(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)


def inspect_language_model(recipe: Recipe) -> str | None:
    """Check a language model's source from its files alone (validate): its family, weights and context.

    A Hub source is checked against the architecture config shipped for its repository, when there is one.

    Returns:
        `str | None`: the family (``config.json``'s ``model_type``), when known before loading.

    Raises:
        `RecipeError`: one line naming the recipe and the field at fault.
    """
    source = recipe.source
    if source.path is not None:
        folder = source.path
        if not any(folder.glob("*.safetensors")):
            pickled = sorted(file.name for file in folder.iterdir() if file.suffix in (".bin", ".pt", ".pth"))
            detail = f" (only {', '.join(pickled)}, pickles, refused since loading one runs code)" if pickled else ""
            raise RecipeError(f"{recipe.file}: source.path: {folder} has no .safetensors weights{detail}; save the"
                              " model with save_pretrained(safe_serialization=True)")
    else:
        from publisher.architectures import ARCHITECTURES, architecture

        if source.repo not in ARCHITECTURES:
            return None
        folder = architecture(str(source.repo))
    config = json.loads((folder / "config.json").read_text())
    family = config.get("model_type")
    if family not in FAMILIES:
        raise RecipeError(f"{recipe.file}: source: {source.display} is a {family!r} model; language-model recipes"
                          f" support {', '.join(FAMILIES)}")
    limit = config.get("max_position_embeddings")
    if limit is not None and recipe.conversion.context_length > limit:
        raise RecipeError(f"{recipe.file}: conversion.context_length: {recipe.conversion.context_length} is longer"
                          f" than the model's max_position_embeddings {limit}")
    return family


def load_language_model_source(recipe: Recipe) -> LanguageModelSource:
    """Read the source's config and tokenizer (no weights): a local folder, or a Hub repo at its revision.

    Raises:
        `RecipeError`: the source is not a causal LM of a known family, or the context is longer than it allows.
    """
    from transformers import AutoConfig, AutoTokenizer

    source = recipe.source
    folder = source.path if source.repo is None else _hub_snapshot(source.repo, source.revision)
    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{recipe.file}: source: {source.display} is not a transformers model folder with a"
                          f" tokenizer ({str(exc).splitlines()[0]})") from None
    family = inspect_language_model(recipe.model_copy(update={"source": source.model_copy(
        update={"repo": None, "revision": None, "path": Path(folder)})}))
    license_id = _card_license(folder / "README.md")
    return LanguageModelSource(folder=Path(folder), config=config, tokenizer=tokenizer, family=family,
                               license=license_id, revision=source.revision,
                               model_classes={"language_model": (config.architectures or ["?"])[0]})


def _hub_snapshot(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        # Weights as safetensors only: a pickled checkpoint is never fetched, let alone unpickled.
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[
            *LANGUAGE_MODEL_FILES, "*.safetensors", "*.safetensors.index.json", "README.md"]))
    except (HfHubHTTPError, OSError) as exc:
        raise PublisherError(f"{repo}@{revision}: the source does not download: {str(exc).splitlines()[0]}") from None


def _card_license(card: Path) -> str | None:
    from huggingface_hub import ModelCard

    if not card.is_file():
        return None
    return ModelCard.load(card).data.license


def package_name(recipe: Recipe) -> str:
    """The package's file name: the model's own name, as Apple names ``StatefulMistral7BInstructInt4``."""
    return f"{recipe.model_version.rsplit('/', 1)[-1]}.mlpackage"
