"""The model card: golden demo card, Hub metadata, well-formed tables, no leaks, the image grid, device results.

Most tests render from a synthetic report (fast); one re-renders the real demo folder from the session fixture.
Set UPDATE_GOLDEN=1 to rewrite the golden card after an intended change, then review its diff.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt
from PIL import Image

from publisher import cli
from publisher.card import (
    GRID_CAPTION_HEIGHT,
    GRID_HEADER_HEIGHT,
    GRID_LABEL_WIDTH,
    GRID_PAD,
    GRID_PATH,
    GRID_TILE,
    make_image_grid,
    render_card,
    rerender_card,
    write_card,
)
from publisher.device_results import DeviceRun
from publisher.errors import PublisherError, RecipeError
from publisher.layout import DEVICE_RESULTS_NAME
from publisher.report import (
    ComponentReport,
    ImageParity,
    Machine,
    ParityResult,
    PublishReport,
    StageCost,
    VariantReport,
    tool_versions,
)
from tests.conftest import DEMO_RECIPE

GOLDEN = Path(__file__).parent / "golden"
DEMO_REPORT = GOLDEN / "tiny-sd-palettized.report.json"
DEMO_CARD = GOLDEN / "tiny-sd-palettized.README.md"


# ---------------------------------------------------------------------------------------------
# Helpers


def demo_report() -> PublishReport:
    """The demo run's report (sizes and stages from a real run, parity and images as the parity stage writes them).

    The values a rerun changes come from this machine, so the golden comparison depends on normalization.
    """
    report = PublishReport.model_validate(json.loads(DEMO_REPORT.read_text()))
    return report.model_copy(
        update={
            "tool_versions": tool_versions(),
            "machine": Machine.current(),
            "recipe_sha256": hashlib.sha256(DEMO_RECIPE.read_bytes()).hexdigest(),
        }
    )


def solid_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def demo_folder(tmp_path: Path, report: PublishReport) -> Path:
    """A published folder holding what the card reads: the recipe, the report and the parity images."""
    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copy(DEMO_RECIPE, folder / "recipe.yaml")
    report.write(folder)
    for index, entry in enumerate(report.image_parity):
        solid_png(folder / entry.reference_image, (200, 40 + 60 * index, 40))
        solid_png(folder / entry.variant_image, (40, 40 + 60 * index, 200))
    return folder


def normalize(card: str) -> str:
    """Replace what differs between runs and machines: times, memory, the machine, versions and hashes.

    The embedded recipe is replaced too (tests check it separately), so editing the demo recipe does not
    invalidate the golden card.
    """
    card = card.replace(DEMO_RECIPE.read_text().rstrip("\n"), "<recipe.yaml>")
    out, section = [], ""
    for line in card.splitlines():
        if line.startswith("## "):
            section = line
        if section == "## Conversion cost":
            line = re.sub(r"on .+?, \d+ CPUs, [\d.]+ [KMG]?i?B memory", "on <machine>", line)
            if line.startswith("|") and not line.startswith("|---"):
                cells = line.split(" | ")
                line = " | ".join(
                    cells[:1] + [re.sub(r"[\d.]+( [KMG]?i?B)?", "<n>", cell) for cell in cells[1:]]
                )
        # The tool table's versions; the inputs table's hashes are replaced below like every sha256.
        tool_row = line.count(" | ") == 1
        if section == "## Reproducibility" and tool_row and line.startswith("| ") and not line.startswith("| Tool "):
            line = re.sub(r"^\| (.+?) \| .+ \|$", r"| \1 | <version> |", line)
        out.append(line)
    text = "\n".join(out) + "\n"
    text = re.sub(r"\b[0-9a-f]{64}\b", "<sha256>", text)
    return re.sub(r"coreml-publisher \d+\.\d+\S*", "coreml-publisher <version>", text)


def tables(card: str) -> list[list[str]]:
    """Every Markdown table outside code fences, as its list of lines."""
    found: list[list[str]] = []
    fence, previous = None, ""
    for line in card.splitlines():
        marker = re.match(r"^(`{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None and line.startswith("|"):
            if previous.startswith("|"):
                found[-1].append(line)
            else:
                found.append([line])
        previous = line if fence is None else ""
    return found


def cell_count(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip())) - 2


def body(card: str) -> str:
    return card.split("\n---\n", 1)[1]


def hub_report(**changes) -> PublishReport:
    """Two variants of a Hub model, an 'other' license, Core ML runtime parity, and a prompt with a pipe in it."""
    components = [
        ComponentReport(
            component=name,
            package=f"packages/Stable_Diffusion_version_org_model_{name}.mlpackage",
            parameters=parameters,
            fp16_bytes=parameters * 2,
            compressed_bytes=parameters * 6 // 8,
            scheme="palettize 6-bit kmeans" if name == "unet" else "none",
            bits_per_weight=6.0,
            convert_seconds=1.0,
            compress_seconds=1.0,
        )
        for name, parameters in (
            ("text_encoder", 123_000_000),
            ("unet", 860_000_000),
            ("vae_decoder", 49_000_000),
        )
    ]
    report = PublishReport(
        recipe_name="sd-6bit",
        recipe_file="sd-6bit.yaml",
        recipe_sha256="a" * 64,
        source="org/model",
        source_revision="0123456789abcdef0123456789abcdef01234567",
        family="sd1",
        license="other",
        license_name="model-license",
        license_link="https://example.com/LICENSE",
        target_repo="me/sd-coreml",
        precision="float16",
        minimum_deployment_target="iOS17",
        image_size=512,
        tool_versions={"coreml-publisher": "0.1.0", "coremltools": "9.0"},
        card_tags=["six-bit"],
        variants=[
            VariantReport(
                folder="original", attention="original", compute_units="CPU_AND_GPU", components=components
            ),
            VariantReport(
                folder="split_einsum_v2",
                attention="split_einsum_v2",
                compute_units="CPU_AND_NE",
                components=components,
            ),
        ],
        parity=[
            ParityResult(component=c, variant=v, backend=b, psnr_db=40.0 + i, threshold_db=35.0, passed=True)
            for i, (c, v, b) in enumerate(
                (c, v, b)
                for c in ("text_encoder", "unet")
                for v in ("original", "split_einsum_v2")
                for b in ("executor-fp32", "coreml-runtime")
            )
        ],
        image_parity=[
            ImageParity(
                prompt=prompt,
                variant=variant,
                steps=4,
                seed=7,
                psnr_db=30.0,
                reference_image=f"images/{index}-ref.png",
                variant_image=f"images/{index}-{variant}.png",
            )
            for index, prompt in enumerate(("a cat | a dog", "a red <b>barn</b>"))
            for variant in ("original", "split_einsum_v2")
        ],
        stages=[StageCost(stage="convert original/unet", seconds=210.0, peak_rss_bytes=7 * 2**30)],
        machine=Machine(system="Linux 6.1", machine="x86_64", cpus=2, memory_bytes=24 * 2**30),
    )
    return report.model_copy(update=changes)


def device_run(**changes) -> dict:
    run = {
        "device": "iPhone 15 Pro",
        "os": "iOS 17.4",
        "variant": "split_einsum_v2",
        "compute_unit": "CPU_AND_NE",
        "latency_s": 7.94,
        "iterations_per_second": 2.694,
        "steps": 20,
        "runs": 5,
        "date": "2024-05-01",
        "tool_versions": {"ml-stable-diffusion": "1.1.1", "Xcode": "15.3"},
    }
    return run | changes


# ---------------------------------------------------------------------------------------------
# The demo card


def test_demo_card_matches_golden(tmp_path: Path):
    folder = demo_folder(tmp_path, demo_report())
    card = write_card(folder, PublishReport.read(folder)).read_text(encoding="utf-8")
    assert f"```yaml\n{DEMO_RECIPE.read_text()}```\n" in card
    normalized = normalize(card)
    if os.environ.get("UPDATE_GOLDEN"):
        DEMO_CARD.write_text(normalized, encoding="utf-8")
    assert normalized == DEMO_CARD.read_text(encoding="utf-8")
    # Normalization only hides what changes between runs; the measured sizes and PSNRs stay exact.
    assert "| unet | 792,964 | 1.5 MiB | 614.6 KiB | 2.54× | 6.35 | palettize 6-bit kmeans |" in normalized
    assert "| `original` | unet | 37.6 | 37.6 | 35.0 | pass |" in normalized
    assert "| a photo of an astronaut riding a horse on mars | `original` | 4 | 0 | 43.0 |" in normalized


def test_demo_card_sections_in_order(tmp_path: Path):
    folder = demo_folder(tmp_path, demo_report())
    tokens = MarkdownIt("commonmark").parse(body(write_card(folder, PublishReport.read(folder)).read_text()))
    headings = [
        tokens[i + 1].content
        for i, token in enumerate(tokens)
        if token.type == "heading_open" and token.tag in ("h1", "h2")
    ]
    assert headings == [
        "tiny-sd-palettized for Core ML",
        "Variants",
        "Components",
        "Parity with the PyTorch model",
        "Images",
        "Usage",
        "Conversion cost",
        "Reproducibility",
        "License",
        "Limitations",
    ]


def test_published_demo_card_rerenders_identically(demo_output: Path, tmp_path: Path):
    """The real run's folder: its card is what `publisher card` renders from the folder's own files."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_output, folder)
    published = (folder / "README.md").read_text(encoding="utf-8")
    assert rerender_card(folder).read_text(encoding="utf-8") == published
    report = PublishReport.read(folder)
    for component in report.variants[0].components:
        assert f"| {component.component} | {component.parameters:,} |" in published
    assert DEMO_RECIPE.read_text().strip() in published
    for table in tables(published):
        assert len({cell_count(row) for row in table}) == 1, table


# ---------------------------------------------------------------------------------------------
# Metadata


def test_metadata_round_trips_through_the_hub_card_loader(tmp_path: Path):
    card = ModelCard(render_card(hub_report()))
    data = card.data.to_dict()
    assert data["base_model"] == "org/model"
    assert data["base_model_relation"] == "quantized"
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other",
        "model-license",
        "https://example.com/LICENSE",
    )
    assert data["pipeline_tag"] == "text-to-image"
    assert data["tags"] == [
        "coreml",
        "core-ml",
        "stable-diffusion",
        "text-to-image",
        "original",
        "split_einsum_v2",
        "six-bit",
    ]
    # Saved and loaded again, the card is unchanged.
    card.save(tmp_path / "README.md")
    assert ModelCard.load(tmp_path / "README.md").data.to_dict() == data


def test_metadata_passes_the_hub_validate_yaml_endpoint(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    from tests.hub.server import HubServer

    with HubServer(tmp_path / "hub", tokens={}) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        ModelCard(render_card(hub_report())).validate()
        # The endpoint does reject bad metadata (ModelCard itself refuses to build such a card).
        bad = get_session().post(
            f"{server.url}/api/validate-yaml", json={"content": "---\nlicense: [x\n---\n"}
        )
        assert bad.status_code == 400


def test_local_source_has_no_base_model_and_unknown_license_is_left_out():
    report = demo_report().model_copy(update={"license": None})
    data = ModelCard(render_card(report)).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data and "license" not in data
    assert "states no license" in render_card(report)


# ---------------------------------------------------------------------------------------------
# Tables and sections


@pytest.mark.parametrize("name", ["demo", "hub", "bare"])
def test_every_table_is_well_formed(tmp_path: Path, name: str):
    report = {
        "demo": demo_report(),
        "hub": hub_report(),
        "bare": demo_report().model_copy(update={"parity": [], "image_parity": [], "stages": []}),
    }[name]
    runs = [DeviceRun.model_validate(device_run())] if name == "hub" else []
    card = render_card(report, recipe_text="name: x\n", device_results=runs, image_grid=None)
    found = tables(card)
    assert len(found) >= 3
    for table in found:
        assert len({cell_count(row) for row in table}) == 1, table
        assert re.fullmatch(r"\|(-{3,}:?\|)+", table[1]), table
    # A Markdown renderer sees each of them as a table (a broken separator or missing blank line would not).
    html = MarkdownIt("commonmark").enable("table").render(body(card))
    assert html.count("<table>") == len(found)


def test_sections_appear_only_with_their_data():
    bare = render_card(demo_report().model_copy(update={"parity": [], "image_parity": [], "stages": []}))
    for heading in ("## Parity", "## Images", "## Device benchmarks", "## Conversion cost", "```yaml"):
        assert heading not in bare
    assert "parity of the Core ML packages against the PyTorch model was not measured" in bare
    assert "have not been measured yet" in bare

    full = render_card(
        hub_report(),
        recipe_text="name: x\n",
        device_results=[DeviceRun.model_validate(device_run())],
        image_grid=GRID_PATH,
    )
    for heading in (
        "## Parity",
        "## Images",
        "## Device benchmarks",
        "## Conversion cost",
        "```yaml\nname: x\n```",
    ):
        assert heading in full
    assert "have not been measured yet" not in full and "not with the Core ML runtime" not in full


def test_parity_table_has_a_column_per_measured_backend():
    card = render_card(hub_report())
    assert (
        "| Variant | Component | Linux executor, fp32 (dB) | Core ML runtime (dB) | Threshold (dB) | Pass |"
        in card
    )
    assert "| `split_einsum_v2` | unet | 46.0 | 47.0 | 35.0 | pass |" in card
    failing = hub_report(
        parity=[
            ParityResult(
                component="unet",
                variant="original",
                backend="executor-fp16",
                psnr_db=31.25,
                threshold_db=35.0,
                passed=False,
            )
        ]
    )
    assert "| `original` | unet | 31.2 | 35.0 | **FAIL** |" in render_card(failing)


def test_usage_names_the_real_folders_and_packages():
    card = render_card(hub_report())
    assert "-i split_einsum_v2/packages -o output --compute-unit CPU_AND_NE --model-version org/model" in card
    assert "PACKAGES=split_einsum_v2/packages\nOUT=Resources/split_einsum_v2\n" in card
    assert (
        "xcrun coremlcompiler compile $PACKAGES/Stable_Diffusion_version_org_model_unet.mlpackage $OUT\n"
        "mv $OUT/Stable_Diffusion_version_org_model_unet.mlmodelc $OUT/Unet.mlmodelc\n"
    ) in card
    assert (
        "--resource-path path/to/sd-coreml/Resources/split_einsum_v2 --compute-units cpuAndNeuralEngine"
        in card
    )
    assert "ships `.mlpackage` files only" in card


def test_a_recipe_template_can_include_the_stock_partials(tmp_path: Path):
    template = tmp_path / "card.md.j2"
    template.write_text('# {{ report.recipe_name }}, our way\n\n{% include "partials/components.md.j2" %}\n')
    card = render_card(hub_report(), template=template)
    assert "# sd-6bit, our way" in card and "| `original` | unet | 860,000,000 |" in card
    assert "## Usage" not in card


# ---------------------------------------------------------------------------------------------
# Leaks


def test_card_holds_no_local_path_user_name_or_token(tmp_path: Path, monkeypatch):
    sentinel = "sentinel-token-8c1f0b6e"
    monkeypatch.setenv("HF_TOKEN", sentinel)
    recipe = (
        "name: x  # pushed with " + sentinel + "\n"
        "# old token hf_AbCdEfGhIjKlMnOpQrStUvWx\n"
        "source:\n  path: /home/alice-sentinel/models/sd\n"
        "card:\n  template: ~/cards/card.md.j2\n"
        "  tags: [see-https://example.com/a/b]\n"
    )
    folder = demo_folder(tmp_path, demo_report())
    (folder / "recipe.yaml").write_text(recipe)
    card = write_card(folder, PublishReport.read(folder)).read_text()
    for leak in (
        sentinel,
        "hf_AbCdEfGhIjKlMnOpQrStUvWx",
        "alice-sentinel",
        "/home/",
        "~/cards",
        str(tmp_path),
        str(Path.home()) + "/",
        str(Path.cwd()) + "/",
    ):
        assert leak not in card
    assert "path: <local path>" in card and "<redacted token>" in card
    assert "https://example.com/a/b" in card  # URLs are not local paths


# ---------------------------------------------------------------------------------------------
# Image grid


def test_image_grid_has_one_tile_per_prompt_and_column(tmp_path: Path):
    report = hub_report()
    folder = tmp_path / "repo"
    colors = {}
    for index, entry in enumerate(report.image_parity):
        colors[entry.reference_image] = (250, 10 * index, 0)
        colors[entry.variant_image] = (0, 10 * index, 250 - 40 * index)
        solid_png(folder / entry.reference_image, colors[entry.reference_image])
        solid_png(folder / entry.variant_image, colors[entry.variant_image], size=(32, 16))

    assert make_image_grid(folder, report) == "images/image_grid.png"
    with Image.open(folder / "images" / "image_grid.png") as grid:
        grid = grid.convert("RGB")
    # 2 prompts x (reference + 2 variants).
    assert grid.size == (8 + 240 + 3 * (256 + 8), 8 + 36 + 2 * (256 + 26 + 8)) == (1040, 624)
    prompts = ["a cat | a dog", "a red <b>barn</b>"]
    columns = [None, "original", "split_einsum_v2"]
    for row, prompt in enumerate(prompts):
        for column, variant in enumerate(columns):
            entry = next(
                e for e in report.image_parity if e.prompt == prompt and e.variant == (variant or "original")
            )
            expected = colors[entry.reference_image if variant is None else entry.variant_image]
            left = GRID_PAD + GRID_LABEL_WIDTH + column * (GRID_TILE + GRID_PAD)
            top = GRID_PAD + GRID_HEADER_HEIGHT + row * (GRID_TILE + GRID_CAPTION_HEIGHT + GRID_PAD)
            assert grid.getpixel((left + GRID_TILE // 2, top + GRID_TILE // 2)) == expected, (prompt, variant)
            if variant is not None:
                # A 32x16 image fills the tile's width and half its height, centred: the corners stay empty.
                assert grid.getpixel((left + 2, top + 2)) != expected
                assert grid.getpixel((left + 2, top + GRID_TILE // 2)) == expected
    card = write_card(folder, report).read_text()
    assert "![Reference and Core ML images for each prompt](images/image_grid.png)" in card


def test_no_grid_when_no_images_were_compared(tmp_path: Path):
    assert make_image_grid(tmp_path, demo_report().model_copy(update={"image_parity": []})) is None
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("path", ["../outside.png", "/etc/outside.png", "images/missing.png"])
def test_grid_refuses_images_outside_the_folder_or_missing(tmp_path: Path, path: str):
    folder = tmp_path / "repo"
    solid_png(tmp_path / "outside.png", (1, 2, 3))
    entry = ImageParity(
        prompt="p", variant="original", steps=1, seed=0, psnr_db=1.0, reference_image=path, variant_image=path
    )
    with pytest.raises(
        PublisherError, match="outside the published folder|missing from the published folder"
    ):
        make_image_grid(folder, demo_report().model_copy(update={"image_parity": [entry]}))


# ---------------------------------------------------------------------------------------------
# Device results, added after publishing


def test_device_results_added_later_refresh_the_card(tmp_path: Path, capsys):
    folder = tmp_path / "repo"
    folder.mkdir()
    hub_report(image_parity=[]).write(folder)
    assert cli.main(["card", str(folder)]) == 0
    assert "## Device benchmarks" not in (folder / "README.md").read_text()

    runs = [
        device_run(),
        device_run(
            device="Mac mini | M2 Pro",
            os="macOS 14.4",
            variant="original",
            compute_unit="CPU_AND_GPU",
            latency_s=3.0,
            iterations_per_second=8.0,
            runs=1,
        ),
    ]
    (folder / DEVICE_RESULTS_NAME).write_text(json.dumps({"schema_version": 1, "results": runs}))
    assert cli.main(["card", str(folder)]) == 0
    card = (folder / "README.md").read_text()
    assert "| Device | Compute unit | Attention | End-to-end latency (s) | Iterations/s |" in card
    assert "| iPhone 15 Pro, iOS 17.4 | `CPU_AND_NE` | `split_einsum_v2` | 7.9 | 2.69 |" in card
    assert "| Mac mini \\| M2 Pro, macOS 14.4 | `CPU_AND_GPU` | `original` | 3.0 | 8.00 |" in card
    assert "20 steps, median of 5 runs, 2024-05-01; ml-stable-diffusion 1.1.1, Xcode 15.3" in card
    assert "have not been measured yet" not in card


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "device_results.json: not valid JSON"),
        (json.dumps({"results": [device_run(latency_s=0)]}), "device_results.json: results.0.latency_s:"),
        (
            json.dumps({"results": [device_run(compute_unit="NE")]}),
            "device_results.json: results.0.compute_unit:",
        ),
        (json.dumps({"results": [device_run(speed=1)]}), "device_results.json: results.0.speed:"),
        (
            json.dumps({"results": [device_run(variant="split_einsum")]}),
            "results.0.variant: 'split_einsum' is not a variant of this repository",
        ),
    ],
)
def test_invalid_device_results_name_the_field(tmp_path: Path, content: str, message: str):
    folder = tmp_path / "repo"
    folder.mkdir()
    hub_report(image_parity=[]).write(folder)
    (folder / DEVICE_RESULTS_NAME).write_text(content)
    with pytest.raises(RecipeError) as error:
        rerender_card(folder)
    assert message in str(error.value)
