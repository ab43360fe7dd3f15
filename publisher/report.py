"""The publish report: the machine-readable record of one run (`publish_report.json`).

Every number on the model card comes from here, so the card can be re-rendered later
(`publisher card DIR`) without reconverting.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, Field

REPORT_NAME = "publish_report.json"
SCHEMA_VERSION = 1
TOOLS = ("coreml-publisher", "coremltools", "torch", "diffusers", "transformers", "peft", "huggingface_hub", "numpy")
# Measured while a run runs rather than determined by what it publishes: a cold cache re-measures every stage,
# so two runs of the same recipe, sources and tools differ in these and in nothing else.
MEASURED_COSTS: dict = {
    "stages": True,
    "machine": True,
    "variants": {"__all__": {"components": {"__all__": {"convert_seconds", "compress_seconds"}}}},
}


class ComponentReport(BaseModel):
    component: str
    package: str = Field(description="Path of the package relative to the variant folder")
    parameters: int
    fp16_bytes: int = Field(description="Size of the uncompressed (float16) weights")
    compressed_bytes: int = Field(description="Size of the published weights")
    scheme: str
    bits_per_weight: float = Field(description="compressed_bytes * 8 / parameters")
    convert_seconds: float
    compress_seconds: float

    @property
    def ratio(self) -> float:
        return self.fp16_bytes / self.compressed_bytes if self.compressed_bytes else 0.0


class ParityResult(BaseModel):
    component: str
    variant: str
    backend: str = Field(description="'executor-fp32', 'executor-fp16' or 'coreml-runtime'")
    psnr_db: float
    threshold_db: float
    passed: bool


class ImageParity(BaseModel):
    """One prompt's end-to-end image: the reference pipeline's and a variant's, compared."""

    prompt: str
    variant: str
    steps: int
    seed: int
    psnr_db: float
    reference_image: str = Field(description="PNG path relative to the repository root")
    variant_image: str = Field(description="PNG path relative to the repository root")


class TokenParity(BaseModel):
    """A language model's prompt, prefilled then decoded through the package, against transformers in fp32."""

    prompt: str
    variant: str
    backend: str
    prompt_tokens: int
    decode_steps: int
    prefill_psnr_db: float = Field(description="Logits PSNR over every prompt position")
    decode_psnr_db: float = Field(description="Logits PSNR of the worst decode step")
    token_agreement: float = Field(description="Share of predicted positions whose top-1 token is the reference's")
    first_divergence: int | None = Field(description="First decode step whose top-1 differs (0: the prefill's)")
    threshold_db: float
    min_token_agreement: float
    passed: bool


class VariantReport(BaseModel):
    folder: str
    attention: str
    compute_units: str
    components: list[ComponentReport]


class StageCost(BaseModel):
    stage: str
    seconds: float
    peak_rss_bytes: int


class Machine(BaseModel):
    system: str
    machine: str
    cpus: int
    memory_bytes: int

    @classmethod
    def current(cls) -> Machine:
        return cls(
            system=f"{platform.system()} {platform.release()}",
            machine=platform.machine(),
            cpus=psutil.cpu_count() or 1,
            memory_bytes=psutil.virtual_memory().total,
        )


class SourceInput(BaseModel):
    """A file the published weights were made from: a model's weights in a diffusers folder or repo, a single-file
    checkpoint, a VAE file or a fused LoRA."""

    role: Literal["weights", "checkpoint", "vae", "lora"]
    name: str = Field(description="'<repo>/<filename>' on the Hub, or the local file's name")
    repo: str | None = None
    revision: str | None = None
    filename: str
    sha256: str
    scale: float | None = Field(default=None, description="A LoRA's fusing scale")


class PublishReport(BaseModel):
    schema_version: int = SCHEMA_VERSION
    recipe_name: str
    recipe_file: str
    recipe_sha256: str
    source: str = Field(description="Hub repo id, or 'local:<folder name>' for a local source")
    source_revision: str | None
    family: str
    license: str | None
    license_name: str | None = Field(default=None, description="Display name of an 'other' license")
    license_link: str | None = Field(default=None, description="Link to the text of an 'other' license")
    target_repo: str
    precision: str
    minimum_deployment_target: str
    image_size: int | None = Field(description="The diffusion pipeline's image size; none for a language model")
    task: str = "text-to-image"
    context_length: int | None = Field(default=None, description="A language model's KV cache length (tokens)")
    tool_versions: dict[str, str]
    card_tags: list[str] = Field(default_factory=list)
    inputs: list[SourceInput] = Field(
        default_factory=list, description="The files the weights were made from, with their sha256"
    )
    missing_components: list[str] = Field(
        default_factory=list,
        description="Components Apple's pipelines load for this model that the repository does not hold (partial)",
    )
    source_warnings: list[str] = Field(
        default_factory=list, description="What could not be read from the source (its model card), in words"
    )
    variants: list[VariantReport]
    parity: list[ParityResult] = Field(default_factory=list)
    image_parity: list[ImageParity] = Field(default_factory=list)
    token_parity: list[TokenParity] = Field(default_factory=list)
    stages: list[StageCost] = Field(default_factory=list)
    machine: Machine = Field(default_factory=Machine.current)

    def same_publish(self, other: PublishReport) -> bool:
        """Whether `other` reports the same artifacts from the same recipe and tools: everything is equal but
        the measured costs (stage times and peak memory, convert and compress seconds, the machine)."""
        return self.model_dump(mode="json", exclude=MEASURED_COSTS) == other.model_dump(
            mode="json", exclude=MEASURED_COSTS
        )

    def write(self, folder: Path) -> Path:
        path = folder / REPORT_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> PublishReport:
        return cls.model_validate(json.loads((folder / REPORT_NAME).read_text()))


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
