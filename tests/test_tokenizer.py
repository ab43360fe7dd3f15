"""A tokenizer saved by transformers >= 5 (``tokenizer.json`` only): the published ``vocab.json`` and
``merges.txt`` are derived from it, byte for byte as transformers 4's slow ``CLIPTokenizer`` wrote them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from publisher.errors import RecipeError
from publisher.source import write_slow_tokenizer_files
from publisher.source_check import check_tokenizer
from tests.conftest import DEMO_RECIPE, TINY_SOURCE

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "Hello hello HELLO, abab ba!",
    "café crème brûlée, naïve façade, Ångström, ½",
    "a cat 🐱 with a hat 🎩🎉, 東京 at night",
    " ".join(["a very long prompt about a lighthouse at dawn in watercolor"] * 12),
    "",
]
# Merges over the tiny vocabulary's byte symbols ("é" is "Ã©" in CLIP's byte-to-unicode alphabet), so the
# prompts above exercise them; a merged symbol gets the next id, as a BPE trainer gives it.
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o</w>"), ("a", "b"), ("a", "b</w>"), ("ab", "ab</w>"),
          ("b", "a</w>"), ("Ã", "©"), ("t", "h")]


def v4_saved_files(vocab_file: Path, merges_file: Path) -> tuple[str, str]:
    """The text transformers 4's slow CLIPTokenizer writes for these files: its ``__init__`` reads them and
    ``save_vocabulary`` writes them (``src/transformers/models/clip/tokenization_clip.py``)."""
    encoder = json.loads(vocab_file.read_text(encoding="utf-8"))
    bpe_merges = merges_file.read_text(encoding="utf-8").strip().split("\n")[1 : 49152 - 256 - 2 + 1]
    bpe_ranks = dict(zip([tuple(merge.split()) for merge in bpe_merges], range(len(bpe_merges)), strict=True))
    vocab = json.dumps(encoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    merges = "#version: 0.2\n" + "".join(" ".join(pair) + "\n" for pair, _ in sorted(bpe_ranks.items(),
                                                                                      key=lambda kv: kv[1]))
    return vocab, merges


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory) -> Path:
    """The shipped tiny tokenizer (no merges) with a few merges added, so the merges file is not empty."""
    folder = Path(shutil.copytree(TINY_SOURCE / "tokenizer", tmp_path_factory.mktemp("slow") / "tokenizer"))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    for first, second in MERGES:
        vocab.setdefault(first + second, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return folder


def transformers5_form(slow: Path, dest: Path) -> Path:
    """The tokenizer as transformers >= 5 saves it: ``tokenizer.json`` and ``tokenizer_config.json`` only."""
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(str(slow)).save_pretrained(str(dest))
    assert sorted(path.name for path in dest.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return dest


def input_ids(folder: Path) -> list[list[int]]:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    return [tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
            for prompt in PROMPTS]


def input_ids_of(folder: Path, prompt: str) -> list[int]:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))(prompt)["input_ids"]


@pytest.mark.parametrize("merge_format", ["pairs", "strings"])
def test_derived_files_are_what_the_v4_slow_tokenizer_writes(tmp_path, slow_folder, merge_format):
    fast = transformers5_form(slow_folder, tmp_path / "fast")
    tokenizer_json = fast / "tokenizer.json"
    if merge_format == "strings":  # tokenizers < 0.20 saved a merge as "a b"
        content = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        content["model"]["merges"] = [" ".join(pair) for pair in content["model"]["merges"]]
        tokenizer_json.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    assert check_tokenizer(fast) == [tokenizer_json]

    derived = tmp_path / "derived"
    derived.mkdir()
    vocab, merges = write_slow_tokenizer_files(tokenizer_json, derived)
    expected_vocab, expected_merges = v4_saved_files(slow_folder / "vocab.json", slow_folder / "merges.txt")
    assert expected_merges.count("\n") == len(MERGES) + 1
    assert vocab.read_bytes() == expected_vocab.encode("utf-8")
    assert merges.read_bytes() == expected_merges.encode("utf-8")

    shutil.copy(fast / "tokenizer_config.json", derived)
    ids = input_ids(fast)
    assert input_ids(derived) == ids == input_ids(slow_folder)
    assert any(len(row) == 77 for row in ids) and len({len(row) for row in ids}) > 2
    assert len(input_ids_of(derived, "hello")) == 3, "the merges are not applied"


def test_a_tokenizer_with_neither_form_is_refused(tmp_path, slow_folder):
    folder = Path(shutil.copytree(slow_folder, tmp_path / "tokenizer"))
    (folder / "vocab.json").unlink()
    with pytest.raises(RecipeError, match="vocab.json and merges.txt, or tokenizer.json") as caught:
        check_tokenizer(folder)
    assert "\n" not in str(caught.value)


def test_publish_from_a_tokenizer_json_only_pipeline(tmp_path):
    """The whole pipeline, cheaply: the published files are the v4 slow tokenizer's, and the source is untouched."""
    from publisher.pipeline import publish

    source = Path(shutil.copytree(TINY_SOURCE, tmp_path / "tiny-sd"))
    shutil.rmtree(source / "tokenizer")
    transformers5_form(TINY_SOURCE / "tokenizer", source / "tokenizer")
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["source"] = {"path": str(source)}
    recipe["conversion"]["components"] = ["text_encoder", "unet", "vae_decoder"]
    recipe["compression"] = {name: recipe["compression"][name] for name in recipe["conversion"]["components"]}
    recipe["parity"]["image_steps"] = 1
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))

    out = tmp_path / "published"
    publish(recipe_file, out, quiet=True)
    expected = v4_saved_files(TINY_SOURCE / "tokenizer/vocab.json", TINY_SOURCE / "tokenizer/merges.txt")
    assert (out / "vocab.json").read_bytes() == expected[0].encode("utf-8")
    assert (out / "merges.txt").read_bytes() == expected[1].encode("utf-8")
    assert sorted(path.name for path in (source / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
