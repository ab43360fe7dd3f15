"""The device benchmark: the publish workflow's macOS job (``.github/workflows/publish.yml``).

``publisher bench-device REPO --recipe RECIPE --push`` downloads the published revision and measures
what only Apple's runtime can: Core ML runtime parity against the PyTorch reference, and end-to-end
latency and UNet iterations/s per variant and compute unit. It compiles each variant to ``.mlmodelc``
and zips them the way Apple's apps download them (``<repo name>_<variant>_compiled.zip``), records
``device_results.json``, re-renders the card and pushes one more commit.

A language model's repository (``task: text-generation``) gets the same, measured as its consumers run it:
token parity (prefill then decode with the state carried, :mod:`publisher.language_model_parity`) on the
Core ML runtime, and the speed of a prompt's prefill and of decoding one token per call, in tokens/s.

Only compiling, loading a compiled model and measuring parity need macOS; they arrive as
:class:`DeviceTools`, so everything else here runs, and is tested, on Linux.
"""

from __future__ import annotations

import datetime
import functools
import platform
import shutil
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.proto import FeatureTypes_pb2, Model_pb2
from huggingface_hub import HfApi, get_token, snapshot_download

from publisher import __version__
from publisher.cache import hash_path
from publisher.card import format_bytes, write_card
from publisher.checkpoint import Assembly, assemble_source
from publisher.chunk import chains
from publisher.commands import run_tool
from publisher.components import component_names, swift_resource
from publisher.device_results import DeviceResults, DeviceRun, read_device_results
from publisher.errors import HubError, ParityError, PublisherError, RecipeError
from publisher.hub import PushResult
from publisher.hub_errors import HubCall, hub_errors
from publisher.language_model import CAUSAL_MASK, INPUT_IDS, causal_mask
from publisher.language_model_parity import COMPONENT as LANGUAGE_MODEL
from publisher.language_model_parity import judge, measure_language_model, reference_tokens
from publisher.language_model_source import load_language_model_source
from publisher.layout import DEVICE_RESULTS_NAME, LANGUAGE_MODEL_FILES, TOKENIZER_FILES
from publisher.parity import COREML_RUNTIME, coreml_runtime_available, measure_component
from publisher.push import PushOptions, push_folder_and_report
from publisher.recipe import Recipe
from publisher.report import ParityResult, PublishReport, TokenParity
from publisher.source import load_source

TEXT_ENCODERS = component_names("text_encoder")
# The models one text-to-image generation runs: every text encoder the repository has, then the image check's.
GENERATION = tuple(dict.fromkeys((*TEXT_ENCODERS, *component_names(in_images=True))))
# What a text-to-image generation needs beside a text encoder (SD 1.x/2.x have one, SDXL two).
TEXT_TO_IMAGE = tuple(name for name in component_names(in_images=True) if name not in TEXT_ENCODERS)
COMMIT_MESSAGE = "Add device benchmarks and compiled Core ML models"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same models always zip to the same bytes
_COPY_CHUNK = 1 << 20

Inputs = dict[str, np.ndarray]
Predict = Callable[[Inputs], Mapping[str, np.ndarray]]
Session = Callable[[], Predict]


@dataclass(frozen=True)
class DeviceTools:
    """What a device run needs from macOS, injected so the rest runs anywhere.

    Attributes:
        compile: ``(package, output folder) -> the .mlmodelc folder written there`` (Xcode's compiler).
        load: ``(compiled model, compute unit) -> its predict function`` (Core ML's runtime).
        measure: ``(component, packages) -> worst PSNR in dB`` of the Core ML runtime against the PyTorch
            reference, as :func:`publisher.parity.measure_component` measures it; ``packages`` holds one
            package, or a chunked UNet's two chunks in run order.
        open_session: ``(compiled stateful model, compute unit) -> a session factory``: each call starts a
            session with a fresh (zeroed) state and returns its predict function, which carries that state
            from call to call (coremltools' ``make_state`` and ``predict(state=...)``).
        measure_tokens: ``(language model package, variant) -> token parity rows`` of the Core ML runtime
            against transformers, as :func:`publisher.language_model_parity.measure_language_model` measures them.
        device, os, tool_versions: what the device results record about the machine.
    """

    compile: Callable[[Path, Path], Path]
    load: Callable[[Path, str], Predict]
    measure: Callable[[str, tuple[Path, ...]], float]
    open_session: Callable[[Path, str], Session]
    measure_tokens: Callable[[Path, str], list[TokenParity]]
    device: str
    os: str
    tool_versions: dict[str, str]


@dataclass(frozen=True)
class BenchSettings:
    """Apple's benchmark protocol by default: 20 steps, median of 5 runs."""

    steps: int = 20
    """Diffusion steps per generation; a language model's decode steps after its prompt."""
    runs: int = 5
    # A language model's prompt, shortened to what its package accepts with room left for the decode steps.
    prompt_tokens: int = 128
    # Empty: each variant on the compute units it was made for (the report's `compute_units`).
    compute_units: tuple[str, ...] = ()


@dataclass
class BenchResult:
    zips: list[Path] = field(default_factory=list)
    runs: list[DeviceRun] = field(default_factory=list)
    parity: list[ParityResult] = field(default_factory=list)
    tokens: list[TokenParity] = field(default_factory=list)

    @property
    def failed(self) -> list[ParityResult]:
        return [result for result in self.parity if not result.passed]


def bench_device(folder: Path, repo_id: str, recipe: Recipe, tools: DeviceTools,
                 settings: BenchSettings = BenchSettings(), *,
                 clock: Callable[[], float] = time.perf_counter) -> BenchResult:
    """Measure the assembled ``folder`` on this Mac and add what was measured to it.

    Writes ``<repo name>_<variant>_compiled.zip`` at the root (``repo_id`` names them: apps derive the
    URL from the repo they download from), ``device_results.json`` (this machine's rows replaced, other
    devices' kept), the Core ML runtime rows of the report's parity table, and the card rendered from
    them. Parity failures are recorded, not raised: the caller decides when to fail.
    """
    report = PublishReport.read(folder)
    if report.recipe_sha256 != recipe.sha256:
        raise RecipeError(
            f"{recipe.file}: is not the recipe {folder} was published from (its sha256 differs from the"
            " report's): check out the commit that published it"
        )
    result = BenchResult()
    language_model = report.task == "text-generation"
    measured: dict[str, float] = {}  # package content hash -> PSNR: variants share unchanged packages
    measured_tokens: dict[str, list[TokenParity]] = {}  # the same for a language model's token parity
    # A language model's zip carries its config and tokenizer, which swift-transformers and transformers read.
    files = tuple(name for name in LANGUAGE_MODEL_FILES if (folder / name).is_file()) if language_model \
        else TOKENIZER_FILES
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.bench-", dir=folder.parent) as work:
        for variant in report.variants:
            packages = {c.component: folder / variant.folder / c.package for c in variant.components}
            if language_model:
                package = packages[LANGUAGE_MODEL]
                key = hash_path(package)
                if key not in measured_tokens:
                    measured_tokens[key] = tools.measure_tokens(package, variant.folder)
                tokens, summary = judge(
                    recipe, [row.model_copy(update={"variant": variant.folder}) for row in measured_tokens[key]])
                result.tokens += tokens
                result.parity += summary
            else:
                for component, chain in chains(packages).items():
                    key = " + ".join(hash_path(package) for package in chain)
                    if key not in measured:
                        measured[key] = tools.measure(component, chain)
                    threshold = recipe.parity.threshold(component)
                    result.parity.append(ParityResult(
                        component=component, variant=variant.folder, backend=COREML_RUNTIME,
                        psnr_db=round(measured[key], 2), threshold_db=threshold, passed=measured[key] >= threshold,
                    ))
            stem = f"{repo_id.split('/')[-1]}_{variant.folder}_compiled"
            compiled = compile_variant(folder, packages, Path(work) / stem, tools.compile, files)
            if compiled is None:
                continue
            result.zips.append(zip_compiled(compiled).replace(folder / f"{stem}.zip"))
            if language_model:
                result.runs += time_language_model_variant(packages[LANGUAGE_MODEL], compiled, variant.folder,
                                                           variant.compute_units, tools, settings, clock)
                continue
            if not (set(TEXT_TO_IMAGE) <= set(packages) and set(TEXT_ENCODERS) & set(packages)):
                continue  # not a text-to-image pipeline: nothing to time end to end
            inputs = {component: example_inputs(packages[component]) for component in GENERATION
                      if component in packages}
            for unit in settings.compute_units or (variant.compute_units,):
                models = {component: tools.load(compiled / f"{swift_resource(component, packages[component].name)}"
                                                            ".mlmodelc", unit)
                          for component in inputs}
                latency, speed = time_generation(models, inputs, settings.steps, settings.runs, clock)
                result.runs.append(DeviceRun(
                    device=tools.device, os=tools.os, variant=variant.folder, compute_unit=unit,
                    latency_s=_significant(latency), iterations_per_second=_significant(speed), steps=settings.steps,
                    runs=settings.runs, date=datetime.date.today(), tool_versions=tools.tool_versions,
                    notes=f"median after one warm-up run; UNet batch {inputs['unet']['sample'].shape[0]};"
                          " compiled models driven from Python (coreml-publisher bench-device)",
                ))

    record_runs(folder, result.runs)
    variants = {r.variant for r in result.parity}
    kept = [r for r in report.parity if not (r.backend == COREML_RUNTIME and r.variant in variants)]
    kept_tokens = [r for r in report.token_parity if not (r.backend == COREML_RUNTIME and r.variant in variants)]
    report = report.model_copy(update={"parity": kept + result.parity, "token_parity": kept_tokens + result.tokens})
    report.write(folder)
    write_card(folder, report, template=recipe.card.template, extra_tags=recipe.card.tags)
    return result


def _significant(value: float) -> float:
    """Four significant digits: decimals would round a tiny model's milliseconds to zero."""
    return float(f"{value:.4g}")


def compile_variant(folder: Path, packages: dict[str, Path], destination: Path,
                    compile_model: Callable[[Path, Path], Path], files: tuple[str, ...] = TOKENIZER_FILES
                    ) -> Path | None:
    """Compile ``packages`` into ``destination`` as the resources Apple's Swift pipeline loads
    (``Unet.mlmodelc``, ``controlnet/<Name>.mlmodelc``, ...), beside the tokenizer ``files`` it reads. ``None`` for a
    variant without packages."""
    resources = {component: swift_resource(component, package.name) for component, package in packages.items()}
    if not resources:
        return None
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise PublisherError(f"{folder} has no {' or '.join(missing)}: the compiled models would be unusable")
    destination.mkdir(parents=True)
    for component, resource in resources.items():
        compiled = compile_model(packages[component], destination.parent / f"{destination.name}.{component}")
        if not compiled.is_dir():
            raise PublisherError(f"compiling {packages[component].name} produced no {compiled.name}")
        target = destination / f"{resource}.mlmodelc"
        target.parent.mkdir(exist_ok=True)  # controlnet/
        compiled.rename(target)
    for name in files:
        shutil.copyfile(folder / name, destination / name)
    return destination


def zip_compiled(compiled: Path) -> Path:
    """Zip the folder ``compiled`` beside it, as a top folder of the same name: apps unzip the archive
    and load ``<archive name without .zip>/``."""
    archive_path = compiled.parent / f"{compiled.name}.zip"
    with zipfile.ZipFile(archive_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted([compiled, *compiled.rglob("*")]):
            name = path.relative_to(compiled.parent).as_posix()
            if path.is_dir():
                info = zipfile.ZipInfo(f"{name}/", _ZIP_DATE)
                info.external_attr = (0o40755 << 16) | 0x10  # unix mode and the MS-DOS directory flag
                archive.writestr(info, b"")
                continue
            info = zipfile.ZipInfo(name, _ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            # Decided before writing a streamed entry; zipfile's own margin for deflate growth.
            large = path.stat().st_size * 1.05 > zipfile.ZIP64_LIMIT
            with path.open("rb") as source, archive.open(info, "w", force_zip64=large) as target:
                shutil.copyfileobj(source, target, _COPY_CHUNK)
    return archive_path


def example_inputs(package: Path, seed: int = 0) -> Inputs:
    """One array per input of ``package``, with the shape and type its spec declares.

    Token ids are zeros, a valid id in every vocabulary; the rest is noise. The values only need to be
    plausible: the time a dense network takes does not depend on them.
    """
    kinds = FeatureTypes_pb2.ArrayFeatureType
    dtypes = {kinds.FLOAT16: np.float16, kinds.FLOAT32: np.float32, kinds.DOUBLE: np.float64, kinds.INT32: np.int32}
    rng = np.random.default_rng(seed)
    inputs = {}
    for feature in _spec(package).description.input:
        array = feature.type.multiArrayType
        shape = tuple(array.shape)
        values = np.zeros(shape) if feature.name == "input_ids" else rng.standard_normal(shape)
        inputs[feature.name] = values.astype(dtypes[array.dataType])
    return inputs


def _spec(package: Path) -> Model_pb2.Model:
    spec = Model_pb2.Model()
    spec.ParseFromString((package / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    return spec


def prompt_length(package: Path, wanted: int, steps: int) -> int:
    """The prompt a language model's bench prefills: ``wanted`` tokens, or fewer where ``package`` takes fewer in
    one call or its cache could not hold ``steps`` decode steps after them.

    Args:
        package: the stateful package (``inputIds`` ranged, the KV cache as states of axis 3 the context).
        wanted: the prompt length asked for.
        steps: the decode steps that follow the prompt.

    Returns:
        `int`: the prompt length, at least 1.

    Raises:
        `PublisherError`: the context cannot hold one prompt token and ``steps`` decode steps.
    """
    description = _spec(package).description
    (ids,) = [feature for feature in description.input if feature.name == INPUT_IDS]
    context = min(state.type.stateType.arrayType.shape[3] for state in description.state)
    longest = ids.type.multiArrayType.shapeRange.sizeRanges[-1].upperBound
    prompt = min(wanted, context - steps, longest if longest > 0 else context)  # -1: unbounded
    if prompt < 1:
        raise PublisherError(f"{package.name}: its context of {context} tokens cannot hold a prompt and {steps} decode"
                             " steps: bench it with fewer steps")
    return prompt


def time_language_model(session: Session, prompt: int, steps: int, runs: int,
                        clock: Callable[[], float]) -> tuple[float, float]:
    """Median prefill and decode speeds of a language model, in tokens per second.

    A run is one turn of a chat as swift-transformers runs it: a fresh state, the prompt in one call (prefill),
    then ``steps`` calls of one token each, each call's mask seeing every token cached so far (decode). The ids
    are zeros: the time a dense network takes does not depend on them. One untimed run comes first: Core ML
    specializes a model on its first prediction.

    Args:
        session: starts a session with a fresh state (``DeviceTools.open_session``'s factory).
        prompt: the prompt's tokens.
        steps: the decode steps after it.
        runs: the timed runs the medians are taken over.
        clock: seconds, monotonic.

    Returns:
        `tuple[float, float]`: prompt tokens per second of the prefill, generated tokens per second of the decode.
    """
    prefill = {INPUT_IDS: np.zeros((1, prompt), np.int32), CAUSAL_MASK: causal_mask(prompt, prompt)}
    decode = [{INPUT_IDS: np.zeros((1, 1), np.int32), CAUSAL_MASK: causal_mask(1, end)}
              for end in range(prompt + 1, prompt + steps + 1)]

    def generate() -> tuple[float, float]:
        predict = session()
        start = clock()
        predict(prefill)
        decode_start = clock()
        for inputs in decode:
            predict(inputs)
        return decode_start - start, clock() - decode_start

    generate()
    timings = [generate() for _ in range(runs)]
    return prompt / statistics.median(t[0] for t in timings), steps / statistics.median(t[1] for t in timings)


def time_language_model_variant(package: Path, compiled: Path, variant: str, compute_units: str, tools: DeviceTools,
                                settings: BenchSettings, clock: Callable[[], float]) -> list[DeviceRun]:
    """Time a language model's compiled ``package`` on each compute unit of ``settings`` (default ``compute_units``,
    the variant's own) with :func:`time_language_model`.

    Args:
        package: the published package (its spec bounds the prompt: :func:`prompt_length`).
        compiled: the variant's compiled folder, holding the package's ``.mlmodelc``.
        variant: the variant's folder name.
        compute_units: the variant's own compute units, timed when ``settings`` names none.
        tools: opens the sessions, and names the machine.
        settings: the prompt, decode steps, runs and compute units.
        clock: seconds, monotonic.

    Returns:
        `list[DeviceRun]`: one row per compute unit, with ``steps`` the decode steps.

    Raises:
        `PublisherError`: the package's context cannot hold the decode steps (:func:`prompt_length`).
    """
    prompt = prompt_length(package, settings.prompt_tokens, settings.steps)
    model = compiled / f"{swift_resource(LANGUAGE_MODEL, package.name)}.mlmodelc"
    runs = []
    for unit in settings.compute_units or (compute_units,):
        prefill, decode = time_language_model(tools.open_session(model, unit), prompt, settings.steps, settings.runs,
                                              clock)
        runs.append(DeviceRun(
            device=tools.device, os=tools.os, variant=variant, compute_unit=unit, prompt_tokens=prompt,
            prefill_tokens_per_second=_significant(prefill), decode_tokens_per_second=_significant(decode),
            steps=settings.steps, runs=settings.runs, date=datetime.date.today(), tool_versions=tools.tool_versions,
            notes=f"median after one warm-up run; a prompt of {prompt} tokens in one call, then {settings.steps}"
                  " calls of one token with the KV-cache state carried; compiled model driven from Python"
                  " (coreml-publisher bench-device)",
        ))
    return runs


def time_generation(models: Mapping[str, Predict], inputs: Mapping[str, Inputs], steps: int, runs: int,
                    clock: Callable[[], float]) -> tuple[float, float]:
    """Median seconds of one text-to-image generation, and UNet iterations per second (median).

    A generation is what Apple's pipelines run: each text encoder once per prompt of the UNet batch
    (prompt and negative prompt under classifier-free guidance), ``steps`` UNet predictions, one VAE
    decode. One untimed run comes first: Core ML specializes a model on its first prediction.
    """
    prompts = inputs["unet"]["sample"].shape[0]

    def generate() -> tuple[float, float]:
        start = clock()
        for encoder in TEXT_ENCODERS:
            if encoder in models:
                for _ in range(prompts):
                    models[encoder](inputs[encoder])
        denoise_start = clock()
        for _ in range(steps):
            models["unet"](inputs["unet"])
        denoise_end = clock()
        models["vae_decoder"](inputs["vae_decoder"])
        return clock() - start, denoise_end - denoise_start

    generate()
    timings = [generate() for _ in range(runs)]
    return statistics.median(t[0] for t in timings), steps / statistics.median(t[1] for t in timings)


def record_runs(folder: Path, runs: list[DeviceRun]) -> Path:
    """Add ``runs`` to ``folder``'s device results, replacing earlier rows of the same device, variant and unit."""
    measured = {(run.device, run.variant, run.compute_unit) for run in runs}
    kept = [run for run in read_device_results(folder) if (run.device, run.variant, run.compute_unit) not in measured]
    path = folder / DEVICE_RESULTS_NAME
    # Without the other task's empty fields: the file holds what was measured.
    results = DeviceResults(results=[*kept, *runs])
    path.write_text(results.model_dump_json(indent=2, exclude_none=True) + "\n", encoding="utf-8")
    return path


def describe(result: BenchResult) -> str:
    """The lines a CI log shows: each configuration's timing, each Core ML runtime PSNR, each zip."""
    lines = [
        f"{run.variant}/{run.compute_unit}: {run.latency_s:.2f} s end to end, {run.iterations_per_second:.2f} it/s"
        f" ({run.steps} steps, median of {run.runs})" if run.task == "text-to-image" else
        f"{run.variant}/{run.compute_unit}: prefill {run.prefill_tokens_per_second:.1f} tokens/s ({run.prompt_tokens}"
        f" tokens), decode {run.decode_tokens_per_second:.1f} tokens/s ({run.steps} steps, median of {run.runs})"
        for run in result.runs
    ]
    lines += [
        f"{r.variant}/{r.component}: Core ML runtime {r.psnr_db:.1f} dB"
        f" ({'ok' if r.passed else 'FAILED'}, threshold {r.threshold_db:g} dB)"
        for r in result.parity
    ]
    lines += [
        f"{r.variant}/{r.prompt!r}: Core ML runtime top-1 agreement {r.token_agreement:.0%}"
        f" ({'ok' if r.passed else 'FAILED'}, threshold {r.min_token_agreement:.0%})"
        for r in result.tokens
    ]
    lines += [f"wrote {path.name} ({format_bytes(path.stat().st_size)})" for path in result.zips]
    return "\n".join(lines)


def fetch_published(repo_id: str, revision: str | None, folder: Path, *, endpoint: str | None = None) -> str:
    """Download ``repo_id`` at ``revision`` (default ``main``) into the new folder ``folder``; return the commit."""
    if folder.exists() and any(folder.iterdir()):
        raise PublisherError(f"{folder} is not empty: bench-device downloads into a new folder, so that no stale"
                             " file is pushed back")
    api = HfApi(endpoint=endpoint)
    ctx = HubCall(repo_id=repo_id, revision=revision or "main", endpoint=api.endpoint, secret=get_token(),
                   step="read the published revision")
    with hub_errors(ctx):
        commit = api.model_info(repo_id, revision=revision).sha
        if commit is None:
            raise HubError(f"the Hub at {api.endpoint} returned no head commit for {repo_id}@{ctx.revision}")
        ctx.step = "download the published revision"
        snapshot_download(repo_id, revision=commit, local_dir=folder, endpoint=endpoint)
    return commit


def push_results(folder: Path, repo_id: str, fetched: str | None, options: PushOptions, *,
                 endpoint: str | None = None, quiet: bool = False) -> PushResult:
    """Commit ``folder`` to ``repo_id``, unless the repo moved since ``fetched`` (the commit measured):
    the results describe those packages, and pushing the folder would undo whatever landed since."""
    target = options.revision or "main"
    if fetched is not None:
        api = HfApi(endpoint=endpoint)
        ctx = HubCall(repo_id=repo_id, revision=target, endpoint=api.endpoint, secret=get_token(),
                       step="read the current head")
        with hub_errors(ctx):
            head = api.model_info(repo_id, revision=options.revision).sha
        if head != fetched:
            raise HubError(
                f"{repo_id}@{target} moved from {fetched[:10]} to {(head or 'nothing')[:10]} while bench-device"
                " measured it; nothing was pushed: rerun to measure the new revision"
            )
    return push_folder_and_report(folder, repo_id, options=options, quiet=quiet, endpoint=endpoint,
                                  commit_message=COMMIT_MESSAGE)


def run_bench_device(target: str, recipe: Recipe, tools: DeviceTools, settings: BenchSettings = BenchSettings(),
                     *, out: Path | None = None, push: PushOptions | None = None, endpoint: str | None = None,
                     quiet: bool = False) -> BenchResult:
    """``publisher bench-device``: measure an assembled folder, or a Hub repo downloaded into ``out``
    (default ``bench/<repo name>``), print the results and push them when ``push`` is given.

    Raises :class:`ParityError` after pushing when the Core ML runtime misses a threshold: the card
    shows the failing row, and the job still fails.
    """
    folder = Path(target)
    fetched = None
    if folder.is_dir():
        repo_id = PublishReport.read(folder).target_repo
    else:
        repo_id = target
        folder = out or Path("bench") / target.split("/")[-1]
        fetched = fetch_published(repo_id, push.revision if push else None, folder, endpoint=endpoint)
    result = bench_device(folder, repo_id, recipe, tools, settings)
    print(describe(result))
    if push is not None:
        push_results(folder, repo_id, fetched, push, endpoint=endpoint, quiet=quiet)
    failed_tokens = [row for row in result.tokens if not row.passed]
    if failed_tokens:  # a language model fails on its PSNR or on its top-1 agreement
        token = min(failed_tokens, key=lambda row: (row.token_agreement, row.decode_psnr_db))
        raise ParityError(
            f"parity failed on the Core ML runtime: {LANGUAGE_MODEL} ({token.variant}), prompt {token.prompt!r}:"
            f" prefill {token.prefill_psnr_db:.1f} dB, decode {token.decode_psnr_db:.1f} dB (threshold"
            f" {token.threshold_db:g}), top-1 agreement {token.token_agreement:.0%} (threshold"
            f" {token.min_token_agreement:.0%}) ({len(failed_tokens)} failing row(s) recorded on the card)"
        )
    if result.failed:
        worst = min(result.failed, key=lambda r: r.psnr_db - r.threshold_db)
        raise ParityError(
            f"parity failed on the Core ML runtime: {worst.component} ({worst.variant}) reaches {worst.psnr_db:.1f}"
            f" dB, below its {worst.threshold_db:g} dB threshold ({len(result.failed)} failing row(s) recorded"
            " on the card)"
        )
    return result


def _assembly(recipe: Recipe) -> Assembly | None:
    if not recipe.source.needs_assembly:
        return None
    return assemble_source(recipe.source, Path(tempfile.mkdtemp(prefix="source-")))


def coreml_tools(recipe: Recipe) -> DeviceTools:
    """The real tools on a Mac: ``xcrun coremlcompiler``, coremltools' runtime, parity against ``recipe``'s source."""
    if platform.system() != "Darwin" or not coreml_runtime_available():
        raise PublisherError("bench-device needs macOS: Core ML's runtime and Xcode's compiler exist only there"
                             " (run it on an Apple-silicon Mac, or let the publish workflow's macOS job run it)")


    # Configs once; weights per component. A source assembled at publish time is assembled again here, once.
    source = functools.cache(lambda: load_source(recipe, models=(), assembly=_assembly(recipe)))
    # transformers' greedy decode of the card's prompts, once for every variant.
    references = functools.cache(lambda: reference_tokens(recipe, load_language_model_source(recipe)))

    def compile_model(package: Path, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        run_tool(["xcrun", "coremlcompiler", "compile", str(package), str(out)])
        return out / f"{package.stem}.mlmodelc"

    def load(compiled: Path, compute_unit: str) -> Predict:
        return ct.models.CompiledMLModel(str(compiled), compute_units=ct.ComputeUnit[compute_unit]).predict

    def measure(component: str, chain: tuple[Path, ...]) -> float:
        return measure_component(recipe, source(), component, chain, on=(COREML_RUNTIME,)).psnr_db[COREML_RUNTIME]

    def open_session(compiled: Path, compute_unit: str) -> Session:
        model = ct.models.CompiledMLModel(str(compiled), compute_units=ct.ComputeUnit[compute_unit])

        def session() -> Predict:
            state = model.make_state()
            return lambda inputs: model.predict(inputs, state=state)

        return session

    def measure_tokens(package: Path, variant: str) -> list[TokenParity]:
        return measure_language_model(package, references(), variant, on=(COREML_RUNTIME,))

    chip = run_tool(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
    model = run_tool(["sysctl", "-n", "hw.model"]).strip()
    xcode = run_tool(["xcodebuild", "-version"]).split()[1]
    return DeviceTools(
        compile=compile_model, load=load, measure=measure, open_session=open_session, measure_tokens=measure_tokens,
        device=f"{chip} ({model})",
        os=f"macOS {platform.mac_ver()[0]}",
        tool_versions={"coreml-publisher": __version__, "coremltools": ct.__version__, "Xcode": xcode},
    )
