"""Recipe validation: every shipped recipe is valid, and bad input gets one precise line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from publisher.cli import main
from publisher.errors import RecipeError
from publisher.recipe import Recipe, Target, load_recipe
from publisher.source import inspect_source

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "examples" / "tiny-sd-palettized.yaml"
TINY_SOURCE = ROOT / "recipes" / "examples" / "tiny-sd"
SHIPPED = sorted(ROOT.glob("recipes/**/*.yaml"))

VALID = f"""\
name: ok
source:
  path: {TINY_SOURCE}
target:
  repo: me/ok
conversion:
  components: [text_encoder, unet, vae_decoder]
compression:
  unet:
    palettize:
      nbits: 6
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_recipes_exist():
    assert DEMO in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_validates(path: Path):
    recipe = load_recipe(path)
    inspect_source(recipe)
    assert recipe.sha256 == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_minimal_valid_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, VALID))
    assert recipe.conversion.precision == "float16"
    assert recipe.conversion.minimum_deployment_target is Target.iOS16
    assert recipe.conversion.unet_batch == 2
    assert recipe.variants[0].folder_name == "original"
    assert recipe.compression.unet.palettize.nbits == 6
    assert recipe.compression.vae_decoder.is_none
    assert recipe.parity.threshold("unet") == 35.0
    assert recipe.source.path == TINY_SOURCE
    assert inspect_source(recipe).family == "sd1"
    assert inspect_source(recipe).license == "apache-2.0"


def test_relative_source_path_resolves_against_the_recipe_folder():
    assert load_recipe(DEMO).source.path == TINY_SOURCE


def test_none_word_means_no_compression(tmp_path):
    recipe = load_recipe(write(tmp_path, VALID + "  vae_decoder: none\n"))
    assert recipe.compression.vae_decoder.is_none
    assert recipe.compression.vae_decoder.describe() == "none"


def test_joint_and_grouped_schemes_valid_on_ios18(tmp_path):
    text = VALID.replace(
        "components: [text_encoder, unet, vae_decoder]",
        "components: [text_encoder, unet, vae_decoder]\n  minimum_deployment_target: iOS18",
    )
    text += "      granularity: per_grouped_channel\n      group_size: 16\n    prune: {n_m: [2, 4]}\n"
    scheme = load_recipe(write(tmp_path, text)).compression.unet
    assert scheme.min_opset == 18
    assert scheme.describe() == "prune 2:4 + palettize 6-bit kmeans, grouped channels of 16"


SHA = "0" * 40

# (name, yaml text, expected line, expected message fragment)
BAD = [
    (
        "sdxl-batch-1",
        VALID.replace("target:", "  family: sdxl\ntarget:").replace("conversion:\n", "conversion:\n  unet_batch: 1\n"),
        8,
        "conversion.unet_batch: 1 cannot be loaded by Apple's SDXL pipelines (Swift and Python), which always feed"
        " the UNet batch 2",
    ),
    (
        "pickle-checkpoint-path",
        VALID.replace(f"path: {TINY_SOURCE}", "path: model.ckpt"),
        3,
        "source.path: model.ckpt is a pickle checkpoint (.ckpt): loading one runs any code it holds",
    ),
    (
        "pickle-checkpoint-hub",
        VALID.replace(f"path: {TINY_SOURCE}", "repo: me/model\n  revision: " + "a" * 40 + "\n  filename: v1.pt"),
        5,
        "source.filename: v1.pt is a pickle checkpoint (.pt)",
    ),
    (
        "pickle-lora",
        VALID.replace("target:", "  loras:\n    - path: style.bin\ntarget:"),
        5,
        "source.loras.0.path: style.bin is a pickle checkpoint (.bin)",
    ),
    (
        "lora-not-a-file",
        VALID.replace("target:", f"  loras:\n    - path: {TINY_SOURCE}\ntarget:"),
        5,
        "source.loras.0: give a .safetensors file",
    ),
    (
        "hub-filename-escapes",
        VALID.replace(f"path: {TINY_SOURCE}", "repo: me/model\n  revision: " + "a" * 40
                      + "\n  filename: ../../x.safetensors"),
        5,
        "source.filename: '../../x.safetensors' must be a file's path inside the repository",
    ),
    (
        "filename-with-path",
        VALID.replace(f"path: {TINY_SOURCE}", f"path: {TINY_SOURCE}\n  filename: model.safetensors"),
        2,
        "'filename' only applies to 'repo'",
    ),
    (
        "config-without-single-file",
        VALID.replace("target:", f"  config: {TINY_SOURCE}\ntarget:"),
        4,
        "source.config: only applies to a single-file checkpoint source",
    ),
    (
        "missing-checkpoint-file",
        VALID.replace(f"path: {TINY_SOURCE}", "path: nowhere/model.safetensors"),
        3,
        "model.safetensors does not exist",
    ),
    (
        "nbits-5",
        VALID.replace("nbits: 6", "nbits: 5"),
        11,
        "compression.unet.palettize.nbits: 5 is not one of 1,2,3,4,6,8",
    ),
    (
        "nbits-string",
        VALID.replace("nbits: 6", "nbits: six"),
        11,
        "compression.unet.palettize.nbits: 'six' is not one of",
    ),
    ("unknown-top-key", VALID + "colour: blue\n", 12, "colour: unknown key"),
    (
        "unknown-nested-key",
        VALID.replace("nbits: 6", "nbits: 6\n      bits: 4"),
        12,
        "compression.unet.palettize.bits: unknown key",
    ),
    (
        "unknown-component-compression",
        VALID + "  feature_extractor: none\n",
        12,
        "compression.feature_extractor: unknown key",
    ),
    (
        "unknown-component-conversion",
        VALID.replace("vae_decoder]", "vae_decodr]"),
        7,
        "conversion.components.2: 'vae_decodr' is not one of",
    ),
    ("missing-name", VALID.replace("name: ok\n", ""), 1, "name: is required"),
    ("missing-target", VALID.replace("target:\n  repo: me/ok\n", ""), 1, "target: is required"),
    (
        "missing-target-repo",
        VALID.replace("  repo: me/ok\n", "  private: true\n"),
        4,
        "target.repo: is required",
    ),
    ("bad-target-repo", VALID.replace("me/ok", "just-a-name"), 5, "is not a Hub repo id"),
    (
        "bad-source-repo",
        VALID.replace(f"path: {TINY_SOURCE}", f"repo: 'a/b/c'\n  revision: '{SHA}'"),
        3,
        "source.repo: 'a/b/c' is not a Hub repo id",
    ),
    (
        "unpinned-revision",
        VALID.replace(f"path: {TINY_SOURCE}", "repo: org/model\n  revision: main"),
        4,
        "source.revision: 'main' is not a 40-character commit sha",
    ),
    (
        "repo-without-revision",
        VALID.replace(f"path: {TINY_SOURCE}", "repo: org/model"),
        2,
        "source: 'revision' is required with 'repo'",
    ),
    (
        "repo-and-path",
        VALID.replace(f"path: {TINY_SOURCE}", f"path: {TINY_SOURCE}\n  repo: org/model"),
        2,
        "give exactly one of 'repo'",
    ),
    ("no-origin", VALID.replace(f"path: {TINY_SOURCE}", "family: sd1"), 2, "give exactly one of 'repo'"),
    (
        "missing-source-folder",
        VALID.replace(str(TINY_SOURCE), "/nonexistent/model"),
        3,
        "source.path: /nonexistent/model is not a diffusers pipeline folder",
    ),
    (
        "bad-family",
        VALID.replace(f"path: {TINY_SOURCE}", f"path: {TINY_SOURCE}\n  family: sd3"),
        4,
        "source.family: 'sd3' is not one of sd1,sd2,sdxl",
    ),
    ("bad-precision", VALID + "conversion_extra: 1\n", 12, "conversion_extra: unknown key"),
    (
        "precision-int8",
        VALID.replace("conversion:\n", "conversion:\n  precision: int8\n"),
        7,
        "conversion.precision: 'int8' is not one of float16,float32",
    ),
    (
        "bad-target-os",
        VALID.replace("conversion:\n", "conversion:\n  minimum_deployment_target: iOS15\n"),
        7,
        "conversion.minimum_deployment_target: 'iOS15' is not one of iOS16,iOS17,iOS18,macOS13,macOS14,macOS15",
    ),
    (
        "image-size-odd",
        VALID.replace("conversion:\n", "conversion:\n  image_size: 500\n"),
        7,
        "conversion.image_size: Input should be a multiple of 64",
    ),
    (
        "image-size-huge",
        VALID.replace("conversion:\n", "conversion:\n  image_size: 4096\n"),
        7,
        "conversion.image_size: Input should be less than or equal to 2048",
    ),
    (
        "unet-batch-zero",
        VALID.replace("conversion:\n", "conversion:\n  unet_batch: 0\n"),
        7,
        "conversion.unet_batch: Input should be greater than or equal to 1",
    ),
    ("duplicate-component", VALID.replace("vae_decoder]", "unet]"), 7, "a component is listed twice"),
    (
        "empty-components",
        VALID.replace("[text_encoder, unet, vae_decoder]", "[]"),
        7,
        "list at least one component",
    ),
    (
        "grouped-on-ios16",
        VALID + "      granularity: per_grouped_channel\n",
        9,
        "compression.unet: palettize 6-bit kmeans, grouped channels of 16 needs iOS18/macOS15",
    ),
    (
        "int4-on-ios17",
        VALID.replace("conversion:\n", "conversion:\n  minimum_deployment_target: iOS17\n").replace(
            "palettize:\n      nbits: 6", "quantize:\n      nbits: 4"
        ),
        10,
        "needs iOS18/macOS15; conversion",
    ),
    (
        "joint-on-macos14",
        VALID.replace("conversion:\n", "conversion:\n  minimum_deployment_target: macOS14\n")
        + "    prune: {sparsity: 0.5}\n",
        10,
        "needs iOS18/macOS15; conversion.minimum_deployment_target is macOS14",
    ),
    (
        "palettize-and-quantize",
        VALID + "    quantize: {nbits: 8}\n",
        9,
        "compression.unet: choose 'palettize' or 'quantize', not both",
    ),
    (
        "quantize-3bit",
        VALID.replace("palettize:\n      nbits: 6", "quantize:\n      nbits: 3"),
        11,
        "compression.unet.quantize.nbits: 3 is not one of 4,8",
    ),
    (
        "sparsity-above-one",
        VALID.replace("palettize:\n      nbits: 6", "prune:\n      sparsity: 1.5"),
        11,
        "compression.unet.prune.sparsity: Input should be less than 1",
    ),
    (
        "prune-n-ge-m",
        VALID.replace("palettize:\n      nbits: 6", "prune:\n      n_m: [4, 2]"),
        10,
        "n must be smaller than m",
    ),
    (
        "prune-both-patterns",
        VALID.replace("palettize:\n      nbits: 6", "prune:\n      n_m: [2, 4]\n      sparsity: 0.5"),
        10,
        "give exactly one of 'sparsity' or 'n_m'",
    ),
    (
        "compress-unconverted",
        VALID + "  vae_encoder: {palettize: {nbits: 8}}\n",
        12,
        "compression.vae_encoder: is compressed but not listed in conversion.components",
    ),
    (
        "uniform-grouped",
        VALID.replace("conversion:\n", "conversion:\n  minimum_deployment_target: iOS18\n")
        + "      mode: uniform\n      granularity: per_grouped_channel\n",
        14,
        "uniform mode is per_tensor only",
    ),
    (
        "palettize-mode",
        VALID + "      mode: magic\n",
        12,
        "compression.unet.palettize.mode: 'magic' is not one of kmeans,uniform",
    ),
    (
        "variant-attention",
        VALID + "variants:\n  - attention: flash\n",
        13,
        "variants.0.attention: 'flash' is not one of original,split_einsum,split_einsum_v2",
    ),
    (
        "variant-folder-escape",
        VALID + "variants:\n  - folder: ../../etc\n",
        13,
        "variants.0.folder: '../../etc' must be one plain folder name",
    ),
    (
        "variant-same-folder",
        VALID + "variants:\n  - folder: a\n  - folder: a\n",
        12,
        "two variants land in the same folder",
    ),
    ("variants-empty", VALID + "variants: []\n", 12, "list at least one variant"),
    *(
        (
            f"variant-folder-{name}",
            VALID + f"variants:\n  - folder: {name}\n",
            13,
            f"variants.0.folder: {name!r} is a file or folder of the published repository itself",
        )
        for name in ("vocab.json", "merges.txt", "README.md", "readme.md", "recipe.yaml", "images",
                     "publish_report.json", "device_results.json")
    ),
    (
        "variant-folder-trailing-newline",
        VALID + 'variants:\n  - folder: "original\\n"\n',
        13,
        "variants.0.folder: 'original\\n' must be one plain folder name",
    ),
    *(
        (f"target-repo-{label}", VALID.replace("repo: me/ok", f"repo: {yaml_id}"), 5,
         f"target.repo: {shown!r} is not a {kind}")
        for label, yaml_id, shown, kind in (
            ("double-dot", "me/bad..name", "me/bad..name", "valid Hub repo id"),
            ("double-dash", "me/bad--name", "me/bad--name", "valid Hub repo id"),
            ("dot-git", "me/name.git", "me/name.git", "valid Hub repo id"),
            ("newline", '"me/x\\n"', "me/x\n", "Hub repo id of the form 'namespace/name'"),
            ("too-long", "me/" + "n" * 97, "me/" + "n" * 97, "valid Hub repo id"),
            ("trailing-dot", "me/name.", "me/name.", "valid Hub repo id"),
        )
    ),
    (
        "source-repo-double-dot",
        VALID.replace(f"path: {TINY_SOURCE}", f"repo: org/bad..id\n  revision: '{SHA}'"),
        3,
        "source.repo: 'org/bad..id' is not a valid Hub repo id",
    ),
    (
        "card-prompt-nul",
        VALID + 'card:\n  prompts: ["an\\0astronaut"]\n',
        13,
        "card.prompts.0: holds the control character U+0000",
    ),
    (
        "card-prompt-bidi-override",
        VALID + 'card:\n  prompts: ["an \\u202eastronaut"]\n',
        13,
        "card.prompts.0: holds the bidirectional control character U+202E",
    ),
    (
        "card-license-name-escape",
        VALID + 'card:\n  license: other\n  license_name: "x\\x1b[31m"\n  license_link: https://example.com\n',
        14,
        "card.license_name: holds the control character U+001B",
    ),
    (
        "mixed-bit-recipe-outside",
        VALID.replace("nbits: 6", "mixed: {recipe: /etc/passwd}"),
        11,
        "compression.unet.palettize.mixed.recipe: /etc/passwd must be a file inside the recipe's folder",
    ),
    (
        "yaml-python-tag",
        VALID + "card: !!python/object:builtins.dict {}\n",
        12,
        "the YAML tag !!python/object:builtins.dict is not allowed",
    ),
    (
        "yaml-python-apply-tag",
        VALID + 'card:\n  prompts: !!python/object/apply:os.system ["true"]\n',
        13,
        "the YAML tag !!python/object/apply:os.system is not allowed",
    ),
    (
        "yaml-local-tag",
        VALID + "card:\n  license: !secret mit\n",
        13,
        "the YAML tag !secret is not allowed",
    ),
    (
        "parity-negative",
        VALID + "parity:\n  min_psnr: -3\n",
        13,
        "parity.min_psnr: Input should be greater than or equal to 0",
    ),
    (
        "parity-unknown-component",
        VALID + "parity:\n  per_component: {unet: 30, vae_encoder: 20}\n",
        13,
        "parity.per_component.vae_encoder: is not listed in conversion.components",
    ),
    (
        "parity-steps-string",
        VALID + "parity:\n  image_steps: many\n",
        13,
        "parity.image_steps: Input should be a valid integer",
    ),
    (
        "card-license-other",
        VALID + "card:\n  license: other\n",
        12,
        "card: license 'other' needs 'license_name' and 'license_link'",
    ),
    (
        "card-bad-tag",
        VALID + "card:\n  tags: ['has space']\n",
        13,
        "card.tags.0: String should match pattern",
    ),
    (
        "card-empty-prompt",
        VALID + "card:\n  prompts: ['']\n",
        13,
        "card.prompts.0: String should have at least 1 character",
    ),
    ("card-missing-template", VALID + "card:\n  template: nowhere.md.j2\n", 13, "card.template:"),
    (
        "text-encoder-2-on-sd1",
        VALID.replace(f"path: {TINY_SOURCE}", f"path: {TINY_SOURCE}\n  family: sd1").replace(
            "[text_encoder,", "[text_encoder, text_encoder_2,"
        ),
        8,
        "text_encoder_2 exists only in sdxl",
    ),
    (
        "private-not-bool",
        VALID.replace("repo: me/ok", "repo: me/ok\n  private: perhaps"),
        6,
        "target.private: Input should be a valid boolean",
    ),
    ("yaml-syntax", VALID.replace("nbits: 6", "nbits: [6"), 12, "invalid YAML"),
    ("yaml-tab", VALID.replace("  repo: me/ok", "\trepo: me/ok"), 5, "invalid YAML"),
    ("duplicate-key", VALID + "name: again\n", 12, "'name' is given twice"),
    ("not-a-mapping", "- just\n- a list\n", 1, "a recipe is a mapping"),
    ("empty-file", "", 1, "a recipe is a mapping"),
    (
        "scalar-compression",
        VALID.replace("compression:\n  unet:\n    palettize:\n      nbits: 6\n", "compression: 6\n"),
        8,
        "compression: expected a mapping of keys, got 6",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "message"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_recipe_message(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as raised:
        inspect_source(load_recipe(path))
    text_of_error = str(raised.value)
    assert "\n" not in text_of_error
    assert text_of_error.startswith(f"{path}:{line}: ") or text_of_error.startswith(f"{path}: "), (
        text_of_error
    )
    assert message in text_of_error
    assert raised.value.exit_code == 2


def test_bad_cases_are_distinct():
    assert len({case[0] for case in BAD}) == len(BAD) >= 30
    assert len({case[3] for case in BAD}) >= 30


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "absent.yaml")


def test_alias_bomb_is_refused(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefgh":
        previous = chr(ord(level) - 1)
        bomb += (
            f"{level}: &{level} [*{previous}, *{previous}, *{previous}, *{previous}, *{previous},"
            f" *{previous}, *{previous}, *{previous}, *{previous}, *{previous}]\n"
        )
    with pytest.raises(RecipeError, match="too large"):
        load_recipe(write(tmp_path, bomb))


def test_a_huge_recipe_is_refused_before_parsing(tmp_path):
    """A 12 MB flat list once took 3.8 GB and 107 s to reach the node limit: the size is checked first."""
    path = tmp_path / "huge.yaml"
    path.write_text("a: [" + "x, " * 4_000_000 + "x]\n")
    with pytest.raises(RecipeError, match=r"huge.yaml: the recipe is 12,000,007 bytes, too large for a recipe"):
        load_recipe(path)


@pytest.mark.parametrize("repo", ["noslash", "me/bad..name", "me/x\n", "a/b/c"])
def test_push_refuses_a_bad_repo_id_before_any_request(tmp_path, repo, capsys):
    """A bare name would create a stray repo under the token's own user."""
    (tmp_path / "README.md").write_text("hello\n")
    assert main(["push", str(tmp_path), "--repo", repo]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --repo: {repo!r} is not a ")


def test_cli_validate_reports_one_line_and_exit_code_2(tmp_path):
    bad = write(tmp_path, VALID.replace("nbits: 6", "nbits: 5"), "bad.yaml")
    good = write(tmp_path, VALID, "good.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "publisher", "validate", str(good), str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout.strip() == f"ok: {good}"
    assert (
        result.stderr.strip()
        == "error: bad.yaml:11: compression.unet.palettize.nbits: 5 is not one of 1,2,3,4,6,8"
    )
    assert "Traceback" not in result.stderr


def test_model_version_names_the_hub_source():
    recipe = Recipe.model_validate(
        {"name": "x", "source": {"repo": "org/model", "revision": SHA}, "target": {"repo": "me/x"}}
    )
    assert recipe.model_version == "org/model"
