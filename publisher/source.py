"""Source: load the diffusers pipeline a recipe names, and learn what it is (family, license).

``publisher validate`` runs through this module (``inspect_source``), so torch, diffusers, transformers
and accelerate are imported inside the functions that load models: importing them costs seconds, and
a recipe is checked without them.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import HfApi, ModelCard, constants, get_token, hf_hub_download, snapshot_download
from huggingface_hub.errors import RemoteEntryNotFoundError

from publisher.checkpoint import Assembly, check_single_file_source
from publisher.components import component_spec
from publisher.errors import PublisherError, RecipeError
from publisher.hub_errors import HubCall, hub_errors, retry_notes
from publisher.recipe import ModelSource, Recipe, Source, consumer_batch_problem
from publisher.source_check import (
    CONTROLNET_CLASS,
    FAST_TOKENIZER_FILE,
    TOKENIZER_FILES,
    check_source,
    check_tokenizer,
    library_class,
    refuse,
)

Family = Literal["sd1", "sd2", "sdxl"]
HUB_PROBE_TIMEOUT = 10  # seconds: an unreachable Hub fails fast, a slow one still answers
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceInfo:
    """What the source is, read from its configs alone (cheap: no weights)."""

    family: Family | None
    components: tuple[str, ...]
    license: str | None


@dataclass
class LoadedSource:
    """The reference pipeline, in fp32 and eval mode.

    Models named in ``loaded`` hold their weights; the others are built from their configs on the
    meta device until :meth:`weights` loads them.
    """

    pipe: Any
    family: Family
    license: str | None
    revision: str | None
    controlnet: Any = None
    recipe: Recipe | None = None
    assembly: Assembly | None = None
    """The pipeline assembled for a source diffusers cannot load as one pipeline (publisher.checkpoint)."""
    model_classes: dict[str, str] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)

    @contextmanager
    def weights(self, *models: str) -> Iterator[None]:
        """Hold the weights of ``models`` (pipeline folders such as ``unet``, or ``controlnet``) inside
        the block, and drop them after it.

        A run loads its source without weights and each stage asks for what one component needs,
        so the process never holds more than that. Models already loaded stay loaded.
        """
        missing = [name for name in dict.fromkeys(models) if name not in self.loaded]
        for name in missing:
            self._install(name, _model(self.recipe, self.assembly, self.model_classes, name, weights=True))
        self.loaded.update(missing)
        try:
            yield
        finally:
            for name in missing:
                self._install(name, _model(self.recipe, self.assembly, self.model_classes, name, weights=False))
            self.loaded.difference_update(missing)
            release_memory()

    def _install(self, name: str, model: Any) -> None:
        model.eval().requires_grad_(False)
        if name == "controlnet":
            self.controlnet = model
        else:
            setattr(self.pipe, name, model)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def tokenizer(self) -> Any:
        """The CLIP tokenizer; the SDXL refiner has only ``tokenizer_2`` (same vocabulary and merges)."""
        tokenizer = getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)
        if tokenizer is None:
            raise PublisherError("the source pipeline has no tokenizer")
        return tokenizer

    def tokenizer_files(self) -> list[Path]:
        """``vocab.json`` and ``merges.txt``, which Apple's Swift pipeline reads beside the models.

        diffusers loads Hub sources from a local snapshot, so the tokenizer's ``name_or_path`` is a
        folder either way. A tokenizer with only ``tokenizer.json`` gets the two files derived into a
        new temporary folder (a publish's work folder): the source folder may be read-only or a Hub cache.

        Returns:
            `list[Path]`: ``vocab.json`` and ``merges.txt``.
        """
        files = check_tokenizer(Path(self.tokenizer.name_or_path))
        if files[0].name != FAST_TOKENIZER_FILE:
            return files
        return write_slow_tokenizer_files(files[0], Path(tempfile.mkdtemp(prefix="tokenizer-")))


def write_slow_tokenizer_files(tokenizer_json: Path, folder: Path) -> list[Path]:
    """Write the ``vocab.json`` and ``merges.txt`` of a ``tokenizer.json``'s BPE model, byte for byte as the
    slow ``CLIPTokenizer`` of transformers 4 saves them.

    The format follows ``CLIPTokenizer.save_vocabulary`` in transformers 4
    (``src/transformers/models/clip/tokenization_clip.py``, e.g. commit 01f287b3d817): the encoder dumped with
    ``indent=2, sort_keys=True, ensure_ascii=False`` and a newline; ``#version: 0.2`` then each merge's pair
    joined by a space, in rank order. Apple's Swift pipeline parses these files.

    Args:
        tokenizer_json (`Path`):
            A ``tokenizer.json`` that `check_tokenizer` accepted (a BPE model with ``vocab`` and ``merges``).
        folder (`Path`):
            An existing folder to write the two files into.

    Returns:
        `list[Path]`: ``vocab.json`` and ``merges.txt`` in ``folder``.
    """
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    vocab_path, merges_path = (folder / name for name in TOKENIZER_FILES)
    vocab_path.write_text(json.dumps(model["vocab"], indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                          encoding="utf-8")
    # tokenizers < 0.20 saves a merge as "a b", later versions as ["a", "b"]; the list is in rank order.
    pairs = (merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model["merges"])
    merges_path.write_text("#version: 0.2\n" + "".join(" ".join(pair) + "\n" for pair in pairs), encoding="utf-8")
    return [vocab_path, merges_path]


def detect_family(model_index: dict[str, Any], unet_config: dict[str, Any] | None) -> Family:
    """SDXL pipelines name themselves; SD 2.x differs from 1.x by its 1024-wide text embeddings."""
    if "XL" in str(model_index.get("_class_name", "")) or "text_encoder_2" in model_index:
        return "sdxl"
    if unet_config and unet_config.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None  # check_source has parsed it


def _license_from_card(card_path: Path) -> str | None:
    if not card_path.is_file():
        return None

    try:
        license_id = ModelCard.load(card_path).data.to_dict().get("license")
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: not UTF-8, or metadata that is not a mapping
        # Refused rather than ignored: the published card would silently lose the source's license.
        problem = " ".join(str(exc).split())
        raise refuse(card_path, f"the model card's metadata cannot be read ({problem})",
                     "fix the YAML between its --- lines") from None
    return str(license_id) if license_id else None


def inspect_source(recipe: Recipe) -> SourceInfo:
    """Read the source's configs without loading weights, and check its files and that the recipe fits them.

    A Hub source cannot be inspected offline: its family is the recipe's (if given) and the
    component check happens when it is loaded.

    Args:
        recipe (`Recipe`):
            The validated recipe.

    Returns:
        [`SourceInfo`]: the family, the pipeline's components and the license of a local source.

    Raises:
        [`~publisher.errors.RecipeError`]:
            A file of a local source is missing or broken (see `publisher.source_check`), or the
            recipe converts a component the source lacks.
    """
    source = recipe.source
    if source.needs_assembly:
        return _inspect_assembly(recipe)
    index = check_source(recipe)
    if index is None:
        return SourceInfo(family=source.family, components=(), license=None)
    present = tuple(name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None)
    family = source.family or detect_family(index, _read_json(source.path / "unet" / "config.json"))
    _check_components(recipe, present, family)
    return SourceInfo(family=family, components=present, license=_license_from_card(source.path / "README.md"))


def _inspect_assembly(recipe: Recipe) -> SourceInfo:
    """A source publisher.checkpoint assembles: its local files' headers, and the architecture it loads into."""
    source = recipe.source
    checkpoint, index = check_single_file_source(source)
    if source.is_single_file:
        check_source(recipe.model_copy(update={"source": source.model_copy(update={"path": None})}))
        if index is None:
            return SourceInfo(family=source.family, components=(), license=None)
        present = tuple(name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None)
        family = checkpoint.family if checkpoint else source.family or "sd1"
        _check_components(recipe, present, family)
        return SourceInfo(family=family, components=present, license=None)
    # A pipeline with LoRAs or a VAE file: the pipeline itself is checked as always.
    info = inspect_source(recipe.model_copy(update={"source": source.model_copy(update={"loras": (), "vae": None})}))
    return info


def release_memory() -> None:
    """Collect dropped modules and hand the freed heap back to the operating system.

    glibc keeps freed small and mid-sized blocks for reuse; without the trim, a process that held a
    UNet's weights once would keep their pages resident while it loads the next model.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def with_source_components(recipe: Recipe, present: Iterable[str]) -> Recipe:
    """The recipe with the optional default components its source lacks left out (a pipeline without a safety
    checker); a recipe that lists its components keeps them, and `_check_components` refuses what is missing."""
    if "components" in recipe.conversion.model_fields_set:
        return recipe
    present = set(present)
    kept = tuple(component for component in recipe.conversion.components
                 if not component_spec(component).optional or component_spec(component).model in present)
    return recipe.model_copy(update={"conversion": recipe.conversion.model_copy(update={"components": kept})})


def _check_components(recipe: Recipe, present: tuple[str, ...], family: Family) -> None:
    recipe = with_source_components(recipe, present)
    for component in recipe.conversion.components:
        model = component_spec(component).model
        # A ControlNet comes from source.controlnet, not from the pipeline's folders.
        if component_spec(component).role != "controlnet" and model not in present:
            raise RecipeError(
                f"{recipe.file}: conversion.components: {component!r} is not in the source pipeline "
                f"(it has {', '.join(sorted(present))})"
            )
    if "text_encoder_2" in recipe.conversion.components and family != "sdxl":
        raise RecipeError(f"{recipe.file}: conversion.components: text_encoder_2 needs an sdxl source, not {family}")
    batch_problem = consumer_batch_problem(family, recipe.conversion.unet_batch)
    if batch_problem:  # the family was detected, not declared: the recipe's own check could not know it
        raise RecipeError(f"{recipe.file}: conversion.unet_batch: {batch_problem}")


def load_source(recipe: Recipe, models: tuple[str, ...] | None = None,
                assembly: Assembly | None = None) -> LoadedSource:
    """Load the pipeline with diffusers' own loader (a local folder or a pinned Hub revision).

    ``models`` names the models whose weights are loaded now (pipeline folders such as ``unet``,
    plus ``controlnet``); the others are built empty on the meta device, so their configs still
    answer shape questions, and :meth:`LoadedSource.weights` loads them when a stage needs them.
    All models load when ``models`` is None.

    A source that ``recipe.source.needs_assembly`` (a single file, a VAE file, LoRAs) loads from ``assembly``,
    the pipeline :func:`publisher.checkpoint.assemble_source` saved for it; its license is still the source's.
    """
    import torch
    from diffusers import DiffusionPipeline

    source = recipe.source
    if source.needs_assembly and assembly is None:
        raise PublisherError(f"{source.display} is loaded from the pipeline assembled for it (publisher.checkpoint)")
    info = inspect_source(recipe)
    if assembly is not None and assembly.family is not None:
        info = replace(info, family=assembly.family)
    location = str(assembly.folder) if assembly is not None else _location(source)
    revision = None if assembly is not None else source.revision
    if source.repo is not None and assembly is None:  # a local pipeline was checked by inspect_source
        check_source(recipe, snapshot=_hub_configs(source))
    model_index = _model_index(location, revision)
    classes = _torch_models(model_index)
    if source.controlnet is not None:
        classes["controlnet"] = CONTROLNET_CLASS
    loaded = set(classes if models is None else set(models) & set(classes))

    def separate(name: str) -> bool:  # not in the pipeline's folders: from_pretrained cannot load it
        return name == "controlnet" or (name == "vae" and _separate_vae(source))

    given = {name: _model(recipe, assembly, classes, name, weights=name in loaded)
             for name in classes if separate(name) or name not in loaded}
    controlnet = given.pop("controlnet", None)
    if "safety_checker" in model_index and "safety_checker" not in classes:  # listed without a model
        given["safety_checker"] = None
    try:
        # use_safetensors: a pickle is refused, not unpickled (torch.load on user input runs code); the check of a
        # local source refuses it earlier, a Hub source's weights are only seen here.
        pipe = DiffusionPipeline.from_pretrained(
            location, revision=revision, torch_dtype=torch.float32, use_safetensors=True, **given
        )
    except OSError as exc:
        raise _load_error("the source pipeline", location, exc) from None
    license_id = info.license
    warnings: list[str] = []
    if source.repo is not None:
        license_id = _hub_license(source.repo, source.revision, warnings)
    if info.family is None:
        family = source.family or detect_family(model_index, dict(pipe.unet.config))
        _check_components(recipe, tuple(name for name, value in pipe.components.items() if value is not None), family)
    else:
        family = info.family
    for module in (*pipe.components.values(), controlnet):
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return LoadedSource(pipe=pipe, family=family, license=license_id, revision=source.revision, controlnet=controlnet,
                        recipe=recipe, assembly=assembly, model_classes=classes, loaded=loaded, warnings=warnings)


def _separate_vae(source: Source) -> bool:
    """Whether the VAE loads from a folder of its own (a VAE file is part of the assembled pipeline)."""
    return source.vae is not None and not source.vae.is_single_file


def _model(recipe: Recipe, assembly: Assembly | None, classes: dict[str, str], name: str, *, weights: bool) -> Any:
    """One model of the source, with its weights or empty: a pipeline folder (the assembled one, if any), the
    recipe's separate VAE, or its ControlNet."""
    source = recipe.source
    build = _load_model if weights else _empty_model
    if name == "controlnet":
        return build(classes[name], _location(source.controlnet), source.controlnet.revision, None)
    if name == "vae" and _separate_vae(source):
        return build(classes[name], _location(source.vae), source.vae.revision, None)
    if assembly is not None:
        return build(classes[name], str(assembly.folder), None, name)
    return build(classes[name], _location(source), source.revision, name)


def _location(origin: ModelSource) -> str:
    return str(origin.path) if origin.path is not None else str(origin.repo)


def model_class(class_name: str) -> Any:
    """A model class by name: diffusers', transformers', or the safety checker of diffusers' SD pipelines."""
    return next(filter(None, (library_class(library, class_name)
                              for library in ("diffusers", "transformers", "stable_diffusion"))))


def _load_model(class_name: str, location: str, revision: str | None, subfolder: str | None = None) -> Any:
    """A single model from its repo or folder (``subfolder`` within a pipeline)."""
    import torch

    try:
        where = {"subfolder": subfolder} if subfolder else {}
        return model_class(class_name).from_pretrained(location, revision=revision, torch_dtype=torch.float32,
                                                        use_safetensors=True, **where)  # never unpickle
    except OSError as exc:
        raise _load_error(f"the {class_name}", location, exc) from None


def _empty_model(class_name: str, location: str, revision: str | None, subfolder: str | None = None) -> Any:
    """The model built from its config on the meta device: its config without its weights."""
    import transformers
    from accelerate import init_empty_weights

    cls = model_class(class_name)
    try:
        if issubclass(cls, transformers.PreTrainedModel):
            config = transformers.AutoConfig.from_pretrained(location, subfolder=subfolder or "", revision=revision)
            with init_empty_weights():
                return cls(config)
        config = cls.load_config(location, subfolder=subfolder, revision=revision)
    except OSError as exc:
        raise _load_error(f"the {class_name} config of", location, exc) from None
    with init_empty_weights():
        return cls.from_config(config)


def _hub_configs(source: ModelSource) -> Path:
    """The Hub pipeline's model index, configs and tokenizer files (no weights), downloaded into the Hub cache
    where diffusers then finds them.

    Raises:
        [`~publisher.errors.HubError`]:
            One line when the Hub is unreachable, or does not have the repo or revision.
    """
    api = HfApi()
    call = HubCall(repo_id=str(source.repo), revision=str(source.revision), endpoint=api.endpoint,
                   secret=get_token(), step=f"read the source {source.repo}")
    with retry_notes(show=True), hub_errors(call):
        if not constants.HF_HUB_OFFLINE:
            # One request the client does not retry: without a network, the downloads below would retry
            # for 45 s and end on a misleading "no file named model_index.json".
            api.model_info(str(source.repo), revision=source.revision, timeout=HUB_PROBE_TIMEOUT)
        try:
            return Path(snapshot_download(source.repo, revision=source.revision,
                                          allow_patterns=["model_index.json", "*/*.json", "*/*.txt"]))
        except OSError as exc:
            raise _load_error("the source pipeline", str(source.repo), exc) from None


def _model_index(location: str, revision: str | None) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(location, revision=revision)
    except OSError as exc:
        raise _load_error("the source pipeline", location, exc) from None


def _load_error(what: str, location: str, exc: OSError) -> PublisherError:
    problem = str(exc).splitlines()[0]
    if ".safetensors" in problem:
        # The loaders are told to read safetensors only: weights stored only as a pickle are refused, not unpickled.
        return RecipeError(f"{location}: {what} has no safetensors weights ({problem}); pickled weights (.bin) are"
                           " refused, since loading one runs code from the file: use a revision with .safetensors"
                           " weights, or convert them on a machine without secrets")
    return PublisherError(f"cannot load {what} {location}: {problem}")


def _torch_models(index: dict[str, Any]) -> dict[str, str]:
    """The pipeline's torch models (not schedulers or tokenizers), name -> class name."""
    import torch

    models = {}
    for name, spec in index.items():
        if isinstance(spec, list) and len(spec) == 2 and spec[1] is not None:
            cls = library_class(*spec)
            if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
                models[name] = spec[1]
    return models


def _hub_license(repo: str, revision: str | None, warnings: list[str]) -> str | None:
    """The license in the metadata of the Hub source's card at ``revision``; None without a card.

    A card that cannot be read (not downloadable, not UTF-8, broken metadata) leaves the license unknown: the
    run goes on, since the recipe can name the license, but says so in ``warnings`` and the log.
    """
    try:
        card_path = hf_hub_download(repo, "README.md", revision=revision)
        return ModelCard.load(card_path).data.to_dict().get("license")
    except RemoteEntryNotFoundError:  # a repo without a card
        return None
    except (OSError, yaml.YAMLError, ValueError) as exc:  # ValueError: not UTF-8, or metadata that is not a mapping
        problem = " ".join(str(exc).split())
        warning = (f"The source's model card ({repo} README.md at {revision}) could not be read, so its license is "
                   f"unknown: {type(exc).__name__}: {problem}")
        logger.warning(warning)
        warnings.append(warning)
        return None
