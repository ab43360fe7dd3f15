"""Parity: run the exact package bytes and compare them with the fp32 PyTorch reference.

Core ML's runtime exists only on macOS, so the gate's backend everywhere is the torch ML Program
executor (`publisher.executor`), in two modes: values held in fp32, and each op rounded to the
dtype the program declares. Where coremltools can load models (macOS), Core ML itself is an extra
backend. PSNR is Apple's: ``20 * log10((max|ref| + 1e-5) / (rmse + 1e-10))``.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import coremltools as ct
import numpy as np
import torch
from PIL import Image

from publisher import executor
from publisher.components import component_names, component_spec, pipeline_components
from publisher.errors import ParityError
from publisher.recipe import Recipe
from publisher.report import ImageParity, ParityResult
from publisher.source import LoadedSource
from publisher.wrappers import component_io, image_size, reference_module

EXECUTOR_MODES: tuple[executor.Mode, ...] = ("fp32", "fp16")
COREML_RUNTIME = "coreml-runtime"
# diffusers' SDXL image-to-image default: the refiner re-noises the last 30 % of the schedule and denoises it.
REFINER_STRENGTH = 0.3
# diffusers' refiner conditions the prompt's row on a high aesthetic score and the unconditional row on a low one.
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
UNET_TIMESTEP_SAMPLES = 3  # early, middle and late in the schedule: errors differ across noise levels

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Apple's PSNR, so our thresholds mean what theirs mean (35 dB is their hard minimum)."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    rmse = np.sqrt(np.mean((reference - candidate) ** 2))
    return float(20 * np.log10((np.abs(reference).max() + 1e-5) / (rmse + 1e-10)))


def coreml_runtime_available() -> bool:
    """coremltools ships its runtime bindings only in macOS wheels."""
    return importlib.util.find_spec("coremltools.libcoremlpython") is not None


def backends() -> tuple[str, ...]:
    names = tuple(f"executor-{mode}" for mode in EXECUTOR_MODES)
    return names + ((COREML_RUNTIME,) if coreml_runtime_available() else ())


def as_chain(package: Path | Sequence[Path]) -> tuple[Path, ...]:
    """A component's packages in run order: one, or a chunked UNet's chunks."""
    return (package,) if isinstance(package, Path) else tuple(package)


def _predictor(package: Path, backend: str, programs: dict[Path, executor.LoadedProgram]
               ) -> tuple[list[str], Callable[[Inputs], Outputs]]:
    """The package's input names and its predict function on ``backend``; executor programs are
    loaded once into ``programs`` and shared by the executor's modes."""
    if backend == COREML_RUNTIME:
        model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_ONLY)
        return [feature.name for feature in model.get_spec().description.input], model.predict
    if package not in programs:
        programs[package] = executor.load_program(package)
    program = programs[package]
    mode: executor.Mode = backend.removeprefix("executor-")  # type: ignore[assignment]
    return list(program.inputs), lambda inputs: executor.run(program, inputs, mode=mode)


def _runner(package: Path | Sequence[Path], backend: str,
            programs: dict[Path, executor.LoadedProgram] | None = None) -> Callable[[Inputs], Outputs]:
    """Run a component's packages in order: each takes what it needs from the inputs and the
    outputs before it (a second UNet chunk reads the first's outputs and some original inputs)."""
    programs = {} if programs is None else programs
    stages = [_predictor(link, backend, programs) for link in as_chain(package)]

    def run(inputs: Inputs) -> Outputs:
        values = dict(inputs)
        for names, predict in stages:
            values.update(predict({name: values[name] for name in names}))
        return values

    return run


# ---------------------------------------------------------------------------------------------
# Deterministic, realistic inputs


def tokenize(source: LoadedSource, prompts: list[str]) -> list[np.ndarray]:
    tokenizer = source.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np").input_ids
    return [row[None].astype(np.float32) for row in ids]


def _reference(module: torch.nn.Module, inputs: Inputs, output_names: tuple[str, ...]) -> Outputs:
    with torch.inference_mode():
        outputs = module(*(torch.from_numpy(np.asarray(value, dtype=np.float32)) for value in inputs.values()))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: output.numpy() for name, output in zip(output_names, outputs, strict=True)}


def _text_conditioning(source: LoadedSource, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Reference text encoders' outputs for ``prompts``, in the UNet's layout.

    Returns (N, C, 1, S) hidden states (SDXL: both encoders' concatenated, as its UNet expects) and
    the last encoder's pooled output (SDXL's ``text_embeds``).
    """
    encoders = [name for name in component_names("text_encoder") if getattr(source.pipe, name, None) is not None]
    hidden, pooled = [], None
    for name in encoders:
        module = reference_module(source, name)
        outputs = [_reference(module, {"input_ids": ids}, ("hidden", "pooled")) for ids in tokenize(source, prompts)]
        hidden.append(np.concatenate([output["hidden"] for output in outputs]))
        pooled = np.concatenate([output["pooled"] for output in outputs])
    embeddings = np.concatenate(hidden, axis=-1).transpose(0, 2, 1)[:, :, None, :]
    return embeddings, pooled


def component_inputs(recipe: Recipe, source: LoadedSource, component: str) -> list[Inputs]:
    """The inputs a component is checked on: prompts, latents and timesteps a real run would see."""
    io = component_io(recipe, source, component)
    generator = np.random.default_rng(recipe.parity.seed)
    shapes = {spec.name: spec.shape for spec in io.inputs}
    prompts = list(recipe.card.prompts)
    if component_spec(component).role == "text_encoder":
        return [{"input_ids": ids} for ids in tokenize(source, prompts)]
    if component_spec(component).is_denoiser:
        cases = _denoiser_cases(recipe, source, shapes, generator)
        for case in cases:
            # ControlNet images are in [0, 1]; residuals are small corrections to the UNet's skips.
            for name, shape in shapes.items():
                if name == "controlnet_cond":
                    case[name] = generator.uniform(0, 1, shape).astype(np.float32)
                elif name.startswith("additional_residual_"):
                    case[name] = (0.1 * generator.standard_normal(shape)).astype(np.float32)
        # The torch reference takes its inputs positionally, in the package's order.
        return [{spec.name: case[spec.name] for spec in io.inputs} for case in cases]
    if component == "vae_decoder":
        scaling = source.pipe.vae.config.scaling_factor
        return [{"z": (generator.standard_normal(shapes["z"]) / scaling).astype(np.float32)}]
    if component == "vae_encoder":
        _, _, height, width = shapes["x"]
        return [{"x": structured_image(height, width)[None]}]
    if component_spec(component).role == "safety_checker":
        _, height, width, _ = shapes["images"]
        images = ((structured_image(height, width) + 1) / 2).transpose(1, 2, 0)[None]
        # The feature extractor's crop and normalization, as Apple's Python pipeline feeds the checker.
        clip_input = source.pipe.feature_extractor(images=list(images), do_rescale=False, return_tensors="np")
        return [{"clip_input": clip_input.pixel_values.astype(np.float32), "images": images,
                 "adjustment": np.zeros(shapes["adjustment"], np.float32)}]
    raise ValueError(f"unknown component {component!r}")


def structured_image(height: int, width: int) -> np.ndarray:
    """A smooth image in [-1, 1], channels first: structure (not noise), what image models are made for."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    return np.stack([np.sin(6 * x), np.cos(5 * y), np.sin(4 * (x + y))]).astype(np.float32)


def _denoiser_cases(recipe: Recipe, source: LoadedSource, shapes: dict[str, tuple[int, ...]],
                    generator: np.random.Generator) -> list[Inputs]:
    """Latents at timesteps early, mid and late in the schedule, conditioned on the recipe's prompts."""
    batch = shapes["sample"][0]
    # Unconditional first, as classifier-free guidance batches them.
    embeddings, pooled = _text_conditioning(source, [""] + list(recipe.card.prompts)[: max(batch - 1, 1)])
    embeddings = np.resize(embeddings, shapes["encoder_hidden_states"]).astype(np.float32)
    scheduler = copy.deepcopy(source.pipe.scheduler)
    scheduler.set_timesteps(max(recipe.parity.image_steps, UNET_TIMESTEP_SAMPLES))
    timesteps = scheduler.timesteps.numpy()
    picks = timesteps[np.linspace(0, len(timesteps) - 1, UNET_TIMESTEP_SAMPLES).round().astype(int)]
    size = image_size(recipe, source)
    cases = []
    for timestep in picks:
        case = {
            "sample": generator.standard_normal(shapes["sample"]).astype(np.float32),
            "timestep": np.full(shapes["timestep"], float(timestep), dtype=np.float32),
            "encoder_hidden_states": embeddings,
        }
        if "time_ids" in shapes:
            case["time_ids"] = np.tile(_time_ids(size, shapes["time_ids"][1], AESTHETIC_SCORE), (batch, 1))
            case["text_embeds"] = np.resize(pooled, shapes["text_embeds"]).astype(np.float32)
        cases.append(case)
    return cases


def _time_ids(size: int, width: int, aesthetic_score: float) -> np.ndarray:
    """SDXL's micro-conditioning: the base's six (original size, crop corner, target size) or the refiner's five
    (original size, crop corner, aesthetic score)."""
    return np.array({6: [size, size, 0, 0, size, size], 5: [size, size, 0, 0, aesthetic_score]}[width], np.float32)


# ---------------------------------------------------------------------------------------------
# The gate


@dataclass(frozen=True)
class ComponentParity:
    component: str
    psnr_db: dict[str, float]  # backend -> worst PSNR over outputs and cases


def reference_models(source: LoadedSource, component: str) -> tuple[str, ...]:
    """The models whose weights checking ``component`` reads: its own, and for a denoiser the text
    encoders that make its conditioning."""
    models = [component_spec(component).model]
    if component_spec(component).is_denoiser:
        models += [name for name in component_names("text_encoder") if getattr(source.pipe, name, None) is not None]
    return tuple(models)


@dataclass(frozen=True)
class Reference:
    """The inputs a component is checked on, and the fp32 torch reference's outputs on each.

    It depends on the source and the recipe, not on any package: a run computes it once for all of
    its variants, and the stage cache keeps it for the next run.
    """

    inputs: list[Inputs]
    outputs: list[Outputs]

    def save(self, path: Path) -> None:
        arrays = {f"{kind}/{index}/{name}": value
                  for kind, items in (("input", self.inputs), ("output", self.outputs))
                  for index, item in enumerate(items) for name, value in item.items()}
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> Reference:
        groups: dict[str, dict[int, Inputs]] = {"input": {}, "output": {}}
        with np.load(path) as archive:
            for key in archive.files:  # in the order saved: the torch reference takes inputs positionally
                kind, index, name = key.split("/", 2)
                groups[kind].setdefault(int(index), {})[name] = archive[key]
        return cls(*([items[index] for index in sorted(items)] for items in groups.values()))


def reference_cases(recipe: Recipe, source: LoadedSource, component: str) -> Reference:
    """The inputs ``component`` is checked on, and the fp32 reference's outputs on them.

    Only the models this needs hold weights, and only while it runs: the packages are then run with
    the torch weights already released. Where the run draws reference images, the UNet's and the VAE
    decoder's cases are taken from their denoising (see :func:`cases_from_images`).
    """
    if component in cases_from_images(recipe, source):
        return reference_images(recipe, source).cases[component]
    with source.weights(*reference_models(source, component)):
        return _reference_cases(recipe, source, component)


def _reference_cases(recipe: Recipe, source: LoadedSource, component: str) -> Reference:
    # A function of its own so that the module is gone before source.weights() releases its weights.
    io = component_io(recipe, source, component)
    module = reference_module(source, component)
    cases = component_inputs(recipe, source, component)
    return Reference(cases, [_reference(module, case, io.outputs) for case in cases])


def measure_component(recipe: Recipe, source: LoadedSource, component: str, package: Path | Sequence[Path],
                      on: tuple[str, ...] | None = None, reference: Reference | None = None,
                      programs: dict[Path, executor.LoadedProgram] | None = None) -> ComponentParity:
    """PSNR of ``package`` (or a chunked component's chain of packages) against the fp32 reference,
    per backend (worst output, worst case).

    ``on`` limits the backends (default: every available one); ``reference`` is computed when not given.
    Executor programs are loaded into ``programs`` when given (a caller that runs them again).
    """
    outputs = component_io(recipe, source, component).outputs
    reference = reference or reference_cases(recipe, source, component)
    results = {}
    programs = {} if programs is None else programs
    for backend in on or backends():
        run = _runner(package, backend, programs)
        results[backend] = min(
            psnr(expected[name], produced[name])
            for case, expected in zip(reference.inputs, reference.outputs, strict=True)
            for produced in (run(case),)
            for name in outputs
        )
    return ComponentParity(component, results)


def gate(recipe: Recipe, variant: str, measured: ComponentParity) -> list[ParityResult]:
    """Record every backend's PSNR; raise :class:`ParityError` if any is under the threshold."""
    threshold = recipe.parity.threshold(measured.component)
    results = [
        ParityResult(component=measured.component, variant=variant, backend=backend, psnr_db=round(value, 2),
                     threshold_db=threshold, passed=value >= threshold)
        for backend, value in measured.psnr_db.items()
    ]
    failed = [result for result in results if not result.passed]
    if failed:
        worst = min(failed, key=lambda result: result.psnr_db)
        raise ParityError(
            f"parity failed: {measured.component} ({variant}) reaches {worst.psnr_db:.1f} dB on {worst.backend},"
            f" below the {threshold:g} dB threshold; use a milder compression scheme or lower"
            f" parity.per_component.{measured.component} in the recipe"
        )
    return results


# ---------------------------------------------------------------------------------------------
# End-to-end images


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8, as diffusers' postprocessing does."""
    return (np.clip(image[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def denoise(recipe: Recipe, source: LoadedSource, prompt: str, run: Callable[[str, Inputs], Outputs],
            calls: dict[str, list[tuple[Inputs, Outputs]]] | None = None) -> np.ndarray:
    """A short text-to-image loop (image-to-image for the refiner) over ``run(component, inputs)``, as
    diffusers' pipelines sample: the source's scheduler, the recipe's guidance, seeded noise.

    The same loop serves the torch reference and the packages, so the two images differ only by
    what the components compute. Each call's inputs and outputs are appended to ``calls[component]``.
    """
    if calls is not None:
        run = _recording(run, calls)
    pipe = source.pipe
    scheduler, timesteps = _schedule(recipe, source)
    components = image_components(recipe, source)
    denoiser = next(name for name in components if component_spec(name).role == "denoiser")
    controlnet = next((name for name in components if component_spec(name).role == "controlnet"), None)
    guidance = recipe.parity.guidance_scale
    conditioning = _guided_conditioning(recipe, source, prompt, run, denoiser, guidance)
    if controlnet is not None:
        # A fixed structured image stands for the conditioning (edges, depth) an app would make.
        pixels = image_size(recipe, source)
        conditioning["controlnet_cond"] = np.repeat(((structured_image(pixels, pixels) + 1) / 2)[None], 2, axis=0)
    generator = torch.Generator().manual_seed(recipe.parity.seed)
    if refines(source):
        latents = _noised_base_image(recipe, source, run, scheduler, timesteps[:1], generator)
    else:
        latent = image_size(recipe, source) // source.vae_scale_factor
        latents = torch.randn((1, pipe.unet.config.in_channels, latent, latent), generator=generator)
        latents = latents * scheduler.init_noise_sigma
    # An ancestral scheduler (SDXL-Turbo's Euler ancestral) adds noise at every step: drawn from the seeded
    # generator, so the reference and the packages see the same noise.
    step_options = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for timestep in timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
        values = {"sample": model_input.numpy(), "timestep": np.full((2,), float(timestep), dtype=np.float32),
                  **conditioning}
        if controlnet is not None:  # the ControlNet's residuals are the control-unet's extra inputs
            values |= run(controlnet, _in_order(recipe, source, controlnet, values))
        noise = run(denoiser, _in_order(recipe, source, denoiser, values))["noise_pred"]
        uncond, text = torch.from_numpy(noise.astype(np.float32)).chunk(2)
        guided = uncond + guidance * (text - uncond)
        latents = scheduler.step(guided, timestep, latents, **step_options).prev_sample
    z = (latents / pipe.vae.config.scaling_factor).numpy()
    return _to_uint8(run("vae_decoder", {"z": z})["image"].astype(np.float32))


def refines(source: LoadedSource) -> bool:
    """Whether the source refines an image rather than drawing one: the SDXL refiner, which diffusers loads as its
    image-to-image pipeline, conditioned on an aesthetic score."""
    return bool(source.pipe.config.get("requires_aesthetics_score", False))


def _denoising_steps(recipe: Recipe, source: LoadedSource) -> int:
    """The steps the image check denoises: the recipe's image steps, or for the refiner the last
    :data:`REFINER_STRENGTH` of them as diffusers takes them (at least one, where diffusers would refuse to run
    none)."""
    steps = recipe.parity.image_steps
    return max(int(steps * REFINER_STRENGTH), 1) if refines(source) else steps


def _schedule(recipe: Recipe, source: LoadedSource) -> tuple[Any, torch.Tensor]:
    """A copy of the source's scheduler set for the recipe's image steps, and the timesteps of the
    :func:`_denoising_steps`."""
    scheduler = copy.deepcopy(source.pipe.scheduler)
    steps = recipe.parity.image_steps
    scheduler.set_timesteps(steps)
    if not refines(source):
        return scheduler, scheduler.timesteps
    start = (steps - _denoising_steps(recipe, source)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):  # where add_noise and the first step find their place
        scheduler.set_begin_index(start)
    return scheduler, scheduler.timesteps[start:]


def _noised_base_image(recipe: Recipe, source: LoadedSource, run: Callable[[str, Inputs], Outputs], scheduler: Any,
                       timestep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The refiner's first latents, made as diffusers' image-to-image makes them: the base image through ``run``'s
    VAE encoder, a sample of its posterior in the UNet's scale, noised to the first timestep. A fixed structured
    image stands for the base model's output."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pixels = image_size(recipe, source)
    moments = run("vae_encoder", {"x": structured_image(pixels, pixels)[None]})["latent"]
    posterior = DiagonalGaussianDistribution(torch.from_numpy(moments.astype(np.float32)))
    latents = posterior.sample(generator) * source.pipe.vae.config.scaling_factor
    return scheduler.add_noise(latents, torch.randn(latents.shape, generator=generator), timestep)


def _in_order(recipe: Recipe, source: LoadedSource, component: str, values: Inputs) -> Inputs:
    """``component``'s inputs from ``values``, in its contract's order (the torch reference takes them positionally)."""
    return {spec.name: values[spec.name] for spec in component_io(recipe, source, component).inputs}


def _guided_conditioning(recipe: Recipe, source: LoadedSource, prompt: str, run: Callable[[str, Inputs], Outputs],
                         denoiser: str, guidance: float) -> Inputs:
    """The UNet's text inputs for the unconditional and the prompt's rows, from ``run``'s text encoders: the
    hidden states of every encoder, concatenated (SDXL), and for SDXL the last one's pooled output with the
    micro-conditioning (original size, crop corner, target size or aesthetic score).

    Unguided, both rows are the prompt's: the guided noise is then the prompt's, as diffusers samples without
    guidance, and the UNet still takes the two rows Apple's SDXL pipelines feed it.
    """
    rows = ["" if guidance else prompt, prompt]
    hidden, pooled = [], None
    for encoder in (name for name in image_components(recipe, source)
                    if component_spec(name).role == "text_encoder"):
        first, pooled_name = component_io(recipe, source, encoder).outputs
        outputs = [run(encoder, {"input_ids": row}) for row in tokenize(source, rows)]
        hidden.append(np.concatenate([output[first] for output in outputs]))
        pooled = np.concatenate([output[pooled_name] for output in outputs])
    embeddings = np.concatenate(hidden, axis=-1).transpose(0, 2, 1)[:, :, None, :].astype(np.float32)
    inputs = {"encoder_hidden_states": embeddings}
    time_ids = next((spec for spec in component_io(recipe, source, denoiser).inputs if spec.name == "time_ids"), None)
    if time_ids is not None:
        size = image_size(recipe, source)
        scores = (NEGATIVE_AESTHETIC_SCORE if guidance else AESTHETIC_SCORE, AESTHETIC_SCORE)  # the refiner's
        inputs["time_ids"] = np.stack([_time_ids(size, time_ids.shape[1], score) for score in scores])
        inputs["text_embeds"] = pooled.astype(np.float32)
    return inputs


def _recording(run: Callable[[str, Inputs], Outputs],
               calls: dict[str, list[tuple[Inputs, Outputs]]]) -> Callable[[str, Inputs], Outputs]:
    def recorded(component: str, inputs: Inputs) -> Outputs:
        outputs = run(component, inputs)
        calls.setdefault(component, []).append((inputs, outputs))
        return outputs

    return recorded


def reference_runner(recipe: Recipe, source: LoadedSource) -> Callable[[str, Inputs], Outputs]:
    modules = {component: reference_module(source, component) for component in image_components(recipe, source)}

    def run(component: str, inputs: Inputs) -> Outputs:
        return _reference(modules[component], inputs, component_io(recipe, source, component).outputs)

    return run


def package_runner(packages: Mapping[str, Path | Sequence[Path]], mode: executor.Mode = "fp16",
                   programs: dict[Path, executor.LoadedProgram] | None = None):
    runners = {component: _runner(package, f"executor-{mode}", programs) for component, package in packages.items()}

    def run(component: str, inputs: Inputs) -> Outputs:
        return runners[component](inputs)

    return run


def image_components(recipe: Recipe, source: LoadedSource) -> tuple[str, ...]:
    """What the image check runs: the text encoders the source has, the denoiser (the ControlNet and the
    control-unet for a ControlNet recipe) and the VAE decoder, as Apple's pipelines do; the refiner also encodes
    its base image with the VAE encoder."""
    controlled = any(component_spec(component).role == "controlnet" for component in recipe.conversion.components)
    models = [name for name in source.model_classes if getattr(source.pipe, name, None) is not None]
    return tuple(component for component in pipeline_components(models, controlled=controlled, refines=refines(source))
                 if component_spec(component).role != "safety_checker")


def checks_images(recipe: Recipe, source: LoadedSource) -> bool:
    """Whether the run draws end-to-end images: a recipe with image steps that converts every component the
    images need."""
    return recipe.parity.image_steps > 0 and all(
        component in recipe.conversion.components for component in image_components(recipe, source))


def cases_from_images(recipe: Recipe, source: LoadedSource) -> tuple[str, ...]:
    """The components whose parity cases are calls of the reference images' denoising (first prompt).

    Those calls see what a real run feeds the components, and their torch outputs are computed for
    the images anyway: reusing them saves SD 1.5 three torch forwards of its UNet and one of its VAE
    decoder. The decoder's case is the final latents (the refiner's encoder's, its base image); the UNet's are
    steps early, middle and late in the schedule, the timesteps its own cases would take, so it needs that many
    denoising steps.
    """
    if not checks_images(recipe, source):
        return ()
    steps_enough = _denoising_steps(recipe, source) >= UNET_TIMESTEP_SAMPLES
    return tuple(component for component in image_components(recipe, source) if component_spec(component).role == "vae"
                 or (component_spec(component).is_denoiser and steps_enough))


@dataclass(frozen=True)
class ReferenceImages:
    images: list[np.ndarray]
    """The reference pipeline's image for each recipe prompt."""
    cases: dict[str, Reference]
    """The parity cases of each component of :func:`cases_from_images`."""


def reference_images(recipe: Recipe, source: LoadedSource) -> ReferenceImages:
    """The reference pipeline's images, with the torch weights loaded for them alone (the packages
    run after those weights are released). Empty when no images are checked."""
    if not checks_images(recipe, source):
        return ReferenceImages([], {})
    calls: dict[str, list[tuple[Inputs, Outputs]]] = {}
    with source.weights(*(component_spec(component).model for component in image_components(recipe, source))):
        run = reference_runner(recipe, source)
        images = [denoise(recipe, source, prompt, run, calls if index == 0 else None)
                  for index, prompt in enumerate(recipe.card.prompts)]
    cases = {}
    for component in cases_from_images(recipe, source):
        made = calls[component]
        samples = UNET_TIMESTEP_SAMPLES if component_spec(component).is_denoiser else 1
        picks = np.linspace(0, len(made) - 1, samples).round().astype(int)
        cases[component] = Reference(*map(list, zip(*(made[index] for index in picks), strict=True)))
    return ReferenceImages(images, cases)


def image_parity(recipe: Recipe, source: LoadedSource, variant: str, packages: Mapping[str, Path | Sequence[Path]],
                 root: Path, references: list[np.ndarray],
                 programs: dict[Path, executor.LoadedProgram] | None = None) -> list[ImageParity]:
    """Denoise each recipe prompt with ``packages`` and compare with ``references`` (see
    :func:`reference_images`); save both as PNGs under ``root/images/``. Executor programs already
    in ``programs`` are run from there."""
    if not references:
        return []
    run_package = package_runner({component: packages[component] for component in image_components(recipe, source)},
                                 programs=programs)
    results = []
    for index, (prompt, reference) in enumerate(zip(recipe.card.prompts, references, strict=True)):
        candidate = denoise(recipe, source, prompt, run_package)
        reference_path, variant_path = f"images/reference/{index}.png", f"images/{variant}/{index}.png"
        for relative, pixels in ((reference_path, reference), (variant_path, candidate)):
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / relative, optimize=False)
        results.append(ImageParity(
            prompt=prompt, variant=variant, steps=recipe.parity.image_steps, seed=recipe.parity.seed,
            psnr_db=round(psnr(reference.astype(np.float32), candidate.astype(np.float32)), 2),
            reference_image=reference_path, variant_image=variant_path,
        ))
    return results
