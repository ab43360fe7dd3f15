"""Checkpoint: a single-file checkpoint, a separate VAE file and LoRAs, assembled into one diffusers pipeline folder.

Community models ship as one ``.safetensors`` file in the original (LDM/SGM) key layout, often with LoRAs to
fuse and a replacement VAE. diffusers reads all of it: its single-file loader (``from_single_file``) maps the
original layout given the architecture's configs (the family's shipped folder in ``configs/``, or the recipe's
``source.config``; never a download), and its LoRA loader (``load_lora_weights`` + ``fuse_lora``) reads the
diffusers/PEFT and kohya formats. The assembled pipeline is saved with ``save_pretrained``, so every later stage
loads it as it loads any local pipeline; ``publish`` keeps it as the cached ``source`` stage.

torch, diffusers and peft are imported inside the functions that use them: ``validate`` reads only headers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token, hf_hub_download

from publisher.architectures import CONFIGS
from publisher.components import component_spec
from publisher.errors import PublisherError, RecipeError
from publisher.hub_errors import HubCall, hub_errors, retry_notes
from publisher.recipe import Lora, ModelSource, Recipe, Source
from publisher.report import SourceInput
from publisher.source_check import check_tokenizer, read_json, refuse

PIPELINE = "pipeline"
ASSEMBLY = "assembly.json"


@dataclass(frozen=True)
class Assembly:
    """A source assembled into one pipeline folder: the folder, what the checkpoint's keys said it is, and the
    files it was made from."""

    folder: Path
    family: str | None
    inputs: tuple[SourceInput, ...]

    @classmethod
    def load(cls, entry: Path) -> Assembly:
        """The assembly :func:`assemble_source` saved in ``entry``."""
        saved = json.loads((entry / ASSEMBLY).read_text())
        return cls(entry / PIPELINE, saved["family"],
                   tuple(SourceInput.model_validate(item) for item in saved["inputs"]))


@dataclass(frozen=True)
class CheckpointFamily:
    """What a single file's keys say it is, and the shipped architecture its weights load into."""

    name: str
    family: str
    marker: str
    """A key only this family's checkpoints hold (its text encoder's, so that it does not depend on sizes;
    diffusers' ``CHECKPOINT_KEY_NAMES`` lists the same ones)."""
    config: str
    """The architecture's folder under ``configs/``."""
    repo: str
    revision: str
    """The Hub pipeline whose tokenizers the family uses: the shipped configs hold a tiny stand-in, and a
    checkpoint file carries none."""


# Most specific first: an SDXL base checkpoint also holds a CLIP-L encoder at embedders.0.
CHECKPOINT_FAMILIES = (
    CheckpointFamily("SDXL base", "sdxl", "conditioner.embedders.1.model.positional_embedding", "sdxl-base",
                     "stabilityai/stable-diffusion-xl-base-1.0", "462165984030d82259a11f4367a4eed129e94a7b"),
    CheckpointFamily("SDXL refiner", "sdxl", "conditioner.embedders.0.model.text_projection", "sdxl-refiner",
                     "stabilityai/stable-diffusion-xl-refiner-1.0", "5d4cfe854c9a9a87939ff3653551c2b3c99a4356"),
    # 2.x's 512 px epsilon base; a 768 px v-prediction checkpoint needs source.config.
    CheckpointFamily("SD 2.x", "sd2", "cond_stage_model.model.token_embedding.weight", "sd21-base",
                     "stabilityai/stable-diffusion-2-1-base", "5ede9e4bf3e3fd1cb0ef2f7a3fff13ee514fdf06"),
    CheckpointFamily("SD 1.x", "sd1", "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                     "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"),
)
UNET_PREFIX = "model.diffusion_model."
# The files diffusers and transformers load for a model (whole or sharded), not its variants (.fp16.).
WEIGHT_FILE = re.compile(r"(diffusion_pytorch_model|model)(-\d{5}-of-\d{5})?\.safetensors")
TOKENIZERS = ("tokenizer", "tokenizer_2")
# A LoRA module's down (A) projection, in each format diffusers reads: PEFT, kohya, and older diffusers.
LORA_DOWN_SUFFIXES = (".lora_A.weight", ".lora_down.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")
SAFETENSORS_FIX = "download the file again, or export it again with safetensors"


# ---------------------------------------------------------------------------------------------
# Reading files (validate: headers only)


def read_keys(path: Path) -> dict[str, str]:
    """The tensor names and dtypes in a safetensors file's header.

    The safetensors reader checks the header and that the tensors' byte ranges cover the file exactly, so a
    truncated file, or a pickle renamed ``.safetensors``, is refused here without reading a tensor.

    Raises:
        [`~publisher.errors.RecipeError`]: the file is not a whole safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return {key: str(handle.get_slice(key).get_dtype()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise refuse(path, f"is not a whole safetensors file ({' '.join(str(exc).split())})", SAFETENSORS_FIX) from None


def detect_family(path: Path, keys: Iterable[str], declared: str | None) -> CheckpointFamily:
    """The family of a single-file checkpoint, from its keys.

    Raises:
        [`~publisher.errors.RecipeError`]: the file is no Stable Diffusion checkpoint, or not of the ``declared``
        family.
    """
    keys = set(keys)
    if not any(key.startswith(UNET_PREFIX) for key in keys):
        raise refuse(path, f"holds no UNet ({UNET_PREFIX}* keys): it is not a Stable Diffusion checkpoint in the"
                           " original layout", "give the full checkpoint (a LoRA goes under source.loras)")
    found = next((family for family in CHECKPOINT_FAMILIES if family.marker in keys), None)
    if found is None:
        raise refuse(path, "holds no text encoder of a known family (SD 1.x, SD 2.x, SDXL base or refiner)",
                     "give source.family and source.config for another architecture")
    if declared is not None and declared != found.family:
        raise refuse(path, f"is an {found.name} checkpoint (it holds {found.marker}), but source.family is {declared}",
                     f"set source.family to {found.family} or give the {declared} checkpoint")
    return found


def config_folder(source: Source, family: CheckpointFamily) -> Path:
    """The architecture a single file loads into: the recipe's ``source.config``, else the family's shipped one."""
    return source.config if source.config is not None else CONFIGS / family.config


def single_file_architecture(source: Source) -> Path:
    """The configs folder a single-file source loads into, known before it loads (for ``plan``): the recipe's
    ``source.config``, or the shipped one of the family its keys (a local file) or the recipe (a Hub file) name.

    Raises:
        `LookupError`: a Hub file of undeclared family, whose keys are only read once it downloads.
    """
    if source.config is not None:
        return source.config
    if source.path is not None:
        return config_folder(source, detect_family(source.path, read_keys(source.path), source.family))
    declared = next((family for family in CHECKPOINT_FAMILIES if family.family == source.family), None)
    if declared is None:
        raise LookupError(f"the family of {source.display} is read from its keys once it downloads: give source.family")
    return CONFIGS / declared.config


def check_single_file_source(source: Source) -> tuple[CheckpointFamily | None, dict[str, Any] | None]:
    """Check a single-file source's local files as the assembly will read them.

    Returns:
        The checkpoint's family and its architecture's ``model_index.json``; both None for a Hub file, which
        is read only when the run downloads it.
    """
    for lora in source.loras:
        if lora.path is not None:
            read_keys(lora.path)
    if source.vae is not None and source.vae.path is not None and source.vae.is_single_file:
        read_keys(source.vae.path)
    if source.path is None or not source.is_single_file:
        return None, None
    family = detect_family(source.path, read_keys(source.path), source.family)
    folder = config_folder(source, family)
    index = read_json(folder / "model_index.json")
    if source.config is not None:
        for name in TOKENIZERS:
            if name in index:
                check_tokenizer(folder / name)
    return family, index


# ---------------------------------------------------------------------------------------------
# Fetching and hashing


def sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fetch(origin: ModelSource) -> Path:
    """The local file: the recipe's own, or the Hub file downloaded at its pinned revision into the Hub cache."""
    if origin.path is not None:
        return origin.path
    api = HfApi()
    call = HubCall(repo_id=str(origin.repo), revision=str(origin.revision), endpoint=api.endpoint, secret=get_token(),
                   step=f"download {origin.display}")
    with retry_notes(show=True), hub_errors(call):
        return Path(hf_hub_download(str(origin.repo), str(origin.filename), revision=origin.revision))


def describe_input(role: str, origin: ModelSource, path: Path, scale: float | None = None) -> SourceInput:
    return SourceInput(role=role, name=origin.display, repo=origin.repo, revision=origin.revision,
                       filename=origin.filename or path.name, sha256=sha256(path), scale=scale)


def weight_inputs(recipe: Recipe) -> list[SourceInput]:
    """The weight files of the diffusers (or transformers) folders or repos the converted components load, with
    their sha256.

    Raises:
        [`~publisher.errors.RecipeError`]: a model the run converts has no safetensors weights (only a pickle).

    A Hub file's sha256 is the one the Hub stores for it (its LFS object id, what the download is checked
    against), so a run that found every stage cached reports the same inputs without downloading anything.
    """
    source = recipe.source
    folders: list[tuple[ModelSource, str | None]] = []
    for model in dict.fromkeys(component_spec(component).model for component in recipe.conversion.components):
        if model == "controlnet":
            folders.append((source.controlnet, None))
        elif model == "language_model":  # a transformers model keeps its weights at the folder's root
            folders.append((source, None))
        elif model == "vae" and source.vae is not None:
            if not source.vae.is_single_file:
                folders.append((source.vae, None))
        elif not source.is_single_file:
            folders.append((source, model))
    inputs = []
    for origin, subfolder in folders:
        if origin.path is not None:
            folder = origin.path / subfolder if subfolder else origin.path
            found = {file.relative_to(origin.path).as_posix(): sha256(file) for file in sorted(folder.iterdir())
                     if WEIGHT_FILE.fullmatch(file.name)}
        else:
            found = _hub_weights(origin, subfolder)
        if not found:  # checked here, before any conversion, for a Hub source (a local one at validate)
            where = f"{origin.display}/{subfolder}" if subfolder else origin.display
            raise RecipeError(f"{where}: has no safetensors weights; pickled weights (.bin) are refused, since"
                              " loading one runs code from the file: use a revision with .safetensors weights")
        inputs += [SourceInput(role="weights", name=f"{origin.display}/{name}" if origin.repo else name,
                               repo=origin.repo, revision=origin.revision, filename=name, sha256=digest)
                   for name, digest in found.items()]
    return inputs


def _hub_weights(origin: ModelSource, subfolder: str | None) -> dict[str, str]:
    api = HfApi()
    call = HubCall(repo_id=str(origin.repo), revision=str(origin.revision), endpoint=api.endpoint, secret=get_token(),
                   step=f"list the weights of {origin.display}")
    with retry_notes(show=True), hub_errors(call):
        entries = api.list_repo_tree(str(origin.repo), path_in_repo=subfolder or "", revision=origin.revision)
        return {entry.path: entry.lfs.sha256 for entry in entries
                if getattr(entry, "lfs", None) and WEIGHT_FILE.fullmatch(entry.path.rsplit("/", 1)[-1])}


# ---------------------------------------------------------------------------------------------
# Assembling


def assemble_source(source: Source, folder: Path) -> Assembly:
    """Load the source's checkpoint (or pipeline), replace its VAE, fuse its LoRAs, and save the result.

    Args:
        source (`Source`):
            The recipe's source; ``source.needs_assembly`` is true.
        folder (`Path`):
            An empty folder: the pipeline goes to ``folder/pipeline``, the family and the inputs with their
            sha256 to ``folder/assembly.json`` (read back by `Assembly.load`).

    Returns:
        [`Assembly`]: the pipeline folder, the checkpoint's family and each file it was made from, with its sha256.

    Raises:
        [`~publisher.errors.RecipeError`]:
            A file is not whole safetensors, is of another family than the recipe says, does not fit the
            architecture, or a LoRA does not fit the model (exit 2).
    """
    import torch

    inputs: list[SourceInput] = []
    family = None
    if source.is_single_file:
        path = fetch(source)
        inputs.append(describe_input("checkpoint", source, path))
        pipe, dtype, family = _load_checkpoint(source, path)
    else:
        pipe, dtype = _load_pipeline(source), torch.float32
    if source.vae is not None and source.vae.is_single_file:
        vae_path = fetch(source.vae)
        inputs.append(describe_input("vae", source.vae, vae_path))
        pipe.vae = _load_vae(pipe, vae_path)
    for index, lora in enumerate(source.loras):
        lora_path = fetch(lora)
        inputs.append(describe_input("lora", lora, lora_path, lora.scale))
        fuse_lora(pipe, lora, lora_path, f"lora{index}")
    # Saved in the checkpoint's own precision: an fp16 file's weights lose nothing, and take half the disk.
    pipe.to(dtype)
    pipe.save_pretrained(folder / PIPELINE, safe_serialization=True)
    (folder / ASSEMBLY).write_text(json.dumps({"family": family, "inputs": [item.model_dump() for item in inputs]},
                                              indent=2) + "\n")
    return Assembly.load(folder)


def _pipeline_class(index: dict[str, Any]) -> Any:
    import diffusers

    return getattr(diffusers, str(index.get("_class_name")))


def _load_checkpoint(source: Source, path: Path) -> tuple[Any, Any, str]:
    import torch

    keys = read_keys(path)
    family = detect_family(path, keys, source.family)
    config = config_folder(source, family)
    index = read_json(config / "model_index.json")
    given = {} if source.config is not None else _family_tokenizers(family, index)
    floats = [dtype for key, dtype in keys.items() if key.startswith(UNET_PREFIX) and dtype.startswith(("F", "BF"))]
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(max(set(floats), key=floats.count), torch.float32)
    try:
        # Loaded in fp32 so that LoRAs fuse at full precision; EMA weights, when the file has them, are diffusers'
        # choice (extract_ema is off: the weights the file's own model uses).
        pipe = _pipeline_class(index).from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32, **given)
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        raise _misfit(path, config, exc) from None
    return pipe.to(torch.float32), dtype, family.family


def _misfit(path: Path, config: Path, exc: Exception) -> RecipeError:
    problem = " ".join(str(exc).split())[:300]
    return refuse(path, f"its weights do not fit the architecture in {config} ({type(exc).__name__}: {problem})",
                  "give the source.family it was trained as, or source.config with its architecture")


def _family_tokenizers(family: CheckpointFamily, index: dict[str, Any]) -> dict[str, Any]:
    """The family's real tokenizers, from its Hub pipeline at the pinned revision."""
    import transformers

    tokenizers = {}
    for name in TOKENIZERS:
        if name in index:
            cls = getattr(transformers, index[name][1])
            with hub_errors(HubCall(repo_id=family.repo, revision=family.revision, endpoint=HfApi().endpoint,
                                    secret=get_token(), step=f"read the {family.name} tokenizer")):
                tokenizers[name] = cls.from_pretrained(family.repo, subfolder=name, revision=family.revision)
    return tokenizers


def _load_pipeline(source: Source) -> Any:
    import torch
    from diffusers import DiffusionPipeline

    location = str(source.path) if source.path is not None else str(source.repo)
    try:
        return DiffusionPipeline.from_pretrained(location, revision=source.revision, torch_dtype=torch.float32,
                                                 use_safetensors=True)  # never unpickle
    except OSError as exc:
        raise PublisherError(f"cannot load the source pipeline {location}: {str(exc).splitlines()[0]}") from None


def _load_vae(pipe: Any, path: Path) -> Any:
    import torch
    from diffusers import AutoencoderKL

    read_keys(path)
    try:
        return AutoencoderKL.from_single_file(str(path), config=_saved_config(pipe.vae), torch_dtype=torch.float32,
                                              local_files_only=True)
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        problem = " ".join(str(exc).split())[:300]
        raise refuse(path, f"does not fit the pipeline's VAE ({type(exc).__name__}: {problem})",
                     "give the VAE file of this model family") from None


def _saved_config(model: Any) -> str:
    """A folder holding ``model``'s config.json: diffusers' single-file loader reads the architecture from a folder."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="config-"))
    model.save_config(folder)
    return str(folder)


def fuse_lora(pipe: Any, lora: Lora, path: Path, adapter: str) -> None:
    """Fuse one LoRA into the pipeline's weights at ``lora.scale``, and check that it changed what it names.

    diffusers skips the modules of a LoRA that the model lacks with a log line, and fusing nothing publishes the
    base model under the LoRA's name: every module the file names must receive the adapter, and its weight change.

    Raises:
        [`~publisher.errors.RecipeError`]: the LoRA does not fit the model, or names modules the model lacks.
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.error import NoMatchingPeftModuleError
    from safetensors.torch import load_file

    state = load_file(str(path))
    named = sum(1 for key in state if key.endswith(LORA_DOWN_SUFFIXES))
    fix = "give a LoRA trained for this base model"
    if not named:
        raise refuse(path, "holds no LoRA weights (no lora_A / lora_down keys)", fix)
    _check_alphas(path, state)
    try:
        pipe.load_lora_weights(state, adapter_name=adapter)
    except NoMatchingPeftModuleError:
        raise refuse(path, f"names {named} modules and none of them is in this model", fix) from None
    except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        problem = " ".join(str(exc).split())[:300]
        raise refuse(path, f"does not fit this model ({type(exc).__name__}: {problem})", fix) from None
    layers = [module for model in _lora_models(pipe) for module in model.modules()
              if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {})]
    if len(layers) < named:
        pipe.unload_lora_weights()
        raise refuse(path, f"names {named} modules but only {len(layers)} of them are in this model", fix)
    before = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[adapter])
    unchanged = sum(torch.equal(old, layer.get_base_layer().weight) for old, layer in zip(before, layers, strict=True))
    pipe.unload_lora_weights()
    if unchanged:
        raise refuse(path, f"fusing it left {unchanged} of its {named} modules unchanged (zero weights or scale 0)",
                     "check the file and source.loras scale")


def _lora_models(pipe: Any) -> list[Any]:
    return [getattr(pipe, name) for name in getattr(pipe, "_lora_loadable_modules", ())
            if getattr(pipe, name, None) is not None]


def _check_alphas(path: Path, state: dict[str, Any]) -> None:
    """Refuse a kohya LoRA whose modules of one model carry different alphas.

    diffusers 0.42 turns them into PEFT ``alpha_pattern`` entries named after the kohya keys
    (``_get_alpha_name`` in ``loaders/lora_conversion_utils.py`` splits on ``.lora.``, attention keys hold
    ``_lora.down.``), which match no module: PEFT drops them with a warning and fuses every module with the most
    common alpha, so the published weights would silently differ from the LoRA's.
    """
    alphas: dict[str, set[float]] = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            alphas.setdefault(key.split("_", 2)[1], set()).add(float(value))
    mixed = sorted(model for model, values in alphas.items() if len(values) > 1)
    if mixed:
        raise refuse(path, f"gives the modules of {mixed[0]} different alphas, which diffusers' kohya loader"
                           " would fuse with one alpha (wrong weights)", "give a LoRA with one alpha per model")
