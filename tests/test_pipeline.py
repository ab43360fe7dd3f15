"""The demo recipe end to end: layout, I/O contract, report, and failure leaving nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from huggingface_hub import ModelCard

from publisher import executor, pipeline
from publisher.cache import StageCache
from publisher.compress import CompressedComponent
from publisher.convert import ConvertedComponent
from publisher.errors import ParityError, PublisherError
from publisher.executor import loader
from publisher.monitor import Monitor
from publisher.pipeline import publish
from publisher.recipe import load_recipe
from publisher.report import PublishReport
from publisher.source import load_source
from tests.conftest import DEMO_RECIPE, ROOT, TINY_SOURCE

PREFIX = "original/packages/Stable_Diffusion_version_tiny-sd-palettized"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
FP16, FP32 = (
    ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16,
    ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32,
)

# Apple's ml-stable-diffusion contract, at the tiny model's sizes (latent 32, image 64, width 32).
CONTRACT = {
    "text_encoder": (
        {"input_ids": ((1, 77), FP32)},
        {"last_hidden_state": (1, 77, 32), "pooled_outputs": (1, 32)},
    ),
    "unet": (
        {
            "sample": ((2, 4, 32, 32), FP16),
            "timestep": ((2,), FP16),
            "encoder_hidden_states": ((2, 32, 1, 77), FP16),
        },
        {"noise_pred": (2, 4, 32, 32)},
    ),
    "vae_decoder": ({"z": ((1, 4, 32, 32), FP16)}, {"image": (1, 3, 64, 64)}),
    "vae_encoder": ({"x": ((1, 3, 64, 64), FP16)}, {"latent": (1, 8, 32, 32)}),
}


def test_demo_layout(demo_output: Path):
    files = {path.relative_to(demo_output).as_posix() for path in demo_output.iterdir()}
    assert (demo_output / "images" / "image_grid.png").is_file()
    assert files == {
        "original",
        "images",
        "vocab.json",
        "merges.txt",
        "recipe.yaml",
        "publish_report.json",
        "README.md",
    }
    packages = sorted(p.name for p in (demo_output / "original" / "packages").iterdir())
    assert packages == [f"{PREFIX.split('/')[-1]}_{c}.mlpackage" for c in COMPONENTS]
    assert (demo_output / "recipe.yaml").read_bytes() == DEMO_RECIPE.read_bytes()
    assert (demo_output / "vocab.json").read_bytes() == (
        TINY_SOURCE / "tokenizer" / "vocab.json"
    ).read_bytes()
    leftovers = [p.name for p in demo_output.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("component", COMPONENTS)
def test_package_follows_apples_io_contract(demo_output: Path, component: str):
    spec = ct.utils.load_spec(str(demo_output / f"{PREFIX}_{component}.mlpackage"))
    assert spec.WhichOneof("Type") == "mlProgram"
    inputs, outputs = CONTRACT[component]
    got_inputs = {
        i.name: (tuple(i.type.multiArrayType.shape), i.type.multiArrayType.dataType)
        for i in spec.description.input
    }
    assert got_inputs == inputs
    got_outputs = {o.name: tuple(o.type.multiArrayType.shape) for o in spec.description.output}
    assert got_outputs == outputs


def test_report_describes_four_6bit_components(demo_output: Path):
    report = PublishReport.read(demo_output)
    assert report.source == "local:tiny-sd" and report.family == "sd1" and report.license == "apache-2.0"
    assert report.recipe_sha256 == __import__("hashlib").sha256(DEMO_RECIPE.read_bytes()).hexdigest()
    assert {"coremltools", "torch", "diffusers", "coreml-publisher"} <= set(report.tool_versions)
    (variant,) = report.variants
    assert [c.component for c in variant.components] == list(COMPONENTS)
    for component in variant.components:
        assert component.scheme == "palettize 6-bit kmeans"
        assert component.compressed_bytes < component.fp16_bytes
        assert component.parameters > 0
    # The UNet and VAEs are pure matrices: close to 6 bits. The text encoder keeps its embedding
    # tables (gather) in float16, as Apple does.
    unet = next(c for c in variant.components if c.component == "unet")
    assert 6.0 <= unet.bits_per_weight < 6.6
    stages = [stage.stage for stage in report.stages]
    assert "convert original/unet" in stages and all(stage.peak_rss_bytes > 0 for stage in report.stages)


def test_card_metadata_parses(demo_output: Path):
    card = ModelCard.load(demo_output / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-to-image"
    assert {"coreml", "core-ml", "stable-diffusion", "text-to-image", "tiny", "demo"} <= set(card.data.tags)


def _palettized_weights(package: Path) -> tuple[int, int]:
    """(elements stored as palette indices, bytes of their look-up tables) in a package."""
    from coremltools.converters.mil.frontend.milproto import load as milproto

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = milproto.load(spec, spec.specificationVersion, file_weights_dir=model.weights_dir)
    elements = table_bytes = 0
    for op in program.functions["main"].operations:
        if op.op_type == "constexpr_lut_to_dense":
            elements += int(np.prod(op.outputs[0].shape))
            table_bytes += op.lut.val.nbytes
    return elements, table_bytes


def test_weight_file_matches_the_6bit_budget(demo_output: Path):
    report = PublishReport.read(demo_output)
    for component in report.variants[0].components:
        elements, tables = _palettized_weights(demo_output / "original" / component.package)
        assert elements > 0
        unpalettized_fp16 = component.fp16_bytes - elements * 2
        budget = elements * 6 / 8 + tables + unpalettized_fp16
        # Each blob in weight.bin carries a 64-byte header and 64-byte alignment.
        assert component.compressed_bytes == pytest.approx(budget, rel=0.05), component.component


def test_failed_run_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A run that fails once the work started (a broken source is refused before: tests/test_bad_sources.py)
    leaves neither --out nor its work folder."""
    def failing_parity(run, build):
        assert any(path.name.startswith(".broken.work-") for path in (tmp_path / "out").iterdir())
        raise ParityError("parity failed: simulated")

    monkeypatch.setattr(pipeline, "check_parity", failing_parity)
    out = tmp_path / "out" / "broken"
    with pytest.raises(ParityError):
        publish(DEMO_RECIPE, out, quiet=True)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PublisherError, match="is not a coreml-publisher output"):
        publish(DEMO_RECIPE, out, quiet=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_publish_bad_recipe_exit_code_and_no_traceback(tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(DEMO_RECIPE.read_text().replace("nbits: 6", "nbits: 7", 1))
    result = subprocess.run(
        [sys.executable, "-m", "publisher", "publish", str(recipe), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "compression.text_encoder.palettize.nbits: 7 is not one of 1,2,3,4,6,8" in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_plan_lists_packages_and_sizes():
    result = subprocess.run(
        [sys.executable, "-m", "publisher", "plan", str(DEMO_RECIPE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for component in COMPONENTS:
        assert f"{PREFIX}_{component}.mlpackage" in result.stdout
    assert "palettize 6-bit kmeans" in result.stdout and "MiB" in result.stdout
    unet_line = next(line for line in result.stdout.splitlines() if "_unet.mlpackage" in line)
    assert " 792964 " in unet_line
    json.dumps(result.stdout)


def test_a_second_variant_computes_only_its_unet_and_reuses_the_references(demo_output: Path, tmp_path: Path,
                                                                           monkeypatch, capsys):
    """The session cache holds the demo's stages: adding a Neural Engine variant converts, compresses
    and checks its UNet and draws its images, and takes everything else, torch references included,
    from the cache. Its UNet's program is loaded once, for its parity and its images."""
    recipe = tmp_path / "two-variants.yaml"
    recipe.write_text(DEMO_RECIPE.read_text().replace("path: tiny-sd", f"path: {TINY_SOURCE}").replace(
        "variants:\n", "variants:\n  - attention: split_einsum\n"))
    loads: list[Path] = []

    def load_program(package: Path):
        loads.append(package)
        return loader.load_program(package)

    monkeypatch.setattr(executor, "load_program", load_program)
    publish(recipe, tmp_path / "out")
    lines = capsys.readouterr().err.splitlines()
    computed = sorted(line.rsplit(" (", 1)[0][2:] for line in lines if line.startswith("✓"))
    assert computed == ["assemble", "compress split_einsum/unet (palettize 6-bit kmeans)", "convert split_einsum/unet",
                        "images split_einsum", "load source", "parity split_einsum/unet", "render card"], lines
    # The UNet's and the VAE decoder's cases come with the reference images (their denoising ran both).
    assert {line for line in lines if line.startswith("↷ reference")} == {
        f"↷ reference {name} (cached)" for name in ("text_encoder", "vae_encoder", "images")}
    report = PublishReport.read(tmp_path / "out")
    assert [variant.folder for variant in report.variants] == ["split_einsum", "original"]
    assert {image.variant for image in report.image_parity} == {"split_einsum", "original"}
    # The split_einsum UNet's parity and images, and the images' text encoder and VAE decoder.
    assert len(loads) == len(set(loads)) == 3, loads


class StageClock:
    """Stands in for the conversion and compression workers: records when each ran, and on which thread."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float, str]] = {}

    def _span(self, name: str, seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)
        self.spans[name] = (start, time.perf_counter(), threading.current_thread().name)

    def convert(self, recipe_file, component, attention, package: Path, assembly=None) -> ConvertedComponent:
        self._span(f"convert {component}", 0.6 if component == "unet" else 0.2)
        package.mkdir(parents=True)
        (package / "weights.bin").write_text(component)
        return ConvertedComponent(component, package, 1, 0.0)

    def compress(self, converted: Path, scheme, out: Path, *, component, calibration, analysis) -> CompressedComponent:
        self._span(f"compress {component}", 1.0 if component == "unet" else 0.05)
        shutil.copytree(converted, out)
        return CompressedComponent(out, 0.0)

    def overlap(self, first: str, second: str) -> bool:
        (a, b, _), (c, d, _) = self.spans[first], self.spans[second]
        return a < d and c < b


@pytest.mark.parametrize("mixed_bit", [False, True], ids=["uniform-unet", "mixed-bit-unet"])
def test_other_components_convert_beside_the_unets_compression_only(tmp_path, monkeypatch, mixed_bit):
    clock = StageClock()
    monkeypatch.setattr(pipeline, "convert_in_subprocess", clock.convert)
    monkeypatch.setattr(pipeline, "compress_package", clock.compress)
    monkeypatch.setattr(pipeline, "reference", lambda run, component: None)
    monkeypatch.setattr(pipeline, "analyse", lambda *args: None)
    recipe_file = tmp_path / "recipe.yaml"
    text = DEMO_RECIPE.read_text().replace("path: tiny-sd", f"path: {TINY_SOURCE}")
    if mixed_bit:
        text = text.replace("unet: {palettize: {nbits: 6, mode: kmeans}", "unet: {palettize: {mixed: {target_bits: 4}}")
    recipe_file.write_text(text)
    recipe = load_recipe(recipe_file)
    monitor = Monitor(quiet=True)
    source = load_source(recipe, models=())
    run = pipeline.Run(recipe, source, "test", StageCache(tmp_path / "cache"), monitor, tmp_path)

    built = pipeline.build_components(run)

    assert set(built) == {("original", component) for component in COMPONENTS}
    others = [f"convert {component}" for component in COMPONENTS if component != "unet"]
    # The UNet's conversion, the run's memory peak, has nothing beside it.
    assert not any(clock.overlap("convert unet", name) for name in clock.spans if name != "convert unet")
    beside = [clock.spans[name][2] != threading.current_thread().name for name in others]
    assert beside == [not mixed_bit] * len(others)
    assert clock.overlap("compress unet", "convert text_encoder") is not mixed_bit
    # The report lists this thread's stages, then the background's, whichever finished first.
    stages = [cost.stage.split(" (")[0] for cost in monitor.costs]
    rest = [component for component in COMPONENTS if component != "unet"]
    converted = [f"convert original/{component}" for component in rest]
    compressed = [f"compress original/{component}" for component in rest]
    in_turn = [stage for pair in zip(converted, compressed, strict=True) for stage in pair]
    assert stages == ["convert original/unet", "compress original/unet",
                      *(in_turn if mixed_bit else converted + compressed)]
