"""bench-device on a language model's repository, on Linux: the executor stands in for Core ML's runtime (sessions
that carry the KV-cache state, token parity), a fake clock for time. A tiny Llama is published once, then each test
benchmarks a copy: prefill and decode tokens/s per compute unit, the compiled zip, device_results.json, the card's
table; a broken state update on the "runtime" is recorded on the card, then fails the job."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from publisher import executor
from publisher.cli import main
from publisher.device_bench import BenchSettings, DeviceTools, bench_device, prompt_length, run_bench_device
from publisher.device_results import read_device_results
from publisher.errors import ParityError, PublisherError
from publisher.language_model import CAUSAL_MASK, INPUT_IDS, LOGITS, causal_mask
from publisher.language_model_parity import TokenReference, measure_language_model, reference_tokens
from publisher.language_model_source import load_language_model_source
from publisher.layout import DEVICE_RESULTS_NAME
from publisher.parity import COREML_RUNTIME
from publisher.pipeline import publish
from publisher.recipe import Recipe, load_recipe
from publisher.report import PublishReport
from publisher.synthetic import build_language_model
from tests.conftest import ROOT
from tests.test_language_models import CONTEXT, break_cache_writes, write_recipe

REPO = "someone/tiny-llama-coreml"
CALL, TOKEN = 1 / 64, 1 / 1024  # the fake clock's cost of a prediction and of each token in it: exact in binary


class ExecutorCoreML:
    """Xcode's compiler and Core ML's runtime as Linux can have them: compiling copies the package (the executor
    runs packages), a session runs it on the executor in float16 with its own state, each prediction costs
    ``CALL + TOKEN * tokens`` on a fake clock, and token parity is the executor's, reported as the runtime's."""

    def __init__(self, references: list[TokenReference]) -> None:
        self.references = references
        self.now = 0.0
        self.sessions: list[tuple[str, list[tuple[int, int]]]] = []  # (unit, [(new tokens, mask end)] per call)
        self.logits: list[np.ndarray] = []

    def clock(self) -> float:
        return self.now

    def compile(self, package: Path, out: Path) -> Path:
        compiled = out / f"{package.stem}.mlmodelc"
        shutil.copytree(package, compiled)
        return compiled

    def open_session(self, compiled: Path, compute_unit: str):
        program = executor.load_program(compiled)

        def session():
            state = executor.make_state(program)
            calls: list[tuple[int, int]] = []
            self.sessions.append((compute_unit, calls))

            def predict(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                ids, mask = inputs[INPUT_IDS], inputs[CAUSAL_MASK]
                assert ids.dtype == np.int32 and mask.dtype == np.float16
                seen = calls[-1][1] if calls else 0
                # Each call sees every token cached before it and its own: the state is carried, not restarted.
                assert mask.shape == (1, 1, ids.shape[1], seen + ids.shape[1]), (mask.shape, seen)
                np.testing.assert_array_equal(mask, causal_mask(ids.shape[1], seen + ids.shape[1]))
                calls.append((ids.shape[1], mask.shape[-1]))
                self.now += CALL + TOKEN * ids.shape[1]
                outputs = executor.run(program, inputs, mode="fp16", state=state)
                self.logits.append(outputs[LOGITS])
                return outputs

            return predict

        return session

    def measure_tokens(self, package: Path, variant: str):
        rows = measure_language_model(package, self.references, variant, on=("executor-fp16",))
        return [row.model_copy(update={"backend": COREML_RUNTIME}) for row in rows]

    def load(self, compiled: Path, compute_unit: str):
        raise AssertionError(f"{compiled.name}: a language model is run in sessions, with its state")

    def measure(self, component: str, chain: tuple[Path, ...]) -> float:
        raise AssertionError(f"{component}: a language model's parity is measured in tokens")

    def tools(self) -> DeviceTools:
        return DeviceTools(compile=self.compile, load=self.load, measure=self.measure, open_session=self.open_session,
                           measure_tokens=self.measure_tokens, device="Apple M2 (Mac14,3)", os="macOS 15.1",
                           tool_versions={"coremltools": "9.0", "Xcode": "16.1"})


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Recipe, Path, list[TokenReference]]:
    """The tiny Llama published uncompressed (its recipe, its folder) and transformers' reference tokens."""
    root = tmp_path_factory.mktemp("bench-language-model")
    build_language_model(ROOT / "configs" / "tiny-llama", root / "tiny-llama")
    recipe_file = write_recipe(root, "llama", "none", name="tiny-llama-bench",
                               target={"repo": REPO}, card={"prompts": ["The capital of France is"]})
    publish(recipe_file, root / "published", quiet=True)
    recipe = load_recipe(recipe_file)
    return recipe, root / "published", reference_tokens(recipe, load_language_model_source(recipe))


@pytest.fixture
def published(tiny_llama, tmp_path: Path) -> Path:
    """A copy of the published folder, free to modify."""
    return Path(shutil.copytree(tiny_llama[1], tmp_path / "published"))


def _package(folder: Path) -> Path:
    (variant,) = PublishReport.read(folder).variants
    return folder / variant.folder / variant.components[0].package


def test_bench_device_times_prefill_and_decode_and_records_them(tiny_llama, published: Path):
    recipe, _, references = tiny_llama
    assert "Prefill and decode speed on Apple devices have not been measured yet" in (
        published / "README.md").read_text()
    fake = ExecutorCoreML(references)
    settings = BenchSettings(steps=4, runs=3, prompt_tokens=16, compute_units=("ALL", "CPU_AND_GPU"))

    result = bench_device(published, REPO, recipe, fake.tools(), settings, clock=fake.clock)

    # Per run: the 16-token prompt in one call, then 4 calls of one token; a warm-up run, then 3 timed ones.
    prefill = 16 / (CALL + 16 * TOKEN)
    decode = 4 / (4 * (CALL + TOKEN))
    assert [(run.compute_unit, run.prompt_tokens, run.steps, run.prefill_tokens_per_second,
             run.decode_tokens_per_second) for run in result.runs] == [
        (unit, 16, 4, float(f"{prefill:.4g}"), float(f"{decode:.4g}")) for unit in ("ALL", "CPU_AND_GPU")]
    assert [unit for unit, _ in fake.sessions] == ["ALL"] * 4 + ["CPU_AND_GPU"] * 4
    assert all(calls == [(16, 16), (1, 17), (1, 18), (1, 19), (1, 20)] for _, calls in fake.sessions)
    # The executor ran every call: real logits, prefill's over the prompt, decode's one position.
    assert fake.logits[0].shape == (1, 16, 512) and fake.logits[1].shape == (1, 1, 512)

    (archive_path,) = result.zips
    assert archive_path == published / "tiny-llama-coreml_original_compiled.zip"
    resource = f"{_package(published).stem}.mlmodelc"
    with zipfile.ZipFile(archive_path) as archive:
        top = {name.split("/")[1] for name in archive.namelist() if name.count("/") >= 1} - {""}
        assert {name.split("/")[0] for name in archive.namelist()} == {"tiny-llama-coreml_original_compiled"}
        assert archive.read("tiny-llama-coreml_original_compiled/tokenizer.json") == (
            published / "tokenizer.json").read_bytes()
    assert top == {resource, "config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer_config.json"}

    recorded = json.loads((published / DEVICE_RESULTS_NAME).read_text())["results"]
    assert [run["compute_unit"] for run in recorded] == ["ALL", "CPU_AND_GPU"]
    assert not {"latency_s", "iterations_per_second"} & set(recorded[0]), "a language model has no image latency"
    assert read_device_results(published) == result.runs

    report = PublishReport.read(published)
    runtime = [row for row in report.token_parity if row.backend == COREML_RUNTIME]
    assert [row.prompt for row in runtime] == list(recipe.card.prompts)
    assert all(row.passed and row.token_agreement == 1.0 and row.decode_steps == 16 for row in runtime)
    (summary,) = [row for row in report.parity if row.backend == COREML_RUNTIME]
    assert summary.component == "language_model" and summary.passed
    assert {row.backend for row in report.token_parity} == {"executor-fp32", "executor-fp16", COREML_RUNTIME}

    card = (published / "README.md").read_text()
    assert "| Device | OS | Compute units | Variant | Prefill (tokens/s) | Decode (tokens/s) |" in card
    assert (f"| Apple M2 (Mac14,3) | macOS 15.1 | `ALL` | `original` | {prefill:.1f} | {decode:.1f} |"
            in card), card
    assert "`CPU_AND_GPU`: a prompt of 16 tokens then 4 decode steps, median of 3 runs" in card
    assert "| coreml-runtime |" in card and "End-to-end latency" not in card
    assert "have not been measured yet" not in card


def test_the_prompt_fits_the_package(tiny_llama):
    package = _package(tiny_llama[1])
    assert prompt_length(package, 16, 4) == 16
    assert prompt_length(package, 1000, 4) == CONTEXT - 4  # room left in the cache for the decode steps
    with pytest.raises(PublisherError, match=f"context of {CONTEXT} tokens cannot hold a prompt and {CONTEXT}"):
        prompt_length(package, 16, CONTEXT)


def test_a_broken_state_update_on_the_runtime_is_recorded_then_fails(tiny_llama, published: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    recipe, _, references = tiny_llama
    fake = ExecutorCoreML(references)
    # The update that writes nothing: decode reads a cache the prompt never filled (tests/test_language_models.py).
    break_cache_writes(monkeypatch)
    with pytest.raises(ParityError, match="on the Core ML runtime: language_model .*top-1 agreement") as failure:
        run_bench_device(str(published), recipe, fake.tools(), BenchSettings(steps=2, runs=1, prompt_tokens=8))
    assert failure.value.exit_code == 3

    report = PublishReport.read(published)
    runtime = [row for row in report.token_parity if row.backend == COREML_RUNTIME]
    assert runtime and not any(row.passed for row in runtime)
    assert all(row.threshold_db == 20 and row.min_token_agreement == 0.9 for row in runtime)
    assert [row.passed for row in report.parity if row.backend == COREML_RUNTIME] == [False]
    assert all(row.passed for row in report.token_parity if row.backend != COREML_RUNTIME), "Linux's rows stay"
    assert read_device_results(published), "the timings are still recorded"
    assert "| coreml-runtime |" in (card := (published / "README.md").read_text()) and "**FAIL**" in card


def test_a_diffusion_run_in_a_language_model_repository_is_one_line(published: Path, capsys):
    run = {"device": "iPhone 15 Pro", "os": "iOS 18.1", "variant": "original", "compute_unit": "CPU_AND_NE",
           "latency_s": 7.9, "iterations_per_second": 2.7, "steps": 20, "date": "2024-11-01",
           "tool_versions": {"app": "1.0"}}
    (published / DEVICE_RESULTS_NAME).write_text(json.dumps({"results": [run]}))
    assert main(["card", str(published)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "results.0: has a text-to-image model's speeds" in error, error

    # Half of a language model's speeds, or one of each task's: the file itself is refused, naming the row.
    for change in ({"latency_s": None, "iterations_per_second": None, "decode_tokens_per_second": 30.0},
                   {"prompt_tokens": 16, "prefill_tokens_per_second": 500.0, "decode_tokens_per_second": 30.0}):
        (published / DEVICE_RESULTS_NAME).write_text(json.dumps({"results": [{**run, **change}]}))
        assert main(["card", str(published)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "results.0: Value error, a run has latency_s" in error, error
