"""Defense in depth: a push refuses any file that holds the token it would push with, before writing anything.

Whatever put the token there (a card template reading the environment, a token pasted into a recipe comment,
a stray file), the push reads every file it would send, names the culprit in one line (exit 4) and leaves the
Hub untouched: no repo, no branch, no upload, no commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from publisher import hub
from publisher.cli import main
from publisher.errors import HubError
from publisher.hub import push_folder
from tests.hub.helpers import USER, WRITE_TOKEN, make_published_folder
from tests.hub.server import HubServer

pytest_plugins = ["tests.hub.fixtures"]

REPO = f"{USER}/tiny-sd-coreml"
NESTED = "original/packages/Stable_Diffusion_version_tiny_unet.mlpackage/Data/com.apple.CoreML/notes.txt"


def stored_bytes_contain(server: HubServer, secret: str) -> list[Path]:
    """Every file the server stored (blobs, LFS objects, xet CAS, commit snapshots) that holds `secret`."""
    needle = secret.encode()
    return [p for p in server.storage.root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize("existing", [False, True], ids=["new-repo", "existing-repo"])
def test_a_token_in_a_nested_file_or_the_recipe_is_refused_and_nothing_reaches_the_hub(
    hub_cli: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: bool
) -> None:
    folder = make_published_folder(tmp_path / "out")
    if existing:
        main(["push", str(folder), "--repo", REPO, "-q"])
        capsys.readouterr()
    head = hub_cli.head(REPO) if existing else None
    (folder / NESTED).write_text(f"rendered from the environment: HF_TOKEN={WRITE_TOKEN}\n")
    (folder / "recipe.yaml").write_text(f"name: tiny\n# my token, for later: {WRITE_TOKEN}\n")
    hub_cli.reset_log()

    code = main(["push", str(folder), "--repo", REPO])

    out, err = capsys.readouterr()
    assert code == 4
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    assert "recipe.yaml" in err and NESTED in err and "the Hub token" in err
    assert WRITE_TOKEN not in out + err
    assert {r.method for r in hub_cli.requests} <= {"GET", "HEAD"}  # read the remote, wrote nothing
    if existing:
        assert hub_cli.head(REPO) == head
    else:
        assert REPO not in hub_cli.storage.repos
    assert stored_bytes_contain(hub_cli, WRITE_TOKEN) == []


def test_a_token_cut_by_the_read_chunk_boundary_is_found(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    weight = folder / "original" / "big.bin"
    content = bytearray(hub._READ_CHUNK + 4096)
    # The first read ends 5 bytes into the token: only the bytes carried over to the next read complete it.
    start = hub._READ_CHUNK - 5
    content[start : start + len(WRITE_TOKEN)] = WRITE_TOKEN.encode()
    weight.write_bytes(content)

    with pytest.raises(HubError) as info:
        push_folder(folder, REPO, token=WRITE_TOKEN, endpoint=hub_server.url, progress=False, dry_run=True)

    assert info.value.exit_code == 4
    assert "original/big.bin" in str(info.value) and WRITE_TOKEN not in str(info.value)
    weight.write_bytes(content.replace(WRITE_TOKEN.encode(), b"x" * len(WRITE_TOKEN)))
    assert push_folder(folder, REPO, token=WRITE_TOKEN, endpoint=hub_server.url, progress=False).verified


def test_a_file_already_on_the_hub_is_not_read_again(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only what the commit sends is scanned: a re-publish of an unchanged multi-GB folder reads nothing twice."""
    folder = make_published_folder(tmp_path / "out")
    push_folder(folder, REPO, token=WRITE_TOKEN, endpoint=hub_server.url, progress=False)
    (folder / "README.md").write_text("changed\n")
    scanned: list[Path] = []
    real = hub._contains
    monkeypatch.setattr(hub, "_contains", lambda path, needle: scanned.append(path) or real(path, needle))

    push_folder(folder, REPO, token=WRITE_TOKEN, endpoint=hub_server.url, progress=False)

    assert scanned == [folder / "README.md"]
