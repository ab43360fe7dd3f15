"""Pytest fixtures around the loopback Hub server. Enable with `pytest_plugins = ["tests.hub.fixtures"]`.

`hub_server` starts a fresh server per test and, at teardown, fails the test if the server hit a bug or left
a thread running. `transfer` runs a test once with hf_xet (the production default) and once with
`HF_HUB_DISABLE_XET=1` (plain LFS). `hf_isolation` keeps the user's real token, login and caches out of reach.
`hub_cli` points `publisher.cli.main`, run in the test's process, at the server with the write token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from tests.hub.helpers import (
    MULTIPART_CHUNK,
    MULTIPART_THRESHOLD,
    ORG,
    OTHER_USER_TOKEN,
    READ_TOKEN,
    USER,
    WRITE_TOKEN,
    set_transfer,
)
from tests.hub.server import HubServer, TokenInfo


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private HF_HOME for the session: hf_xet reads its cache location once, when its session starts."""
    home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_XET_CACHE", str(home / "xet"))
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield home


@pytest.fixture
def hf_isolation(hf_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No HF_TOKEN, no stored login, no offline mode: each test says which token it uses."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    token_dir = tmp_path / "hf-token"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_dir / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(token_dir / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return hf_home


@pytest.fixture(params=["xet", "lfs"])
def transfer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test over hf_xet (the production default) and over plain LFS."""
    set_transfer(monkeypatch, request.param)
    return str(request.param)


@pytest.fixture
def hub_server(tmp_path: Path, hf_isolation: Path) -> Iterator[HubServer]:
    """A Hub-compatible server on 127.0.0.1 with three tokens: alice (write), alice (read), bob (write)."""
    tokens = {
        WRITE_TOKEN: TokenInfo(USER, "write", (ORG,)),
        READ_TOKEN: TokenInfo(USER, "read"),
        OTHER_USER_TOKEN: TokenInfo("bob", "write"),
    }
    server = HubServer(
        tmp_path / "hub-server",
        tokens,
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunk_size=MULTIPART_CHUNK,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
    leftovers = [
        t.name for t in threading.enumerate() if "process_request" in t.name or t.name == "hub-server"
    ]
    assert not leftovers, f"server threads still running: {leftovers}"
    assert not server.errors, "the test server hit a bug:\n" + "\n".join(server.errors)


@pytest.fixture
def hub_cli(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """`hub_server`, reached by the CLI's own token and endpoint resolution (`HF_TOKEN`, `HF_ENDPOINT`)."""
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    # huggingface_hub reads HF_ENDPOINT once, at import, into the two constants it reads per call.
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    resolve = f"{hub_server.url}/{{repo_id}}/resolve/{{revision}}/{{filename}}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", resolve)
    return hub_server
