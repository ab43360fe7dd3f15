"""Mixed-bit palettization on the tiny UNet: analysis, allocation, JSON, recipe schema and the applied package."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil.frontend.milproto import load as milproto

from publisher import mixed_bit, pipeline
from publisher.cache import StageCache
from publisher.compress import compress_package, mixed_recipe
from publisher.convert import convert_component
from publisher.errors import RecipeError
from publisher.mixed_bit import MixedBitRecipe
from publisher.monitor import Monitor
from publisher.package_weights import program_weights
from publisher.parity import measure_component
from publisher.recipe import Scheme, load_recipe
from publisher.source import load_source

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "recipes" / "examples" / "tiny-sd-palettized.yaml"
TINY_SOURCE = ROOT / "recipes" / "examples" / "tiny-sd"
THRESHOLD = 4096  # the tiny UNet's largest weights only: keeps the suite fast
CANDIDATES = (2, 4, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    recipe = load_recipe(DEMO_RECIPE)
    source = load_source(recipe)
    package = tmp_path_factory.mktemp("mixed") / "unet.mlpackage"
    convert_component(recipe, source, "unet", package)
    full = mixed_bit.calibration(recipe, source, "unet")
    # One of the parity gate's three timesteps keeps the suite fast; the gate itself checks all three below.
    return recipe, source, package, mixed_bit.Calibration(full.inputs[:1], full.outputs[:1])


@pytest.fixture(scope="module")
def analysis(tiny) -> mixed_bit.Analysis:
    _, _, package, calib = tiny
    return mixed_bit.analyze(package, calib, THRESHOLD, CANDIDATES, groups=2)


def lut_bits(package: Path) -> dict[str, int]:
    """Weight const -> nbits of its constexpr_lut_to_dense, read back from the package."""
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = milproto.load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    found = {}
    for op in program.functions["main"].operations:
        if op.op_type == "constexpr_lut_to_dense":
            bits = int(np.log2(op.lut.val.size))
            for reader in op.outputs[0].child_ops:
                found[reader.name] = (bits, int(np.prod(op.outputs[0].shape)))
    return found


def test_curve_is_monotone_from_all_most_to_all_fewest_bits(analysis: mixed_bit.Analysis):
    path = mixed_bit.greedy_path(analysis)
    points = mixed_bit.curve(analysis)
    bits = [b for b, _ in points]
    quality = [q for _, q in points]
    assert bits[0] == 8 and bits[-1] == 2
    assert all(later < earlier for earlier, later in zip(bits, bits[1:], strict=False))
    assert all(later <= earlier + 1e-9 for earlier, later in zip(quality, quality[1:], strict=False))
    assert (path[-1] == len(CANDIDATES) - 1).all()
    assert quality[0] - quality[-1] > 20  # the model sees the damage 2 bits do


def test_group_gains_are_those_of_whole_forwards(tiny, analysis: mixed_bit.Analysis):
    # Each group's forward resumes the unpalettized one where the group's first weight is read: the gains
    # must be those of whole forwards with the group palettized.
    _, _, package, calib = tiny
    weights = mixed_bit._Weights(package, [layer.name for layer in analysis.layers])
    probe = calib.inputs[0]
    unpalettized = weights.run(probe)
    column = analysis.candidates.index(mixed_bit.REFERENCE_NBITS)
    expected = np.zeros(len(analysis.layers))
    starts = []
    for group in sorted({layer.group for layer in analysis.layers}):
        members = [i for i, layer in enumerate(analysis.layers) if layer.group == group]
        names = [analysis.layers[i].name for i in members]
        starts.append(min(weights.first_step[name] for name in names))
        for name in names:
            lut = analysis.luts[name, mixed_bit.REFERENCE_NBITS]
            weights.set(name, mixed_bit._from_lut(weights.original[name], lut))
        expected[members] = mixed_bit._mse(weights.run(probe), unpalettized) / analysis.sse[members, column].sum()
        weights.reset(names)
    assert starts[-1] > starts[0] > 0  # the groups' forwards do resume part-way
    np.testing.assert_allclose(analysis.gains, expected, rtol=1e-6)


def test_applied_package_meets_the_target_and_its_measured_psnr(tiny, analysis, tmp_path: Path):
    recipe, source, package, calib = tiny
    built = mixed_bit.build_recipe(package, calib, "unet", target_bits=5.0, analysis=analysis)
    assert 4.75 <= built.average_bits <= 5.0
    assert set(built.layers.values()) > {8}  # mixed, not uniform
    stored = tmp_path / "mixed.json"
    built.save(stored)
    out = tmp_path / "unet.mlpackage"
    compress_package(package, Scheme.model_validate(
        {"palettize": {"mixed": {"recipe": str(stored)}}, "weight_threshold": THRESHOLD}), out)

    applied = lut_bits(out)
    readers = {w.name: w.consumers for w in program_weights(package)}
    per_layer = {name: applied[readers[name][0]][0] for name in built.layers}
    assert per_layer == built.layers
    sizes = np.array([applied[readers[name][0]][1] for name in built.layers])
    average = float((np.array(list(per_layer.values())) * sizes).sum() / sizes.sum())
    assert average == pytest.approx(built.average_bits, abs=1e-6)
    # Only the recipe's weights are palettized.
    assert len(applied) == len(built.layers)

    # A bits target is not verified (the parity gate is): the analysis's weights are the package's.
    # The parity gate runs the exact package bytes on all its cases, the first being the analysis's
    # calibration case: its worst case can be no better than what the analysis measures on that one.
    assert built.measured_psnr is None
    probe = mixed_bit.measure(package, calib, built.layers, analysis)
    parity = measure_component(recipe, source, "unet", out, on=("executor-fp32",))
    assert probe - 6 < parity.psnr_db["executor-fp32"] <= probe + 0.05


def test_psnr_target_is_verified(tiny, analysis):
    _, _, package, calib = tiny
    # A point a quarter down the predicted curve: predictions run a few dB optimistic, so meeting it
    # takes the verification's correction.
    points = mixed_bit.curve(analysis)
    target = points[len(points) // 4][1]
    built = mixed_bit.build_recipe(package, calib, "unet", target_psnr=target, analysis=analysis)
    assert built.measured_psnr >= target
    assert built.average_bits < 8


def test_target_needs_calibration(tiny):
    _, _, package, _ = tiny
    scheme = Scheme.model_validate({"palettize": {"mixed": {"target_bits": 4}}})
    with pytest.raises(ValueError, match="needs calibration inputs"):
        mixed_recipe(package, scheme, "unet", None)


def test_json_round_trip_and_apple_key(tmp_path: Path):
    original = MixedBitRecipe("unet", {"unet_a_weight_to_fp16": 4, "unet_b_weight_to_fp16": 6}, 4.5123,
                              predicted_psnr=41.2, measured_psnr=40.7, target={"bits": 4.5})
    path = tmp_path / "m.json"
    original.save(path)
    loaded = MixedBitRecipe.load(path)
    assert loaded == MixedBitRecipe("unet", original.layers, 4.5123, 41.2, 40.7, {"bits": 4.5})
    assert loaded.apple_format() == {"recipe_4.51_bit_mixedpalette": original.layers}

    data = json.loads(path.read_text())
    data["layers"]["unet_b_weight_to_fp16"] = 5
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"m.json: layer 'unet_b_weight_to_fp16': nbits 5 is not one of"):
        MixedBitRecipe.load(path)


RECIPE = f"""\
name: ok
source:
  path: {TINY_SOURCE}
target:
  repo: me/ok
compression:
  unet:
    palettize:
"""


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("mixed: {target_bits: 0.5}", 9,
         "compression.unet.palettize.mixed.target_bits: Input should be greater than or equal to 1"),
        ("mixed: {target_bits: 7, candidates: [2, 4]}", 9,
         "compression.unet.palettize.mixed: target_bits 7 is outside the candidates' range 2-4"),
        ("mixed: {target_bits: 4, target_psnr: 40}", 9,
         "compression.unet.palettize.mixed: give exactly one of 'target_bits', 'target_psnr' or 'recipe'"),
        ("mixed: {target_bits: 4, candidates: [3, 4]}", 9,
         "compression.unet.palettize.mixed.candidates.0: 3 is not one of 1,2,4,6,8"),
        ("{nbits: 6, mixed: {target_bits: 4}}", 8,
         "compression.unet.palettize: give exactly one of 'nbits' or 'mixed'"),
        ("{mixed: {target_bits: 4}, granularity: per_grouped_channel}", 8,
         "compression.unet.palettize: 'mixed' is per_tensor kmeans only"),
        ("mixed: {recipe: missing.json}", 9,
         "compression.unet.palettize.mixed.recipe: {dir}/missing.json does not exist"),
    ],
)
def test_bad_mixed_message(tmp_path: Path, body: str, line: int, message: str):
    path = tmp_path / "recipe.yaml"
    text = RECIPE + textwrap.indent(body, "      ") + "\n" if not body.startswith("{") else (
        RECIPE.replace("palettize:\n", f"palettize: {body}\n"))
    path.write_text(text)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert str(raised.value) == f"{path}:{line}: {message.format(dir=tmp_path.resolve())}"


def test_stored_recipe_path_resolves_against_the_recipe(tmp_path: Path):
    MixedBitRecipe("unet", {"w": 4}, 4.0).save(tmp_path / "m.json")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE + "      mixed: {recipe: m.json}\n")
    scheme = load_recipe(path).compression.unet
    assert scheme.palettize.mixed.recipe == (tmp_path / "m.json").resolve()
    assert scheme.describe() == "palettize mixed-bit (recipe m.json)"


def test_analysis_round_trips_through_its_files(analysis: mixed_bit.Analysis, tmp_path: Path):
    analysis.save(tmp_path)
    loaded = mixed_bit.Analysis.load(tmp_path)
    assert (loaded.layers, loaded.candidates, loaded.base_mse, loaded.peak, loaded.seconds) == (
        analysis.layers, analysis.candidates, analysis.base_mse, analysis.peak, analysis.seconds)
    np.testing.assert_array_equal(loaded.sse, analysis.sse)
    np.testing.assert_array_equal(loaded.gains, analysis.gains)
    assert loaded.luts.keys() == analysis.luts.keys()
    for key, lut in analysis.luts.items():
        assert loaded.luts[key].dtype == lut.dtype
        np.testing.assert_array_equal(loaded.luts[key], lut)

    (tmp_path / "analysis.json").write_text('{"format": "coreml-publisher/mixed-bit/1"}')
    with pytest.raises(ValueError, match="not a mixed-bit analysis"):
        mixed_bit.Analysis.load(tmp_path)


def test_a_republish_aiming_elsewhere_reuses_the_analysis(tmp_path: Path, monkeypatch):
    forwards = []  # whole and resumed

    def counting(run):
        def counted(self, *args):
            forwards.append(1)
            return run(self, *args)
        return counted

    for method in ("run", "run_with_snapshots", "resume"):
        monkeypatch.setattr(mixed_bit._Weights, method, counting(getattr(mixed_bit._Weights, method)))
    references = []
    load_reference = pipeline.reference
    monkeypatch.setattr(pipeline, "reference", lambda run, component: references.append(component)
                        or load_reference(run, component))
    cache = StageCache(tmp_path / "cache")

    def build(target_bits: int, cache: StageCache = cache) -> tuple[MixedBitRecipe, list[str]]:
        recipe_file = tmp_path / f"recipe-{target_bits}.yaml"
        recipe_file.write_text(RECIPE.replace("  unet:\n", f"  unet:\n    weight_threshold: {THRESHOLD}\n")
                               + f"      mixed: {{target_bits: {target_bits}, candidates: [2, 4, 8], groups: 2}}\n"
                               + "conversion: {components: [unet], image_size: 64}\n")
        recipe = load_recipe(recipe_file)
        monitor = Monitor(quiet=True)
        run = pipeline.Run(recipe, load_source(recipe), "tiny-sd", cache, monitor, tmp_path)
        built = pipeline.build_components(run)[("original", "unet")]
        return MixedBitRecipe.load(built.package.parent / "mixed_bit.json"), [cost.stage for cost in monitor.costs]

    forwards.clear()
    first, first_stages = build(4)
    assert len(forwards) == 3  # the unpalettized probe and one per group
    assert "analysis original/unet" in first_stages

    forwards.clear()
    second, _ = build(6)
    assert forwards == []
    assert second.average_bits > first.average_bits
    # The same as an analysis of its own allocates.
    assert build(6, StageCache(tmp_path / "fresh"))[0].layers == second.layers

    # A finished compression needs no analysis, stored or not (an older cache, or one pruned).
    shutil.rmtree(tmp_path / "cache" / "analysis")
    forwards.clear()
    references.clear()
    again, again_stages = build(4)
    assert forwards == [] and again == first
    assert references == []  # nor its calibration cases
    assert not any(stage.startswith("analysis") for stage in again_stages)
