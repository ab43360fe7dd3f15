"""Assemble: lay the run's artifacts out as the Hub repository Apple's consumers expect.

```
<variant>/packages/Stable_Diffusion_version_<model>_<component>.mlpackage
vocab.json, merges.txt          tokenizer files the Swift pipeline reads
images/                         end-to-end parity images (reference and each variant)
recipe.yaml                     the exact recipe of this run
publish_report.json             what was built and measured
README.md                       the model card
```

The folder is built in a staging directory beside the output and renamed into place only when
complete, so a failed run never leaves a half-written repository.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from publisher.components import CONTROLNET_PACKAGE_PREFIX, component_spec, package_suffix
from publisher.errors import RecipeError
from publisher.language_model_source import package_name as language_model_package_name
from publisher.layout import IMAGES_FOLDER, RECIPE_NAME, REPORT_NAME
from publisher.recipe import Recipe
from publisher.report import PublishReport


def package_name(recipe: Recipe, component: str) -> str:
    """Apple's naming: ``Stable_Diffusion_version_<model id with / -> _>_<component>.mlpackage``, the
    ControlNet-conditioned UNet as ``..._control-unet``, and ControlNets as ``ControlNet_<model id>``; a language
    model after its model (:func:`publisher.language_model.package_name`)."""
    if component_spec(component).role == "language_model":
        return language_model_package_name(recipe)
    if component_spec(component).package_suffix is None:
        return f"{CONTROLNET_PACKAGE_PREFIX}{recipe.source.controlnet.model_id.replace('/', '_')}.mlpackage"
    return f"Stable_Diffusion_version_{recipe.model_version.replace('/', '_')}_{package_suffix(component)}.mlpackage"


def package_path(variant_folder: str, recipe: Recipe, component: str) -> str:
    return f"{variant_folder}/packages/{package_name(recipe, component)}"


# Dropped so that the same recipe, run again, publishes the same bytes (a no-op commit on the Hub).
VOLATILE_METADATA = ("com.github.apple.coremltools.conversion_date",)
_PACKAGE_NAMESPACE = uuid.UUID("6f1c1e0a-3c55-4d5e-9a55-8f0d1b6c2e11")


def make_deterministic(package: Path) -> None:
    """Remove what differs between two conversions of the same model: the conversion date in the
    spec and the random item identifiers coremltools writes into ``Manifest.json``."""
    # Here rather than at the top: `plan` reads package names from this module, and importing
    # coremltools takes seconds.
    from coremltools.proto import Model_pb2

    spec_file = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    for key in VOLATILE_METADATA:
        spec.description.metadata.userDefined.pop(key, None)
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))

    manifest_file = package / "Manifest.json"
    manifest = json.loads(manifest_file.read_text())
    renamed = {old: str(uuid.uuid5(_PACKAGE_NAMESPACE, entry["path"]))
               for old, entry in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def assemble(
    staging: Path,
    *,
    packages: dict[str, Path],
    tokenizer_files: list[Path],
    recipe_text: str,
    images: Path | None,
    report: PublishReport,
) -> Path:
    """Write the repository into ``staging`` (which must not exist yet).

    ``packages`` maps each package's path inside the repository to the package built for it.
    """
    staging.mkdir(parents=True)
    for relative, built in sorted(packages.items()):
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(built, destination)
        make_deterministic(destination)
    for file in tokenizer_files:
        shutil.copy2(file, staging / file.name)
    if images is not None and images.is_dir():
        shutil.copytree(images, staging / IMAGES_FOLDER)
    (staging / RECIPE_NAME).write_text(recipe_text, encoding="utf-8")
    report.write(staging)
    return staging


def is_publisher_output(folder: Path) -> bool:
    return (folder / REPORT_NAME).is_file()


def check_destination(out: Path) -> None:
    """Refuse to replace a folder this tool did not write: it may hold someone's work."""
    if out.exists() and not (out.is_dir() and (is_publisher_output(out) or not any(out.iterdir()))):
        raise RecipeError(f"{out} exists and is not a coreml-publisher output; choose another --out")


def promote(staging: Path, out: Path) -> Path:
    """Move the finished ``staging`` folder to ``out``, replacing a previous publish there."""
    check_destination(out)
    retired = out.with_name(f".{out.name}.previous")
    if retired.exists():
        shutil.rmtree(retired)
    if out.exists():
        out.rename(retired)
    staging.rename(out)
    if retired.exists():
        shutil.rmtree(retired)
    return out
