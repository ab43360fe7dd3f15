"""The fault matrix: whatever step of a publish fails, the repo is exactly in its old or its new state, never
a mix, the local folder is untouched, and rerunning the publish completes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from publisher.errors import HubError
from publisher.hub import PushResult, push_folder
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
