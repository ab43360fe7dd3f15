"""Re-publishing an unchanged recipe is a no-op, whatever the stage cache held.

A cold cache (every CI job starts with one) re-measures every stage: only the measured costs (stage times,
peak memory, the machine) then differ from the published report, and the publish keeps the published ones
instead of committing new measurements of the same artifacts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from publisher.cache import StageCache
from publisher.hub import push_folder
from publisher.pipeline import publish
from publisher.push import PushOptions, adopt_published_costs
from publisher.report import Machine, PublishReport, StageCost
from tests.conftest import DEMO_RECIPE
from tests.hub.helpers import ORG, USER, WRITE_TOKEN, folder_state
from tests.hub.server import HubServer, TokenInfo

pytest_plugins = ["tests.hub.fixtures"]

NAMESPACE = "coreml-publisher"  # the demo recipe's target namespace
REPO = f"{NAMESPACE}/tiny-sd-palettized"
GOLDEN_REPORT = Path(__file__).parent / "golden" / "tiny-sd-palettized.report.json"


@pytest.fixture
def hub(hub_cli: HubServer) -> HubServer:
    """The loopback Hub, where the write token may publish to the demo's namespace."""
    hub_cli.tokens[WRITE_TOKEN] = TokenInfo(USER, "write", (ORG, NAMESPACE))
    hub_cli.namespaces.add(NAMESPACE)
    return hub_cli


def commits(server: HubServer) -> list[str]:
    return [r.step for r in server.requests if r.step == "commit"]


def test_a_cold_cache_republish_of_an_unchanged_recipe_makes_no_commit(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = publish(DEMO_RECIPE, tmp_path / "first", quiet=True, push=PushOptions())
    head, count = hub.head(REPO), hub.commit_count(REPO)
    capsys.readouterr()
    hub.reset_log()

    cold_cache = StageCache(tmp_path / "cold-cache")
    again = publish(DEMO_RECIPE, tmp_path / "again", quiet=True, push=PushOptions(), cache=cold_cache)

    assert any((cold_cache.root / "convert").iterdir())  # every stage really ran again
    assert f"\nup to date: {REPO}@main already holds this content" in capsys.readouterr().out
    assert (hub.head(REPO), hub.commit_count(REPO)) == (head, count)
    assert commits(hub) == []
    # Every byte of the folder is the same, the measured costs included: they were taken from the Hub.
    assert folder_state(tmp_path / "again") == folder_state(tmp_path / "first")
    assert again.stages == first.stages and again.machine == first.machine


def test_a_report_that_differs_in_more_than_measured_costs_is_published(hub: HubServer, tmp_path: Path) -> None:
    published = PublishReport.model_validate_json(GOLDEN_REPORT.read_text())
    folder = tmp_path / "repo"
    folder.mkdir()
    published.write(folder)
    push_folder(folder, REPO, progress=False)
    head = hub.head(REPO)

    remeasured = published.model_copy(deep=True)
    remeasured.stages = [StageCost(stage=s.stage, seconds=s.seconds * 2, peak_rss_bytes=1) for s in published.stages]
    remeasured.machine = Machine(system="Linux 0", machine="riscv64", cpus=1, memory_bytes=1)
    remeasured.variants[0].components[0].convert_seconds += 1.0
    adopted = adopt_published_costs(remeasured, PushOptions(), quiet=True)
    assert adopted == published
    adopted.write(folder)
    assert push_folder(folder, REPO, progress=False).up_to_date

    for change in ("parity", "tool_versions", "recipe_sha256"):
        changed = remeasured.model_copy(deep=True)
        if change == "parity":
            changed.parity[0].psnr_db += 0.1
        elif change == "tool_versions":
            changed.tool_versions["coremltools"] = "10.0"
        else:
            changed.recipe_sha256 = "1" * 64
        assert adopt_published_costs(changed, PushOptions(), quiet=True) is changed, change
    changed.write(folder)
    result = push_folder(folder, REPO, progress=False)
    assert not result.up_to_date and hub.head(REPO) == result.commit_oid != head


def test_a_first_publish_has_no_costs_to_adopt(hub: HubServer) -> None:
    report = PublishReport.model_validate_json(GOLDEN_REPORT.read_text())

    assert adopt_published_costs(report, PushOptions(), quiet=True) is report  # no repo yet
    assert adopt_published_costs(report, PushOptions(revision="v2"), quiet=True) is report
