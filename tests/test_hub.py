"""Publishing to the Hub: one atomic, verified commit, over hf_xet and over LFS, against the loopback server.

The real huggingface_hub client talks HTTP to `tests.hub.server`; nothing in the client is mocked.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile

from publisher.errors import HubError
from publisher.hub import PushResult, format_operations, format_summary, push_folder
from tests.hub.helpers import (
    OTHER_USER_TOKEN,
    READ_TOKEN,
    USER,
    WRITE_TOKEN,
    folder_state,
    make_published_folder,
    set_transfer,
    sha256_of,
)
from tests.hub.server import HubServer, TokenInfo

pytest_plugins = ["tests.hub.fixtures"]

REPO = f"{USER}/tiny-sd-coreml"
PACKAGES = "original/packages/Stable_Diffusion_version_tiny"
UNET_WEIGHT = f"{PACKAGES}_unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
TEXT_WEIGHT = f"{PACKAGES}_text_encoder.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
REVOKED_TOKEN = "hf_SENTINELrevokedTOKEN000000"
SENTINELS = (WRITE_TOKEN, READ_TOKEN, OTHER_USER_TOKEN, REVOKED_TOKEN)


def push(server: HubServer, folder: Path, **kwargs: object) -> PushResult:
    options: dict = {"token": WRITE_TOKEN, "endpoint": server.url, "progress": False, **kwargs}
    return push_folder(folder, str(options.pop("repo_id", REPO)), **options)


def remote_content(server: HubServer, revision: str = "main") -> dict[str, tuple[int, str]]:
    """The published files of a revision, minus the `.gitattributes` the Hub itself maintains."""
    state = server.snapshot(REPO, revision)
    assert ".gitattributes" in state
    del state[".gitattributes"]
    return state


def writes(server: HubServer) -> list[str]:
    """Steps of the requests that could have changed the server, other than an idempotent create_repo."""
    return [r.step for r in server.requests if r.method in ("POST", "PUT", "DELETE") and r.step != "create"]


def assert_clean_error(err: HubError, *fragments: str) -> None:
    message = str(err)
    assert err.exit_code == 4
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    chain: BaseException | None = err
    while chain is not None:
        assert not any(secret in str(chain) for secret in SENTINELS), str(chain)
        chain = chain.__cause__ or chain.__context__


# Publish, re-publish, change, delete ---------------------------------------------------------------------


def test_first_publish_is_one_verified_commit(hub_server: HubServer, transfer: str, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    local = folder_state(folder)

    result = push(hub_server, folder)

    assert [(op.path, op.kind) for op in result.operations] == [(path, "add") for path in sorted(local)]
    assert result.bytes_uploaded == sum(size for size, _ in local.values())
    assert result.commit_oid == hub_server.head(REPO)
    assert result.parent_commit == hub_server.storage.commit(result.commit_oid)["parents"][0]
    assert hub_server.commit_count(REPO) == 2  # the Hub's initial commit, then exactly one publish commit
    assert remote_content(hub_server) == local
    assert result.verified
    assert sorted(v.path for v in result.verification) == sorted(local)
    # Weights went through LFS/xet (sha256 verified), small text files inline (git blob id verified).
    methods = {v.path: v.method for v in result.verification}
    assert methods[UNET_WEIGHT] == "sha256" and methods["README.md"] == "git-blob"
    steps = [r.step for r in hub_server.requests]
    if transfer == "xet":
        assert "xet_token" in steps and "lfs_batch" not in steps
    else:
        assert "lfs_batch" in steps and "xet_token" not in steps
        assert hub_server.requests_for("lfs_complete"), "the UNet weight should have used multipart"
    assert "published 9 operations" in format_summary(result)


def test_published_files_download_with_the_local_sha256(
    hub_server: HubServer, transfer: str, tmp_path: Path
) -> None:
    folder = make_published_folder(tmp_path / "out")
    push(hub_server, folder)

    for path, (size, sha256) in folder_state(folder).items():
        downloaded = hf_hub_download(
            REPO, path, endpoint=hub_server.url, token=WRITE_TOKEN, cache_dir=tmp_path / "download-cache"
        )
        assert (Path(downloaded).stat().st_size, sha256_of(Path(downloaded))) == (size, sha256), path
    reads = {r.step for r in hub_server.requests if r.method == "GET"}
    assert ("xet_token" in reads) == (transfer == "xet")  # xet downloads ask for a read token


def test_xet_uploads_also_download_over_plain_http(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_transfer(monkeypatch, "xet")
    folder = make_published_folder(tmp_path / "out")
    push(hub_server, folder)
    set_transfer(monkeypatch, "lfs")  # a client without hf_xet: the server rebuilds the bytes from its CAS
    hub_server.reset_log()

    downloaded = hf_hub_download(
        REPO, UNET_WEIGHT, endpoint=hub_server.url, token=WRITE_TOKEN, cache_dir=tmp_path / "http-cache"
    )

    assert sha256_of(Path(downloaded)) == sha256_of(folder / UNET_WEIGHT)
    assert [(r.method, r.status) for r in hub_server.requests] == [("HEAD", 200), ("GET", 200)]


def test_republish_unchanged_uploads_nothing_and_makes_no_commit(
    hub_server: HubServer, transfer: str, tmp_path: Path
) -> None:
    folder = make_published_folder(tmp_path / "out")
    first = push(hub_server, folder)
    hub_server.reset_log()

    again = push(hub_server, folder)

    assert again.up_to_date and again.operations == [] and again.bytes_uploaded == 0
    assert again.commit_oid == first.commit_oid == hub_server.head(REPO)
    assert hub_server.commit_count(REPO) == 2
    assert writes(hub_server) == []
    assert sum(r.bytes_in for r in hub_server.requests if r.step != "create") == 0
    assert again.verified
    assert format_operations(again) == f"up to date: {REPO}@main already holds this content"


def test_changed_file_is_the_only_upload(hub_server: HubServer, transfer: str, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    first = push(hub_server, folder)
    weight = folder / UNET_WEIGHT
    # Same size, new content: only the hash comparison can tell.
    weight.write_bytes(make_published_folder(tmp_path / "other", seed=7).joinpath(UNET_WEIGHT).read_bytes())
    hub_server.reset_log()

    result = push(hub_server, folder)

    assert [(op.path, op.kind) for op in result.operations] == [(UNET_WEIGHT, "modify")]
    assert result.bytes_uploaded == weight.stat().st_size
    assert hub_server.storage.commit(hub_server.head(REPO))["parents"] == [first.commit_oid]
    assert remote_content(hub_server) == folder_state(folder)
    assert result.verified
    if transfer == "lfs":
        assert sum(r.bytes_in for r in hub_server.requests_for("lfs_put")) == weight.stat().st_size
    else:
        assert not hub_server.requests_for("lfs_put")


def test_file_no_longer_produced_is_deleted(hub_server: HubServer, transfer: str, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    push(hub_server, folder)
    size = (folder / TEXT_WEIGHT).stat().st_size
    (folder / TEXT_WEIGHT).unlink()
    hub_server.reset_log()

    result = push(hub_server, folder)

    assert [(op.path, op.size, op.kind) for op in result.operations] == [(TEXT_WEIGHT, size, "delete")]
    assert result.bytes_uploaded == 0
    assert remote_content(hub_server) == folder_state(folder)  # .gitattributes is kept, checked there
    assert result.verified
    assert "preupload" not in writes(hub_server)


# Pull requests, branches, visibility ----------------------------------------------------------------------


def test_create_pr_leaves_main_untouched(hub_server: HubServer, transfer: str, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    first = push(hub_server, folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny, 6-bit\n")

    result = push(hub_server, folder, create_pr=True)

    assert result.pr_url == f"{hub_server.url}/{REPO}/discussions/1"
    assert hub_server.head(REPO) == first.commit_oid
    assert remote_content(hub_server, "refs/pr/1") == folder_state(folder)
    assert result.verified
    api = HfApi(endpoint=hub_server.url, token=WRITE_TOKEN)
    [discussion] = api.get_repo_discussions(REPO)
    assert discussion.is_pull_request and discussion.status == "open"
    assert api.get_discussion_details(REPO, discussion.num).target_branch == "refs/heads/main"
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", result.commit_oid)]
    # The PR revision travels URL-quoted (refs%2Fpr%2F1) through the API and the resolve endpoint.
    assert api.model_info(REPO, revision="refs/pr/1").sha == result.commit_oid
    readme = hf_hub_download(
        REPO,
        "README.md",
        revision="refs/pr/1",
        endpoint=hub_server.url,
        token=WRITE_TOKEN,
        cache_dir=tmp_path / "c",
    )
    assert Path(readme).read_bytes() == (folder / "README.md").read_bytes()


def test_revision_targets_a_branch_created_from_main(
    hub_server: HubServer, transfer: str, tmp_path: Path
) -> None:
    folder = make_published_folder(tmp_path / "out")
    first = push(hub_server, folder)
    (folder / TEXT_WEIGHT).write_bytes(b"\x00" * 1234)

    result = push(hub_server, folder, revision="coreml-v2")

    assert result.revision == "coreml-v2"
    assert [(op.path, op.kind) for op in result.operations] == [(TEXT_WEIGHT, "modify")]
    assert hub_server.head(REPO) == first.commit_oid
    assert hub_server.storage.commit(hub_server.head(REPO, "coreml-v2"))["parents"] == [first.commit_oid]
    assert remote_content(hub_server, "coreml-v2") == folder_state(folder)
    assert push(hub_server, folder, revision="coreml-v2").up_to_date


def test_create_pr_with_a_revision_targets_that_branch(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    first = push(hub_server, folder)
    api = HfApi(endpoint=hub_server.url, token=WRITE_TOKEN)
    api.create_branch(REPO, branch="coreml-v2")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny, for v2\n")

    result = push(hub_server, folder, revision="coreml-v2", create_pr=True)

    assert result.pr_url == f"{hub_server.url}/{REPO}/discussions/1" and result.verified
    assert api.get_discussion_details(REPO, 1).target_branch == "refs/heads/coreml-v2"
    assert hub_server.head(REPO) == hub_server.head(REPO, "coreml-v2") == first.commit_oid
    assert remote_content(hub_server, "refs/pr/1") == folder_state(folder)


@pytest.mark.parametrize("dry_run", [False, True], ids=["push", "dry-run"])
def test_create_pr_against_a_missing_branch_fails_and_creates_nothing(
    hub_server: HubServer, tmp_path: Path, dry_run: bool
) -> None:
    folder = make_published_folder(tmp_path / "out")
    push(hub_server, folder)
    (folder / "README.md").write_text("changed\n")
    hub_server.reset_log()

    with pytest.raises(HubError) as info:
        push(hub_server, folder, revision="no-such-branch", create_pr=True, dry_run=dry_run)

    assert_clean_error(info.value, "branch 'no-such-branch' does not exist", REPO, "--create-pr")
    assert hub_server.storage.repos[REPO].branches.keys() == {"main"}
    assert hub_server.storage.repos[REPO].discussions == {}
    assert writes(hub_server) == []


def test_private_repo_is_invisible_without_a_token(
    hub_server: HubServer, transfer: str, tmp_path: Path
) -> None:
    folder = make_published_folder(tmp_path / "out")

    result = push(hub_server, folder, private=True)

    assert result.verified
    assert HfApi(endpoint=hub_server.url, token=WRITE_TOKEN).model_info(REPO).private is True
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub_server.url, token=False).model_info(REPO)
    with pytest.raises(HfHubHTTPError):
        hf_hub_download(REPO, "README.md", endpoint=hub_server.url, token=False, cache_dir=tmp_path / "anon")


# Concurrency ------------------------------------------------------------------------------------------------


def test_concurrent_publishes_one_wins_the_other_gets_412(
    hub_server: HubServer, transfer: str, tmp_path: Path
) -> None:
    push(hub_server, make_published_folder(tmp_path / "base"))
    folders = {name: make_published_folder(tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 2))}
    outcomes: dict[str, PushResult | HubError] = {}

    def publish(name: str) -> None:
        try:
            outcomes[name] = push(hub_server, folders[name])
        except HubError as err:
            outcomes[name] = err

    # Both read the same head and upload before either commits: the race the parent commit pin exists for.
    hub_server.hold("commit", parties=2)
    threads = [threading.Thread(target=publish, args=(name,)) for name in folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    [winner] = [name for name, outcome in outcomes.items() if isinstance(outcome, PushResult)]
    [loser] = [name for name, outcome in outcomes.items() if isinstance(outcome, HubError)]
    loss = outcomes[loser]
    assert isinstance(loss, HubError)
    assert_clean_error(loss, "(412)", "rerun")
    assert remote_content(hub_server) == folder_state(folders[winner])

    rerun = push(hub_server, folders[loser])

    assert rerun.verified
    assert remote_content(hub_server) == folder_state(folders[loser])
    assert hub_server.commit_count(REPO) == 4  # initial, base, winner, loser's rerun


# Dry run ---------------------------------------------------------------------------------------------------


def test_dry_run_of_a_new_repo_lists_additions_and_writes_nothing(
    hub_server: HubServer, tmp_path: Path
) -> None:
    folder = make_published_folder(tmp_path / "out")

    result = push(hub_server, folder, dry_run=True)

    assert result.dry_run and result.parent_commit is None and result.commit_oid is None
    assert {op.kind for op in result.operations} == {"add"}
    assert REPO not in hub_server.storage.repos
    assert {r.method for r in hub_server.requests} == {"GET"}
    listing = format_operations(result).splitlines()
    assert listing[0].split() == ["add", "69", "B", "README.md"]
    assert any(line.split()[0] == "add" and line.endswith(UNET_WEIGHT) for line in listing)
    assert listing[-1].startswith("9 operations (9 add): ") and listing[-1].endswith(
        f"to upload to {REPO}@main"
    )


def test_dry_run_of_a_change_lists_it_and_writes_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    first = push(hub_server, folder)
    (folder / "README.md").write_text("changed\n")
    (folder / TEXT_WEIGHT).unlink()
    (folder / "extra.txt").write_text("new\n")
    hub_server.reset_log()

    result = push(hub_server, folder, dry_run=True, revision="not-yet-a-branch")

    assert [(op.kind, op.path) for op in result.operations] == [
        ("modify", "README.md"),
        ("add", "extra.txt"),
        ("delete", TEXT_WEIGHT),
    ]
    assert result.parent_commit == first.commit_oid
    assert writes(hub_server) == [] and "create" not in {r.step for r in hub_server.requests}
    assert hub_server.head(REPO) == first.commit_oid
    assert "not-yet-a-branch" not in hub_server.storage.repos[REPO].branches
    listing = format_operations(result).splitlines()
    assert listing[0].split() == ["modify", "8", "B", "README.md"]
    assert listing[-1] == (
        f"3 operations (1 add, 1 modify, 1 delete): 12 B to upload to {REPO}@not-yet-a-branch"
    )


# Errors: one line, exit code 4, never the token ------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "repo_id", "fragments"),
    [
        (REVOKED_TOKEN, REPO, ("authentication failed", "(401)")),
        (None, REPO, ("not logged in", "(401)", "HF_TOKEN")),
        (READ_TOKEN, REPO, ("no write access", "(403)")),
        (OTHER_USER_TOKEN, REPO, ("no write access", "(403)", f"'{USER}'")),
        (WRITE_TOKEN, "nobody-here/tiny", ("namespace 'nobody-here' not found", "(404)")),
    ],
    ids=["bad-token", "no-token", "read-only-token", "other-namespace", "unknown-namespace"],
)
def test_auth_and_namespace_errors_are_one_clean_line(
    hub_server: HubServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    token: str | None,
    repo_id: str,
    fragments: tuple[str, ...],
) -> None:
    caplog.set_level(logging.DEBUG)
    folder = make_published_folder(tmp_path / "out")
    push(hub_server, folder)  # the repo exists: errors must come from permissions, not from its absence
    head = hub_server.head(REPO)
    (folder / "README.md").write_text("changed\n")

    with pytest.raises(HubError) as info:
        push(hub_server, folder, token=token, repo_id=repo_id)

    assert_clean_error(info.value, *fragments)
    assert hub_server.head(REPO) == head
    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err):
        assert not any(secret in text for secret in SENTINELS)


def test_network_down_is_one_clean_line(hf_isolation: Path, tmp_path: Path) -> None:
    with HubServer(tmp_path / "gone", {WRITE_TOKEN: TokenInfo(USER)}) as server:
        endpoint = server.url
    folder = make_published_folder(tmp_path / "out")

    with pytest.raises(HubError) as info:
        push_folder(folder, REPO, token=WRITE_TOKEN, endpoint=endpoint, progress=False)

    assert_clean_error(info.value, "cannot reach the Hub", endpoint, "network down")


def test_invalid_readme_metadata_is_refused_before_any_upload(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    first = push(hub_server, folder)
    (folder / "README.md").write_text("---\nlicense: [apache-2.0\n---\n# broken\n")
    (folder / UNET_WEIGHT).write_bytes(b"new weights")
    hub_server.reset_log()

    with pytest.raises(HubError) as info:
        push(hub_server, folder)

    assert_clean_error(info.value, "README.md metadata", "invalid YAML")
    assert hub_server.head(REPO) == first.commit_oid
    assert not {"preupload", "commit", "xet_token", "lfs_batch"} & set(writes(hub_server))


# Token sources ---------------------------------------------------------------------------------------------


def test_token_comes_from_hf_token_then_the_stored_login(
    hub_server: HubServer, hf_isolation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_published_folder(tmp_path / "out")
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert push(hub_server, folder, token=None).verified

    monkeypatch.delenv("HF_TOKEN")
    (folder / "README.md").write_text("second\n")
    token_file = Path(constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(WRITE_TOKEN)
    assert push(hub_server, folder, token=None).verified
    assert hub_server.commit_count(REPO) == 3


def test_the_token_is_written_to_no_file(
    hub_server: HubServer, transfer: str, hf_isolation: Path, tmp_path: Path
) -> None:
    folder = make_published_folder(tmp_path / "out")
    result = push(hub_server, folder)
    hf_hub_download(REPO, UNET_WEIGHT, endpoint=hub_server.url, token=WRITE_TOKEN, cache_dir=tmp_path / "dl")

    assert result.verified
    # HF_HOME holds hf_xet's logs and caches; tmp_path the folder, the download cache and the server storage.
    for root in (hf_isolation, tmp_path):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert WRITE_TOKEN.encode() not in path.read_bytes(), path


# The test server itself -------------------------------------------------------------------------------------


def test_server_resolve_answers_head_and_ranges_like_the_hub(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    result = push(hub_server, folder)
    url = f"{hub_server.url}/{REPO}/resolve/main/{UNET_WEIGHT}"
    headers = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    content = (folder / UNET_WEIGHT).read_bytes()

    with httpx2.Client() as client:
        head = client.head(url, headers=headers)
        ranged = client.get(url, headers={**headers, "Range": "bytes=10-19"})
        missing = client.head(f"{hub_server.url}/{REPO}/resolve/main/nope.bin", headers=headers)

    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == result.commit_oid
    assert head.headers["X-Linked-Etag"] == f'"{sha256_of(folder / UNET_WEIGHT)}"'
    assert int(head.headers["X-Linked-Size"]) == len(content)
    assert ranged.status_code == 206 and ranged.content == content[10:20]
    assert ranged.headers["Content-Range"] == f"bytes 10-19/{len(content)}"
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


def test_server_tree_lists_lfs_metadata_at_a_commit(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_published_folder(tmp_path / "out")
    result = push(hub_server, folder)
    api = HfApi(endpoint=hub_server.url, token=WRITE_TOKEN)

    tree = {e.path: e for e in api.list_repo_tree(REPO, revision=result.commit_oid, recursive=True)}
    top = {e.path for e in api.list_repo_tree(REPO, revision=result.commit_oid)}

    weight = tree[UNET_WEIGHT]
    assert isinstance(weight, RepoFile) and weight.lfs is not None
    assert weight.lfs.sha256 == sha256_of(folder / UNET_WEIGHT)
    readme = tree["README.md"]
    assert isinstance(readme, RepoFile) and readme.lfs is None
    assert top == {".gitattributes", "README.md", "merges.txt", "vocab.json", "original"}


def test_server_account_repo_and_listing_endpoints(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub_server.url, token=WRITE_TOKEN)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        (folder / f"file{i:02d}.txt").write_text(f"{i}\n")
    result = push(hub_server, folder)

    assert api.whoami()["name"] == USER
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub_server.url, token="hf_SENTINELnotAtoken").whoami()
    # expand=True pages by 50 on the Hub: 61 entries take two pages, following the Link header.
    assert len(list(api.list_repo_tree(REPO, expand=True))) == 61
    [info] = api.get_paths_info(REPO, ["file07.txt"])
    assert isinstance(info, RepoFile) and info.size == len("7\n")
    assert [c.commit_id for c in api.list_repo_commits(REPO)][0] == result.commit_oid
    api.create_branch(REPO, branch="scratch")
    assert "scratch" in [b.name for b in api.list_repo_refs(REPO).branches]
    api.delete_branch(REPO, branch="scratch")
    assert api.repo_exists(REPO)
    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)
