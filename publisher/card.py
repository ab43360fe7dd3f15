"""Card: render the published folder's README.md from the run's own measurements.

Every number on the card comes from ``publish_report.json`` (and ``device_results.json`` when a
device run was recorded later), so ``publisher card DIR`` can refresh it without reconverting.
Metadata goes through huggingface_hub's ``ModelCardData`` so the YAML header is exactly what the
Hub validates; the body is a jinja2 template, built from the typed :class:`CardContext`, so a
recipe can swap it (and still ``{% include %}`` the stock partials in ``publisher/templates/partials/``).
"""

from __future__ import annotations

import os
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import ModelCard, ModelCardData
from PIL import Image, ImageDraw, ImageFont

from publisher.card_template import TEMPLATES, render
from publisher.components import swift_resource
from publisher.device_results import DeviceRun, read_device_results
from publisher.errors import PublisherError, RecipeError
from publisher.layout import CARD_NAME, DEVICE_RESULTS_NAME, IMAGES_FOLDER, RECIPE_NAME
from publisher.recipe import Recipe
from publisher.report import (
    ComponentReport,
    ImageParity,
    ParityResult,
    PublishReport,
    StageCost,
    TokenParity,
    VariantReport,
    tool_versions,
)

DEFAULT_TEMPLATE = TEMPLATES / "model_card.md.j2"
BASE_TAGS = ("coreml", "core-ml")
# The Hub's pipeline tag and the tags of each task, and what the card calls a local source of it.
TASK_TAGS = {"text-to-image": ("stable-diffusion", "text-to-image"), "text-generation": ("text-generation",)}
LOCAL_SOURCE_KIND = {"text-to-image": "diffusers pipeline", "text-generation": "transformers model folder"}
GRID_PATH = "images/image_grid.png"
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"
PACKAGE_PREFIX = "Stable_Diffusion_version_"

# Columns of the parity table, in this order when present.
BACKENDS = {
    "executor-fp32": "Linux executor, fp32",
    "executor-fp16": "Linux executor, fp16",
    "coreml-runtime": "Core ML runtime",
}
SWIFT_COMPUTE_UNITS = {
    "ALL": "all",
    "CPU_ONLY": "cpuOnly",
    "CPU_AND_GPU": "cpuAndGPU",
    "CPU_AND_NE": "cpuAndNeuralEngine",
}

# Image grid geometry, in pixels.
GRID_TILE = 256
GRID_LABEL_WIDTH = 240
GRID_HEADER_HEIGHT = 36
GRID_CAPTION_HEIGHT = 26
GRID_PAD = 8
_GRID_BACKGROUND = (255, 255, 255)
_GRID_TILE_BACKGROUND = (236, 236, 236)
_GRID_TEXT = (34, 34, 34)


# ---------------------------------------------------------------------------------------------
# The typed context the templates render


@dataclass(frozen=True)
class SchemeLine:
    """One compression scheme and the components it was applied to."""

    scheme: str
    components: tuple[str, ...]


@dataclass(frozen=True)
class VariantRow:
    folder: str
    attention: str
    compute_units: str
    swift_compute_units: str
    total_bytes: int


@dataclass(frozen=True)
class ComponentRow:
    """One component of one variant, or (``is_total``) the sum over a variant's components."""

    variant: str
    component: str
    parameters: int
    fp16_bytes: int
    compressed_bytes: int
    ratio: float
    bits_per_weight: float
    scheme: str
    is_total: bool = False


@dataclass(frozen=True)
class ParityRow:
    """PSNR of one component of one variant against the PyTorch fp32 reference, per backend."""

    variant: str
    component: str
    psnr_db: dict[str, float]
    threshold_db: tuple[float, ...]
    passed: bool


@dataclass(frozen=True)
class DeviceRow:
    run: DeviceRun
    attention: str


@dataclass(frozen=True)
class SwiftResource:
    """A package and the name the Swift pipeline loads its compiled model under."""

    component: str
    resource: str
    package_stem: str


@dataclass(frozen=True)
class UsageVariant:
    """What a user types to run one variant with Apple's Python and Swift pipelines."""

    folder: str
    packages_dir: str
    compute_unit: str
    swift_compute_units: str
    swift_resources: tuple[SwiftResource, ...]


@dataclass(frozen=True)
class CardContext:
    """Everything the template shows, derived from the report and the folder's other files."""

    report: PublishReport
    title: str
    source_display: str
    source_url: str | None
    revision_url: str | None
    local_source: bool
    model_version: str
    download_folder: str
    schemes: tuple[SchemeLine, ...]
    variants: tuple[VariantRow, ...]
    components: tuple[ComponentRow, ...]
    multi_variant: bool
    parity_backends: tuple[tuple[str, str], ...]
    parity_rows: tuple[ParityRow, ...]
    image_rows: tuple[ImageParity, ...]
    image_grid: str | None
    stages: tuple[StageCost, ...]
    total_seconds: float
    peak_rss_bytes: int
    machine: str
    device_rows: tuple[DeviceRow, ...]
    usage: tuple[UsageVariant, ...]
    example_prompt: str
    recipe_text: str | None
    recipe_redacted: bool
    recipe_fence: str
    limitations: tuple[str, ...]
    language_model: bool
    token_rows: tuple[TokenParity, ...]
    source_kind: str
    """What the source is, in words: a diffusers pipeline, a checkpoint file, a transformers model folder."""
    language_model_package: str | None
    """A language model's package path in the first variant, for the usage lines."""


def build_context(
    report: PublishReport,
    *,
    recipe_text: str | None = None,
    device_results: list[DeviceRun] | tuple[DeviceRun, ...] = (),
    image_grid: str | None = None,
) -> CardContext:
    """Derive the card's tables from the report. Raises :class:`RecipeError` for a device run of an unknown variant."""
    local = report.source.startswith("local:")
    source_name = report.source.removeprefix("local:")
    single_file = any(item.role == "checkpoint" for item in report.inputs)
    source_kind = "checkpoint file" if single_file else LOCAL_SOURCE_KIND[report.task]
    language_model = report.task == "text-generation"
    attention = {variant.folder: variant.attention for variant in report.variants}
    device_rows = []
    for index, run in enumerate(device_results):
        if run.variant not in attention:
            raise RecipeError(
                f"{DEVICE_RESULTS_NAME}: results.{index}.variant: {run.variant!r} is not a variant of this repository"
                f" ({', '.join(attention)})"
            )
        if run.task != report.task:  # the table shows one task's speeds
            raise RecipeError(f"{DEVICE_RESULTS_NAME}: results.{index}: has a {run.task} model's speeds, but this"
                              f" repository holds a {report.task} model")
        device_rows.append(DeviceRow(run=run, attention=attention[run.variant]))
    redacted = _redact(recipe_text) if recipe_text else None
    return CardContext(
        report=report,
        title=f"{report.recipe_name} for Core ML",
        source_display=f"a local {source_kind} (`{source_name}`)" if local else f"`{report.source}`",
        source_url=None if local else f"https://huggingface.co/{report.source}",
        revision_url=(
            f"https://huggingface.co/{report.source}/tree/{report.source_revision}"
            if report.source_revision and not local
            else None
        ),
        local_source=local,
        model_version=_model_version(report),
        download_folder=report.target_repo.split("/")[-1],
        schemes=_scheme_lines(report),
        variants=tuple(
            VariantRow(
                folder=variant.folder,
                attention=variant.attention,
                compute_units=variant.compute_units,
                swift_compute_units=SWIFT_COMPUTE_UNITS.get(variant.compute_units, variant.compute_units),
                total_bytes=sum(component.compressed_bytes for component in variant.components),
            )
            for variant in report.variants
        ),
        components=_component_rows(report),
        multi_variant=len(report.variants) > 1,
        parity_backends=tuple(
            (key, label)
            for key, label in _backend_labels(report).items()
            if any(r.backend == key for r in report.parity)
        ),
        parity_rows=_parity_rows(report),
        image_rows=tuple(report.image_parity),
        image_grid=image_grid,
        stages=tuple(report.stages),
        total_seconds=sum(stage.seconds for stage in report.stages),
        peak_rss_bytes=max((stage.peak_rss_bytes for stage in report.stages), default=0),
        machine=(
            f"{report.machine.system}, {report.machine.machine}, {report.machine.cpus} CPUs, "
            f"{format_bytes(report.machine.memory_bytes)} memory"
        ),
        device_rows=tuple(device_rows),
        usage=() if language_model else _usage(report),
        # Quoted for the shell: the usage lines are meant to be pasted as they are.
        example_prompt=shlex.quote(report.image_parity[0].prompt if report.image_parity else DEFAULT_PROMPT),
        recipe_text=redacted,
        recipe_redacted=redacted != recipe_text,
        recipe_fence=_fence_for(redacted or ""),
        limitations=_limitations(report, device_rows),
        language_model=language_model,
        token_rows=tuple(report.token_parity),
        source_kind=source_kind,
        language_model_package=(f"{report.variants[0].folder}/{report.variants[0].components[0].package}"
                                if language_model and report.variants and report.variants[0].components else None),
    )


def _backend_labels(report: PublishReport) -> dict[str, str]:
    labels = dict(BACKENDS)
    for result in report.parity:
        labels.setdefault(result.backend, result.backend)
    return labels


def _model_version(report: PublishReport) -> str:
    """The ``--model-version`` that reproduces the package names this run wrote.

    Apple's Python pipeline names packages after ``--model-version`` with ``/`` turned into ``_``, so
    the id is read back from a package name rather than recomputed from the recipe.
    """
    for variant in report.variants:
        for component in variant.components:
            name = PurePosixPath(component.package).name
            suffix = f"_{component.component}.mlpackage"
            if name.startswith(PACKAGE_PREFIX) and name.endswith(suffix):
                stem = name[len(PACKAGE_PREFIX) : -len(suffix)]
                if not report.source.startswith("local:") and report.source.replace("/", "_") == stem:
                    return report.source
                return stem
    return report.recipe_name


def _scheme_lines(report: PublishReport) -> tuple[SchemeLine, ...]:
    schemes: dict[str, list[str]] = {}
    for variant in report.variants:
        for component in variant.components:
            members = schemes.setdefault(component.scheme, [])
            if component.component not in members:
                members.append(component.component)
    return tuple(SchemeLine(scheme, tuple(components)) for scheme, components in schemes.items())


def _component_rows(report: PublishReport) -> tuple[ComponentRow, ...]:
    rows = []
    for variant in report.variants:
        for c in variant.components:
            rows.append(
                ComponentRow(
                    variant=variant.folder,
                    component=c.component,
                    parameters=c.parameters,
                    fp16_bytes=c.fp16_bytes,
                    compressed_bytes=c.compressed_bytes,
                    ratio=c.ratio,
                    bits_per_weight=c.bits_per_weight,
                    scheme=c.scheme,
                )
            )
        if len(variant.components) > 1:
            parameters = sum(c.parameters for c in variant.components)
            fp16 = sum(c.fp16_bytes for c in variant.components)
            compressed = sum(c.compressed_bytes for c in variant.components)
            rows.append(
                ComponentRow(
                    variant=variant.folder,
                    component="total",
                    parameters=parameters,
                    fp16_bytes=fp16,
                    compressed_bytes=compressed,
                    ratio=fp16 / compressed if compressed else 0.0,
                    bits_per_weight=compressed * 8 / parameters if parameters else 0.0,
                    scheme="",
                    is_total=True,
                )
            )
    return tuple(rows)


def _parity_rows(report: PublishReport) -> tuple[ParityRow, ...]:
    grouped: dict[tuple[str, str], list] = {}
    for result in report.parity:
        grouped.setdefault((result.variant, result.component), []).append(result)
    return tuple(
        ParityRow(
            variant=variant,
            component=component,
            psnr_db={result.backend: result.psnr_db for result in results},
            threshold_db=tuple(sorted({result.threshold_db for result in results})),
            passed=all(result.passed for result in results),
        )
        for (variant, component), results in grouped.items()
    )


def _usage(report: PublishReport) -> tuple[UsageVariant, ...]:
    usage = []
    for variant in report.variants:
        if not variant.components:
            continue
        first = variant.components[0]
        packages_dir = PurePosixPath(variant.folder, first.package).parent.as_posix()
        resources = tuple(SwiftResource(component=c.component, resource=swift_resource(c.component, c.package),
                                        package_stem=PurePosixPath(c.package).stem) for c in variant.components)
        usage.append(
            UsageVariant(
                folder=variant.folder,
                packages_dir=packages_dir,
                compute_unit=variant.compute_units,
                swift_compute_units=SWIFT_COMPUTE_UNITS.get(variant.compute_units, variant.compute_units),
                swift_resources=resources,
            )
        )
    return tuple(usage)


def _limitations(report: PublishReport, device_rows: list[DeviceRow]) -> tuple[str, ...]:
    """Say plainly what this run did not measure or could not read, so a missing table or license is not mistaken
    for a good one."""
    notes = [_redact(warning) for warning in report.source_warnings]
    if report.missing_components:
        notes.append(
            "This is a partial repository: Apple's pipelines also load "
            + ", ".join(f"`{name}`" for name in report.missing_components)
            + " for this model, which it does not hold. Bring those packages from a repository of the same source"
            " model, converted with the same settings."
        )
    if not report.parity:
        notes.append("Numerical parity of the Core ML packages against the PyTorch model was not measured in this run.")
    elif not any(result.backend == "coreml-runtime" for result in report.parity):
        notes.append(
            "Parity was measured on Linux with an executor that runs the packages' ML Program ops in PyTorch, "
            "not with the Core ML runtime (which needs macOS): Core ML's own kernels may differ slightly."
        )
    if report.task == "text-generation":
        notes.append("Token agreement is measured with the reference's own tokens fed back (teacher forcing): it "
                     "compares each step's prediction, not free-running generations, which drift apart after the "
                     "first differing token.")
    elif not report.image_parity:
        notes.append("No end-to-end images were generated and compared in this run.")
    else:
        notes.append(
            "PSNR compares against the float32 PyTorch pipeline at the same seed; it measures faithfulness to the "
            "source model, not image quality."
        )
    if not device_rows:
        speeds = "Prefill and decode speed" if report.task == "text-generation" else "Latency and iterations per second"
        notes.append(
            f"{speeds} on Apple devices have not been measured yet: there is no "
            f"`{DEVICE_RESULTS_NAME}` in this repository."
        )
    if not report.license:
        notes.append("The source model's card states no license: check the upstream terms before use.")
    return tuple(notes)


_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(?:/|~[\w.-]*/|[A-Za-z]:\\)[^\s'\"#,\]}]+")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


def _redact(text: str) -> str:
    """The recipe as embedded in the card: no local absolute paths, no access tokens."""
    token = os.environ.get("HF_TOKEN")
    if token:
        text = text.replace(token, "<redacted token>")
    text = _HF_TOKEN.sub("<redacted token>", text)
    return _ABSOLUTE_PATH.sub("<local path>", text)


def _fence_for(text: str) -> str:
    """A code fence longer than any backtick run inside ``text``, so the embedded recipe cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


# ---------------------------------------------------------------------------------------------
# Formatting filters


def format_bytes(count: int | float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, one decimal below GiB, two at GiB and above."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def table_cell(value: object) -> str:
    """Text made safe inside a Markdown table cell: no column breaks, line breaks or raw HTML."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


FILTERS = {
    "size": format_bytes,
    "cell": table_cell,
    "thousands": lambda value: f"{value:,}",
    "fixed": lambda value, digits=2: f"{value:.{digits}f}",
}


def _tidy(body: str) -> str:
    """Collapse runs of blank lines the template's conditionals leave, except inside code fences."""
    out: list[str] = []
    fence: str | None = None
    for line in body.splitlines():
        marker = re.match(r"^(`{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        if fence is None and not line.strip() and (not out or not out[-1].strip()):
            continue
        out.append(line.rstrip() if fence is None else line)
    return "\n".join(out).strip() + "\n"


# ---------------------------------------------------------------------------------------------
# Metadata and rendering


def card_data(report: PublishReport, extra_tags: tuple[str, ...] = ()) -> ModelCardData:
    """The card's YAML header: license, base model and its relation, pipeline tag and tags."""
    language_model = report.task == "text-generation"
    # A language model has one attention implementation: its variant folder is no tag of interest.
    variant_tags = () if language_model else tuple(variant.attention for variant in report.variants)
    family_tags = (report.family,) if language_model else ()
    tags = list(dict.fromkeys(BASE_TAGS + TASK_TAGS[report.task] + family_tags + variant_tags
                              + tuple(report.card_tags) + tuple(extra_tags)))
    base_models = [] if report.source.startswith("local:") else [report.source]
    # LoRAs fused into the weights are base models too; with several, the Hub's relation is a merge.
    base_models += [item.repo for item in report.inputs if item.role == "lora" and item.repo]
    base_models = list(dict.fromkeys(base_models))
    other = {"base_model_relation": "merge" if len(base_models) > 1 else "quantized"} if base_models else {}
    return ModelCardData(
        license=report.license,
        license_name=report.license_name,
        license_link=report.license_link,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        pipeline_tag=report.task,
        # The name Core ML repositories on the Hub give their library (its "Core ML" filter); transformers would
        # claim a repository holding config.json otherwise.
        library_name="coreml" if language_model else None,
        tags=tags,
        # Not a named argument of ModelCardData; without it the Hub labels a converted repo a fine-tune.
        **other,
    )


def render_card(
    report: PublishReport,
    *,
    template: Path | None = None,
    extra_tags: tuple[str, ...] = (),
    recipe_text: str | None = None,
    device_results: list[DeviceRun] | tuple[DeviceRun, ...] = (),
    image_grid: str | None = None,
) -> str:
    """The full README.md text (YAML header and body) for ``report``.

    ``recipe_text`` is embedded (local paths and tokens redacted), ``device_results`` fill the
    benchmark table and ``image_grid`` is the grid's path relative to the repository root; each
    section is left out when its data is absent.
    """
    context = build_context(report, recipe_text=recipe_text, device_results=device_results, image_grid=image_grid)
    body = render(template or DEFAULT_TEMPLATE, FILTERS, card=context, report=report)
    card = ModelCard(f"---\n{card_data(report, extra_tags).to_yaml()}\n---\n\n{_tidy(body)}")
    return str(card)


def write_card(
    folder: Path,
    report: PublishReport,
    *,
    template: Path | None = None,
    extra_tags: tuple[str, ...] = (),
) -> Path:
    """Build the image grid, then write ``folder``/README.md from the report and the folder's files.

    Reads ``recipe.yaml`` and ``device_results.json`` from ``folder`` when they exist. Returns the
    card's path.
    """
    recipe = folder / RECIPE_NAME
    text = render_card(
        report,
        template=template,
        extra_tags=extra_tags,
        recipe_text=recipe.read_text(encoding="utf-8") if recipe.is_file() else None,
        device_results=read_device_results(folder),
        image_grid=make_image_grid(folder, report),
    )
    path = folder / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path


def check_template(recipe: Recipe, family: str | None) -> None:
    """Render the recipe's card template once against a report shaped like the run's, before any work.

    A template error found only after every stage would waste the run (the UNet's conversion alone takes
    minutes at full size): ``publisher validate`` and ``publish`` call this first.

    Raises:
        [`~publisher.errors.RecipeError`]:
            One line naming the template's file and line.
    """
    if recipe.card.template is not None:
        render_card(preview_report(recipe, family), template=recipe.card.template, extra_tags=recipe.card.tags,
                    recipe_text=recipe.text)


def preview_report(recipe: Recipe, family: str | None) -> PublishReport:
    """A report with the recipe's variants, components and prompts, and placeholder numbers: every section
    and every loop of a template renders against it."""
    language_model = recipe.task == "text-generation"
    variants = [
        VariantReport(folder=variant.folder_name, attention=variant.attention, compute_units="CPU_AND_GPU",
                      components=[ComponentReport(component=component, package=f"packages/{component}.mlpackage",
                                                  parameters=1, fp16_bytes=2, compressed_bytes=1,
                                                  scheme=recipe.compression.for_component(component).describe(),
                                                  bits_per_weight=8.0, convert_seconds=1.0, compress_seconds=1.0)
                                  for component in recipe.conversion.components])
        for variant in recipe.variants
    ]
    return PublishReport(
        recipe_name=recipe.name, recipe_file=recipe.file.name, recipe_sha256=recipe.sha256,
        source=recipe.source.repo or f"local:{recipe.source.model_id}", source_revision=recipe.source.revision,
        family=family or ("llama" if language_model else "sd1"), license=recipe.card.license,
        license_name=recipe.card.license_name, task=recipe.task,
        context_length=recipe.conversion.context_length if language_model else None,
        license_link=recipe.card.license_link, target_repo=recipe.target.repo, precision=recipe.conversion.precision,
        minimum_deployment_target=recipe.conversion.minimum_deployment_target.value,
        image_size=None if language_model else recipe.conversion.image_size or 512, tool_versions=tool_versions(),
        card_tags=list(recipe.card.tags), variants=variants,
        parity=[ParityResult(component=component, variant=variant.folder, backend="executor-fp32", psnr_db=60.0,
                             threshold_db=recipe.parity.threshold(component), passed=True)
                for variant in variants for component in recipe.conversion.components],
        image_parity=[ImageParity(prompt=prompt, variant=variant.folder, steps=recipe.parity.image_steps,
                                  seed=recipe.parity.seed, psnr_db=30.0,
                                  reference_image=f"{IMAGES_FOLDER}/reference_{index}.png",
                                  variant_image=f"{IMAGES_FOLDER}/{variant.folder}_{index}.png")
                      for variant in variants for index, prompt in enumerate(recipe.card.prompts)
                      if not language_model],
        token_parity=[TokenParity(prompt=prompt, variant=variant.folder, backend="executor-fp32", prompt_tokens=4,
                                  decode_steps=recipe.parity.decode_steps, prefill_psnr_db=60.0, decode_psnr_db=60.0,
                                  token_agreement=1.0, first_divergence=None, threshold_db=35.0,
                                  min_token_agreement=0.9, passed=True)
                      for variant in variants for prompt in recipe.card.prompts if language_model],
        stages=[StageCost(stage="convert", seconds=1.0, peak_rss_bytes=1)],
    )


def rerender_card(folder: Path, *, template: Path | None = None) -> Path:
    """Render README.md again from the folder's own report (e.g. after device results arrive)."""
    return write_card(folder, PublishReport.read(folder), template=template)


# ---------------------------------------------------------------------------------------------
# Image grid


def make_image_grid(folder: Path, report: PublishReport) -> str | None:
    """Draw the reference image and each variant's image per prompt into ``images/image_grid.png``.

    Rows are prompts (labelled on the left), columns the float32 reference then each variant, with
    the image's PSNR under it. Paths in ``report.image_parity`` are relative to ``folder``. Returns the
    grid's path relative to ``folder``, or ``None`` when the run compared no images.
    """
    if not report.image_parity:
        return None
    prompts = list(dict.fromkeys(entry.prompt for entry in report.image_parity))
    order = [variant.folder for variant in report.variants]
    measured = {entry.variant for entry in report.image_parity}
    variants = [name for name in order if name in measured] + sorted(measured - set(order))
    cells = {(entry.prompt, entry.variant): entry for entry in report.image_parity}
    references = {}
    for entry in report.image_parity:
        references.setdefault(entry.prompt, entry.reference_image)

    columns = 1 + len(variants)
    width = GRID_PAD + GRID_LABEL_WIDTH + columns * (GRID_TILE + GRID_PAD)
    row_height = GRID_TILE + GRID_CAPTION_HEIGHT + GRID_PAD
    height = GRID_PAD + GRID_HEADER_HEIGHT + len(prompts) * row_height
    grid = Image.new("RGB", (width, height), _GRID_BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=15)

    titles = ["reference (PyTorch fp32)"] + [f"{name} (Core ML package)" for name in variants]
    for column, title in enumerate(titles):
        x = GRID_PAD + GRID_LABEL_WIDTH + column * (GRID_TILE + GRID_PAD)
        draw.text(
            (x + GRID_TILE / 2, GRID_PAD + GRID_HEADER_HEIGHT / 2), title, fill=_GRID_TEXT, font=font, anchor="mm"
        )

    for row, prompt in enumerate(prompts):
        top = GRID_PAD + GRID_HEADER_HEIGHT + row * row_height
        label = "\n".join(_wrap(f'"{prompt}"', font, GRID_LABEL_WIDTH - 2 * GRID_PAD))
        draw.multiline_text((GRID_PAD, top + GRID_TILE / 2), label, fill=_GRID_TEXT, font=font, anchor="lm", spacing=4)
        tiles: list[tuple[str | None, str]] = [(references[prompt], "")]
        for name in variants:
            entry = cells.get((prompt, name))
            tiles.append((entry.variant_image, f"PSNR {entry.psnr_db:.1f} dB") if entry else (None, "not generated"))
        for column, (relative, caption) in enumerate(tiles):
            left = GRID_PAD + GRID_LABEL_WIDTH + column * (GRID_TILE + GRID_PAD)
            draw.rectangle((left, top, left + GRID_TILE - 1, top + GRID_TILE - 1), fill=_GRID_TILE_BACKGROUND)
            if relative is not None:
                _paste_fitted(grid, _open_inside(folder, relative), left, top)
            if caption:
                draw.text(
                    (left + GRID_TILE / 2, top + GRID_TILE + GRID_CAPTION_HEIGHT / 2),
                    caption,
                    fill=_GRID_TEXT,
                    font=font,
                    anchor="mm",
                )

    path = folder / GRID_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return GRID_PATH


def _open_inside(folder: Path, relative: str) -> Image.Image:
    """Open a PNG the report names, refusing paths that leave the published folder."""
    root = folder.resolve()
    path = (root / relative).resolve()
    if PurePosixPath(relative).is_absolute() or not path.is_relative_to(root):
        raise PublisherError(f"image {relative!r} in the report is outside the published folder")
    if not path.is_file():
        raise PublisherError(f"image {relative!r} named in the report is missing from the published folder")
    with Image.open(path) as image:
        return image.convert("RGB")


def _paste_fitted(grid: Image.Image, image: Image.Image, left: int, top: int) -> None:
    """Scale ``image`` to fit a tile, keeping its aspect ratio, centred.

    Images smaller than a tile are enlarged with nearest-neighbour so each pixel stays visible as it
    was generated, rather than smoothed into something the model did not produce.
    """
    scale = GRID_TILE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    fitted = image.resize(size, resample)
    grid.paste(fitted, (left + (GRID_TILE - size[0]) // 2, top + (GRID_TILE - size[1]) // 2))


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float, max_lines: int = 8) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line ends in an ellipsis when the text is longer."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.extend(textwrap.wrap(word, 24) if font.getlength(word) > width else [word])
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1] + "…"
    return lines
