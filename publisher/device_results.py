"""Device benchmarks: ``device_results.json``, measured on Apple hardware and added to a published folder later.

Linux cannot run Core ML, so latency is measured elsewhere (a macOS job, or a maintainer with an iPhone)
and dropped into the published folder beside ``publish_report.json``; ``publisher card DIR`` then
re-renders the card's benchmark table from it. The file is one JSON object::

    {
      "schema_version": 1,
      "results": [
        {
          "device": "iPhone 15 Pro",
          "os": "iOS 17.4",
          "variant": "split_einsum",
          "compute_unit": "CPU_AND_NE",
          "latency_s": 7.9,
          "iterations_per_second": 2.69,
          "steps": 20,
          "runs": 5,
          "date": "2024-05-01",
          "tool_versions": {"ml-stable-diffusion": "1.1.1", "Xcode": "15.3"},
          "notes": "median of 5 runs, guidance 7.5 (UNet batch 2)"
        }
      ]
    }

One entry per measured configuration (device x variant x compute unit). ``variant`` is the folder
that was measured; the card takes its attention implementation from the publish report, so the
two can never disagree.

A language model's entry has the prompt's length and two speeds instead of a generation's latency and UNet
speed, and ``steps`` counts its decode steps::

    {"device": "Mac mini (M2 Pro)", "os": "macOS 15.1", "variant": "original", "compute_unit": "CPU_AND_GPU",
     "prompt_tokens": 128, "prefill_tokens_per_second": 812.5, "decode_tokens_per_second": 31.4,
     "steps": 20, "runs": 5, "date": "2024-11-02", "tool_versions": {"coremltools": "8.1"}}
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from publisher.errors import RecipeError
from publisher.layout import DEVICE_RESULTS_NAME

ComputeUnit = Literal["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL"]
_Text = Annotated[str, Field(min_length=1, max_length=200)]
_Rate = Annotated[float, Field(gt=0)]
# What each task measures: a run holds one task's fields, all of them, and no other task's.
MEASURES = {
    "text-to-image": ("latency_s", "iterations_per_second"),
    "text-generation": ("prompt_tokens", "prefill_tokens_per_second", "decode_tokens_per_second"),
}


class DeviceRun(BaseModel):
    """One measured configuration: a device running one variant on one set of compute units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: _Text = Field(description="Hardware as Apple names it: 'iPhone 15 Pro', 'Mac mini (M2 Pro)'")
    os: _Text = Field(description="Operating system and version: 'iOS 17.4', 'macOS 14.4'")
    variant: _Text = Field(description="Folder of the variant measured: 'original', 'split_einsum', ...")
    compute_unit: ComputeUnit = Field(description="MLComputeUnits used, in the Python pipeline's spelling")
    latency_s: _Rate | None = Field(default=None, description="End-to-end seconds for one image (median)")
    iterations_per_second: _Rate | None = Field(default=None, description="Diffusion speed: UNet steps/s")
    prompt_tokens: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="A language model's prompt length: the tokens one prefill call takes")
    prefill_tokens_per_second: _Rate | None = Field(
        default=None, description="Prompt tokens per second of the prefill call (median)")
    decode_tokens_per_second: _Rate | None = Field(
        default=None, description="Generated tokens per second, one call per token with the state carried (median)")
    steps: Annotated[int, Field(ge=1, le=1000)] = Field(description="Diffusion steps, or a language model's decode"
                                                       " steps")
    runs: Annotated[int, Field(ge=1, le=1000)] = Field(default=1, description="Runs the median is taken over")
    date: datetime.date = Field(description="When it was measured")
    tool_versions: dict[_Text, _Text] = Field(
        min_length=1, description="What ran it: 'ml-stable-diffusion', 'Xcode', app name and version, ..."
    )
    notes: Annotated[str, Field(max_length=500)] | None = None

    @model_validator(mode="after")
    def _one_task(self) -> DeviceRun:
        given = {name for fields in MEASURES.values() for name in fields if getattr(self, name) is not None}
        if not any(given == set(fields) for fields in MEASURES.values()):
            expected = " or ".join(f"{', '.join(fields)} ({task})" for task, fields in MEASURES.items())
            raise ValueError(f"a run has {expected}, not a mix (this one has {', '.join(sorted(given)) or 'neither'})")
        return self

    @property
    def task(self) -> str:
        """The task whose speeds this run measured."""
        return next(task for task, fields in MEASURES.items() if getattr(self, fields[0]) is not None)


class DeviceResults(BaseModel):
    """The whole ``device_results.json`` file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    results: list[DeviceRun] = Field(default_factory=list)


def read_device_results(folder: Path) -> list[DeviceRun]:
    """The device runs recorded in ``folder``; empty when no one has measured this repo yet.

    Raises :class:`RecipeError` naming the field when the file exists but is not valid, so a typo
    in a hand-written file never silently drops a row from the card.
    """
    path = folder / DEVICE_RESULTS_NAME
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecipeError(f"{DEVICE_RESULTS_NAME}: not valid JSON ({error})") from None
    try:
        return DeviceResults.model_validate(data).results
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise RecipeError(f"{DEVICE_RESULTS_NAME}: {where}: {first['msg']}") from None
