"""Recipe: the YAML file a maintainer writes, validated once into typed objects.

Every later stage receives a :class:`Recipe`; none of them reads YAML or dicts. Errors name the
file, the line and the field (``recipes/x.yaml:12: compression.unet.palettize.nbits: 5 is not
one of 1,2,3,4,6,8``) so a maintainer can fix them without reading a traceback.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from publisher.components import NAMES as COMPONENTS
from publisher.components import component_names, component_spec
from publisher.errors import RecipeError
from publisher.layout import ROOT_NAMES

Component = Literal[COMPONENTS]  # type: ignore[valid-type]  # the table's names, checked by pydantic
Task = Literal["text-to-image", "text-generation"]
# A language model's default parity prompts: several scripts, as multilingual families (Qwen2) are published.
LANGUAGE_MODEL_PROMPTS = ("The capital of France is", "Écris une phrase sur la mer.", "日本の首都は")
VAE_COMPONENTS = component_names("vae")
Precision = Literal["float16", "float32"]
PALETTIZE_NBITS = (1, 2, 3, 4, 6, 8)
# iOS16's constexpr_lut_to_dense stores 1, 2, 4, 6 or 8 bits (3 needs iOS18); Apple's mixed-bit recipes
# use the same set.
MIXED_NBITS = (1, 2, 4, 6, 8)

# fullmatch everywhere: `$` also matches before a trailing newline.
_NAMESPACED = re.compile(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Invisible characters that reorder the text around them (Trojan Source); a card or a terminal shows
# the text in an order other than its bytes'.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


class Target(str, Enum):
    """Minimum deployment targets, ordered by the Core ML opset they unlock."""

    iOS16 = "iOS16"
    iOS17 = "iOS17"
    iOS18 = "iOS18"
    macOS13 = "macOS13"
    macOS14 = "macOS14"
    macOS15 = "macOS15"

    @property
    def opset(self) -> int:
        """The iOS-equivalent generation: macOS13 ships the iOS16 opset, and so on."""
        return {"iOS16": 16, "iOS17": 17, "iOS18": 18, "macOS13": 16, "macOS14": 17, "macOS15": 18}[self.value]


def check_repo_id(value: str) -> str:
    """``value`` if it is a ``namespace/name`` id the Hub accepts, else ``ValueError`` saying why.

    huggingface_hub's validator holds the Hub's rules (length, ``--``, ``..``, ``.git``); it also admits
    a bare name, which the Hub would create under the token's own user: a publish names its namespace.
    """
    if not _NAMESPACED.fullmatch(value):
        raise ValueError(f"{value!r} is not a Hub repo id of the form 'namespace/name'")
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(
            f"{value!r} is not a valid Hub repo id: at most 96 letters, digits, '-', '_' or '.' on each side"
            " of the '/', not starting or ending with '-' or '.', no '--' or '..', not ending in '.git'"
        ) from None
    return value


def _plain_text(value: str | None) -> str | None:
    """Text that reaches the card as written: no control or direction-changing characters."""
    for char in value or "":
        if char in _BIDI_CONTROLS:
            raise ValueError(f"holds the bidirectional control character U+{ord(char):04X}: remove it")
        if unicodedata.category(char) == "Cc":
            raise ValueError(f"holds the control character U+{ord(char):04X}: remove it")
    return value


RepoId = Annotated[str, AfterValidator(check_repo_id)]
PlainText = Annotated[str, AfterValidator(_plain_text)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Pickled checkpoints run code from the file when loaded: refused, never unpickled.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
CHECKPOINT_SUFFIX = ".safetensors"


def check_weights_file(name: str) -> str:
    """``name`` if it names a safetensors file, else ``ValueError`` saying why and what to do."""
    suffix = Path(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{Path(name).name} is a pickle checkpoint ({suffix}): loading one runs any code it holds, so it is"
            " refused; use the repository's .safetensors file, or convert it to safetensors on a machine"
            " without secrets (safetensors.torch.save_file of its state dict)"
        )
    if suffix != CHECKPOINT_SUFFIX:
        raise ValueError(f"{Path(name).name} is not a {CHECKPOINT_SUFFIX} file")
    return name


class ModelSource(_Strict):
    """A pinned Hub revision or a local path: a diffusers folder, or one ``.safetensors`` file (``path`` to
    the file, or ``filename`` in the Hub repo)."""

    repo: RepoId | None = None
    revision: str | None = None
    path: Path | None = None
    filename: str | None = None

    @field_validator("revision")
    @classmethod
    def _pinned(cls, value: str | None) -> str | None:
        # A branch name would make two runs of the same recipe publish different weights.
        if value is not None and not _COMMIT_SHA.fullmatch(value):
            raise ValueError(f"{value!r} is not a 40-character commit sha: pin the exact revision")
        return value

    @field_validator("filename")
    @classmethod
    def _repo_file(cls, value: str | None) -> str | None:
        if value is None:
            return value
        # A path inside the repo, never out of the download folder; huggingface_hub refuses '..' too.
        if value.startswith("/") or "\\" in value or any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError(f"{value!r} must be a file's path inside the repository, like 'model.safetensors'")
        return check_weights_file(value)

    @field_validator("path")
    @classmethod
    def _no_pickle(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix.lower() in (*PICKLE_SUFFIXES, CHECKPOINT_SUFFIX):
            check_weights_file(value.name)
        return value

    @model_validator(mode="after")
    def _one_origin(self) -> ModelSource:
        if (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo' (with 'revision') or 'path'")
        if self.repo is not None and self.revision is None:
            raise ValueError("'revision' is required with 'repo': pin a commit sha")
        if self.path is not None and self.revision is not None:
            raise ValueError("'revision' only applies to 'repo', not to a local 'path'")
        if self.path is not None and self.filename is not None:
            raise ValueError("'filename' only applies to 'repo'; give a local file as 'path'")
        return self

    @property
    def is_single_file(self) -> bool:
        """Whether this is one checkpoint file rather than a diffusers folder or repository."""
        return self.filename is not None or (self.path is not None and self.path.suffix.lower() == CHECKPOINT_SUFFIX)

    @property
    def model_id(self) -> str:
        """The Hub id, or the local folder's (or file's) name."""
        return self.repo or Path(self.path or "").name

    @property
    def display(self) -> str:
        """How the card and messages name it: the Hub file, or the local file's or folder's name."""
        if self.repo is not None:
            return f"{self.repo}/{self.filename}" if self.filename else self.repo
        return Path(self.path or "").name


class SingleFile(ModelSource):
    """A ``.safetensors`` file: local, or in a Hub repo at a pinned revision."""

    @model_validator(mode="after")
    def _a_file(self) -> SingleFile:
        if not self.is_single_file:
            raise ValueError("give a .safetensors file: 'path' to it, or 'repo', 'revision' and 'filename'")
        return self


class Lora(SingleFile):
    """A LoRA fused into the weights before conversion, in diffusers/PEFT or kohya format."""

    scale: Annotated[float, Field(gt=-8, lt=8)] = 1.0


class Source(ModelSource):
    """Where the diffusers pipeline comes from, and the single models that replace or join it."""

    family: Literal["sd1", "sd2", "sdxl"] | None = None
    # A single-file checkpoint's architecture: a diffusers pipeline folder of configs (and tokenizers), for
    # architectures that are not a shipped family (distilled or small UNets). Default: the family's shipped one.
    config: Path | None = None
    # Replaces the pipeline's VAE, e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE overflows in float16.
    vae: ModelSource | None = None
    # A diffusers ControlNetModel, converted as the `controlnet` component.
    controlnet: ModelSource | None = None
    loras: tuple[Lora, ...] = ()

    @property
    def needs_assembly(self) -> bool:
        """Whether diffusers cannot load the source as one pipeline folder: it is assembled into one first."""
        return self.is_single_file or bool(self.loras) or (self.vae is not None and self.vae.is_single_file)


class PublishTarget(_Strict):
    repo: RepoId
    private: bool = False


class Variant(_Strict):
    """One attention implementation, published under its own folder."""

    attention: Literal["original", "split_einsum", "split_einsum_v2"] = "original"
    folder: str | None = None

    @field_validator("folder")
    @classmethod
    def _safe_folder(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not _FOLDER.fullmatch(value):
            raise ValueError(f"{value!r} must be one plain folder name (letters, digits, '.', '_', '-')")
        # Compared case-insensitively: the repository is downloaded to macOS, whose file system is.
        if value.casefold() in {name.casefold() for name in ROOT_NAMES}:
            raise ValueError(f"{value!r} is a file or folder of the published repository itself: choose another name")
        return value

    @property
    def folder_name(self) -> str:
        return self.folder or self.attention


class Conversion(_Strict):
    components: tuple[Component, ...] = component_names(default=True)
    precision: Precision = "float16"
    # SDXL's VAE overflows in float16 (black images): keep it float32 unless the source VAE is the fixed one.
    vae_precision: Precision | None = None
    minimum_deployment_target: Target = Target.iOS16
    image_size: Annotated[int, Field(ge=64, le=2048, multiple_of=64)] | None = None
    unet_batch: Annotated[int, Field(ge=1, le=8)] = 2
    # Apple's --chunk-unet: iOS maps large models badly, so UNets above ~6 bits ship as two packages.
    chunk_unet: bool = False
    # Language models: the KV cache's length (tokens), and the longest input one call takes (a prompt chunk; decode
    # feeds one token). Default: the whole context.
    context_length: Annotated[int, Field(ge=2, le=131072)] = 2048
    max_input_length: Annotated[int, Field(ge=2, le=131072)] | None = None

    @field_validator("components")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("list at least one component")
        if len(set(value)) != len(value):
            raise ValueError("a component is listed twice")
        return value

    @model_validator(mode="after")
    def _chunked_unet_is_converted(self) -> Conversion:
        if self.chunk_unet and not any(component_spec(component).chunkable for component in self.components):
            raise ValueError(f"chunk_unet needs one of {', '.join(component_names(chunkable=True))} in components")
        return self

    def precision_for(self, component: str) -> Precision:
        if component in VAE_COMPONENTS and self.vae_precision is not None:
            return self.vae_precision
        return self.precision


class MixedBits(_Strict):
    """Mixed-bit palettization (publisher/mixed_bit.py): per-layer nbits for a target, or a stored recipe."""

    target_bits: Annotated[float, Field(ge=1, le=8)] | None = None
    target_psnr: Annotated[float, Field(gt=0, le=200)] | None = None
    recipe: Path | None = None
    candidates: tuple[Literal[MIXED_NBITS], ...] = MIXED_NBITS  # type: ignore[valid-type]
    groups: Annotated[int, Field(ge=1, le=256)] = 8

    @model_validator(mode="after")
    def _one_target(self) -> MixedBits:
        given = [self.target_bits is not None, self.target_psnr is not None, self.recipe is not None]
        if sum(given) != 1:
            raise ValueError("give exactly one of 'target_bits', 'target_psnr' or 'recipe'")
        if len(set(self.candidates)) < 2:
            raise ValueError("list at least two distinct candidate nbits")
        if self.target_bits is not None and not min(self.candidates) <= self.target_bits <= max(self.candidates):
            raise ValueError(
                f"target_bits {self.target_bits:g} is outside the candidates' range"
                f" {min(self.candidates)}-{max(self.candidates)}"
            )
        return self


class Palettize(_Strict):
    """k-means (or uniform) look-up-table compression, decompressed just in time by Core ML."""

    nbits: Literal[PALETTIZE_NBITS] | None = None  # type: ignore[valid-type]
    mixed: MixedBits | None = None
    mode: Literal["kmeans", "uniform"] = "kmeans"
    granularity: Literal["per_tensor", "per_grouped_channel"] = "per_tensor"
    group_size: Annotated[int, Field(ge=1, le=4096)] = 16

    @model_validator(mode="after")
    def _bits(self) -> Palettize:
        if (self.nbits is None) == (self.mixed is None):
            raise ValueError("give exactly one of 'nbits' or 'mixed'")
        if self.mixed and (self.mode != "kmeans" or self.granularity != "per_tensor"):
            raise ValueError("'mixed' is per_tensor kmeans only")
        return self

    def describe(self) -> str:
        if self.mixed is None:
            return f"{self.nbits}-bit {self.mode}"
        mixed = self.mixed
        target = (f"{mixed.target_bits:g} bits" if mixed.target_bits is not None
                  else f"{mixed.target_psnr:g} dB" if mixed.target_psnr is not None else f"recipe {mixed.recipe.name}")
        return f"mixed-bit ({target})"


class Quantize(_Strict):
    """Linear (affine) weight quantization."""

    nbits: Literal[4, 8] = 8
    granularity: Literal["per_channel", "per_block"] = "per_channel"
    block_size: Annotated[int, Field(ge=1, le=4096)] = 32


class Prune(_Strict):
    """Magnitude pruning: unstructured ``sparsity`` or an ``n:m`` pattern."""

    sparsity: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    n_m: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=2)]] | None = None

    @model_validator(mode="after")
    def _one_pattern(self) -> Prune:
        if (self.sparsity is None) == (self.n_m is None):
            raise ValueError("give exactly one of 'sparsity' or 'n_m'")
        if self.n_m is not None and self.n_m[0] >= self.n_m[1]:
            raise ValueError(f"n_m {list(self.n_m)}: n must be smaller than m")
        return self


class Override(_Strict):
    """The compression of the weights whose MIL name, or the name of an op reading them, matches ``pattern``
    (fnmatch). ``skip: true`` leaves them float; otherwise the stages given replace the component's."""

    pattern: Annotated[str, Field(min_length=1, max_length=300)]
    skip: bool = False
    palettize: Palettize | None = None
    quantize: Quantize | None = None
    prune: Prune | None = None

    @model_validator(mode="after")
    def _something(self) -> Override:
        stages = self.palettize or self.quantize or self.prune
        if self.skip == bool(stages):
            raise ValueError("give 'skip: true' or at least one of 'palettize', 'quantize', 'prune'")
        if self.palettize and self.palettize.mixed:
            raise ValueError("'mixed' applies to a whole component, not to an override")
        if self.palettize and self.quantize:
            raise ValueError("choose 'palettize' or 'quantize', not both")
        if self.quantize and self.prune:
            raise ValueError("'prune' combines with 'palettize' only, not with 'quantize'")
        return self

    def stages(self) -> Scheme:
        """The override as a scheme of its own (validated like one)."""
        return Scheme(palettize=self.palettize, quantize=self.quantize, prune=self.prune)


class Scheme(_Strict):
    """The compression of one component. ``none`` in YAML is an empty scheme."""

    palettize: Palettize | None = None
    quantize: Quantize | None = None
    prune: Prune | None = None
    weight_threshold: Annotated[int, Field(ge=0)] = 2048
    # Later entries win where several patterns match one weight.
    overrides: tuple[Override, ...] = ()

    @model_validator(mode="after")
    def _compatible(self) -> Scheme:
        if self.palettize and self.quantize:
            raise ValueError("choose 'palettize' or 'quantize', not both")
        if self.quantize and self.prune:
            raise ValueError("'prune' combines with 'palettize' only, not with 'quantize'")
        return self

    @property
    def is_none(self) -> bool:
        return not (self.palettize or self.quantize or self.prune or any(not o.skip for o in self.overrides))

    @property
    def min_opset(self) -> int:
        """The oldest Core ML opset (iOS generation) that can store this scheme."""
        needs_18 = (
            (self.palettize and self.prune)
            or (self.palettize and self.palettize.granularity == "per_grouped_channel")
            or (self.quantize and (self.quantize.nbits == 4 or self.quantize.granularity == "per_block"))
        )
        return max([18 if needs_18 else 16, *(o.stages().min_opset for o in self.overrides if not o.skip)])

    def describe(self) -> str:
        """One human-readable line, used by `plan`, the report and the card."""
        parts = []
        if self.prune:
            pattern = f"{self.prune.n_m[0]}:{self.prune.n_m[1]}" if self.prune.n_m else f"{self.prune.sparsity:g}"
            parts.append(f"prune {pattern}")
        if self.palettize:
            grouped = (
                f", grouped channels of {self.palettize.group_size}"
                if self.palettize.granularity == "per_grouped_channel"
                else ""
            )
            parts.append(f"palettize {self.palettize.describe()}{grouped}")
        if self.quantize:
            block = f", blocks of {self.quantize.block_size}" if self.quantize.granularity == "per_block" else ""
            parts.append(f"quantize {self.quantize.nbits}-bit linear {self.quantize.granularity}{block}")
        if self.overrides:
            parts.append(f"{len(self.overrides)} override{'s' if len(self.overrides) > 1 else ''}")
        return " + ".join(parts) or "none"


def _scheme_or_none(value: Any) -> Any:
    return {} if value in ("none", None) else value


class _CompressionBase(_Strict):
    """A :class:`Scheme` per component of the table (fields added by :data:`Compression`)."""

    @model_validator(mode="before")
    @classmethod
    def _none_words(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: _scheme_or_none(value) for key, value in data.items()}
        return data

    def for_component(self, component: str) -> Scheme:
        return getattr(self, component)


# One field per component of the table, so adding a component adds its `compression.<name>` key.
Compression = create_model(
    "Compression", __base__=_CompressionBase,
    **{name: (Scheme, Field(default_factory=Scheme)) for name in COMPONENTS},  # type: ignore[call-overload]
)


class Parity(_Strict):
    min_psnr: Annotated[float, Field(ge=0, le=200)] = 35.0
    per_component: dict[Component, Annotated[float, Field(ge=0, le=200)]] = Field(default_factory=dict)
    image_steps: Annotated[int, Field(ge=0, le=100)] = 4
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    # The image check's classifier-free guidance: 0 for adversarially distilled models (SD-Turbo, SDXL-Turbo), which
    # their cards sample without guidance.
    guidance_scale: Annotated[float, Field(ge=0, le=30)] = 7.5
    # Language models: greedy tokens decoded after each prompt, and the share of positions whose top-1 token must
    # match the reference's. Unset thresholds default per compression scheme (publisher.language_model_parity).
    decode_steps: Annotated[int, Field(ge=1, le=256)] = 16
    min_token_agreement: Annotated[float, Field(ge=0, le=1)] | None = None

    def threshold(self, component: str) -> float:
        return self.per_component.get(component, self.min_psnr)  # type: ignore[call-overload]


class Card(_Strict):
    prompts: tuple[Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_plain_text)], ...] = (
        "a photo of an astronaut riding a horse on mars",
    )
    license: PlainText | None = None
    license_name: PlainText | None = None
    license_link: PlainText | None = None
    tags: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")], ...] = ()
    template: Path | None = None

    @model_validator(mode="after")
    def _other_license(self) -> Card:
        if self.license == "other" and not (self.license_name and self.license_link):
            raise ValueError("license 'other' needs 'license_name' and 'license_link'")
        return self


class Recipe(_Strict):
    """A validated recipe. Paths inside it are absolute (resolved against the recipe's folder)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")]
    # text-to-image: a diffusers pipeline; text-generation: a transformers causal LM (publisher.language_model).
    task: Task = "text-to-image"
    source: Source
    target: PublishTarget
    variants: tuple[Variant, ...] = (Variant(),)
    conversion: Conversion = Field(default_factory=Conversion)
    compression: Compression = Field(default_factory=Compression)
    parity: Parity = Field(default_factory=Parity)
    card: Card = Field(default_factory=Card)

    # Set by load_recipe, not by the YAML.
    file: Path = Field(default=Path("<memory>"), exclude=True)
    text: str = Field(default="", exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """A language model's defaults: its one component, the first target with states, prompts of text."""
        if not (isinstance(data, dict) and data.get("task") == "text-generation"):
            return data
        data = dict(data)
        conversion = data.get("conversion")
        if conversion is None or isinstance(conversion, dict):
            conversion = dict(conversion or {})
            conversion.setdefault("components", list(component_names("language_model")))
            conversion.setdefault("minimum_deployment_target", Target.iOS18.value)
            data["conversion"] = conversion
        card = data.get("card")
        if card is None or isinstance(card, dict):
            data["card"] = {"prompts": list(LANGUAGE_MODEL_PROMPTS), **(card or {})}
        return data

    @field_validator("variants")
    @classmethod
    def _distinct_folders(cls, value: tuple[Variant, ...]) -> tuple[Variant, ...]:
        if not value:
            raise ValueError("list at least one variant")
        folders = [v.folder_name for v in value]
        if len(set(folders)) != len(folders):
            raise ValueError(f"two variants land in the same folder: {folders}")
        return value

    @property
    def sha256(self) -> str:
        """Hash of the recipe file's bytes: the report and card name the exact recipe."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def model_version(self) -> str:
        """The model id in Apple's package names (``Stable_Diffusion_version_<id>_<component>``)."""
        return self.source.repo or self.name


# ---------------------------------------------------------------------------------------------
# Loading with line numbers

_MAX_NODES = 20_000  # far above any real recipe; stops alias bombs before they expand
# Checked before parsing: PyYAML composes the whole document first, and a 12 MB flat list took 3.8 GB
# and 107 s to reach the node count above. Real recipes are a few KB.
_MAX_BYTES = 256 * 1024
_CORE_TAG = "tag:yaml.org,2002:"
# What the safe loader resolves plain YAML to. Any other tag (`!!python/object:...`, a local `!secret`)
# asks for a construction this loader ignores while composing: refused rather than silently dropped.
_PLAIN_TAGS = frozenset(_CORE_TAG + kind for kind in ("str", "int", "float", "bool", "null", "map", "seq",
                                                       "timestamp"))


def _compose_with_lines(text: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse YAML, remembering the line of every key and item so errors can point at it."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[tuple[Any, ...], int] = {}
    visited = 0

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> Any:
        nonlocal visited
        visited += 1
        if visited > _MAX_NODES or len(path) > 32:
            raise RecipeError(f"line {node.start_mark.line + 1}: the document is too large or too deeply nested")
        lines.setdefault(path, node.start_mark.line + 1)
        if node.tag not in _PLAIN_TAGS:
            shown = "!!" + node.tag.removeprefix(_CORE_TAG) if node.tag.startswith(_CORE_TAG) else node.tag
            raise RecipeError(f"line {node.start_mark.line + 1}: the YAML tag {shown} is not allowed:"
                              " a recipe holds plain mappings, lists and values")
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = _scalar(key_node)
                if not isinstance(key, str | int | float | bool) or key is None:
                    raise RecipeError(f"line {key_node.start_mark.line + 1}: a key must be a plain name")
                if key in out:
                    raise RecipeError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice")
                lines[path + (key,)] = key_node.start_mark.line + 1
                out[key] = walk(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [walk(item, path + (index,)) for index, item in enumerate(node.value)]
        return _scalar(node)

    return (walk(root, ()) if root is not None else None), lines


def _scalar(node: yaml.Node) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return [] if isinstance(node, yaml.SequenceNode) else {}
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node)
    finally:
        loader.dispose()


def _line_of(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def _describe(error: dict[str, Any]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", "")
        choices = ",".join(part.strip() for part in re.split(r",| or ", expected) if part.strip())
        return f"{value!r} is not one of {choices}" if isinstance(value, str) else f"{value} is not one of {choices}"
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see recipes/README.md for the schema)"
    if kind == "missing":
        return "is required"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {value!r}"
    if kind == "enum":
        return f"{value!r} is not one of " + ",".join(target.value for target in Target)
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _dotted(loc: tuple[Any, ...]) -> str:
    # A fuzzed or mistyped key may hold spaces or control characters: quote it so the line stays one line.
    parts = [str(part) if re.fullmatch(r"[\w-]+", str(part)) else repr(str(part)) for part in loc if part != "[key]"]
    return ".".join(parts) or "(top level)"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Raises :class:`RecipeError` with a one-line message."""
    path = Path(path)
    shown = _display(path)
    try:
        size = path.stat().st_size
        if size > _MAX_BYTES:
            raise RecipeError(f"{shown}: the recipe is {size:,} bytes, too large for a recipe (at most"
                              f" {_MAX_BYTES:,}): is this the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{shown}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{shown}: cannot read the recipe ({exc.__class__.__name__})") from None
    try:
        data, lines = _compose_with_lines(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError(f"{shown}:{line}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        position = getattr(exc, "position", None)
        where = f" (character {position})" if position is not None else ""
        problem = getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{shown}: invalid YAML{where}: {problem}") from None
    except RecipeError as exc:
        raise RecipeError(f"{shown}:{str(exc).removeprefix('line ')}") from None
    except RecursionError:
        raise RecipeError(f"{shown}: the document is nested too deeply") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{shown}:1: a recipe is a mapping with 'name', 'source' and 'target'")

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        more = exc.error_count() - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise RecipeError(f"{shown}:{_line_of(lines, loc)}: {_dotted(loc)}: {_describe(first)}{suffix}") from None

    folder = path.resolve().parent
    recipe = _resolve_paths(recipe, folder)
    problem = _cross_check(recipe, data, folder)
    if problem:
        loc, message = problem
        raise RecipeError(f"{shown}:{_line_of(lines, loc)}: {_dotted(loc)}: {message}")
    return recipe.model_copy(update={"file": path.resolve(), "text": text})


def _resolve_origin(origin: ModelSource, base: Path) -> ModelSource:
    if origin.path is None or origin.path.is_absolute():
        return origin
    return origin.model_copy(update={"path": (base / origin.path).resolve()})


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    source, card = recipe.source, recipe.card
    source = _resolve_origin(source, base)
    extras: dict[str, Any] = {name: _resolve_origin(getattr(source, name), base) for name in ("vae", "controlnet")
                              if getattr(source, name) is not None}
    extras["loras"] = tuple(_resolve_origin(lora, base) for lora in source.loras)
    if source.config is not None and not source.config.is_absolute():
        extras["config"] = (base / source.config).resolve()
    source = source.model_copy(update=extras)
    if card.template is not None and not card.template.is_absolute():
        card = card.model_copy(update={"template": (base / card.template).resolve()})
    compression = recipe.compression
    for component in COMPONENTS:
        palettize = compression.for_component(component).palettize
        mixed = palettize.mixed if palettize else None
        if palettize and mixed and mixed.recipe is not None and not mixed.recipe.is_absolute():
            mixed = mixed.model_copy(update={"recipe": (base / mixed.recipe).resolve()})
            scheme = compression.for_component(component)
            scheme = scheme.model_copy(update={"palettize": palettize.model_copy(update={"mixed": mixed})})
            compression = compression.model_copy(update={component: scheme})
    return recipe.model_copy(update={"source": source, "card": card, "compression": compression})


def _check_local_files(source: Source, task: Task) -> tuple[tuple[Any, ...], str] | None:
    """The local paths exist and are what the recipe takes them for: folders with their index, or files."""
    if task == "text-generation":
        if source.path is not None and not (source.path / "config.json").is_file():
            return ("source", "path"), f"{source.path} is not a transformers model folder (no config.json)"
        return None
    if source.path is not None and source.is_single_file and not source.path.is_file():
        return ("source", "path"), f"{source.path} does not exist"
    if source.path is not None and not source.is_single_file and not (source.path / "model_index.json").is_file():
        return ("source", "path"), (f"{source.path} is not a diffusers pipeline folder (no model_index.json) nor a"
                                    " .safetensors checkpoint")
    if source.config is not None and not source.is_single_file:
        return ("source", "config"), "only applies to a single-file checkpoint source; a pipeline has its own configs"
    if source.config is not None and not (source.config / "model_index.json").is_file():
        return ("source", "config"), (f"{source.config} is not a diffusers pipeline folder of configs"
                                      " (no model_index.json)")
    for name in ("vae", "controlnet"):
        model: ModelSource | None = getattr(source, name)
        if model is None or model.path is None:
            continue
        if model.is_single_file and name == "controlnet":
            return ("source", name, "path"), "a ControlNet is loaded from a diffusers folder or repo, not one file"
        if model.is_single_file and not model.path.is_file():
            return ("source", name, "path"), f"{model.path} does not exist"
        if not model.is_single_file and not (model.path / "config.json").is_file():
            return ("source", name, "path"), f"{model.path} is not a diffusers model folder (no config.json)"
    if source.controlnet is not None and source.controlnet.filename is not None:
        return ("source", "controlnet", "filename"), "a ControlNet is loaded from a diffusers repo, not one file"
    for index, lora in enumerate(source.loras):
        if lora.path is not None and not lora.path.is_file():
            return ("source", "loras", index, "path"), f"{lora.path} does not exist"
    return None


def consumer_batch_problem(family: str | None, unet_batch: int) -> str | None:
    """Why no consumer could load a UNet of ``unet_batch`` for ``family``, or None.

    Apple's SDXL pipelines (Swift and Python) double the latents and pass two timesteps and two rows of
    ``time_ids`` whatever the guidance, so a UNet of another batch fails in both
    (``Expected shape (1, 4, h, w), got (2, 4, h, w)``).
    """
    if family == "sdxl" and unet_batch != 2:
        return (f"{unet_batch} cannot be loaded by Apple's SDXL pipelines (Swift and Python), which always feed the"
                " UNet batch 2: set 2")
    return None


def is_inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, with every symlink resolved, lies within ``folder`` (itself resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


def _cross_check(recipe: Recipe, data: dict[str, Any], folder: Path) -> tuple[tuple[Any, ...], str] | None:
    """Checks that span several fields; returns the first problem's location and message."""
    source = recipe.source
    problem = _check_local_files(source, recipe.task)
    if problem:
        return problem
    template = recipe.card.template
    if template is not None and not is_inside(template, folder):
        # A merged recipe runs in CI beside HF_TOKEN: a template path is how /proc/self/environ would
        # reach the published card. Resolved first, so a symlink cannot lead out either.
        return ("card", "template"), (
            f"{template} must be a file inside the recipe's folder {folder} (a path outside it, or a symlink"
            " leading out of it, is refused)"
        )
    if template is not None and not template.is_file():
        return ("card", "template"), f"{template} does not exist"

    converted = set(recipe.conversion.components)
    language_model = set(component_names("language_model"))
    if recipe.task == "text-generation":
        return _language_model_problem(recipe, data)
    if converted & language_model:
        return ("conversion", "components"), "language_model needs task: text-generation"
    if "controlnet" in converted and source.controlnet is None:
        return ("conversion", "components"), "controlnet needs source.controlnet (the ControlNet model to convert)"
    if source.controlnet is not None and "controlnet" not in converted:
        return ("source", "controlnet"), "is given but conversion.components does not list controlnet"
    if recipe.conversion.vae_precision is not None and not converted & set(VAE_COMPONENTS):
        return ("conversion", "vae_precision"), "no VAE component is listed in conversion.components"
    if source.vae is not None and not converted & set(VAE_COMPONENTS):
        return ("source", "vae"), "is given but no VAE component is listed in conversion.components"
    target = recipe.conversion.minimum_deployment_target
    given = data.get("compression") if isinstance(data.get("compression"), dict) else {}
    for component in given:
        scheme = recipe.compression.for_component(component)
        if component not in converted and not scheme.is_none:
            return ("compression", component), "is compressed but not listed in conversion.components"
        if scheme.min_opset > target.opset:
            return ("compression", component), (
                f"{scheme.describe()} needs iOS18/macOS15; conversion.minimum_deployment_target is {target.value}"
            )
        if scheme.palettize and scheme.palettize.mode == "uniform" and scheme.palettize.granularity != "per_tensor":
            return ("compression", component, "palettize", "granularity"), "uniform mode is per_tensor only"
        mixed = scheme.palettize.mixed if scheme.palettize else None
        if mixed and mixed.recipe is not None and not is_inside(mixed.recipe, folder):
            return ("compression", component, "palettize", "mixed", "recipe"), (
                f"{mixed.recipe} must be a file inside the recipe's folder {folder}")
        if mixed and mixed.recipe is not None and not mixed.recipe.is_file():
            return ("compression", component, "palettize", "mixed", "recipe"), f"{mixed.recipe} does not exist"
    for component in recipe.parity.per_component:
        if component not in converted:
            return ("parity", "per_component", component), "is not listed in conversion.components"
    batch_problem = consumer_batch_problem(source.family, recipe.conversion.unet_batch)
    if batch_problem:
        return ("conversion", "unet_batch"), batch_problem
    if "text_encoder_2" in converted and source.family in ("sd1", "sd2"):
        return ("conversion", "components"), f"text_encoder_2 exists only in sdxl pipelines, not {source.family}"
    return None


def _language_model_problem(recipe: Recipe, data: dict[str, Any]) -> tuple[tuple[Any, ...], str] | None:
    """What a ``text-generation`` recipe cannot ask for: the diffusion fields, a target without states."""
    source, conversion = recipe.source, recipe.conversion
    if set(conversion.components) != set(component_names("language_model")):
        return ("conversion", "components"), "a text-generation recipe converts language_model alone"
    for name in ("family", "config", "vae", "controlnet", "filename"):
        if getattr(source, name) is not None:
            return ("source", name), "is for diffusion pipelines; a language model's source is a folder or Hub repo"
    if source.loras:
        return ("source", "loras"), "LoRAs are fused into diffusion pipelines only"
    if conversion.minimum_deployment_target.opset < 18:
        return ("conversion", "minimum_deployment_target"), (
            f"{conversion.minimum_deployment_target.value}: the KV cache is a Core ML state, which needs iOS18 or"
            " macOS15")
    if conversion.max_input_length is not None and conversion.max_input_length > conversion.context_length:
        return ("conversion", "max_input_length"), (
            f"{conversion.max_input_length} is longer than conversion.context_length {conversion.context_length}")
    if any(variant.attention != "original" for variant in recipe.variants):
        return ("variants",), "language models have one attention implementation: leave attention unset"
    scheme = recipe.compression.for_component("language_model")
    if scheme.min_opset > conversion.minimum_deployment_target.opset:
        return ("compression", "language_model"), (
            f"{scheme.describe()} needs iOS18/macOS15; conversion.minimum_deployment_target is"
            f" {conversion.minimum_deployment_target.value}")
    return None
