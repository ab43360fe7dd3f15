"""The publish pipeline, top to bottom:

recipe -> source -> convert -> compress (-> chunk) -> parity -> card -> assemble -> (hub)

Every stage but the first and the last is cached (publisher/cache.py); parity's torch reference
outputs are a cached stage of their own, shared by all variants. A source that diffusers cannot load as
one pipeline (a single-file checkpoint, a VAE file, LoRAs) is assembled into one first, cached too.
"""

from __future__ import annotations

import json
import multiprocessing.util
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil

from publisher.assemble import assemble, check_destination, package_path, promote
from publisher.cache import StageCache, hash_path, make_key
from publisher.card import write_card
from publisher.checkpoint import Assembly, assemble_source, weight_inputs
from publisher.chunk import chunk_package
from publisher.components import CHUNKS, chunk_names, component_spec, pipeline_components
from publisher.compress import compress_package, mixed_analysis
from publisher.convert import convert_in_subprocess, stop_conversion_server
from publisher.executor import LoadedProgram
from publisher.language_model_parity import COMPONENT as LM_COMPONENT
from publisher.language_model_parity import gate as gate_language_model
from publisher.language_model_parity import (
    load_references,
    measure_language_model,
    reference_tokens,
    save_references,
)
from publisher.language_model_source import LanguageModelSource, load_language_model_source
from publisher.mixed_bit import Analysis
from publisher.monitor import Monitor
from publisher.parity import (
    ComponentParity,
    Reference,
    cases_from_images,
    checks_images,
    gate,
    image_components,
    image_parity,
    measure_component,
    reference_cases,
    reference_images,
    refines,
)
from publisher.push import PushOptions, adopt_published_costs, push_folder_and_report
from publisher.recipe import ModelSource, Recipe, Scheme, Variant
from publisher.report import (
    ComponentReport,
    ImageParity,
    ParityResult,
    PublishReport,
    SourceInput,
    StageCost,
    TokenParity,
    VariantReport,
    tool_versions,
)
from publisher.source import LoadedSource, load_source, release_memory, with_source_components
from publisher.validate import validate_recipe
from publisher.wrappers import image_size

PACKAGE = "model.mlpackage"
COST = "cost.json"


@dataclass
class BuiltComponent:
    component: str
    converted: Path
    package: Path
    parameters: int
    convert_seconds: float
    compress_seconds: float
    compressed_weights: int | None = None
    """None when nothing was asked to compress (or the cache entry predates the count)."""


@dataclass
class Build:
    """Packages built for each variant, keyed by their path inside the published repository."""

    packages: dict[str, Path] = field(default_factory=dict)
    variants: list[VariantReport] = field(default_factory=list)
    by_variant: dict[str, dict[str, tuple[Path, ...]]] = field(default_factory=dict)
    """Per variant, each component's packages in run order (a chunked UNet has two)."""


@dataclass
class Parity:
    results: list[ParityResult] = field(default_factory=list)
    images: list[ImageParity] = field(default_factory=list)
    tokens: list[TokenParity] = field(default_factory=list)


@dataclass
class Run:
    """What every stage of one run shares."""

    recipe: Recipe
    source: LoadedSource | LanguageModelSource
    source_identity: str
    cache: StageCache
    monitor: Monitor
    work: Path
    entries: dict[str, Path] = field(default_factory=dict)
    """Stage key -> cache entry, for each entry this run made or reused: one line and one cost each."""


def publish(recipe_file: Path, out: Path, *, quiet: bool = False, push: PushOptions | None = None,
            cache: StageCache | None = None) -> PublishReport:
    """Run a recipe end to end and leave the assembled repository in ``out``; optionally push it.

    Finished stages are taken from ``cache`` (default: the user cache), so a rerun after an
    interruption resumes where the last run stopped. With ``push``, a run that publishes what the
    target revision already holds keeps its report (see :func:`adopt_published_costs`): an unchanged
    recipe makes no commit, whatever the cache held.
    """
    monitor = Monitor(quiet=quiet)
    recipe = validate_recipe(recipe_file)
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_work(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-{os.getpid()}-", dir=out.parent))
    # coremltools writes temporary packages to the temp dir and does not always delete them.
    # Two libraries make a folder of their own under the temp dir on first use and keep its path for the
    # life of the process: torch._dynamo a cache folder when first imported (diffusers imports it lazily,
    # e.g. in a scheduler's step), multiprocessing the one of its forkserver's socket (the conversions').
    # Made in the work folder, those paths would outlive it, in this process and in its children.
    import torch._dynamo  # noqa: F401

    multiprocessing.util.get_temp_dir()

    previous_tempdir, tempfile.tempdir = tempfile.tempdir, str(work)
    try:
        cache = cache or StageCache()
        entries: dict[str, Path] = {}
        assembly = assemble_source_stage(recipe, cache, monitor, entries)
        with monitor.stage("load source", record=False):
            # Configs and tokenizer only: each stage loads the weights of the component it works on.
            source, recipe, inputs = load_run_source(recipe, assembly)
        run = Run(recipe, source, source_identity(recipe), cache, monitor, work, entries)
        missing = missing_components(recipe, source)
        if missing:
            monitor.say(f"[yellow]![/yellow] a partial repository: Apple's pipelines also load {', '.join(missing)},"
                        " which the recipe does not convert (the card says so)")
        build = build_variants(run)
        parity = check_parity(run, build)
        report = make_report(recipe, source, build, parity, monitor, inputs)
        if push is not None:
            published = adopt_published_costs(report, push, quiet=quiet)
            if published is not report:
                monitor.say(f"[cyan]↷[/cyan] report: {recipe.target.repo} already publishes these artifacts"
                            " [dim](its measured costs kept)[/dim]")
            report = published
        with monitor.stage("assemble", record=False):
            staging = assemble(
                work / "repo",
                packages=build.packages,
                tokenizer_files=source.tokenizer_files(),
                recipe_text=recipe.text,
                images=work / "images",
                report=report,
            )
        with monitor.stage("render card", record=False):
            # After assembly: the card's image grid is drawn from the images in the folder.
            write_card(staging, report, template=recipe.card.template, extra_tags=recipe.card.tags)
        promote(staging, out)
    finally:
        tempfile.tempdir = previous_tempdir
        shutil.rmtree(work, ignore_errors=True)
    # A result, not progress: printed with -q too, plainly, for scripts that read it.
    print(f"published folder ready: {out}")
    if push is not None:
        push_folder_and_report(out, recipe.target.repo, private=recipe.target.private, options=push, quiet=quiet)
    return report


def load_run_source(recipe: Recipe, assembly: Assembly | None
                    ) -> tuple[LoadedSource | LanguageModelSource, Recipe, list[SourceInput]]:
    """The source without weights, the recipe with the components it resolves, and the input files' hashes."""
    if recipe.task == "text-generation":
        return load_language_model_source(recipe), recipe, weight_inputs(recipe)
    source = load_source(recipe, models=(), assembly=assembly)
    recipe = with_source_components(recipe, source.model_classes)  # a Hub source is known once it loads
    return source, recipe, weight_inputs(recipe) + list(assembly.inputs if assembly else ())


def remove_abandoned_work(out: Path) -> None:
    """A killed run cannot clean up after itself: remove work folders whose process is gone."""
    for folder in out.parent.glob(f".{out.name}.work-*"):
        pid = folder.name.removeprefix(f".{out.name}.work-").split("-")[0]
        if not (pid.isdigit() and psutil.pid_exists(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
    retired = out.parent / f".{out.name}.previous"
    if retired.exists() and out.exists():
        shutil.rmtree(retired, ignore_errors=True)
    elif retired.exists():
        retired.rename(out)  # killed between the two renames of promote(): the previous publish stands


def source_identity(recipe: Recipe) -> str:
    """A Hub revision is immutable; a local file or folder is identified by its content. Everything that
    changes the weights is part of it: a separate VAE or ControlNet, the LoRAs and their scales, and the
    architecture a single file loads into."""
    source = recipe.source

    def identity(model: ModelSource) -> str:
        if model.repo is None:
            return f"local:{hash_path(model.path)}"
        return f"{model.repo}@{model.revision}" + (f":{model.filename}" if model.filename else "")

    parts = [identity(model) for model in (source, source.vae, source.controlnet) if model is not None]
    parts += [f"lora {identity(lora)} x {lora.scale!r}" for lora in source.loras]
    if source.is_single_file:
        parts.append(f"config {hash_path(source.config) if source.config else source.family or 'detected'}")
    return " + ".join(parts)


def assemble_source_stage(recipe: Recipe, cache: StageCache, monitor: Monitor,
                          entries: dict[str, Path]) -> Assembly | None:
    """The pipeline assembled from a source diffusers cannot load as one (see publisher.checkpoint), or None."""
    if not recipe.source.needs_assembly:
        return None
    entry = cache_entry(cache, monitor, entries, recipe.name, "source", {"source": source_identity(recipe)},
                        recipe.source.display, lambda folder: assemble_source(recipe.source, folder))
    return Assembly.load(entry)


def cached(run: Run, stage: str, key_parts: dict, label: str, produce: Callable[[Path], None]) -> Path:
    """The cache entry for ``stage``: reused when present, else made by ``produce(folder)``."""
    return cache_entry(run.cache, run.monitor, run.entries, run.recipe.name, stage, key_parts, label, produce)


def is_cached(run: Run, stage: str, key_parts: dict) -> bool:
    """Whether :func:`cached` would reuse an entry: for a stage whose inputs cost more than itself."""
    key = make_key(stage, key_parts)
    return key in run.entries or run.cache.lookup(stage, key) is not None


def cache_entry(cache: StageCache, monitor: Monitor, entries: dict[str, Path], recipe_name: str, stage: str,
                key_parts: dict, label: str, produce: Callable[[Path], None]) -> Path:
    """:func:`cached`, before a run's source is loaded."""
    key = make_key(stage, key_parts)
    if key in entries:
        return entries[key]
    entry = cache.lookup(stage, key, on_broken=lambda problem: monitor.say(
        f"[yellow]![/yellow] {stage} {label}: the cached entry is broken ({problem}); recomputing"))
    if entry is not None:
        monitor.say(f"[cyan]↷[/cyan] {stage} {label} [dim](cached)[/dim]")
        # The report keeps the cost measured when the entry was made, so a resumed or repeated run
        # reports (and publishes) the same numbers.
        monitor.costs.append(StageCost.model_validate_json((entry / COST).read_text()))
    else:
        with cache.store(stage, key, label, recipe=recipe_name) as folder:
            with monitor.stage(stage, label):
                produce(folder)
                # What a stage freed stays in this long-lived process's heap otherwise, under the
                # next stage's peak (2 GB after compressing SD 1.5's UNet).
                release_memory()
            (folder / COST).write_text(monitor.costs[-1].model_dump_json())
        entry = cache.root / stage / key
    entries[key] = entry
    return entry


def build_variants(run: Run) -> Build:
    recipe = run.recipe
    try:
        built = build_components(run)
    finally:
        stop_conversion_server()
    build = Build()
    for variant in recipe.variants:
        reports = []
        for component in recipe.conversion.components:
            made = built[variant.folder_name, component]
            whole = component_report(recipe, made)
            parts = {component: made.package}
            if component_spec(component).chunkable and recipe.conversion.chunk_unet:
                parts = dict(zip(chunk_names(component), chunk(run, variant, component, made.package), strict=True))
            build.by_variant.setdefault(variant.folder_name, {})[component] = tuple(parts.values())
            for name, part in parts.items():
                relative = package_path(variant.folder_name, recipe, name)
                build.packages[relative] = part
                reports.append(part_report(whole, name, part, relative.removeprefix(f"{variant.folder_name}/")))
        build.variants.append(
            VariantReport(
                folder=variant.folder_name,
                attention=variant.attention,
                compute_units="CPU_AND_NE" if variant.attention.startswith("split_einsum") else "CPU_AND_GPU",
                components=reports,
            )
        )
    return build


def build_components(run: Run) -> dict[tuple[str, str], BuiltComponent]:
    """Convert and compress every variant's components, keyed by (variant folder, component).

    A denoiser's conversion is the run's memory peak, so the denoisers convert first, one at a
    time, with nothing beside them. Conversion is single-threaded Python: the other components then
    convert in the background, one process at a time, while this process compresses the denoisers
    on the other core (SD 1.5's text encoder and VAE convert during its UNet's palettization). A
    mixed-bit analysis runs a denoiser's whole program in fp32 and holds an SDXL runner's memory:
    nothing converts beside it.
    """
    recipe = run.recipe
    jobs = [(variant, component) for variant in recipe.variants for component in recipe.conversion.components]
    denoisers = [(variant, component) for variant, component in jobs if component_spec(component).is_denoiser]
    others = [job for job in jobs if job not in denoisers]
    converted = {job: convert(run, *job) for job in denoisers}
    alone = any(needs_analysis(recipe.compression.for_component(component)) for _, component in denoisers)
    beside = replace(run, monitor=run.monitor.beside())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert") as background:
        pending = [] if alone else [background.submit(convert, beside, *job) for job in others]
        try:
            built = {job: compress(run, *job, converted[job]) for job in denoisers}
            converted |= {job: future.result() for job, future in zip(others, pending, strict=False)}
        except BaseException:
            background.shutdown(cancel_futures=True)
            raise
    # In the threads' own orders, so that the report does not depend on which finished first.
    run.monitor.costs += beside.monitor.costs
    built |= {job: compress(run, *job, converted.get(job) or convert(run, *job)) for job in others}
    return {(variant.folder_name, component): built[variant, component] for variant, component in jobs}


def chunk(run: Run, variant: Variant, component: str, package: Path) -> tuple[Path, ...]:
    entry = cached(run, "chunk", {"package": hash_path(package)}, f"{variant.folder_name}/{component}",
                   lambda folder: chunk_package(package, folder))
    return tuple(entry / f"{chunk}.mlpackage" for chunk in CHUNKS)


def convert(run: Run, variant: Variant, component: str) -> BuiltComponent:
    recipe = run.recipe
    # Only the denoisers' attention differs between variants: the others are shared through the cache.
    attention = variant.attention if component_spec(component).is_denoiser else "original"

    def produce(folder: Path) -> None:
        # In a process of its own, which loads this component's model alone and returns all of its
        # memory when it ends: the run's peak is its largest component's.
        converted = convert_in_subprocess(recipe.file, component, attention, folder / PACKAGE, run.source.assembly)
        (folder / "meta.json").write_text(json.dumps({"parameters": converted.parameters,
                                                       "seconds": converted.seconds}))

    entry = cached(run, "convert", {
        "component": component, "attention": attention, "source": run.source_identity,
        "conversion": recipe.conversion.model_dump(mode="json", exclude={"components"}),
        # The package's author and version metadata name it: for a local source, the recipe's name. Its license
        # metadata is the recipe's, or the source's (part of the source's identity).
        "model_version": recipe.model_version, "license": recipe.card.license,
    }, f"{variant.folder_name}/{component}", produce)
    meta = json.loads((entry / "meta.json").read_text())
    return BuiltComponent(component, entry / PACKAGE, entry / PACKAGE, meta["parameters"], meta["seconds"], 0.0)


def needs_analysis(scheme: Scheme) -> bool:
    """Whether compressing with ``scheme`` analyses the component: a mixed-bit target, not a stored recipe."""
    mixed = scheme.palettize.mixed if scheme.palettize else None
    return mixed is not None and mixed.recipe is None


def compress(run: Run, variant: Variant, component: str, converted: BuiltComponent) -> BuiltComponent:
    recipe = run.recipe
    scheme = recipe.compression.for_component(component)
    if scheme.is_none:
        return converted
    package_hash = hash_path(converted.converted)
    analysed = needs_analysis(scheme)
    # The analysis runs on the component's reference cases: keyed as they are (see reference()).
    calibration_inputs = {"component": component, **reference_settings(run)} if analysed else {}
    key_parts = {"package": package_hash, "scheme": scheme.model_dump(mode="json"), **calibration_inputs}
    calibration = analysis = None
    if analysed and not is_cached(run, "compress", key_parts):
        # A mixed-bit target is analysed on the parity gate's own inputs and reference outputs.
        calibration = reference(run, component)
        analysis = analyse(run, variant, component, converted.converted, package_hash, scheme, calibration)

    def produce(folder: Path) -> None:
        result = compress_package(converted.converted, scheme, folder / PACKAGE, component=component,
                                  calibration=calibration, analysis=analysis)
        if result.mixed is not None:
            result.mixed.save(folder / "mixed_bit.json")
        (folder / "meta.json").write_text(json.dumps({"seconds": result.seconds,
                                                       "compressed_weights": result.compressed_weights}))

    entry = cached(run, "compress", key_parts, f"{variant.folder_name}/{component} ({scheme.describe()})", produce)
    meta = json.loads((entry / "meta.json").read_text())
    return replace(converted, package=entry / PACKAGE, compress_seconds=meta["seconds"],
                   compressed_weights=meta.get("compressed_weights"))


def analyse(run: Run, variant: Variant, component: str, package: Path, package_hash: str, scheme: Scheme,
            calibration: Reference) -> Analysis:
    """The mixed-bit pre-analysis of a converted denoiser, cached apart from the compression: keyed
    on everything it measures but the target, so a re-publish aiming at another average or PSNR, or a
    run cancelled after it, skips its forwards."""
    mixed = scheme.palettize.mixed

    def produce(folder: Path) -> None:
        mixed_analysis(package, scheme, calibration).save(folder)

    entry = cached(run, "analysis", {
        "package": package_hash, "component": component, **reference_settings(run),
        "weight_threshold": scheme.weight_threshold, "candidates": list(mixed.candidates), "groups": mixed.groups,
        "overrides": [override.model_dump(mode="json") for override in scheme.overrides],
    }, f"{variant.folder_name}/{component}", produce)
    return Analysis.load(entry)


def check_parity(run: Run, build: Build) -> Parity:
    """Gate every package on its PSNR against the torch reference, then compare end-to-end images.

    A package shared by several variants is measured once and reported under each.
    """
    recipe = run.recipe
    if recipe.task == "text-generation":
        return check_language_model_parity(run, build)
    parity = Parity()
    # Measured against the torch reference: keyed on what keys the reference, whose cases depend on
    # the whole recipe's components and steps (see cases_from_images).
    settings = reference_settings(run)
    for variant, packages in build.by_variant.items():
        gated = {}
        # The images' components keep their executor programs for the images (loading SD 1.5's
        # 6-bit UNet, parse and decompress, takes about 11 s). The torch references come first, while
        # no program is held, and the UNet is checked last, so that its program is held through no
        # other component's check.
        images = checks_images(recipe, run.source)
        kept: dict[Path, LoadedProgram] = {}
        order = sorted(packages, key=lambda component: component == "unet")
        references = {component: reference(run, component) for component in order}
        hashes = {component: hash_chain(chain) for component, chain in sorted(packages.items())}
        for component in order:
            chain = packages[component]
            programs = kept if images and component in image_components(recipe, run.source) else {}

            def measure(folder: Path, component: str = component, chain: tuple[Path, ...] = chain,
                        known: Reference = references[component], programs: dict[Path, LoadedProgram] = programs
                        ) -> None:
                measured = measure_component(recipe, run.source, component, chain, reference=known,
                                             programs=programs)
                (folder / "psnr.json").write_text(json.dumps(measured.psnr_db))

            entry = cached(run, "parity", {"component": component, "package": hashes[component], **settings},
                           f"{variant}/{component}", measure)
            measured = ComponentParity(component, json.loads((entry / "psnr.json").read_text()))
            gated[component] = gate(recipe, variant, measured)
        parity.results += [result for component in packages for result in gated[component]]
        if images:
            parity.images += variant_images(run, variant, packages, hashes, settings, kept)
    return parity


def check_language_model_parity(run: Run, build: Build) -> Parity:
    """Prefill and decode each variant's package against transformers' greedy tokens
    (publisher.language_model_parity)."""
    settings = reference_settings(run)
    references = cached(run, "reference", {"component": LM_COMPONENT, **settings}, LM_COMPONENT,
                        lambda folder: save_references(reference_tokens(run.recipe, run.source),
                                                       folder / "reference.npz"))
    parity = Parity()
    for variant, packages in build.by_variant.items():
        (package,) = packages[LM_COMPONENT]

        def measure(folder: Path, package: Path = package, variant: str = variant) -> None:
            rows = measure_language_model(package, load_references(references / "reference.npz"), variant)
            (folder / "tokens.json").write_text(json.dumps([row.model_dump() for row in rows]))

        entry = cached(run, "parity", {"component": LM_COMPONENT, "package": hash_path(package), **settings},
                       f"{variant}/{LM_COMPONENT}", measure)
        rows = [TokenParity.model_validate(item) for item in json.loads((entry / "tokens.json").read_text())]
        judged, summary = gate_language_model(run.recipe, rows)
        parity.tokens += judged
        parity.results += summary
    return parity


def hash_chain(chain: tuple[Path, ...]) -> str:
    return " + ".join(hash_path(package) for package in chain)


def reference(run: Run, component: str) -> Reference:
    """The component's parity inputs and torch outputs: computed once, for every variant and run."""
    if component in cases_from_images(run.recipe, run.source):
        return Reference.load(images_reference(run) / f"{component}.npz")
    entry = cached(run, "reference", {"component": component, **reference_settings(run)}, component,
                   lambda folder: reference_cases(run.recipe, run.source, component).save(folder / "reference.npz"))
    return Reference.load(entry / "reference.npz")


def images_reference(run: Run) -> Path:
    """The cache entry of the reference images (``images.npz``), and of the parity cases their
    denoising gives (``<component>.npz``, see :func:`publisher.parity.cases_from_images`)."""
    def draw(folder: Path) -> None:
        drawn = reference_images(run.recipe, run.source)
        np.savez(folder / "images.npz", *drawn.images)
        for component, cases in drawn.cases.items():
            cases.save(folder / f"{component}.npz")

    return cached(run, "reference", {"images": True, "cases": list(cases_from_images(run.recipe, run.source)),
                                     **reference_settings(run)}, "images", draw)


def reference_settings(run: Run) -> dict:
    recipe = run.recipe
    # The thresholds judge the measurements; they change no reference and no measured number.
    thresholds = {"min_psnr", "per_component", "min_token_agreement"}
    return {"source": run.source_identity, "prompts": list(recipe.card.prompts),
            "parity": recipe.parity.model_dump(mode="json", exclude=thresholds),
            "conversion": recipe.conversion.model_dump(mode="json")}


def variant_images(run: Run, variant: str, packages: dict[str, tuple[Path, ...]], hashes: dict[str, str],
                   settings: dict, programs: dict[Path, LoadedProgram]) -> list[ImageParity]:
    with np.load(images_reference(run) / "images.npz") as archive:
        references = [archive[f"arr_{index}"] for index in range(len(archive.files))]

    def render(folder: Path) -> None:
        results = image_parity(run.recipe, run.source, variant, packages, folder, references, programs)
        (folder / "images.json").write_text(json.dumps([result.model_dump() for result in results]))

    # The images are saved under the variant's folder, which their report names too.
    entry = cached(run, "images", {"packages": hashes, "variant": variant, **settings}, variant, render)
    results = [ImageParity.model_validate(item) for item in json.loads((entry / "images.json").read_text())]
    for result in results:
        for relative in (result.reference_image, result.variant_image):
            destination = run.work / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry / relative, destination)
    return results


def missing_components(recipe: Recipe, source: LoadedSource | LanguageModelSource) -> list[str]:
    """What Apple's pipelines load for this model and the recipe does not convert: a partial repository."""
    if recipe.task == "text-generation":
        return []
    converted = recipe.conversion.components
    controlled = any(component_spec(component).role == "controlnet" for component in converted)
    needed = pipeline_components(source.model_classes, controlled=controlled, refines=refines(source))
    return [component for component in needed if component not in converted]


def weights_bytes(package: Path) -> int:
    return sum(file.stat().st_size for file in package.glob("Data/com.apple.CoreML/weights/*") if file.is_file())


def component_report(recipe: Recipe, built: BuiltComponent) -> ComponentReport:
    fp16_bytes = weights_bytes(built.converted)
    if recipe.conversion.precision_for(built.component) == "float32":
        fp16_bytes //= 2
    compressed_bytes = weights_bytes(built.package)
    return ComponentReport(
        component=built.component,
        package="",
        parameters=built.parameters,
        fp16_bytes=fp16_bytes,
        compressed_bytes=compressed_bytes,
        scheme=scheme_line(recipe.compression.for_component(built.component), built.compressed_weights),
        bits_per_weight=round(compressed_bytes * 8 / built.parameters, 3) if built.parameters else 0.0,
        convert_seconds=round(built.convert_seconds, 3),
        compress_seconds=round(built.compress_seconds, 3),
    )


def scheme_line(scheme: Scheme, compressed_weights: int | None) -> str:
    """The scheme as the report and card state it: one that compressed no weight says so, rather than
    claiming bits it did not save."""
    if compressed_weights == 0:
        return (f"none: {scheme.describe()} compressed no weight (none is larger than weight_threshold"
                f" {scheme.weight_threshold:,} elements, or the overrides skip them all)")
    return scheme.describe()


def part_report(whole: ComponentReport, name: str, package: Path, relative: str) -> ComponentReport:
    """The report of one published package of a component: the whole component's, or a chunk's share
    of it (the bisection splits the weights by bytes; both chunks keep the component's scheme)."""
    compressed_bytes = weights_bytes(package)
    share = compressed_bytes / whole.compressed_bytes if whole.compressed_bytes else 1.0
    return whole.model_copy(update={
        "component": name, "package": relative, "compressed_bytes": compressed_bytes,
        "parameters": round(whole.parameters * share), "fp16_bytes": round(whole.fp16_bytes * share),
    })


def make_report(recipe: Recipe, source: LoadedSource | LanguageModelSource, build: Build, parity: Parity,
                monitor: Monitor, inputs: list[SourceInput] | None = None) -> PublishReport:
    return PublishReport(
        recipe_name=recipe.name,
        recipe_file=recipe.file.name,
        recipe_sha256=recipe.sha256,
        source=recipe.source.repo or f"local:{recipe.source.model_id}",
        source_revision=source.revision,
        family=source.family,
        license=recipe.card.license or source.license,
        license_name=recipe.card.license_name,
        license_link=recipe.card.license_link,
        target_repo=recipe.target.repo,
        precision=recipe.conversion.precision,
        minimum_deployment_target=recipe.conversion.minimum_deployment_target.value,
        image_size=image_size(recipe, source) if recipe.task == "text-to-image" else None,
        task=recipe.task,
        context_length=recipe.conversion.context_length if recipe.task == "text-generation" else None,
        tool_versions=tool_versions(),
        card_tags=list(recipe.card.tags),
        inputs=inputs or [],
        missing_components=missing_components(recipe, source),
        source_warnings=list(source.warnings),
        variants=build.variants,
        parity=parity.results,
        image_parity=parity.images,
        token_parity=parity.tokens,
        stages=list(monitor.costs),
    )
