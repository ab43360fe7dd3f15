"""Mixed-bit palettization: give each weight the fewest bits the component's output can afford.

Apple's pre-analysis palettizes one layer at a time and runs the model for every layer and bit
width (hours on a GPU for SD 1.5). This one needs a handful of forwards instead:

1. **Weight error.** Every eligible weight is palettized at every candidate bit width with the fast
   histogram k-means (:func:`publisher.palettize.palette_errors`, the same LUTs the apply step writes):
   ``sse[l, b] = ||W_l - LUT[idx]||^2``, summed over the weight's distinct values.
2. **Gain.** Output error is modelled as additive: ``mse_out = mse_fp + sum_l gain_l * sse[l, b_l]``.
   Layers are cut into ``groups`` contiguous runs of the program (about equal parameter counts, so
   runs follow the network's blocks); the gain of a group is measured by one executor forward with
   only that group palettized at ``REFERENCE_NBITS``: ``gain_g = mse_g / sum_{l in g} sse[l, ref]``.
   Cost: one forward on the first calibration input (the probe), then ``groups`` partial ones: a
   group's forward resumes that one from the first step reading one of the group's weights (what
   comes before is the same). At SDXL's 1024 px a whole forward takes a minute on two cores.
3. **Allocation.** Greedy descent from every layer at the most bits: each step takes the move (one
   layer to any fewer bits) with the smallest predicted error per bit saved. The path of states is
   the predicted curve; a target average bit width or PSNR picks a state on it.
4. **Verification.** For a PSNR target the chosen state is run end to end on every calibration
   input against the fp32 torch reference; a shortfall raises the target by the gap and re-picks, a
   few times at most. A bits target needs no verification to pick its state and gets none: the parity
   gate runs every input on the applied package anyway (at SDXL's size a forward costs minutes).

The stored recipe is JSON (:class:`MixedBitRecipe`): ``layers`` maps each MIL weight constant
(``unet_down_blocks_0_resnets_0_conv1_weight_to_fp16``: the torch parameter name with ``.`` -> ``_``,
prefixed by the component and suffixed by the cast) to its nbits. Apple's pre-analysis writes a
file of several recipes keyed ``recipe_<average bits, 2 decimals>_bit_mixedpalette``, each such a
layer -> nbits dict; :meth:`MixedBitRecipe.apple_format` gives ours under that key. Average bits
weigh each layer by its element count and leave the LUTs out (the convention of Apple's keys).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from publisher import executor
from publisher.package_weights import program_weights
from publisher.palettize import palette_errors, palettize
from publisher.parity import Reference, psnr, reference_cases
from publisher.recipe import MIXED_NBITS, PALETTIZE_NBITS, Recipe
from publisher.source import LoadedSource

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]

DEFAULT_CANDIDATES = MIXED_NBITS
# Gains are linearized at this width: the middle of the useful range, where errors are neither
# rounding noise (8) nor so large that the output model saturates (1-2).
REFERENCE_NBITS = 4
DEFAULT_GROUPS = 8
VERIFY_TRIES = 3
FORMAT = "coreml-publisher/mixed-bit/1"
ANALYSIS_FORMAT = "coreml-publisher/mixed-bit-analysis/1"


# Mixed-bit analysis calibrates on the parity gate's own inputs and reference outputs.
Calibration = Reference


@dataclass(frozen=True)
class Layer:
    name: str
    """The MIL const holding the weight."""
    size: int
    group: int


@dataclass
class Analysis:
    """Everything the allocator needs; cheap to re-allocate from for any target."""

    layers: list[Layer]
    candidates: tuple[int, ...]
    """Bit widths, descending."""
    sse: np.ndarray
    """[layer, candidate] weight-space SSE, made non-decreasing as bits fall."""
    gains: np.ndarray
    """Per layer: output MSE per unit of weight SSE."""
    base_mse: float
    """Output MSE of the uncompressed package against the reference."""
    peak: float
    """max|reference| of the worst calibration output (PSNR's numerator)."""
    luts: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)
    """(layer, nbits) -> the LUT k-means found: re-assigning indices from it is far cheaper than
    clustering again, and gives the same indices."""
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([layer.size for layer in self.layers], dtype=np.float64)

    def predicted_psnr(self, choice: np.ndarray) -> float:
        mse = self.base_mse + float((self.gains * self.sse[np.arange(len(self.layers)), choice]).sum())
        return _psnr_of_mse(self.peak, mse)

    def average_bits(self, choice: np.ndarray) -> float:
        bits = np.asarray(self.candidates, dtype=np.float64)[choice]
        return float((bits * self.sizes).sum() / self.sizes.sum())

    def nbits(self, choice: np.ndarray) -> dict[str, int]:
        return {layer.name: self.candidates[index] for layer, index in zip(self.layers, choice, strict=True)}

    def save(self, folder: Path) -> None:
        """Write the analysis into ``folder`` (``analysis.json`` and ``analysis.npz``): any target can be
        allocated from it again without a forward."""
        widths = sorted({nbits for _, nbits in self.luts})
        arrays = {"sse": self.sse, "gains": self.gains}
        arrays |= {f"lut_{nbits}_{i}": self.luts[layer.name, nbits]
                   for i, layer in enumerate(self.layers) for nbits in widths if (layer.name, nbits) in self.luts}
        np.savez(folder / "analysis.npz", **arrays)
        (folder / "analysis.json").write_text(json.dumps({
            "format": ANALYSIS_FORMAT, "layers": [[layer.name, layer.size, layer.group] for layer in self.layers],
            "candidates": list(self.candidates), "lut_widths": widths, "base_mse": self.base_mse, "peak": self.peak,
            "seconds": self.seconds,
        }) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Analysis:
        """The analysis :meth:`save` wrote into ``folder``."""
        meta = json.loads((folder / "analysis.json").read_text())
        if meta.get("format") != ANALYSIS_FORMAT:
            raise ValueError(f"{folder}: not a mixed-bit analysis (expected format {ANALYSIS_FORMAT!r})")
        layers = [Layer(name, int(size), int(group)) for name, size, group in meta["layers"]]
        with np.load(folder / "analysis.npz") as arrays:
            luts = {(layer.name, nbits): arrays[key] for i, layer in enumerate(layers) for nbits in meta["lut_widths"]
                    if (key := f"lut_{nbits}_{i}") in arrays.files}
            return cls(layers, tuple(meta["candidates"]), arrays["sse"], arrays["gains"], float(meta["base_mse"]),
                       float(meta["peak"]), luts, dict(meta["seconds"]))


@dataclass(frozen=True)
class MixedBitRecipe:
    """A layer -> nbits assignment, with what it was built for and what it measured."""

    component: str
    layers: dict[str, int]
    average_bits: float
    predicted_psnr: float | None = None
    measured_psnr: float | None = None
    """Worst over the calibration inputs, for a PSNR target (a bits target is measured by the parity gate)."""
    target: dict[str, float] = field(default_factory=dict)

    @property
    def apple_key(self) -> str:
        return f"recipe_{self.average_bits:.2f}_bit_mixedpalette"

    def apple_format(self) -> dict[str, dict[str, int]]:
        return {self.apple_key: dict(self.layers)}

    def save(self, path: Path) -> None:
        data = {"format": FORMAT, "component": self.component, "average_bits": round(self.average_bits, 4),
                "predicted_psnr": self.predicted_psnr, "measured_psnr": self.measured_psnr,
                "target": self.target, "apple_key": self.apple_key, "layers": self.layers}
        path.write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> MixedBitRecipe:
        """Read a recipe; raises ValueError with one line naming the file and the problem."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable mixed-bit recipe ({exc.__class__.__name__})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a mixed-bit recipe (expected format {FORMAT!r})")
        layers = data.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise ValueError(f"{path}: 'layers' must map weight names to nbits")
        bad = [name for name, bits in layers.items() if bits not in PALETTIZE_NBITS or isinstance(bits, bool)]
        if bad:
            widths = ",".join(map(str, PALETTIZE_NBITS))
            raise ValueError(f"{path}: layer {bad[0]!r}: nbits {layers[bad[0]]!r} is not one of {widths}")
        average = data.get("average_bits")
        if not isinstance(average, int | float) or isinstance(average, bool):
            raise ValueError(f"{path}: 'average_bits' must be a number")
        return cls(component=str(data.get("component", "")), layers={k: int(v) for k, v in layers.items()},
                   average_bits=float(average), predicted_psnr=data.get("predicted_psnr"),
                   measured_psnr=data.get("measured_psnr"), target=dict(data.get("target") or {}))


def calibration(recipe: Recipe, source: LoadedSource, component: str) -> Calibration:
    """The parity gate's inputs for ``component`` and the fp32 torch outputs on them."""
    return reference_cases(recipe, source, component)


def _psnr_of_mse(peak: float, mse: float) -> float:
    return float(20 * np.log10((peak + 1e-5) / (np.sqrt(max(mse, 0.0)) + 1e-10)))


def _mse(a: Outputs, b: Outputs) -> float:
    return float(np.mean([np.mean((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2) for k in b]))


class _Weights:
    """The executor program with its eligible weights swappable for palettized versions.

    A swapped weight is a new tensor put where the steps read the original, and a reset puts the
    original back: the weights are held once (an SDXL UNet's three copies would not fit in 16 GB).
    """

    def __init__(self, package: Path, names: Iterable[str]):
        self.program = executor.load_program(package)
        self.tensors = {name: self.program.constants[name] for name in names}
        self.original = {name: tensor.numpy() for name, tensor in self.tensors.items()}  # read-only views
        owner = {id(tensor): name for name, tensor in self.tensors.items()}
        self.uses: dict[str, list[tuple[dict[str, Any], str, int | None]]] = {name: [] for name in self.tensors}
        self.first_step: dict[str, int] = {}
        """The index of the first step reading each weight: a run up to it is the same whatever the weight holds."""
        for position, step in enumerate(self.program.steps):
            for key, value in step.inputs.items():
                items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
                for index, item in items:
                    if id(item) in owner:
                        self.uses[owner[id(item)]].append((step.inputs, key, index))
                        self.first_step.setdefault(owner[id(item)], position)

    def _place(self, name: str, tensor: torch.Tensor) -> None:
        for inputs, key, index in self.uses[name]:
            if index is None:
                inputs[key] = tensor
            else:
                inputs[key] = (*inputs[key][:index], tensor, *inputs[key][index + 1:])

    def set(self, name: str, value: np.ndarray) -> None:
        original = self.tensors[name]
        self._place(name, torch.from_numpy(np.asarray(value).reshape(original.shape)).to(original.dtype))

    def reset(self, names: Iterable[str]) -> None:
        for name in names:
            self._place(name, self.tensors[name])

    def run(self, inputs: Inputs) -> Outputs:
        return executor.run(self.program, inputs, mode="fp32")

    def run_with_snapshots(self, inputs: Inputs, at: Iterable[int]) -> tuple[Outputs, dict[int, executor.Snapshot]]:
        return executor.run_with_snapshots(self.program, inputs, at, mode="fp32")

    def resume(self, snapshot: executor.Snapshot) -> Outputs:
        return executor.resume(snapshot)


def _from_lut(weight: np.ndarray, lut: np.ndarray) -> np.ndarray:
    # Nearest entry of the LUT as stored, ties to the lower one: palettize()'s own assignment.
    stored = lut.astype(np.float64)
    return lut[np.searchsorted((stored[:-1] + stored[1:]) / 2, weight.astype(np.float64), side="left")]


def eligible_weights(package: Path, weight_threshold: int, exclude: Iterable[str] = ()) -> list[tuple[str, int]]:
    """(name, size) of the weights palettization would touch, in program order."""
    skip = set(exclude)
    return [(w.name, w.size) for w in program_weights(package)
            if w.compressible(weight_threshold) and w.name not in skip]


def analyze(package: Path, calib: Calibration, weight_threshold: int = 2048,
            candidates: Iterable[int] = DEFAULT_CANDIDATES, groups: int = DEFAULT_GROUPS,
            exclude: Iterable[str] = ()) -> Analysis:
    """Measure weight errors and group gains of ``package`` (see the module docstring)."""
    started = time.perf_counter()
    widths = tuple(sorted(set(candidates), reverse=True))
    if REFERENCE_NBITS not in widths:
        widths = tuple(sorted({*widths, REFERENCE_NBITS}, reverse=True))
    found = eligible_weights(package, weight_threshold, exclude)
    if not found:
        raise ValueError(f"{package}: no weight above {weight_threshold} elements to palettize")
    sizes = np.array([size for _, size in found], dtype=np.float64)
    cut = np.minimum((np.cumsum(sizes) - sizes / 2) / sizes.sum() * groups, groups - 1).astype(int)
    layers = [Layer(name, size, int(group)) for (name, size), group in zip(found, cut, strict=True)]
    weights = _Weights(package, [layer.name for layer in layers])
    loaded = time.perf_counter()

    sse = np.zeros((len(layers), len(widths)))
    luts: dict[tuple[str, int], np.ndarray] = {}
    for i, layer in enumerate(layers):
        for j, (nbits, (lut, error)) in enumerate(zip(widths, palette_errors(weights.original[layer.name], widths),
                                                      strict=True)):
            luts[layer.name, nbits] = lut
            sse[i, j] = error
    # Fewer bits are never assumed better: keeps every greedy move's predicted cost >= 0.
    sse = np.maximum.accumulate(sse, axis=1)
    clustered = time.perf_counter()

    probe, expected = calib.inputs[0], calib.outputs[0]
    members_of = {group: [i for i, layer in enumerate(layers) if layer.group == group]
                  for group in sorted({layer.group for layer in layers})}
    # A group's forward repeats the unpalettized one up to the first step reading one of its weights: it
    # resumes there instead. The same outputs; a fifth less time at SD 1.5 size, not more, as a UNet's
    # parameters (which cut the groups) sit in its middle and its compute at both ends.
    starts = {group: min(weights.first_step[layers[i].name] for i in members) for group, members in members_of.items()}
    fp, snapshots = weights.run_with_snapshots(probe, starts.values())
    base_mse = _mse(fp, expected)
    peak = max(float(np.abs(v).max()) for v in expected.values())
    gains = np.zeros(len(layers))
    ref_column = widths.index(REFERENCE_NBITS)
    for group, members in members_of.items():
        for i in members:
            name = layers[i].name
            weights.set(name, _from_lut(weights.original[name], luts[name, REFERENCE_NBITS]))
        group_mse = _mse(weights.resume(snapshots[starts[group]]), fp)
        weights.reset(layers[i].name for i in members)
        total = sse[members, ref_column].sum()
        gains[members] = group_mse / total if total > 0 else 0.0
    keep = [j for j, nbits in enumerate(widths) if nbits in set(candidates)]
    done = time.perf_counter()
    return Analysis(layers, tuple(widths[j] for j in keep), sse[:, keep], gains, base_mse, peak, luts,
                    {"load": loaded - started, "kmeans": clustered - loaded, "gains": done - clustered,
                     "total": done - started})


def greedy_path(analysis: Analysis) -> list[np.ndarray]:
    """States from every layer at the most bits down to every layer at the fewest.

    Each step takes the cheapest move (predicted output error per bit saved) of one layer to any
    fewer bits, so average bits fall and predicted error rises along the path.
    """
    count, widths = analysis.sse.shape
    bits = np.asarray(analysis.candidates, dtype=np.float64)
    sizes = analysis.sizes
    cost = analysis.gains[:, None] * analysis.sse
    choice = np.zeros(count, dtype=np.intp)
    path = [choice.copy()]
    rows = np.arange(count)
    while (choice < widths - 1).any():
        extra = cost - cost[rows, choice][:, None]
        saved = (bits[choice][:, None] - bits[None, :]) * sizes[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(saved > 0, extra / saved, np.inf)
        layer, column = np.unravel_index(np.argmin(ratio), ratio.shape)
        choice[layer] = column
        path.append(choice.copy())
    return path


def curve(analysis: Analysis) -> list[tuple[float, float]]:
    """(average bits, predicted PSNR) along the greedy path."""
    return [(analysis.average_bits(state), analysis.predicted_psnr(state)) for state in greedy_path(analysis)]


def _pick(analysis: Analysis, path: list[np.ndarray], target_bits: float | None,
          target_psnr: float | None) -> np.ndarray:
    if target_bits is not None:
        return next((s for s in path if analysis.average_bits(s) <= target_bits + 1e-9), path[-1])
    best = path[0]
    for state in path:
        if analysis.predicted_psnr(state) < target_psnr:
            break
        best = state
    return best


def measure(package: Path, calib: Calibration, layers: Mapping[str, int], analysis: Analysis | None = None) -> float:
    """Worst PSNR over calibration cases and outputs with ``layers`` palettized, others as stored."""
    weights = _Weights(package, layers)
    return _measure(weights, calib, layers, analysis.luts if analysis else {})


def _measure(weights: _Weights, calib: Calibration, layers: Mapping[str, int],
             luts: Mapping[tuple[str, int], np.ndarray]) -> float:
    for name, nbits in layers.items():
        original = weights.original[name]
        lut = luts.get((name, nbits))
        weights.set(name, _from_lut(original, palettize(original, nbits)[0] if lut is None else lut))
    worst = min(psnr(ref[k], out[k]) for case, ref in zip(calib.inputs, calib.outputs, strict=True)
                for out in (weights.run(case),) for k in ref)
    weights.reset(layers)
    return worst


def build_recipe(package: Path, calib: Calibration, component: str, *, target_bits: float | None = None,
                 target_psnr: float | None = None, analysis: Analysis | None = None, weight_threshold: int = 2048,
                 candidates: Iterable[int] = DEFAULT_CANDIDATES, groups: int = DEFAULT_GROUPS,
                 exclude: Iterable[str] = ()) -> MixedBitRecipe:
    """Analyse ``package`` (unless ``analysis`` is given) and pick the state meeting one target, verified."""
    if (target_bits is None) == (target_psnr is None):
        raise ValueError("give exactly one of target_bits or target_psnr")
    analysis = analysis or analyze(package, calib, weight_threshold, candidates, groups, exclude)
    path = greedy_path(analysis)
    state = _pick(analysis, path, target_bits, target_psnr)
    measured = None
    if target_psnr is not None:
        weights = _Weights(package, [layer.name for layer in analysis.layers])
        measured = _measure(weights, calib, analysis.nbits(state), analysis.luts)
        aim = target_psnr
        for _ in range(VERIFY_TRIES - 1):
            if measured >= target_psnr or state is path[0]:
                break
            # Predictions run optimistic by about the gap just measured: aim that much higher.
            aim += target_psnr - measured + 0.1
            state = _pick(analysis, path, None, aim)
            measured = _measure(weights, calib, analysis.nbits(state), analysis.luts)
    target = {"bits": target_bits} if target_bits is not None else {"psnr": target_psnr}
    return MixedBitRecipe(component, analysis.nbits(state), analysis.average_bits(state),
                          round(analysis.predicted_psnr(state), 2), None if measured is None else round(measured, 2),
                          target)
