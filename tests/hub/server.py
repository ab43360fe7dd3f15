"""A loopback server that speaks the part of the Hugging Face Hub HTTP protocol huggingface_hub 2.x uses to
create repos, upload files (LFS and xet), commit, branch, open pull requests and download.

Tests point the real client at it (`HfApi(endpoint=server.url)`); nothing in huggingface_hub is mocked.
Storage is content-addressed on disk (LFS objects by sha256, regular blobs by git blob id, xet content in a
`local://` CAS written by hf_xet itself) and every commit is an immutable snapshot file, so a test can assert
that a repo is exactly in its old or its new state after a fault.

Faults are injected per protocol step (`server.inject("commit", 500)`), see `Fault` for the actions.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import secrets
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

import hf_xet
import yaml

# The .gitattributes the Hub writes into every new model repo (abridged to the rules that matter here).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy"
        " *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/*"
        " *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
    ).split()
)
# The Hub routes files of 10 MB and more through LFS whatever .gitattributes says.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
TREE_PAGE_SIZE = 1000
_READ_CHUNK = 1 << 20
_XET_BOOKEND = b"\xff" * 32
_XET_FLAG_VERIFICATION = 1 << 31
_XET_FLAG_METADATA_EXT = 1 << 30
_MDB_RECORD = 48

Role = Literal["read", "write"]
FaultAction = int | Literal["reset", "drop_response", "corrupt", "die"]
STEPS = tuple(
    "whoami create delete validate_yaml model_info tree paths_info commits refs branch discussions preupload"
    " lfs_batch lfs_put lfs_complete lfs_verify xet_token commit resolve".split()
)


@dataclass(frozen=True)
class TokenInfo:
    """What a bearer token grants: the user it belongs to, its role and the organizations it can act for."""

    user: str
    role: Role = "write"
    orgs: tuple[str, ...] = ()


@dataclass
class Fault:
    """One injected failure of a protocol step, consumed by the next `times` requests to that step.

    `action` is an HTTP status to answer instead of doing the work (412 and 401 carry the Hub's own
    messages), `"reset"` (read half of the request body, then reset the TCP connection), `"drop_response"`
    (do the work, then reset the connection instead of answering: the client cannot know it succeeded) or
    `"corrupt"` (commit only: record a wrong size and sha256 for the first LFS file, as a storage bug would) or
    `"die"` (read half of the request body, then stop the whole server as a crashed Hub process would: every
    open connection is reset and new ones are refused until the test ends).
    """

    step: str
    action: FaultAction
    times: int = 1


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it, for assertions about what the client sent."""

    method: str
    step: str
    path: str
    status: int
    bytes_in: int


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    file_range: tuple[int, int] | None = None
    head_length: int | None = None  # Content-Length announced to a HEAD request


class RouteError(Exception):
    """Raised inside a route to answer with an error status the Hub's way (JSON body, X-Error-* headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


@dataclass
class _Repo:
    repo_id: str
    private: bool
    branches: dict[str, str]
    commits: set[str]
    discussions: dict[int, dict[str, Any]] = field(default_factory=dict)
    created_at: str = ""


@dataclass
class _Upload:
    oid: str
    size: int
    chunk_size: int | None
    parts: dict[int, str] = field(default_factory=dict)


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as `oid`/`blobId` for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _xet_hex(raw: bytes) -> str:
    # xet-core stores a 256-bit hash as four little-endian u64 words and prints each word as big-endian hex.
    return "".join(raw[i : i + 8][::-1].hex() for i in range(0, 32, 8))


def parse_xet_shard(data: bytes) -> dict[str, tuple[str, int]]:
    """Map sha256 -> (xet file hash, size) from the file-info section of an MDB shard written by hf_xet."""
    found: dict[str, tuple[str, int]] = {}
    offset = _MDB_RECORD  # shard header
    while offset + _MDB_RECORD <= len(data):
        file_hash = data[offset : offset + 32]
        if file_hash == _XET_BOOKEND:
            break
        flags, entries = struct.unpack_from("<II", data, offset + 32)
        offset += _MDB_RECORD
        size = sum(struct.unpack_from("<I", data, offset + i * _MDB_RECORD + 36)[0] for i in range(entries))
        offset += entries * _MDB_RECORD
        if flags & _XET_FLAG_VERIFICATION:
            offset += entries * _MDB_RECORD
        if flags & _XET_FLAG_METADATA_EXT:
            found[_xet_hex(data[offset : offset + 32])] = (_xet_hex(file_hash), size)
            offset += _MDB_RECORD
    return found


def _gitattributes_lfs_patterns(content: str) -> list[str]:
    patterns = []
    for line in content.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches(pattern: str, path: str) -> bool:
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern.replace("**/", "*").lstrip("/"))


class HubStorage:
    """Repos, refs, immutable commit snapshots and content-addressed blobs under one directory."""

    def __init__(self, root: Path):
        self.root = root
        self.cas_dir = root / "cas"
        for sub in ("lfs", "git", "commits", "uploads", "cas"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[str, _Repo] = {}
        self.uploads: dict[str, _Upload] = {}
        self._xet_index: dict[str, tuple[str, int]] = {}
        self._xet_scanned: set[Path] = set()
        self._commit_cache: dict[str, dict[str, Any]] = {}
        self._xet_session: Any = None
        self._counter = 0

    # Content-addressed blobs ------------------------------------------------------------------------------

    def lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256[:2] / sha256

    def git_path(self, oid: str) -> Path:
        return self.root / "git" / oid[:2] / oid

    def has_lfs(self, sha256: str, size: int) -> bool:
        path = self.lfs_path(sha256)
        return path.is_file() and path.stat().st_size == size

    def put_lfs(self, tmp: Path, sha256: str) -> None:
        target = self.lfs_path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)

    def put_git_blob(self, data: bytes) -> str:
        oid = git_blob_id(data)
        target = self.git_path(oid)
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            tmp = target.with_suffix(f".{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return oid

    def xet_lookup(self, sha256: str) -> tuple[str, int] | None:
        """The xet file hash and size hf_xet recorded for `sha256`, scanning any shard not seen yet."""
        with self.lock:
            if sha256 not in self._xet_index:
                for shard in sorted(self.cas_dir.rglob("shards/*.mdb")):
                    if shard not in self._xet_scanned:
                        self._xet_index.update(parse_xet_shard(shard.read_bytes()))
                        self._xet_scanned.add(shard)
            return self._xet_index.get(sha256)

    def materialize_xet(self, sha256: str, xet_hash: str, size: int) -> Path:
        """Rebuild the bytes of a file uploaded through xet, so plain HTTP clients can download it too."""
        target = self.lfs_path(sha256)
        if target.exists():
            return target
        with self.lock:
            if self._xet_session is None:
                self._xet_session = hf_xet.XetSession()
            session = self._xet_session
        tmp = self.root / "uploads" / f"xet-{secrets.token_hex(8)}"
        with session.new_file_download_group(
            endpoint=self.cas_url, token="local", token_expiry_unix_secs=int(time.time()) + 3600
        ) as group:
            group.start_download_file(hf_xet.XetFileInfo(xet_hash, size), str(tmp))
        digest = hashlib.sha256()
        with tmp.open("rb") as f:
            while chunk := f.read(_READ_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            tmp.unlink()
            raise RouteError(500, f"xet content of {sha256} does not match its sha256")
        self.put_lfs(tmp, sha256)
        return target

    @property
    def cas_url(self) -> str:
        return f"local://{self.cas_dir.resolve()}"

    # Commits ----------------------------------------------------------------------------------------------

    def commit(self, oid: str) -> dict[str, Any]:
        with self.lock:
            if oid not in self._commit_cache:
                self._commit_cache[oid] = json.loads((self.root / "commits" / f"{oid}.json").read_text())
            return self._commit_cache[oid]

    def write_commit(
        self, repo: _Repo, parents: list[str], files: dict[str, dict[str, Any]], title: str, message: str
    ) -> str:
        with self.lock:
            self._counter += 1
            snapshot = {
                "parents": parents,
                "files": dict(sorted(files.items())),
                "title": title,
                "message": message,
                "date": _now(),
                "repo": repo.repo_id,
                "seq": self._counter,
            }
            payload = json.dumps(snapshot, sort_keys=True).encode()
            oid = hashlib.sha1(payload).hexdigest()
            snapshot["id"] = oid
            path = self.root / "commits" / f"{oid}.json"
            # Snapshots are immutable: "x" refuses to overwrite, and the file is made read-only.
            with path.open("x") as f:
                json.dump(snapshot, f, sort_keys=True)
            path.chmod(0o444)
            self._commit_cache[oid] = snapshot
            repo.commits.add(oid)
            return oid

    def history(self, oid: str) -> Iterator[dict[str, Any]]:
        while True:
            commit = self.commit(oid)
            yield commit
            if not commit["parents"]:
                return
            oid = commit["parents"][0]

    def resolve_revision(self, repo: _Repo, revision: str) -> str:
        with self.lock:
            name = revision.removeprefix("refs/heads/")
            if name in repo.branches:
                return repo.branches[name]
            pr = re.fullmatch(r"refs/pr/(\d+)", revision)
            if (
                pr
                and int(pr.group(1)) in repo.discussions
                and repo.discussions[int(pr.group(1))]["isPullRequest"]
            ):
                return repo.discussions[int(pr.group(1))]["head"]
            if re.fullmatch(r"[0-9a-f]{7,40}", revision):
                matches = [oid for oid in repo.commits if oid.startswith(revision)]
                if len(matches) == 1:
                    return matches[0]
        raise RouteError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def regular_entry(self, data: bytes) -> dict[str, Any]:
        return {"size": len(data), "oid": self.put_git_blob(data), "lfs": None, "xetHash": None}

    def lfs_entry(self, sha256: str, size: int) -> dict[str, Any]:
        """The tree entry of an LFS file, refused unless its content was uploaded (LFS) or chunked (xet)."""
        pointer = lfs_pointer(sha256, size)
        xet = None
        if not self.has_lfs(sha256, size):
            xet = self.xet_lookup(sha256)
            if xet is None or xet[1] != size:
                raise RouteError(
                    422,
                    f"Your push was rejected because an LFS pointer points to a missing file: {sha256}",
                )
        return {
            "size": size,
            "oid": git_blob_id(pointer),
            "lfs": {"sha256": sha256, "size": size, "pointerSize": len(pointer)},
            "xetHash": xet[0] if xet else None,
        }

    def create_repo(self, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_id=repo_id, private=private, branches={}, commits=set(), created_at=_now())
        files = {".gitattributes": self.regular_entry(DEFAULT_GITATTRIBUTES.encode())}
        repo.branches["main"] = self.write_commit(repo, [], files, "initial commit", "")
        self.repos[repo_id] = repo
        return repo

    def read_file(self, entry: dict[str, Any]) -> bytes:
        if entry["lfs"] is None:
            return self.git_path(entry["oid"]).read_bytes()
        return self.lfs_path(entry["lfs"]["sha256"]).read_bytes()


class HubServer:
    """A Hub-compatible HTTP server on 127.0.0.1, with token auth and fault injection.

    Args:
        root (`Path`):
            Directory for the content-addressed storage, commit snapshots and the xet CAS.
        tokens (`dict[str, TokenInfo]`):
            Valid bearer tokens. Any other token is answered 401 "Invalid credentials".
        multipart_threshold (`int`, *optional*):
            LFS objects larger than this are uploaded with the multipart transfer, in parts of
            `multipart_chunk_size` bytes.
        namespaces (`tuple[str, ...]`, *optional*):
            Extra namespaces that exist (users and organizations of `tokens` always do).

    Use as a context manager, or call `start()` and `stop()`; `stop()` closes kept-alive connections and
    joins every handler thread.
    """

    def __init__(
        self,
        root: Path,
        tokens: dict[str, TokenInfo],
        *,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunk_size: int = 16 * 1024 * 1024,
        namespaces: tuple[str, ...] = (),
    ):
        self.tokens = dict(tokens)
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.namespaces = {t.user for t in tokens.values()} | {o for t in tokens.values() for o in t.orgs}
        self.namespaces |= set(namespaces)
        self.storage = HubStorage(root)
        self.requests: list[RequestRecord] = []
        self.errors: list[str] = []
        self._faults: list[Fault] = []
        self._holds: dict[str, tuple[threading.Barrier, list[int]]] = {}  # step -> (barrier, [requests left])
        self._control = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # Lifecycle --------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        with self._control:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            for barrier, _ in self._holds.values():
                barrier.abort()
        self._httpd.server_close()  # joins the handler threads
        assert self._thread is not None
        self._thread.join()
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Test controls ----------------------------------------------------------------------------------------

    def inject(self, step: str, action: FaultAction, *, times: int = 1) -> None:
        """Make the next `times` requests to `step` fail with `action` (see `Fault`)."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; one of {STEPS}")
        with self._control:
            self._faults.append(Fault(step, action, times))

    def pending_faults(self) -> list[Fault]:
        with self._control:
            return [f for f in self._faults if f.times > 0]

    def hold(self, step: str, parties: int) -> None:
        """Hold the next `parties` requests to `step` until all of them arrived, then let them all through."""
        with self._control:
            self._holds[step] = (threading.Barrier(parties, timeout=30), [parties])

    def requests_for(self, step: str) -> list[RequestRecord]:
        with self._control:
            return [r for r in self.requests if r.step == step]

    def reset_log(self) -> None:
        with self._control:
            self.requests.clear()

    def head(self, repo_id: str, revision: str = "main") -> str:
        repo = self.storage.repos[repo_id]
        return self.storage.resolve_revision(repo, revision)

    def snapshot(self, repo_id: str, revision: str = "main") -> dict[str, tuple[int, str]]:
        """Path -> (size, sha256 of the content) of a revision, read from the server's own storage."""
        commit = self.storage.commit(self.head(repo_id, revision))
        out = {}
        for path, entry in commit["files"].items():
            if entry["lfs"] is not None:
                out[path] = (entry["size"], entry["lfs"]["sha256"])
            else:
                out[path] = (entry["size"], hashlib.sha256(self.storage.read_file(entry)).hexdigest())
        return out

    def commit_count(self, repo_id: str, revision: str = "main") -> int:
        return sum(1 for _ in self.storage.history(self.head(repo_id, revision)))

    # Internals used by the handler ------------------------------------------------------------------------

    def _die(self) -> None:
        """Stop accepting (connections are refused, not left pending) and reset every other open connection."""
        assert self._httpd is not None
        self._httpd.shutdown()  # called from a handler thread: serve_forever runs in its own thread
        self._httpd.socket.close()
        with self._control:
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.shutdown(socket.SHUT_RDWR)

    def _take_fault(self, step: str) -> Fault | None:
        with self._control:
            for fault in self._faults:
                if fault.step == step and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    def _barrier(self, step: str) -> threading.Barrier | None:
        with self._control:
            if step not in self._holds:
                return None
            barrier, left = self._holds[step]
            left[0] -= 1
            if left[0] == 0:
                del self._holds[step]
            return barrier

    def _record(self, record: RequestRecord) -> None:
        with self._control:
            self.requests.append(record)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() must join handler threads: no thread outlives a test
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: HubServer):
        self.hub = hub
        super().__init__(address, handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.hub._control:
            self.hub._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.hub._control:
                self.hub._connections.discard(request)


class _ConnectionReset(Exception):
    """Abort the request by resetting the TCP connection (no response at all)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every request body must then be drained
    server: _Server
    timeout = 60

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes: without NODELAY, Nagle and delayed ACKs add 40 ms each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # HTTP verbs -------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # Plumbing ---------------------------------------------------------------------------------------------

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    @property
    def storage(self) -> HubStorage:
        return self.server.hub.storage

    def _dispatch(self, method: str) -> None:
        self._body_read = 0
        self._remaining = int(self.headers.get("Content-Length") or 0)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # huggingface_hub always sends Content-Length; without it the body could not be drained exactly.
            self.close_connection = True
            self._send(_Response(411, b'{"error": "Content-Length required"}'), method == "HEAD")
            return
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        # Revisions and file paths arrive URL-quoted (refs%2Fpr%2F1): split the raw path before unquoting.
        self.segments = [s for s in split.path.split("/") if s != ""]
        route, step = self._route(method)
        self._fault = self.hub._take_fault(step) if step else None
        # Each outcome is recorded before the client can see it, so a test reading the log right after a
        # client call returns finds every request of that call.
        try:
            response = self._handle(step, route)
        except _ConnectionReset:
            self._record(method, step, 0)
            self._reset()
            return
        except (ConnectionError, TimeoutError):
            self._record(method, step, 0)
            self.close_connection = True
            return
        except Exception:
            # A bug in this server, not a protocol answer: keep it for the test fixture to report.
            self.hub.errors.append(traceback.format_exc())
            self.close_connection = True
            response = self._error_response(RouteError(500, "test server bug"))
        self._record(method, step, response.status)
        with contextlib.suppress(ConnectionError):
            self._send(response, method == "HEAD")

    def _record(self, method: str, step: str, status: int) -> None:
        self.hub._record(RequestRecord(method, step, self.path, status, self._body_read))

    def _handle(self, step: str, route: Callable[[], _Response]) -> _Response:
        fault = self._fault
        try:
            barrier = self.hub._barrier(step) if step else None
            if barrier is not None:
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait()
            if fault is not None and fault.action in ("reset", "die"):
                for _ in self._iter_body(max(1, self._content_length() // 2)):
                    pass
                if fault.action == "die":
                    self.hub._die()
                raise _ConnectionReset
            if fault is not None and isinstance(fault.action, int):
                raise self._fault_error(fault.action)
            response = route()
            self._drain()
            if fault is not None and fault.action == "drop_response":
                raise _ConnectionReset
        except RouteError as err:
            self._drain()
            response = self._error_response(err)
        return response

    def _fault_error(self, status: int) -> RouteError:
        if status == 401:
            return RouteError(401, "Invalid credentials in Authorization header")
        if status == 412:
            return RouteError(412, "A commit has happened since. Please refresh and try again.")
        # Retry-After: 0 makes the client retry an injected 5xx after a second instead of its full backoff.
        headers = {"Retry-After": "0"} if status >= 500 else {}
        return RouteError(status, f"Injected failure ({status})", headers=headers)

    def _error_response(self, err: RouteError) -> _Response:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        return _Response(err.status, json.dumps({"error": err.message, **err.extra}).encode(), headers)

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send an RST: the client sees "connection reset", like a dropped link.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = True

    def _send(self, response: _Response, head_only: bool) -> None:
        body = response.body
        headers = {"Content-Type": "application/json", **response.headers}
        start = end = 0
        if head_only and response.head_length is not None:
            length = response.head_length
        elif response.file is not None:
            start, end = response.file_range or (0, response.file.stat().st_size)
            length = end - start
        else:
            length = len(body)
        self.send_response(response.status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head_only:
            return
        if response.file is None:
            self.wfile.write(body)
            return
        with response.file.open("rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(_READ_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def _content_length(self) -> int:
        return int(self.headers.get("Content-Length") or 0)

    def _iter_body(self, limit: int | None) -> Iterator[bytes]:
        """Stream the request body, up to `limit` bytes."""
        budget = limit if limit is not None else float("inf")
        while self._remaining > 0 and budget > 0:
            data = self.rfile.read(int(min(self._remaining, _READ_CHUNK, budget)))
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            self._remaining -= len(data)
            self._body_read += len(data)
            budget -= len(data)
            yield data

    def _drain(self) -> None:
        for _ in self._iter_body(None):
            pass

    def _body(self) -> bytes:
        return b"".join(self._iter_body(None))

    def _json(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as err:
            raise RouteError(400, f"invalid JSON body: {err}") from err

    def _ok(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
        return _Response(status, json.dumps(payload).encode(), headers or {})

    # Routing ----------------------------------------------------------------------------------------------

    def _route(self, method: str) -> tuple[Callable[[], _Response], str]:
        s = self.segments
        n = len(s)
        if n >= 1 and s[0] == "api":
            if method == "GET" and s[1:] == ["whoami-v2"]:
                return self._whoami, "whoami"
            if method == "POST" and s[1:] == ["repos", "create"]:
                return self._create_repo, "create"
            if method == "DELETE" and s[1:] == ["repos", "delete"]:
                return self._delete_repo, "delete"
            if method == "POST" and s[1:] == ["validate-yaml"]:
                return self._validate_yaml, "validate_yaml"
            if n >= 4 and s[1] == "models":
                self.repo_id = f"{unquote(s[2])}/{unquote(s[3])}"
                rest = s[4:]
                action = rest[0] if rest else ""
                rev = unquote(rest[1]) if len(rest) > 1 else None
                tail = unquote("/".join(rest[2:]))
                table: dict[tuple[str, str], tuple[Callable[[], _Response], str]] = {
                    ("GET", ""): (lambda: self._model_info("main"), "model_info"),
                    ("GET", "revision"): (lambda: self._model_info(rev or "main"), "model_info"),
                    ("GET", "tree"): (lambda: self._tree(rev or "main", tail), "tree"),
                    ("POST", "paths-info"): (lambda: self._paths_info(rev or "main"), "paths_info"),
                    ("GET", "commits"): (lambda: self._list_commits(rev or "main"), "commits"),
                    ("GET", "refs"): (self._refs, "refs"),
                    ("POST", "branch"): (lambda: self._create_branch(rev or ""), "branch"),
                    ("DELETE", "branch"): (lambda: self._delete_branch(rev or ""), "branch"),
                    ("GET", "discussions"): (lambda: self._discussions(rev), "discussions"),
                    ("POST", "preupload"): (lambda: self._preupload(rev or "main"), "preupload"),
                    ("GET", "xet-write-token"): (lambda: self._xet_token(rev, "write"), "xet_token"),
                    ("GET", "xet-read-token"): (lambda: self._xet_token(rev, "read"), "xet_token"),
                    ("POST", "commit"): (lambda: self._commit(rev or "main"), "commit"),
                }
                if (method, action) in table:
                    return table[(method, action)]
        elif n >= 2 and s[0] == "_lfs":
            ticket = s[1]
            if method == "PUT" and n == 2:
                return (lambda: self._lfs_put(ticket, None)), "lfs_put"
            if method == "PUT" and n == 4 and s[2] == "part":
                return (lambda: self._lfs_put(ticket, int(s[3]))), "lfs_put"
            if method == "POST" and n == 3 and s[2] == "complete":
                return (lambda: self._lfs_complete(ticket)), "lfs_complete"
        elif n == 6 and s[2:5] == ["info", "lfs", "objects"] and s[1].endswith(".git") and method == "POST":
            self.repo_id = f"{unquote(s[0])}/{unquote(s[1][: -len('.git')])}"
            if s[5] == "batch":
                return self._lfs_batch, "lfs_batch"
            if s[5] == "verify":
                return self._lfs_verify, "lfs_verify"
        elif n >= 5 and s[2] == "resolve" and method in ("GET", "HEAD"):
            self.repo_id = f"{unquote(s[0])}/{unquote(s[1])}"
            rev, path = unquote(s[3]), unquote("/".join(s[4:]))
            return (lambda: self._resolve(rev, path)), "resolve"
        return self._not_found, ""

    def _not_found(self) -> _Response:
        raise RouteError(404, f"Not found: {self.command} {self.path}")

    # Auth -------------------------------------------------------------------------------------------------

    def _token(self) -> TokenInfo | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        info = self.hub.tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            raise RouteError(401, "Invalid credentials in Authorization header")
        return info

    def _can_act_for(self, token: TokenInfo, namespace: str) -> bool:
        return namespace == token.user or namespace in token.orgs

    def _repo(self, *, write: bool = False) -> _Repo:
        token = self._token()
        repo = self.storage.repos.get(self.repo_id)
        namespace = self.repo_id.split("/")[0]
        visible = repo is not None and (
            not repo.private or (token is not None and self._can_act_for(token, namespace))
        )
        if not visible:
            if token is None:
                raise RouteError(401, "Repository not found", code="RepoNotFound")
            raise RouteError(404, "Repository not found", code="RepoNotFound")
        assert repo is not None
        if write:
            if token is None:
                raise RouteError(401, "You must be authenticated to write to this repository")
            if token.role != "write" or not self._can_act_for(token, namespace):
                raise RouteError(403, f"You don't have the rights to write to {self.repo_id}")
        return repo

    # Account and repos ------------------------------------------------------------------------------------

    def _whoami(self) -> _Response:
        token = self._token()
        if token is None:
            raise RouteError(401, "Invalid credentials in Authorization header")
        return self._ok(
            {
                "type": "user",
                "name": token.user,
                "orgs": [{"name": org, "type": "org"} for org in token.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": token.role}},
            }
        )

    def _create_repo(self) -> _Response:
        payload = self._json()
        token = self._token()
        if token is None:
            raise RouteError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") != "model":
            raise RouteError(400, "this test server only hosts model repos")
        namespace = payload.get("organization") or token.user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace not in self.hub.namespaces:
            raise RouteError(404, f"Namespace {namespace} does not exist")
        if token.role != "write" or not self._can_act_for(token, namespace):
            raise RouteError(
                403, f"You don't have the rights to create a model under the namespace {namespace}"
            )
        url = f"{self.hub.url}/{repo_id}"
        with self.storage.lock:
            if repo_id in self.storage.repos:
                raise RouteError(409, "You already created this model repo", extra={"url": url})
            self.storage.create_repo(repo_id, payload.get("visibility") == "private")
        return self._ok({"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _delete_repo(self) -> _Response:
        payload = self._json()
        token = self._token()
        namespace = payload.get("organization") or (token.user if token else "")
        self.repo_id = f"{namespace}/{payload['name']}"
        self._repo(write=True)
        with self.storage.lock:
            del self.storage.repos[self.repo_id]
        return self._ok({})

    def _validate_yaml(self) -> _Response:
        content = self._json().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML: {str(err).splitlines()[0]}"})
        return self._ok({"errors": errors, "warnings": []}, status=400 if errors else 200)

    # Read API ---------------------------------------------------------------------------------------------

    def _model_info(self, revision: str) -> _Response:
        repo = self._repo()
        oid = self.storage.resolve_revision(repo, revision)
        commit = self.storage.commit(oid)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in commit["files"].items():
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"] is not None:
                    sibling["lfs"] = dict(entry["lfs"])
            siblings.append(sibling)
        return self._ok(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": oid,
                "lastModified": commit["date"],
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree_entry(self, path: str, entry: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"] is not None:
            lfs = entry["lfs"]
            out["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
        if entry["xetHash"]:
            out["xetHash"] = entry["xetHash"]
        return out

    def _listing(self, files: dict[str, dict[str, Any]], base: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{base}/" if base else ""
        out: dict[str, dict[str, Any]] = {}
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :]
            if recursive or "/" not in rel:
                out[path] = self._tree_entry(path, entry)
            folders = rel.split("/")[:-1]
            for depth in range(1, (len(folders) if recursive else min(1, len(folders))) + 1):
                folder = prefix + "/".join(folders[:depth])
                children = sorted(p for p in files if p.startswith(folder + "/"))
                tree_oid = hashlib.sha1("\n".join(files[c]["oid"] + c for c in children).encode()).hexdigest()
                out.setdefault(folder, {"type": "directory", "oid": tree_oid, "size": 0, "path": folder})
        return [out[k] for k in sorted(out)]

    def _tree(self, revision: str, path: str) -> _Response:
        repo = self._repo()
        commit = self.storage.commit(self.storage.resolve_revision(repo, revision))
        files = commit["files"]
        if path and not any(p.startswith(path + "/") for p in files):
            raise RouteError(404, f"{path} does not exist on {revision}", code="EntryNotFound")
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        entries = self._listing(files, path, recursive)
        page = (
            TREE_PAGE_SIZE // 20 if self.query.get("expand", "").lower() in ("1", "true") else TREE_PAGE_SIZE
        )
        start = int(self.query.get("cursor", "0"))
        headers = {}
        if start + page < len(entries):
            params = "&".join(
                f"{k}={quote(v)}" for k, v in {**self.query, "cursor": str(start + page)}.items()
            )
            headers["Link"] = f'<{self.hub.url}{urlsplit(self.path).path}?{params}>; rel="next"'
        return self._ok(entries[start : start + page], headers=headers)

    def _paths_info(self, revision: str) -> _Response:
        repo = self._repo()
        form = parse_qs(self._body().decode())
        commit = self.storage.commit(self.storage.resolve_revision(repo, revision))
        files = commit["files"]
        out = []
        for path in form.get("paths", []):
            if path in files:
                out.append(self._tree_entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append(
                    {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}
                )
        return self._ok(out)

    def _list_commits(self, revision: str) -> _Response:
        repo = self._repo()
        oid = self.storage.resolve_revision(repo, revision)
        items = [
            {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "authors": [{"user": repo.repo_id.split("/")[0]}],
                "date": c["date"],
            }
            for c in self.storage.history(oid)
        ]
        return self._ok(items)

    def _ref(self, name: str, ref: str, oid: str) -> dict[str, str]:
        return {"name": name, "ref": ref, "targetCommit": oid}

    def _refs(self) -> _Response:
        repo = self._repo()
        with self.storage.lock:
            branches = [self._ref(b, f"refs/heads/{b}", oid) for b, oid in sorted(repo.branches.items())]
            prs = [
                self._ref(f"refs/pr/{num}", f"refs/pr/{num}", d["head"])
                for num, d in sorted(repo.discussions.items())
                if d["isPullRequest"]
            ]
        payload: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if self.query.get("include_prs"):
            payload["pullRequests"] = prs
        return self._ok(payload)

    def _create_branch(self, branch: str) -> _Response:
        repo = self._repo(write=True)
        payload = self._json()
        if branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch):
            raise RouteError(400, f"Invalid reference for a branch: {branch}")
        with self.storage.lock:
            if branch in repo.branches:
                raise RouteError(409, f"Reference already exists: refs/heads/{branch}")
            start = payload.get("startingPoint") or "main"
            repo.branches[branch] = self.storage.resolve_revision(repo, start)
        return self._ok({})

    def _delete_branch(self, branch: str) -> _Response:
        repo = self._repo(write=True)
        with self.storage.lock:
            if branch not in repo.branches or branch == "main":
                raise RouteError(404 if branch not in repo.branches else 403, f"Cannot delete {branch}")
            del repo.branches[branch]
        return self._ok({})

    def _discussion_json(self, repo: _Repo, num: int, d: dict[str, Any]) -> dict[str, Any]:
        return {
            "num": num,
            "title": d["title"],
            "status": d["status"],
            "isPullRequest": d["isPullRequest"],
            "createdAt": d["createdAt"],
            "author": {"name": d["author"]},
            "repo": {"name": repo.repo_id, "type": "model"},
        }

    def _discussions(self, num: str | None) -> _Response:
        repo = self._repo()
        with self.storage.lock:
            if num is None:
                items = [self._discussion_json(repo, n, d) for n, d in sorted(repo.discussions.items())]
                return self._ok(
                    {"discussions": items, "count": len(items), "start": 0, "numClosedDiscussions": 0}
                )
            if not num.isdigit() or int(num) not in repo.discussions:
                raise RouteError(404, f"Discussion {num} not found")
            d = repo.discussions[int(num)]
            details = self._discussion_json(repo, int(num), d)
            events = [
                {
                    "id": secrets.token_hex(12),
                    "type": "commit",
                    "createdAt": d["createdAt"],
                    "author": {"name": d["author"]},
                    "data": {"subject": d["title"], "oid": d["head"]},
                }
            ]
            details.update(events=events, changes={"base": f"refs/heads/{d['base']}"}, filesWithConflicts=[])
            return self._ok(details)

    # Upload -----------------------------------------------------------------------------------------------

    def _preupload(self, revision: str) -> _Response:
        repo = self._repo(write=not self.query.get("create_pr"))
        files = self.storage.commit(self.storage.resolve_revision(repo, revision))["files"]
        gitattributes = files.get(".gitattributes")
        patterns = _gitattributes_lfs_patterns(
            self.storage.read_file(gitattributes).decode() if gitattributes else DEFAULT_GITATTRIBUTES
        )
        out = []
        for item in self._json().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size >= LFS_SIZE_THRESHOLD or b"\0" in sample or any(_matches(p, path) for p in patterns)
            remote = files.get(path)
            oid = None
            if remote is not None:
                oid = remote["lfs"]["sha256"] if remote["lfs"] is not None else remote["oid"]
            out.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return self._ok({"files": out, "commitOid": self.storage.resolve_revision(repo, revision)})

    def _lfs_batch(self) -> _Response:
        self._repo(write=True)
        payload = self._json()
        if payload.get("operation") != "upload":
            raise RouteError(400, "only uploads are supported")
        objects, multipart = [], False
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.storage.has_lfs(oid, size):
                ticket = secrets.token_urlsafe(16)
                chunk = self.hub.multipart_chunk_size if size > self.hub.multipart_threshold else None
                with self.storage.lock:
                    self.storage.uploads[ticket] = _Upload(oid, size, chunk)
                base = f"{self.hub.url}/_lfs/{ticket}"
                verify = {"href": f"{self.hub.url}/{self.repo_id}.git/info/lfs/objects/verify", "header": {}}
                if chunk is None:
                    upload = {"href": base, "header": {}}
                else:
                    multipart = True
                    parts = -(-size // chunk)
                    header = {"chunk_size": str(chunk)}
                    header.update({f"{i:05d}": f"{base}/part/{i}" for i in range(1, parts + 1)})
                    upload = {"href": f"{base}/complete", "header": header}
                item["actions"] = {"upload": upload, "verify": verify}
            objects.append(item)
        return self._ok(
            {"transfer": "multipart" if multipart else "basic", "objects": objects},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _upload(self, ticket: str) -> _Upload:
        with self.storage.lock:
            upload = self.storage.uploads.get(ticket)
        if upload is None:
            raise RouteError(403, "unknown or expired upload URL")
        return upload

    def _receive(self, target: Path) -> tuple[str, int, str]:
        sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
        with target.open("wb") as f:
            for chunk in self._iter_body(None):
                f.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                size += len(chunk)
        return sha.hexdigest(), size, md5.hexdigest()

    def _lfs_put(self, ticket: str, part: int | None) -> _Response:
        upload = self._upload(ticket)
        tmp = self.storage.root / "uploads" / f"{ticket}.{part or 0}.{secrets.token_hex(4)}"
        try:
            sha, size, md5 = self._receive(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if part is None:
            if (sha, size) != (upload.oid, upload.size):
                tmp.unlink()
                raise RouteError(400, f"content does not match oid {upload.oid} / size {upload.size}")
            self.storage.put_lfs(tmp, sha)
            with self.storage.lock:
                self.storage.uploads.pop(ticket, None)
            return _Response(200, b"")
        final = self.storage.root / "uploads" / f"{ticket}.part{part}"
        os.replace(tmp, final)
        with self.storage.lock:
            upload.parts[part] = md5
        return _Response(200, b"", {"ETag": f'"{md5}"'})

    def _lfs_complete(self, ticket: str) -> _Response:
        upload = self._upload(ticket)
        payload = self._json()
        assert upload.chunk_size is not None
        expected = -(-upload.size // upload.chunk_size)
        parts = sorted(payload.get("parts", []), key=lambda p: p["partNumber"])
        if [p["partNumber"] for p in parts] != list(range(1, expected + 1)):
            raise RouteError(400, "missing parts")
        for p in parts:
            if p["etag"].strip('"') != upload.parts.get(p["partNumber"]):
                raise RouteError(400, f"etag mismatch for part {p['partNumber']}")
        uploads = self.storage.root / "uploads"
        tmp = uploads / f"{ticket}.assembled"
        sha = hashlib.sha256()
        with tmp.open("wb") as out:
            for p in parts:
                part_path = uploads / f"{ticket}.part{p['partNumber']}"
                with part_path.open("rb") as f:
                    while chunk := f.read(_READ_CHUNK):
                        out.write(chunk)
                        sha.update(chunk)
        if sha.hexdigest() != upload.oid or tmp.stat().st_size != upload.size:
            tmp.unlink()
            raise RouteError(400, f"assembled content does not match oid {upload.oid}")
        self.storage.put_lfs(tmp, upload.oid)
        for p in parts:
            (uploads / f"{ticket}.part{p['partNumber']}").unlink(missing_ok=True)
        with self.storage.lock:
            self.storage.uploads.pop(ticket, None)
        return self._ok({})

    def _lfs_verify(self) -> _Response:
        self._repo(write=True)
        payload = self._json()
        if not self.storage.has_lfs(payload["oid"], int(payload["size"])):
            raise RouteError(404, f"object {payload['oid']} not found")
        return self._ok({})

    def _xet_token(self, revision: str | None, kind: Role) -> _Response:
        repo = self._repo(write=kind == "write" and not self.query.get("create_pr"))
        if revision not in (None, "None"):
            self.storage.resolve_revision(repo, revision)
        expiration = int(time.time()) + 3600
        token = secrets.token_hex(16)
        headers = {
            "X-Xet-Cas-Url": self.storage.cas_url,
            "X-Xet-Access-Token": token,
            "X-Xet-Token-Expiration": str(expiration),
        }
        # huggingface_hub reads the headers, hf_xet's own refresh reads the JSON body.
        return self._ok(
            {"accessToken": token, "exp": expiration, "casUrl": self.storage.cas_url}, headers=headers
        )

    # Commit -----------------------------------------------------------------------------------------------

    def _commit(self, revision: str) -> _Response:
        create_pr = self.query.get("create_pr") in ("1", "true")
        repo = self._repo(write=True)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise RouteError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        changes: dict[str, dict[str, Any] | None] = {}
        deleted_folders: list[str] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                data = (
                    base64.b64decode(value["content"])
                    if value.get("encoding") == "base64"
                    else value["content"]
                )
                changes[value["path"]] = self.storage.regular_entry(
                    data if isinstance(data, bytes) else data.encode()
                )
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise RouteError(400, "only sha256 LFS oids are supported")
                changes[value["path"]] = self.storage.lfs_entry(value["oid"], int(value["size"]))
            elif key == "deletedFile":
                changes[value["path"]] = None
            elif key == "deletedFolder":
                deleted_folders.append(value["path"].rstrip("/") + "/")
            else:
                raise RouteError(400, f"unknown commit operation {key!r}")
        if self._fault is not None and self._fault.action == "corrupt":
            for path, entry in changes.items():
                if entry is not None and entry["lfs"] is not None:
                    bogus = {**entry["lfs"], "sha256": "0" * 64, "size": entry["size"] + 1}
                    changes[path] = {**entry, "size": entry["size"] + 1, "lfs": bogus}
                    break
        with self.storage.lock:
            branch = revision.removeprefix("refs/heads/")
            pr = re.fullmatch(r"refs/pr/(\d+)", revision)
            if pr is None and branch not in repo.branches:
                raise RouteError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
            head = self.storage.resolve_revision(repo, revision)
            parent_commit = header.get("parentCommit")
            parent = head
            if parent_commit is not None:
                matches = [oid for oid in repo.commits if oid.startswith(parent_commit)]
                if len(matches) != 1:
                    raise RouteError(400, f"Invalid parent commit {parent_commit}")
                if create_pr:
                    parent = matches[0]
                elif matches[0] != head:
                    raise RouteError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(self.storage.commit(parent)["files"])
            for path, entry in changes.items():
                if entry is None:
                    if path not in files:
                        raise RouteError(
                            404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    del files[path]
                else:
                    files[path] = entry
            for folder in deleted_folders:
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
            oid = self.storage.write_commit(
                repo, [parent], files, header["summary"], header.get("description", "")
            )
            payload: dict[str, Any] = {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{oid}",
            }
            if create_pr:
                num = max(repo.discussions, default=0) + 1
                token = self._token()
                repo.discussions[num] = {
                    "title": header["summary"],
                    "status": "open",
                    "isPullRequest": True,
                    "createdAt": _now(),
                    "author": token.user if token else "anonymous",
                    "head": oid,
                    "base": branch,
                }
                payload["pullRequestUrl"] = f"{self.hub.url}/{repo.repo_id}/discussions/{num}"
            elif pr is not None:
                repo.discussions[int(pr.group(1))]["head"] = oid
            else:
                repo.branches[branch] = oid
        return self._ok(payload)

    # Download ---------------------------------------------------------------------------------------------

    def _resolve(self, revision: str, path: str) -> _Response:
        repo = self._repo()
        oid = self.storage.resolve_revision(repo, revision)
        entry = self.storage.commit(oid)["files"].get(path)
        if entry is None:
            raise RouteError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        headers = {"X-Repo-Commit": oid, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if entry["lfs"] is None:
            file = self.storage.git_path(entry["oid"])
            headers["ETag"] = f'"{entry["oid"]}"'
        else:
            sha256 = entry["lfs"]["sha256"]
            headers.update(
                {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(entry["size"])}
            )
            if entry["xetHash"]:
                route = f"{self.hub.url}/api/models/{repo.repo_id}/xet-read-token/{oid}"
                headers.update({"X-Xet-Hash": entry["xetHash"], "Link": f'<{route}>; rel="xet-auth"'})
            file = self.storage.lfs_path(sha256)
            if self.command == "GET" and not file.exists() and entry["xetHash"]:
                file = self.storage.materialize_xet(sha256, entry["xetHash"], entry["size"])
        size = entry["size"]
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if ranged and self.command == "GET":
            first, last = ranged.groups()
            start = int(first) if first else max(0, size - int(last))
            end = min(size, int(last) + 1) if first and last else size
            if start >= size:
                raise RouteError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            return _Response(206, headers=headers, file=file, file_range=(start, end))
        if self.command == "HEAD":
            return _Response(200, headers=headers, head_length=size)
        return _Response(200, headers=headers, file=file)


__all__ = [
    "DEFAULT_GITATTRIBUTES",
    "Fault",
    "HubServer",
    "RequestRecord",
    "TokenInfo",
    "git_blob_id",
    "parse_xet_shard",
]
