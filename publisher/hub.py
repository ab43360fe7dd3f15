"""Publish an assembled folder to the Hugging Face Hub in one atomic, verified commit.

`upload_folder` splits large folders into several commits when hf_xet is installed, so a failure can leave a
repo half old, half new. This stage instead builds one `create_commit` holding every addition, modification
and deletion, pinned with `parent_commit` to the head it diffed against: either the whole publish lands or
nothing does, and a concurrent publish to the same revision makes the later one fail cleanly (412) instead
of interleaving. Files whose content the Hub already holds are not sent again; an unchanged folder makes no
commit at all. After the commit, every file's size and content hash on the Hub is checked against the
local file.

The token comes from the `token` argument, `HF_TOKEN` or the stored `hf auth login` (huggingface_hub's own
resolution). It never appears in a message this module writes or raises, and a push refuses, before writing
anything to the Hub, to send a file that contains it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import disable_progress_bars

from publisher.errors import HubError, PublisherError
from publisher.hub_errors import UPLOAD_AND_COMMIT, HubCall, hub_errors, retry_notes

logger = logging.getLogger(__name__)

OperationKind = Literal["add", "modify", "delete"]
HashMethod = Literal["sha256", "git-blob"]
_Hashes = dict[tuple[str, HashMethod], str]  # (path in repo, method) -> hex digest of the local file

# The Hub refuses paths under these folders, and `.cache/huggingface` is where local download state lives.
_SKIPPED_DIRS = frozenset({".git", ".cache"})
# Written by the Hub when it creates a repo: it routes weights to LFS, so a publish never deletes it.
_KEPT_REMOTE_FILES = frozenset({".gitattributes"})
_READ_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class PlannedOperation:
    """One change the publish commit makes to the repo.

    Attributes:
        path (`str`):
            Path in the repo, POSIX separators.
        size (`int`):
            Size in bytes of the local file (`add`, `modify`) or of the remote file being removed (`delete`).
        kind (`str`):
            `"add"` (not on the Hub yet), `"modify"` (on the Hub with other content) or `"delete"` (on the
            Hub, no longer produced).
    """

    path: str
    size: int
    kind: OperationKind


@dataclass(frozen=True)
class FileVerification:
    """The comparison of one file between the local folder and the published revision.

    LFS files are compared by sha256 of their content, regular (small, text) files by their git blob id, the
    sha1 of their content that the Hub reports for them; both are compared together with the size.

    Attributes:
        path (`str`):
            Path in the repo.
        local_size (`int`, *optional*):
            Size of the local file; `None` for a remote file that the folder does not have.
        remote_size (`int`, *optional*):
            Size on the Hub; `None` if the file is missing there.
        method (`str`):
            `"sha256"` or `"git-blob"`.
        local_hash (`str`, *optional*):
            Hash of the local file with `method`.
        remote_hash (`str`, *optional*):
            Hash the Hub reports with `method`.
    """

    path: str
    local_size: int | None
    remote_size: int | None
    method: HashMethod
    local_hash: str | None
    remote_hash: str | None

    @property
    def ok(self) -> bool:
        """Whether the Hub holds exactly the local content at this path."""
        return (
            self.local_size is not None
            and self.local_size == self.remote_size
            and self.local_hash is not None
            and self.local_hash == self.remote_hash
        )


@dataclass
class PushResult:
    """What `push_folder` did (or, with `dry_run`, would do).

    Attributes:
        repo_id (`str`):
            The repo published to.
        revision (`str`):
            The branch written, or the branch a pull request targets.
        operations (`list[PlannedOperation]`):
            Every add, modify and delete in the commit, sorted by path.
        bytes_uploaded (`int`):
            Bytes of new or changed file content handed to the upload (0 when up to date or in a dry run;
            xet deduplication may send fewer over the wire).
        up_to_date (`bool`):
            True when the revision already held exactly the folder's content: no commit was made.
        dry_run (`bool`):
            True when nothing was written.
        parent_commit (`str`, *optional*):
            The head read before uploading, which the commit was pinned to; `None` in a dry run against a
            repo that does not exist yet.
        commit_oid (`str`, *optional*):
            The new commit (or the unchanged head when up to date).
        commit_url (`str`, *optional*):
            Web URL of `commit_oid`.
        pr_url (`str`, *optional*):
            URL of the pull request opened with `create_pr=True`.
        verification (`list[FileVerification]`):
            One entry per published file, plus one per unexpected remote file; empty in a dry run.
    """

    repo_id: str
    revision: str
    operations: list[PlannedOperation]
    bytes_uploaded: int
    up_to_date: bool
    dry_run: bool
    parent_commit: str | None
    commit_oid: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    verification: list[FileVerification] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Whether every published file was found on the Hub with the local size and hash."""
        return bool(self.verification) and all(v.ok for v in self.verification)


@dataclass(frozen=True)
class _LocalFile:
    path: Path
    size: int


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    progress: bool = True,
) -> PushResult:
    """Publish `folder` as the complete content of `repo_id` in a single commit, then verify it.

    The repo is created if needed. Its target revision then holds exactly the folder's files: new and
    changed files are uploaded (LFS/xet for weights, inline for small text files), remote files the folder
    no longer has are deleted (except `.gitattributes`), unchanged files are not sent again. The commit is
    pinned to the head read before uploading, so it fails with a 412 `HubError` if anything else was
    committed meanwhile; rerunning then publishes on top of the new head.

    Before anything is written to the Hub, every file to add or modify is read for the token the push uses:
    whatever put it there (a card template, a recipe comment), such a file is never sent.

    Args:
        folder (`Path`):
            The assembled repo content. `.git/` and `.cache/` folders are skipped.
        repo_id (`str`):
            `"namespace/name"`.
        private (`bool`, *optional*, defaults to `False`):
            Visibility of the repo if this call creates it; an existing repo keeps its visibility.
        revision (`str`, *optional*):
            Branch to write (created from `main` if missing, unless `create_pr`). Defaults to `"main"`.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request against `revision`, which must exist, instead of writing it.
        dry_run (`bool`, *optional*, defaults to `False`):
            Only compute the operations: no repo, branch, upload or commit is created.
        token (`str`, *optional*):
            Hub token. Defaults to `HF_TOKEN`, then the token stored by `hf auth login`.
        endpoint (`str`, *optional*):
            Hub URL. Defaults to `HF_ENDPOINT`, then `https://huggingface.co`.
        commit_message (`str`, *optional*):
            Commit (or pull request) title. Defaults to `"Publish <folder name> with coreml-publisher"`.
        progress (`bool`, *optional*, defaults to `True`):
            Show huggingface_hub's upload progress bars, and log one warning line per retried request (the
            client's own retry messages are never shown).

    Returns:
        [`PushResult`]: the operations, the commit or pull request, and the per-file verification.

    Raises:
        [`~publisher.errors.HubError`]:
            One line, for: a file holding the token, bad or missing token (401), no write access (403),
            unknown namespace, repo or revision (404), a pull request against a missing branch, repo moved
            during the publish (412), README metadata refused, server errors, network down, or a verification
            mismatch after the commit.
        [`~publisher.errors.PublisherError`]:
            If `folder` is not a folder or holds no file.

    Example:
        ```py
        >>> result = push_folder(Path("out/sd15-6bit"), "me/coreml-sd15-6bit", dry_run=True)
        >>> print(format_operations(result))
        add      615.7 MiB  original/packages/Stable_Diffusion_version_sd15_unet.mlpackage/Data/...
        modify     4.1 KiB  README.md
        2 operations (1 add, 1 modify): 615.7 MiB to upload to me/coreml-sd15-6bit@main
        ```
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublisherError(f"{folder}: not a folder")
    local = _scan(folder)
    if not local:
        raise PublisherError(f"{folder}: nothing to publish, the folder holds no file")
    target = revision or "main"
    api = HfApi(endpoint=endpoint, token=token, library_name="coreml-publisher")
    ctx = HubCall(repo_id=repo_id, revision=target, endpoint=api.endpoint, secret=token or get_token())

    with nullcontext() if progress else disable_progress_bars(), retry_notes(show=progress), hub_errors(ctx):
        # Read only, until the files are known to be safe to send: a refused push creates nothing.
        head, remote, on_branch = _read_remote(api, ctx, revision, create_pr=create_pr)
        ctx.step = "compare local and remote files"
        operations, hashes = _plan(local, remote)
        ctx.step = "check the files for the token"
        _refuse_token(local, operations, ctx.secret)
        if not dry_run:
            ctx.step = "create the repo"
            api.create_repo(repo_id, private=private, exist_ok=True)
            if head is None:
                # The new repo holds the Hub's initial commit: plan against it (the files were all scanned).
                head, remote, on_branch = _read_remote(api, ctx, revision, create_pr=create_pr)
                if head is None:
                    raise HubError(f"repository {repo_id} not found on {ctx.endpoint} after creating it, or not"
                                   " visible to this token")
                operations, hashes = _plan(local, remote)
            if not on_branch:
                ctx.step = f"create branch {target}"
                # From the very commit planned against, so the plan and the parent commit stay valid.
                api.create_branch(repo_id, branch=target, revision=head, exist_ok=True)
        result = PushResult(
            repo_id=repo_id,
            revision=target,
            operations=operations,
            bytes_uploaded=0,
            up_to_date=not operations,
            dry_run=dry_run,
            parent_commit=head,
        )
        if dry_run:
            return result
        if not operations:
            result.commit_oid = head
            result.commit_url = f"{api.endpoint}/{repo_id}/commit/{head}"
            result.verification = _verify(local, remote, hashes)
            logger.info("%s@%s is up to date (%s)", repo_id, target, head)
            return result

        additions = [
            _addition(op.path, local[op.path], hashes.get((op.path, "sha256")))
            for op in operations
            if op.kind != "delete"
        ]
        deletions = [
            CommitOperationDelete(op.path, is_folder=False) for op in operations if op.kind == "delete"
        ]
        counts = {kind: sum(op.kind == kind for op in operations) for kind in ("add", "modify", "delete")}
        ctx.step = UPLOAD_AND_COMMIT
        info = api.create_commit(
            repo_id,
            [*additions, *deletions],
            commit_message=commit_message or f"Publish {folder.name} with coreml-publisher",
            commit_description=", ".join(f"{n} {kind}" for kind, n in counts.items() if n),
            revision=target,
            create_pr=create_pr,
            parent_commit=head,
        )
        result.bytes_uploaded = sum(op.size for op in operations if op.kind != "delete")
        result.commit_oid, result.commit_url, result.pr_url = info.oid, info.commit_url, info.pr_url
        logger.info("committed %s to %s@%s (%s)", info.oid, repo_id, target, info.pr_url or "direct")

        ctx.step = "verify the published files"
        for addition in additions:
            if addition.upload_info.is_hashed:
                hashes[(addition.path_in_repo, "sha256")] = addition.upload_info.sha256.hex()
        published = _remote_files(api, repo_id, info.oid)
        result.verification = _verify(local, published, hashes)

    failures = [v for v in result.verification if not v.ok]
    if failures:
        first = failures[0]
        raise HubError(
            f"verification failed after commit {info.oid[:10]} on {repo_id}: {len(failures)} file(s) differ"
            f" on the Hub, first {first.path} (local {first.local_size} bytes, Hub {first.remote_size} bytes,"
            f" {first.method} {'match' if first.local_hash == first.remote_hash else 'mismatch'})"
        )
    return result


def format_operations(result: PushResult) -> str:
    """Render the operations of a [`PushResult`] as the `--dry-run` listing: kind, size, path, and a total.

    Example:
        ```text
        add        1.5 MiB  unet/weights.bin
        delete       120 B  old.txt
        2 operations (1 add, 1 delete): 1.5 MiB to upload to me/model@main
        ```
    """
    where = f"{result.repo_id}@{result.revision}"
    if not result.operations:
        return f"up to date: {where} already holds this content"
    lines = [f"{op.kind:<7} {_human_size(op.size):>10}  {op.path}" for op in result.operations]
    counts = {kind: sum(op.kind == kind for op in result.operations) for kind in ("add", "modify", "delete")}
    detail = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    to_send = sum(op.size for op in result.operations if op.kind != "delete")
    total = _plural(len(result.operations), "operation")
    lines.append(f"{total} ({detail}): {_human_size(to_send)} to upload to {where}")
    return "\n".join(lines)


def format_summary(result: PushResult) -> str:
    """One line about a finished (non dry-run) publish, for the CLI to print."""
    where = f"{result.repo_id}@{result.revision}"
    checked = f"{sum(v.ok for v in result.verification)}/{len(result.verification)} files verified"
    if result.up_to_date:
        return f"up to date: {where} already holds this content ({checked}, {result.commit_oid})"
    target = result.pr_url or result.commit_url
    return (
        f"published {_plural(len(result.operations), 'operation')},"
        f" {_human_size(result.bytes_uploaded)} uploaded, {checked}: {target}"
    )


def read_published_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> bytes | None:
    """Download one file of a published revision and return its content.

    Args:
        repo_id (`str`):
            `"namespace/name"`.
        filename (`str`):
            Path of the file in the repo.
        revision (`str`, *optional*):
            Branch, tag or commit. Defaults to `"main"`.
        token (`str`, *optional*):
            Hub token. Defaults to `HF_TOKEN`, then the token stored by `hf auth login`.
        endpoint (`str`, *optional*):
            Hub URL. Defaults to `HF_ENDPOINT`, then `https://huggingface.co`.
        progress (`bool`, *optional*, defaults to `True`):
            As for [`push_folder`]: the download's progress bar, and one line per retried request.

    Returns:
        `bytes` or `None`: the file's content, or `None` when the repo (or this token's access to it), the
        revision or the file does not exist: nothing was published there yet.

    Raises:
        [`~publisher.errors.HubError`]:
            One line, for a rejected token, server errors or the network down.
    """
    api = HfApi(endpoint=endpoint, token=token, library_name="coreml-publisher")
    ctx = HubCall(repo_id=repo_id, revision=revision or "main", endpoint=api.endpoint, secret=token or get_token(),
                  step=f"read the published {filename}")
    # A scratch folder rather than the user's Hub cache: the file is read once, right now.
    with (
        nullcontext() if progress else disable_progress_bars(),
        retry_notes(show=progress),
        hub_errors(ctx),
        tempfile.TemporaryDirectory(prefix="coreml-publisher-") as scratch,
    ):
        try:
            path = api.hf_hub_download(repo_id, filename, revision=revision, local_dir=scratch)
        except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError):
            return None
        return Path(path).read_bytes()


def _scan(folder: Path) -> dict[str, _LocalFile]:
    files: dict[str, _LocalFile] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            files[path.relative_to(folder).as_posix()] = _LocalFile(path, path.stat().st_size)
    return files


def _read_remote(
    api: HfApi, ctx: HubCall, revision: str | None, *, create_pr: bool
) -> tuple[str | None, dict[str, RepoFile], bool]:
    """The head of the target revision and its files, listed at that commit so both come from one state, and
    whether the branch exists. A missing branch reads as `main`, which it will be created from; a missing repo
    as no head and no file. Nothing is written.

    Raises:
        [`~publisher.errors.HubError`]:
            If `create_pr` and `revision` does not exist: a pull request needs a branch to target, and
            creating one is not what was asked.
    """
    ctx.step = "read the current head"
    repo_exists = on_branch = True
    try:
        head = api.model_info(ctx.repo_id, revision=ctx.revision).sha
    except RevisionNotFoundError:
        if revision is None:
            raise
        on_branch = False
    except RepositoryNotFoundError:
        repo_exists = on_branch = False
    if create_pr and revision is not None and not on_branch:
        raise HubError(
            f"branch '{revision}' does not exist in {ctx.repo_id}: --create-pr opens a pull request against an"
            " existing branch; create the branch first, or leave out --create-pr to create it with the push"
        )
    if not repo_exists:
        return None, {}, False
    if not on_branch:
        head = api.model_info(ctx.repo_id).sha  # the branch will be created from main's head
    if head is None:
        raise HubError(f"the Hub at {ctx.endpoint} returned no head commit for {ctx.repo_id}@{ctx.revision}")
    return head, _remote_files(api, ctx.repo_id, head), on_branch


def _remote_files(api: HfApi, repo_id: str, commit: str) -> dict[str, RepoFile]:
    entries = api.list_repo_tree(repo_id, revision=commit, recursive=True)
    return {entry.path: entry for entry in entries if isinstance(entry, RepoFile)}


def _plan(
    local: dict[str, _LocalFile], remote: dict[str, RepoFile]
) -> tuple[list[PlannedOperation], _Hashes]:
    """The operations turning `remote` into `local`, and the local hashes computed on the way.

    Only files whose size matches their remote counterpart are hashed: a different size is already a
    change, and new files are hashed by the upload itself (hf_xet computes sha256 while chunking).
    """
    same_size = [path for path, file in local.items() if path in remote and remote[path].size == file.size]
    hashes = _hash_files({(path, _hash_method(remote[path])): local[path].path for path in same_size})
    operations = []
    for path, file in local.items():
        if path not in remote:
            operations.append(PlannedOperation(path, file.size, "add"))
        elif hashes.get((path, _hash_method(remote[path]))) != _remote_hash(remote[path]):
            operations.append(PlannedOperation(path, file.size, "modify"))
    for path, entry in remote.items():
        if path not in local and path not in _KEPT_REMOTE_FILES:
            operations.append(PlannedOperation(path, entry.size, "delete"))
    operations.sort(key=lambda op: op.path)
    return operations, hashes


def _verify(
    local: dict[str, _LocalFile], remote: dict[str, RepoFile], hashes: _Hashes
) -> list[FileVerification]:
    """Compare every local file with the remote listing; remote-only files (bar `.gitattributes`) fail."""
    methods: dict[str, HashMethod] = {
        path: _hash_method(remote[path]) if path in remote else "sha256" for path in local
    }
    missing = {
        (path, method): local[path].path for path, method in methods.items() if (path, method) not in hashes
    }
    hashes = {**hashes, **_hash_files(missing)}
    checks = []
    for path, file in local.items():
        entry = remote.get(path)
        checks.append(
            FileVerification(
                path=path,
                local_size=file.size,
                remote_size=entry.size if entry is not None else None,
                method=methods[path],
                local_hash=hashes[(path, methods[path])],
                remote_hash=_remote_hash(entry) if entry is not None else None,
            )
        )
    for path, entry in remote.items():
        if path not in local and path not in _KEPT_REMOTE_FILES:
            checks.append(
                FileVerification(path, None, entry.size, _hash_method(entry), None, _remote_hash(entry))
            )
    return sorted(checks, key=lambda c: c.path)


def _refuse_token(local: dict[str, _LocalFile], operations: list[PlannedOperation], token: str | None) -> None:
    """Raise if a file the commit would send, or its path, holds `token`.

    Files the revision already holds byte for byte are not read: this commit does not send them.
    """
    if not token:
        return
    needle = token.encode()
    found = [
        op.path
        for op in operations
        if op.kind != "delete" and (token in op.path or _contains(local[op.path].path, needle))
    ]
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise HubError(
            f"refusing to publish: {shown} contain{'s' if len(found) == 1 else ''} the Hub token this push uses"
            " (rendered from the environment by a card template, or pasted into the recipe or a file?); remove"
            " it, revoke the token if it was ever shared, and publish again; nothing was sent to the Hub"
        )


def _contains(path: Path, needle: bytes) -> bool:
    """Whether the file holds `needle`, read in chunks however large it is."""
    carry = len(needle) - 1
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            window = tail + chunk
            if needle in window:
                return True
            # The last len(needle) - 1 bytes go on to the next window: a needle cut by the chunk boundary is
            # whole there, and one that ends in this window was already found.
            tail = window[len(window) - carry :]
    return False


def _hash_method(entry: RepoFile) -> HashMethod:
    return "sha256" if entry.lfs is not None else "git-blob"


def _remote_hash(entry: RepoFile) -> str:
    return entry.lfs.sha256 if entry.lfs is not None else entry.blob_id


def _hash_files(files: dict[tuple[str, HashMethod], Path]) -> _Hashes:
    """Hash files in parallel: hashlib releases the GIL, so a multi-GB re-publish uses every core."""
    if not files:
        return {}
    workers = min(len(files), os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="publisher-hash") as pool:
        digests = pool.map(lambda key: _hash_file(files[key], key[1]), files)
        return dict(zip(files, digests, strict=True))


def _hash_file(path: Path, method: HashMethod) -> str:
    if method == "sha256":
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _addition(path: str, file: _LocalFile, sha256: str | None) -> CommitOperationAdd:
    addition = CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(file.path))
    if sha256 is not None:
        # Already hashed while planning: spare the upload a second read of the file.
        addition.upload_info.sha256 = bytes.fromhex(sha256)
    return addition


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
