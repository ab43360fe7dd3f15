"""The publish pipeline, top to bottom:

recipe -> source -> convert -> compress -> (parity) -> card -> assemble -> (hub)
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from publisher.assemble import assemble, check_destination, package_path, promote
from publisher.card import render_card
from publisher.compress import compress_package
from publisher.convert import ConvertedComponent, convert_component, image_size
from publisher.monitor import Monitor
from publisher.recipe import Recipe, Variant, load_recipe
from publisher.report import ComponentReport, PublishReport, VariantReport, tool_versions
from publisher.source import LoadedSource, load_source

# Only the UNet's attention differs between variants; the other components are converted once.
ATTENTION_COMPONENTS = ("unet",)


@dataclass
class BuiltComponent:
    converted: ConvertedComponent
    package: Path
    compress_seconds: float


@dataclass
class Build:
    """Packages built in the work folder, keyed by their path inside the published repository."""

    packages: dict[str, Path] = field(default_factory=dict)
    variants: list[VariantReport] = field(default_factory=list)


def publish(recipe_file: Path, out: Path, *, quiet: bool = False) -> PublishReport:
    """Run a recipe end to end and leave the assembled repository in ``out``."""
    monitor = Monitor(quiet=quiet)
    recipe = load_recipe(recipe_file)
    check_destination(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    # coremltools writes temporary packages to the temp dir and does not always delete them.
    previous_tempdir, tempfile.tempdir = tempfile.tempdir, str(work)
    try:
        with monitor.stage("load source"):
            source = load_source(recipe)
        build = build_variants(recipe, source, work, monitor)
        report = make_report(recipe, source, build, monitor)
        with monitor.stage("render card"):
            card = render_card(report, template=recipe.card.template, extra_tags=recipe.card.tags)
        with monitor.stage("assemble"):
            staging = assemble(
                work / "repo",
                packages=build.packages,
                tokenizer_files=source.tokenizer_files(),
                recipe_text=recipe.text,
                report=report,
                card=card,
            )
            promote(staging, out)
    finally:
        tempfile.tempdir = previous_tempdir
        shutil.rmtree(work, ignore_errors=True)
    monitor.say(f"[bold]Published folder ready:[/bold] {out}")
    return report


def build_variants(recipe: Recipe, source: LoadedSource, work: Path, monitor: Monitor) -> Build:
    build = Build()
    shared: dict[str, BuiltComponent] = {}
    for variant in recipe.variants:
        reports = []
        for component in recipe.conversion.components:
            reuse = component not in ATTENTION_COMPONENTS and component in shared
            built = shared[component] if reuse else build_component(recipe, source, variant, component, work, monitor)
            if component not in ATTENTION_COMPONENTS:
                shared[component] = built
            relative = package_path(variant.folder_name, recipe.model_version, component)
            build.packages[relative] = built.package
            reports.append(component_report(recipe, built, relative, variant))
        build.variants.append(
            VariantReport(
                folder=variant.folder_name,
                attention=variant.attention,
                compute_units="CPU_AND_NE" if variant.attention.startswith("split_einsum") else "CPU_AND_GPU",
                components=reports,
            )
        )
    return build


def build_component(
    recipe: Recipe, source: LoadedSource, variant: Variant, component: str, work: Path, monitor: Monitor
) -> BuiltComponent:
    folder = work / variant.folder_name
    folder.mkdir(parents=True, exist_ok=True)
    with monitor.stage("convert", f"{variant.folder_name}/{component}"):
        converted = convert_component(recipe, source, component, folder / f"{component}.mlpackage")
    scheme = recipe.compression.for_component(component)
    if scheme.is_none:
        return BuiltComponent(converted, converted.package, 0.0)
    with monitor.stage("compress", f"{variant.folder_name}/{component} ({scheme.describe()})"):
        compressed = compress_package(converted.package, scheme, folder / f"{component}.compressed.mlpackage")
    return BuiltComponent(converted, compressed.package, compressed.seconds)


def weights_bytes(package: Path) -> int:
    return sum(file.stat().st_size for file in package.glob("Data/com.apple.CoreML/weights/*") if file.is_file())


def component_report(recipe: Recipe, built: BuiltComponent, relative: str, variant: Variant) -> ComponentReport:
    converted = built.converted
    fp16_bytes = weights_bytes(converted.package)
    if recipe.conversion.precision == "float32":
        fp16_bytes //= 2
    compressed_bytes = weights_bytes(built.package)
    return ComponentReport(
        component=converted.component,
        package=relative.removeprefix(f"{variant.folder_name}/"),
        parameters=converted.parameters,
        fp16_bytes=fp16_bytes,
        compressed_bytes=compressed_bytes,
        scheme=recipe.compression.for_component(converted.component).describe(),
        bits_per_weight=round(compressed_bytes * 8 / converted.parameters, 3) if converted.parameters else 0.0,
        convert_seconds=round(converted.seconds, 3),
        compress_seconds=round(built.compress_seconds, 3),
    )


def make_report(recipe: Recipe, source: LoadedSource, build: Build, monitor: Monitor) -> PublishReport:
    return PublishReport(
        recipe_name=recipe.name,
        recipe_file=recipe.file.name,
        recipe_sha256=recipe.sha256,
        source=recipe.source.repo or f"local:{recipe.source.path.name}",
        source_revision=source.revision,
        family=source.family,
        license=recipe.card.license or source.license,
        target_repo=recipe.target.repo,
        precision=recipe.conversion.precision,
        minimum_deployment_target=recipe.conversion.minimum_deployment_target.value,
        image_size=image_size(recipe, source),
        tool_versions=tool_versions(),
        card_tags=list(recipe.card.tags),
        variants=build.variants,
        stages=list(monitor.costs),
    )
