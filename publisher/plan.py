"""``publisher plan``: what a recipe will build and how big, without loading any weights.

Each component's torch wrapper (what conversion traces, so what the report counts) is built on the
meta device from its model's config: the local source's, or for a Hub repository the architecture
config this checkout ships (:mod:`publisher.architectures`). Parameter counts are exact; sizes follow
how coremltools stores each tensor in the package's weight file (see :func:`tensor_bytes`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import diffusers
import torch
import transformers
from accelerate import init_empty_weights

from publisher.architectures import CONFIGS, architecture
from publisher.assemble import package_path
from publisher.checkpoint import single_file_architecture
from publisher.components import TABLE, component_spec
from publisher.errors import RecipeError
from publisher.language_model_source import inspect_language_model
from publisher.recipe import Palettize, Recipe, Scheme, load_recipe
from publisher.source import LoadedSource, detect_family, inspect_source, model_class, with_source_components
from publisher.wrappers import reference_module

# MIL blob storage (coremltools' weight.bin): a 64-byte file header, then per tensor a 64-byte header and
# its data padded to 64 bytes. Constants under 10 elements live in the model spec instead.
BLOB_ALIGNMENT = 64
INLINE_ELEMENTS = 10


@dataclass(frozen=True)
class PlannedPackage:
    """One package a recipe builds.

    Attributes:
        variant (`str`): The variant folder.
        component (`str`): The component converted (a chunked UNet is one row for both chunks).
        package (`str`): The package's path in the published repository.
        scheme (`str`): The compression scheme, as the report states it.
        parameters (`int`, *optional*): Parameters of the converted module; ``None`` when unknown.
        size_bytes (`int`, *optional*): Expected size of the package's weights; ``None`` when unknown.
    """

    variant: str
    component: str
    package: str
    scheme: str
    parameters: int | None
    size_bytes: int | None


@dataclass(frozen=True)
class Plan:
    """The packages of a recipe, the source's family (``None`` until loaded) and, when sizes are unknown, why."""

    packages: tuple[PlannedPackage, ...]
    family: str | None
    unknown: str | None = None


def empty_model(folder: Path) -> torch.nn.Module:
    """A diffusers or transformers model built from ``folder/config.json`` on the meta device.

    Args:
        folder (`Path`): A model folder (a pipeline's ``unet``, a ControlNet repository...).

    Returns:
        `torch.nn.Module`: the model with meta tensors: exact shapes, no memory.
    """
    config = json.loads((folder / "config.json").read_text())
    with init_empty_weights():
        if "_class_name" in config:
            return getattr(diffusers, config["_class_name"]).from_config(config)
        return model_class(config["architectures"][0])(transformers.AutoConfig.from_pretrained(folder))


def converted_module(component: str, model: torch.nn.Module, family: str = "sd1") -> torch.nn.Module:
    """The module conversion traces for ``component`` when its source model is ``model``.

    Args:
        component (`str`): A component of :data:`publisher.components.TABLE`.
        model (`torch.nn.Module`): The source model it comes from (see ``component_spec(component).model``).
        family (`str`): The source's family; it picks a text encoder's output layer, never its weights.

    Returns:
        `torch.nn.Module`: its wrapper from :mod:`publisher.wrappers` (e.g. the VAE decoder's
        ``post_quant_conv`` and ``decoder`` only).
    """
    # The wrapper reads its model from the pipeline's attribute, or for a ControlNet from the source's own.
    source = LoadedSource(pipe=SimpleNamespace(**{component_spec(component).model: model}), family=family,
                          license=None, revision=None, controlnet=model)
    return reference_module(source, component)


def count_parameters(folder: Path | None, name: str) -> int | None:
    """Exact parameter count from a model folder's config, on the meta device.

    Args:
        folder (`Path`, *optional*): The model folder holding ``config.json``.
        name (`str`): A component (counts what is converted for it) or a model folder name such as
            ``vae`` (counts the whole model).

    Returns:
        `int` or `None`: the count; ``None`` without a config.
    """
    if folder is None or not (folder / "config.json").is_file():
        return None
    model = empty_model(folder)
    module = converted_module(name, model) if name in TABLE else model
    return sum(parameter.numel() for parameter in module.parameters())


def model_folder(recipe: Recipe, component: str) -> Path:
    """The folder holding the config of the model ``component`` is made from.

    Args:
        recipe (`Recipe`): The validated recipe.
        component (`str`): A component it converts.

    Returns:
        `Path`: the local source's folder, the shipped architecture of its Hub repository, or the architecture a
        single-file checkpoint loads into.

    Raises:
        `LookupError`: a Hub repository without a shipped architecture, or a Hub file of undeclared family.
    """
    source = recipe.source
    model = component_spec(component).model
    separate = source.controlnet if model == "controlnet" else source.vae if model == "vae" else None
    if separate is not None and not separate.is_single_file:  # a VAE file has the pipeline's architecture
        return separate.path or architecture(separate.repo)
    if source.is_single_file:
        return single_file_architecture(source) / model
    return (source.path or architecture(source.repo)) / model


def _palette_bits(palettize: Palettize) -> float:
    mixed = palettize.mixed
    if mixed is None:
        return palettize.nbits
    if mixed.recipe is not None:
        try:
            return float(json.loads(mixed.recipe.read_text())["average_bits"])
        except (OSError, ValueError, KeyError, TypeError):
            raise RecipeError(f"{mixed.recipe}: not a mixed-bit recipe with a numeric 'average_bits'") from None
    # A PSNR target's widths are known only after the analysis: the widest candidate bounds them.
    return mixed.target_bits or max(mixed.candidates)


def _blob(data_bytes: float) -> int:
    return BLOB_ALIGNMENT + math.ceil(data_bytes / BLOB_ALIGNMENT) * BLOB_ALIGNMENT


def tensor_bytes(shape: torch.Size, scheme: Scheme | None, float_bits: int) -> int:
    """Bytes one constant takes in a package's weight file.

    Args:
        shape (`torch.Size`): Its shape; the first dimension is the output channels, which per-channel
            tables and scales follow.
        scheme (`Scheme`, *optional*): How it is compressed; ``None`` keeps it float.
        float_bits (`int`): 16 or 32, the component's precision (LUT entries and scales have it too).

    Returns:
        `int`: every blob of it (data, LUT, scales, sparsity mask), headers and padding included.
    """
    elements = shape.numel()
    if elements < INLINE_ELEMENTS:
        return 0
    if scheme is None:
        return _blob(elements * float_bits / 8)
    blobs = []
    kept = elements
    if scheme.prune:
        prune = scheme.prune
        kept = math.ceil(elements * (1 - (prune.sparsity or prune.n_m[0] / prune.n_m[1])))
        blobs.append(elements / 8)  # a 1-bit mask of the kept weights
    if scheme.palettize:
        bits = _palette_bits(scheme.palettize)
        tables = math.ceil(shape[0] / scheme.palettize.group_size) \
            if scheme.palettize.granularity == "per_grouped_channel" else 1
        blobs += [kept * bits / 8, tables * 2 ** math.ceil(bits) * float_bits / 8]
    elif scheme.quantize:
        quantize = scheme.quantize
        scales = elements // quantize.block_size if quantize.granularity == "per_block" else shape[0]
        blobs += [kept * quantize.nbits / 8, scales * float_bits / 8]
    else:
        blobs.append(kept * float_bits / 8)
    return sum(_blob(data) for data in blobs)


def _constants(module: torch.nn.Module) -> list[tuple[torch.Size, bool]]:
    """The shape of each constant a package stores for ``module``, and whether ``gather`` reads it.

    Beside the parameters, the trace records a text encoder's causal attention mask (transformers
    builds it per call, so it is no parameter) for the fixed sequence of its positions. Token
    embeddings are read by ``gather``, which Apple (and compression) leaves uncompressed; position
    embeddings are looked up with constant ids, which the converter folds into a plain constant.
    """
    gathered = set()
    masks = []
    for model in module.modules():
        if isinstance(model, transformers.PreTrainedModel) and model.main_input_name == "input_ids":  # text models
            gathered.add(id(model.get_input_embeddings().weight))
            sequence = model.config.max_position_embeddings
            masks.append((torch.Size((sequence, sequence)), False))
    return [(parameter.shape, id(parameter) in gathered) for parameter in module.parameters()] + masks


def package_bytes(module: torch.nn.Module, scheme: Scheme, float_bits: int, component: str = "") -> int:
    """The expected size of the weights of ``module`` converted and compressed with ``scheme``.

    Args:
        module (`torch.nn.Module`): The converted module (see :func:`converted_module`).
        scheme (`Scheme`): The component's compression; tensors of at most ``weight_threshold``
            elements and embeddings read by ``gather`` stay float. Overrides are not modelled.
        float_bits (`int`): 16 or 32, the component's precision.
        component (`str`): The component; a language model is its parameters alone, embeddings compressed too
            (its trace builds its mask from the inputs, and its table entry compresses embeddings).

    Returns:
        `int`: bytes of its weight file.
    """
    compresses = bool(scheme.palettize or scheme.quantize or scheme.prune)
    language_model = bool(component) and component_spec(component).compress_embeddings
    constants = [(parameter.shape, False) for parameter in module.parameters()] if language_model \
        else _constants(module)
    return BLOB_ALIGNMENT + sum(
        tensor_bytes(shape, scheme if compresses and shape.numel() > scheme.weight_threshold and not gathered else None,
                     float_bits)
        for shape, gathered in constants
    )


def plan_recipe(recipe: Recipe) -> Plan:
    """Every package ``recipe`` builds, with its parameters and expected size.

    Args:
        recipe (`Recipe`): The validated recipe.

    Returns:
        `Plan`: one row per variant and component; sizes are ``None`` where no config is at hand (a Hub
        repository without a shipped architecture), and ``Plan.unknown`` says why.
    """
    if recipe.task == "text-generation":
        return _plan_language_model(recipe)
    info = inspect_source(recipe)
    family = info.family or (_architecture_family(recipe) if recipe.source.repo else None)
    recipe = with_source_components(recipe, info.components or _architecture_models(recipe))
    estimates: dict[str, tuple[int | None, int | None]] = {}
    unknown = None
    for component in recipe.conversion.components:
        try:
            folder = model_folder(recipe, component)
        except LookupError as missing:
            unknown = str(missing)
            estimates[component] = (None, None)
            continue
        module = converted_module(component, empty_model(folder), family or "sd1")
        float_bits = 32 if recipe.conversion.precision_for(component) == "float32" else 16
        scheme = recipe.compression.for_component(component)
        estimates[component] = (sum(p.numel() for p in module.parameters()), package_bytes(module, scheme, float_bits))
    packages = []
    for variant in recipe.variants:
        for component in recipe.conversion.components:
            package = package_path(variant.folder_name, recipe, component)
            if component_spec(component).chunkable and recipe.conversion.chunk_unet:
                package = package.replace(".mlpackage", "_chunk1/2.mlpackage")
            packages.append(PlannedPackage(variant.folder_name, component, package,
                                           recipe.compression.for_component(component).describe(),
                                           *estimates[component]))
    return Plan(tuple(packages), family, unknown)


def _plan_language_model(recipe: Recipe) -> Plan:
    """A language model's one package per variant, sized from its config (the local folder's or the shipped one)."""
    family = inspect_language_model(recipe)
    (component,) = recipe.conversion.components
    scheme = recipe.compression.for_component(component)
    estimate: tuple[int | None, int | None] = (None, None)
    unknown = None
    try:
        model = empty_model(recipe.source.path or architecture(str(recipe.source.repo)))
        model.tie_weights()  # built on the meta device untied: a tied LM head is the embedding's constant
        float_bits = 32 if recipe.conversion.precision == "float32" else 16
        estimate = (sum(p.numel() for p in model.parameters()), package_bytes(model, scheme, float_bits, component))
    except LookupError as missing:
        unknown = str(missing)
    packages = tuple(PlannedPackage(variant.folder_name, component,
                                    package_path(variant.folder_name, recipe, component), scheme.describe(), *estimate)
                     for variant in recipe.variants)
    return Plan(packages, family, unknown)


def _architecture_models(recipe: Recipe) -> tuple[str, ...]:
    """The models of the architecture a Hub or single-file source is sized from; empty when none is known."""
    try:
        folder = single_file_architecture(recipe.source) if recipe.source.is_single_file else architecture(
            str(recipe.source.repo))
    except (LookupError, RecipeError):
        return ()
    index = json.loads((folder / "model_index.json").read_text())
    return tuple(name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None)


def _architecture_family(recipe: Recipe) -> str | None:
    """The family of a Hub source from its shipped architecture, when the recipe does not name it."""
    try:
        folder = architecture(recipe.source.repo)
    except LookupError:
        return None
    unet = folder / "unet" / "config.json"
    return detect_family(json.loads((folder / "model_index.json").read_text()),
                         json.loads(unet.read_text()) if unet.is_file() else None)


def format_size(size: int) -> str:
    """``size`` bytes in KiB, MiB or GiB, whichever keeps it readable.

    Args:
        size (`int`): A number of bytes.

    Returns:
        `str`: e.g. ``87.2 KiB``, ``614.6 MiB``, ``4.83 GiB``.
    """
    if size < 2**20:
        return f"{size / 2**10:.1f} KiB"
    if size < 2**30:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**30:.2f} GiB"


def describe_plan(recipe_file: str | Path) -> str:
    """The text ``publisher plan`` prints: the recipe's source, settings and packages.

    Args:
        recipe_file (`str` or `Path`): The recipe.

    Returns:
        `str`: a header, then one row per package (component, scheme, parameters, expected size, then
        the package path last, so Apple's long names cannot push the columns apart) and the total.
    """
    recipe = load_recipe(recipe_file)
    plan = plan_recipe(recipe)
    source = recipe.source

    def origin(model) -> str:
        if model.repo is None:
            return str(model.path)
        text = f"{model.repo} @ {model.revision}"
        try:
            return f"{text} (sized from {architecture(model.repo).relative_to(CONFIGS.parent)})"
        except LookupError:  # the note at the end says why
            return text

    lines = [
        f"{'recipe':<10} {recipe.name} ({recipe.file.name}, sha256 {recipe.sha256[:12]})",
        f"{'source':<10} {origin(source)}",
        *([f"{'vae':<10} {origin(source.vae)}"] if source.vae else []),
        *([f"{'controlnet':<10} {origin(source.controlnet)}"] if source.controlnet else []),
        f"{'family':<10} {plan.family or 'detected when loaded'}",
        f"{'target':<10} {recipe.target.repo}" + (" (private)" if recipe.target.private else ""),
        f"{'convert':<10} {recipe.conversion.precision}, {recipe.conversion.minimum_deployment_target.value}, "
        + (f"{recipe.conversion.context_length}-token KV cache as state" if recipe.task == "text-generation" else
           f"UNet batch {recipe.conversion.unet_batch}" + (", UNet in two chunks" if recipe.conversion.chunk_unet
                                                          else "")),
        "",
    ]
    total = sum(p.size_bytes or 0 for p in plan.packages)
    cells = [(p.component, p.scheme, str(p.parameters or "?"),
              format_size(p.size_bytes) if p.size_bytes else "?", p.package) for p in plan.packages]
    header = ("component", "scheme", "parameters", "size", "package")
    footer = ("total", f"{len(plan.packages)} packages", "", format_size(total) if not plan.unknown else "?", "")
    widths = [max(len(row[column]) for row in (header, *cells, footer)) for column in range(4)]
    for row in (header, *cells, footer):
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  "
                     f"{row[3]:>{widths[3]}}  {row[4]}".rstrip())
    if plan.unknown:
        lines += ["", f"sizes are known once the source loads: {plan.unknown}"]
    return "\n".join(lines)
