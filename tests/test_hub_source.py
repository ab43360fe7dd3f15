"""A Hub repo as the source: downloaded from the loopback Hub server by the real client, at a pinned revision
that is not the head; its license read from its card at that revision, or a named warning when it cannot be."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, try_to_load_from_cache

from publisher.card import render_card
from publisher.monitor import Monitor
from publisher.pipeline import Build, Parity, make_report, publish
from publisher.recipe import load_recipe
from publisher.source import _hub_license, load_source
from tests.conftest import DEMO_RECIPE, TINY_SOURCE
from tests.hub.helpers import USER, WRITE_TOKEN
from tests.hub.server import HubServer
from tests.test_card import hub_report

pytest_plugins = ["tests.hub.fixtures"]

REPO = f"{USER}/tiny-sd-source"


def commit_card(api: HfApi, card: str) -> str:
    return api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=REPO).oid


def with_license(license_id: str) -> str:
    card = (TINY_SOURCE / "README.md").read_text()
    assert "license: apache-2.0\n" in card
    return card.replace("license: apache-2.0\n", f"license: {license_id}\n")


@pytest.fixture
def api(hub_cli: HubServer) -> HfApi:
    api = HfApi(endpoint=hub_cli.url, token=WRITE_TOKEN)
    api.create_repo(REPO)
    return api


def test_publish_from_a_hub_revision_that_is_not_the_head(tmp_path, api, hub_cli):
    first = api.upload_folder(folder_path=TINY_SOURCE, repo_id=REPO, commit_message="the pipeline").oid
    head = commit_card(api, with_license("mit"))
    assert hub_cli.head(REPO) == head != first

    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["source"] = {"repo": REPO, "revision": first}
    recipe["conversion"]["components"] = ["text_encoder", "vae_decoder"]
    recipe["compression"] = {name: recipe["compression"][name] for name in recipe["conversion"]["components"]}
    recipe["parity"]["image_steps"] = 1
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))

    out = tmp_path / "published"
    report = publish(recipe_file, out, quiet=True)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == REPO and card.data.base_model_relation == "quantized"
    assert card.data.license == report.license == "apache-2.0"  # the card at `first`, not head's mit
    assert report.source_warnings == []
    reproducibility = card.text.split("## Reproducibility", 1)[1]
    assert f"repo: {REPO}" in reproducibility and first in reproducibility
    for weights in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        digest = hashlib.sha256((TINY_SOURCE / weights).read_bytes()).hexdigest()
        assert f"| weights | {REPO}/{weights} | {first} |  | `{digest}` |" in reproducibility
    assert "unet/" not in reproducibility  # not converted, not an input
    # Downloaded at `first` by the real client (over hf_xet, whose transfers skip the resolve route).
    for weights in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        cached = try_to_load_from_cache(REPO, weights, revision=first)
        assert isinstance(cached, str) and Path(cached).read_bytes() == (TINY_SOURCE / weights).read_bytes()


def test_a_hub_card_that_cannot_be_read_is_a_named_warning(api, caplog):
    caplog.set_level(logging.WARNING, logger="publisher.source")  # `-q` in an earlier test's CLI run raised it
    # Valid YAML, so the Hub (and the client's check before a commit) takes it; its eval results lack a task.
    broken = commit_card(api, "---\nlicense: mit\nmodel-index:\n- name: x\n  results:\n  - {}\n---\n# x\n")
    warnings: list[str] = []
    assert _hub_license(REPO, broken, warnings) is None
    assert len(warnings) == 1 and REPO in warnings[0] and broken in warnings[0] and "license" in warnings[0]
    assert warnings[0] in caplog.text

    readable = commit_card(api, with_license("mit"))
    assert _hub_license(REPO, readable, warnings) == "mit"
    api.delete_file("README.md", repo_id=REPO)
    assert _hub_license(REPO, api.model_info(REPO).sha, warnings) is None
    assert len(warnings) == 1  # a repo without a card has no license, and nothing is wrong


def test_source_warnings_are_shown_in_the_card_without_local_paths():
    warning = "The source's model card (org/model README.md at abc) could not be read: OSError: /home/me/x denied"
    card = render_card(hub_report(source_warnings=[warning]))
    limitations = card.split("## Limitations", 1)[1]
    assert "- The source's model card (org/model README.md at abc) could not be read" in limitations
    assert "/home/me" not in card


def test_the_report_carries_the_sources_warnings():
    """What reaches the published card: the run's report holds the warnings its source raised."""
    recipe = load_recipe(DEMO_RECIPE)
    source = load_source(recipe, models=())
    source.warnings.append("The source's model card could not be read: ValueError")
    report = make_report(recipe, source, Build(), Parity(), Monitor(quiet=True))
    assert report.source_warnings == ["The source's model card could not be read: ValueError"]


def test_a_hub_source_with_pickled_weights_only_is_refused_before_any_conversion(tmp_path, api, hub_cli, capsys):
    import torch
    from safetensors.torch import load_file

    from publisher.cli import main

    pickled = tmp_path / "unet.bin"
    torch.save(load_file(TINY_SOURCE / "unet" / "diffusion_pytorch_model.safetensors"), pickled)
    api.upload_folder(folder_path=TINY_SOURCE, repo_id=REPO, ignore_patterns=["unet/*.safetensors"])
    revision = api.upload_file(path_or_fileobj=pickled, path_in_repo="unet/diffusion_pytorch_model.bin",
                               repo_id=REPO).oid
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe["source"] = {"repo": REPO, "revision": revision}
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "published"

    capsys.readouterr()
    assert main(["publish", str(recipe_file), "--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert printed.err.strip().splitlines()[-1] == (
        f"error: {REPO}/unet: has no safetensors weights; pickled weights (.bin) are refused, since loading one runs"
        " code from the file: use a revision with .safetensors weights")
    assert not out.exists() and not list(tmp_path.glob(".published.*"))
