"""The fault matrix: whatever step of a publish fails, the repo is exactly in its old or its new state, never
a mix, the local folder is untouched, and rerunning the publish completes it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from publisher.cli import main
from publisher.errors import HubError
from publisher.hub import PushResult, push_folder
from publisher.hub_errors import HubCall, hub_errors
from tests.hub.helpers import USER, WRITE_TOKEN, folder_state, make_published_folder, set_transfer
from tests.hub.server import FaultAction, HubServer

pytest_plugins = ["tests.hub.fixtures"]

REPO = f"{USER}/faults"
PACKAGES = "original/packages/Stable_Diffusion_version_tiny"
UNET_WEIGHT = f"{PACKAGES}_unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
TEXT_WEIGHT = f"{PACKAGES}_text_encoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin"


@dataclass(frozen=True)
class Case:
    """One injected fault and what the first publish attempt must end with.

    `state` is what the remote holds afterwards: "old" (nothing landed), "new" (the whole publish landed)
    or "corrupt" (a commit landed but the Hub recorded a wrong file, which verification must catch).
    `error` is a fragment of the one-line HubError, or None when the client's own retries absorb the fault.
    """

    name: str
    step: str
    action: FaultAction
    times: int
    state: str
    error: str | None
    transfers: tuple[str, ...] = ("xet", "lfs")


CASES = [
    Case("preupload-503-once", "preupload", 503, 1, "new", None),
    # Preupload precedes the xet/LFS split: exhausting the client's 5 retries is checked on one path only.
    Case("preupload-500-persistent", "preupload", 500, 6, "old", "HTTP 500", ("lfs",)),
    Case("preupload-401", "preupload", 401, 1, "old", "(401)"),
    Case("lfs-batch-401", "lfs_batch", 401, 1, "old", "(401)", ("lfs",)),
    Case("lfs-put-reset-mid-body", "lfs_put", "reset", 1, "new", None, ("lfs",)),
    Case("xet-token-500-once", "xet_token", 500, 1, "new", None, ("xet",)),
    Case("xet-token-401", "xet_token", 401, 1, "old", "(401)", ("xet",)),
    Case("commit-500", "commit", 500, 1, "old", "HTTP 500"),
    Case("commit-412", "commit", 412, 1, "old", "moved since this publish started (412)"),
    Case("commit-reset-mid-body", "commit", "reset", 1, "old", "lost the connection"),
    Case("commit-response-lost", "commit", "drop_response", 1, "new", "lost the connection"),
    Case("commit-recorded-wrong", "commit", "corrupt", 1, "corrupt", "verification failed"),
]
PARAMS = [pytest.param(case, mode, id=f"{case.name}-{mode}") for case in CASES for mode in case.transfers]


def push(server: HubServer, folder: Path) -> PushResult:
    return push_folder(folder, REPO, token=WRITE_TOKEN, endpoint=server.url, progress=False)


def published(server: HubServer) -> dict[str, tuple[int, str]]:
    state = server.snapshot(REPO)
    del state[".gitattributes"]
    return state


@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_fault_leaves_old_or_new_state_and_a_rerun_completes(
    case: Case, mode: str, hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_transfer(monkeypatch, mode)
    folder = make_published_folder(tmp_path / "out")
    push(hub_server, folder)
    old_head, old_state = hub_server.head(REPO), published(hub_server)
    # The new version changes a weight, drops a file and adds one: a mix would be visible.
    (folder / UNET_WEIGHT).write_bytes(
        make_published_folder(tmp_path / "v2", seed=2).joinpath(UNET_WEIGHT).read_bytes()
    )
    (folder / TEXT_WEIGHT).unlink()
    (folder / "extra.bin").write_bytes(b"\x01" * 5000)
    new_state = folder_state(folder)
    hub_server.reset_log()
    hub_server.inject(case.step, case.action, times=case.times)

    if case.error is None:
        assert push(hub_server, folder).verified
    else:
        with pytest.raises(HubError) as info:
            push(hub_server, folder)
        message = str(info.value)
        assert case.error in message and "\n" not in message and WRITE_TOKEN not in message
        assert info.value.exit_code == 4

    # The fault really fired (a test whose fault never triggers would prove nothing).
    assert not hub_server.pending_faults()
    fired = {"reset": 0, "drop_response": 0, "corrupt": 200}.get(str(case.action), case.action)
    assert sum(r.status == fired for r in hub_server.requests_for(case.step)) >= case.times
    head = hub_server.head(REPO)
    if case.state == "old":
        assert head == old_head and published(hub_server) == old_state
    else:
        assert hub_server.storage.commit(head)["parents"] == [old_head]  # exactly one commit landed
        if case.state == "new":
            assert published(hub_server) == new_state
        else:
            assert published(hub_server) != new_state and published(hub_server).keys() == new_state.keys()
    assert folder_state(folder) == new_state  # nothing local lost

    rerun = push(hub_server, folder)

    assert rerun.verified
    assert published(hub_server) == new_state
    assert rerun.up_to_date == (case.state == "new")


def test_the_hub_dying_mid_upload_is_one_line_and_exit_4(
    hub_cli: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """huggingface_hub closes its shared HTTP client when a connection is refused; the LFS uploads still running
    in its other threads then fail with a bare RuntimeError ("the client has been closed"), not a network error.
    """
    set_transfer(monkeypatch, "lfs")
    folder = make_published_folder(tmp_path / "out")
    push(hub_cli, folder)
    old_head = hub_cli.head(REPO)
    changed = make_published_folder(tmp_path / "v2", seed=2)
    # All four LFS uploads are in flight when the server dies, so several threads race on the closed client.
    hub_cli.hold("lfs_put", parties=4)
    hub_cli.inject("lfs_put", "die")

    code = main(["push", str(changed), "--repo", REPO, "-q"])

    out, err = capsys.readouterr()
    assert code == 4, err
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert "nothing was committed" in err or "landed whole or not at all" in err
    assert WRITE_TOKEN not in err
    assert not hub_cli.pending_faults()
    assert hub_cli.head(REPO) == old_head


def test_a_request_on_the_closed_shared_client_is_a_lost_connection(hf_isolation: Path) -> None:
    """The race above, made deterministic: whether a thread sends on the client another thread just closed
    depends on the scheduler, so the dying-Hub test does not always reach this path."""
    closed = httpx2.Client()
    closed.close()
    ctx = HubCall(REPO, "main", "http://127.0.0.1:9", WRITE_TOKEN, step="upload and commit")

    with pytest.raises(HubError) as info, hub_errors(ctx):
        try:
            closed.put("http://127.0.0.1:9/upload", content=b"weights")
        except Exception as exc:  # how huggingface_hub's LFS upload threads wrap every failure
            raise RuntimeError("Error while uploading 'weight.bin' to the Hub.") from exc

    message = str(info.value)
    assert message.startswith("lost the connection to the Hub at http://127.0.0.1:9 while trying to upload")
    assert "rerun" in message and "\n" not in message and WRITE_TOKEN not in message
    assert info.value.exit_code == 4


def test_each_retry_is_one_short_line_of_the_publisher_log(
    hub_server: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As in the CLI, where huggingface_hub sets its own level when it is first imported.
    caplog.set_level(logging.WARNING, logger="huggingface_hub")
    caplog.set_level(logging.INFO, logger="publisher")
    folder = make_published_folder(tmp_path / "out")
    hub_server.inject("preupload", 503, times=2)

    push_folder(folder, REPO, token=WRITE_TOKEN, endpoint=hub_server.url, progress=True)

    assert not hub_server.pending_faults()
    assert [r for r in caplog.records if r.name.startswith("huggingface_hub")] == []
    retries = [r.getMessage() for r in caplog.records if r.name == "publisher.hub_errors" and "retry" in r.getMessage()]
    assert len(retries) == 2, retries
    assert all(len(line) < 100 and "http" not in line and "503" in line for line in retries), retries

    caplog.clear()
    (folder / "README.md").write_text("changed\n")
    hub_server.inject("preupload", 503)
    push_folder(folder, REPO, token=WRITE_TOKEN, endpoint=hub_server.url, progress=False)

    assert not hub_server.pending_faults()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_quiet_cli_prints_no_retry_chatter(hub_server: HubServer, tmp_path: Path) -> None:
    """In a real `publisher push -q`, huggingface_hub is imported after the CLI set its log level, and resets it."""
    folder = make_published_folder(tmp_path / "out")
    hub_server.inject("preupload", 503)
    env = {**os.environ, "HF_TOKEN": WRITE_TOKEN, "HF_ENDPOINT": hub_server.url}

    run = subprocess.run([sys.executable, "-m", "publisher", "push", str(folder), "--repo", REPO, "-q"],
                         capture_output=True, text=True, env=env, timeout=300)

    assert run.returncode == 0, run.stderr
    assert not hub_server.pending_faults()
    assert run.stderr == ""
    assert run.stdout.startswith("published ")
