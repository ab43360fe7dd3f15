"""Hub errors: the client's HTTP and network failures as one line a maintainer can act on.

huggingface_hub raises its own HTTP errors, httpx2 transport errors, hf_xet connection errors and, when
a connection drops mid-upload, a bare ``RuntimeError`` from a closed client; each becomes one
:class:`~publisher.errors.HubError` line that says what failed, at which step, and what to do, with the
token redacted. Its retry messages (two per retried request, one with a presigned URL) go through this
module's logger instead of the client's, so ``-q`` silences them.

Every stage that talks to the Hub (reading a source, pushing, reading a published file) uses it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from publisher.errors import HubError

logger = logging.getLogger(__name__)

UPLOAD_AND_COMMIT = "upload and commit"
_XET_STATUS = re.compile(r"\((\d{3}) [A-Za-z ]+\)")
# httpx2 raises a bare RuntimeError when a request is sent on a closed client. huggingface_hub shares one
# client between its upload threads and closes it when any of them cannot connect, so when the Hub goes down
# mid-upload the other threads fail with this message instead of a network error.
_CLOSED_CLIENT = "Cannot send a request, as the client has been closed."
# huggingface_hub's backoff logs every retried request twice, with the full URL (a presigned one for LFS).
_CLIENT_RETRY_LOGGER = "huggingface_hub.utils._http"
_RETRY_FAILURE = re.compile(
    r"(?:HTTP Error (?P<status>\d{3})|'(?P<error>.*)') thrown while requesting (?P<method>[A-Z]+) ", re.DOTALL
)
_RETRY_WAIT = re.compile(r"(?P<seconds>[\d.]+)s\b.*\[Retry (?P<attempt>\d+)/(?P<retries>\d+)\]")


@dataclass
class HubCall:
    """What an error message needs: where we are in the publish, and the secret it must never show."""

    repo_id: str
    revision: str
    endpoint: str
    secret: str | None
    step: str = "start"


class _RetryNotes(logging.Filter):
    """Drop the client's retry messages; with `show`, say one short line per retry on this module's logger.

    Other messages of the client's logger (its debug lines) pass unchanged.
    """

    def __init__(self, show: bool) -> None:
        super().__init__()
        self.show = show
        self._failures: dict[int | None, str] = {}  # thread -> what its last attempt failed with

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        failure, wait = _RETRY_FAILURE.match(message), _RETRY_WAIT.search(message)
        if failure is not None:
            status, error = failure.group("status"), failure.group("error")
            reason = f"HTTP {status}" if status else _first_line(error) or "connection failed"
            self._failures[record.thread] = f"{failure.group('method')} failed: {reason}"
        elif wait is not None and self.show:
            logger.warning(
                "Hub request %s; retry %s/%s in %ss",
                self._failures.pop(record.thread, "failed"),
                wait.group("attempt"),
                wait.group("retries"),
                wait.group("seconds"),
            )
        return failure is None and wait is None


@contextmanager
def retry_notes(*, show: bool) -> Iterator[None]:
    """Route huggingface_hub's retry messages through this module's logger while this module calls the Hub.

    huggingface_hub sets its own loggers' level when it is first imported, after the CLI set it: its two
    warnings per retried request (the second with the full URL) would show even with `-q`.
    """
    client = logging.getLogger(_CLIENT_RETRY_LOGGER)
    notes = _RetryNotes(show)
    client.addFilter(notes)
    try:
        yield
    finally:
        client.removeFilter(notes)


@contextmanager
def hub_errors(ctx: HubCall) -> Iterator[None]:
    """Turn the client's HTTP and network exceptions into one-line `HubError`s; let real bugs through."""
    try:
        yield
    except HubError as err:
        raise HubError(_redact(str(err), ctx.secret)) from None
    except Exception as err:
        message = _describe(err, ctx)
        if message is None:
            raise
        raise HubError(_redact(message, ctx.secret)) from err


def _describe(err: BaseException, ctx: HubCall) -> str | None:
    """The one-line message for a failure of the Hub or of the network, or None for anything else."""
    if isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err):
        reasons = "; ".join(line.lstrip("- ") for line in str(err).splitlines()[1:] if line.strip())
        return f"the Hub refused the README.md metadata of {ctx.repo_id}: {reasons or 'invalid YAML'}"
    chain = list(_exception_chain(err))
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    if http is not None:
        request = http.response.request
        url = str(request.url) if request is not None else ""
        return _describe_status(http.response.status_code, http.server_message or "", url, ctx, http)
    network = next((e for e in chain if isinstance(e, (httpx2.TransportError, ConnectionError))), None)
    if network is None and any(isinstance(e, RuntimeError) and str(e) == _CLOSED_CLIENT for e in chain):
        return (
            f"lost the connection to the Hub at {ctx.endpoint} while trying to {ctx.step} (a connection was"
            " refused, so the client closed them all): the commit either landed whole or not at all; rerun when"
            " the Hub is reachable: it completes the publish or reports up to date"
        )
    if network is not None:
        reason = _first_line(str(network)) or type(network).__name__
        # hf_xet reports a refused token request as ConnectionError("... (401 Unauthorized), domain: URL").
        status = _XET_STATUS.search(reason)
        if status is not None and not isinstance(network, httpx2.TransportError):
            return _describe_status(int(status.group(1)), "", reason, ctx, None)
        step = _step_from_url(_request_url(network)) or ctx.step
        if step in ("commit", UPLOAD_AND_COMMIT):
            return (
                f"lost the connection to the Hub at {ctx.endpoint} while committing ({reason}): the commit"
                " either landed whole or not at all; rerun: it completes the publish or reports up to date"
            )
        return (
            f"cannot reach the Hub at {ctx.endpoint} while trying to {step} ({reason}): network down or"
            " wrong endpoint; nothing was committed, rerun when it is reachable"
        )
    return None


def _describe_status(status: int, server_message: str, url: str, ctx: HubCall, err: Exception | None) -> str:
    step = _step_from_url(url) or ctx.step
    host = urlsplit(ctx.endpoint).netloc or ctx.endpoint
    namespace = ctx.repo_id.split("/")[0]
    if status == 401:
        if ctx.secret is None:
            return (
                f"not logged in: {host} refused to {step} for {ctx.repo_id} (401); set HF_TOKEN or run"
                " `hf auth login`"
            )
        return (
            f"authentication failed: {host} rejected the token while trying to {step} (401); the token is"
            " invalid, expired or revoked: set a valid HF_TOKEN or run `hf auth login`"
        )
    if status == 403:
        return (
            f"no write access to {ctx.repo_id} (403): the token cannot write to namespace '{namespace}' on"
            f" {host}; use a token with write permission there"
        )
    if status == 404:
        if isinstance(err, RevisionNotFoundError):
            return f"revision '{ctx.revision}' not found in {ctx.repo_id} on {host} (404)"
        if isinstance(err, RepositoryNotFoundError):
            return f"repository {ctx.repo_id} not found on {host}, or not visible to this token (404)"
        return (
            f"namespace '{namespace}' not found on {host} (404) while trying to {step}: check the repo id"
            f" '{ctx.repo_id}'"
        )
    if status == 412:
        return (
            f"{ctx.repo_id}@{ctx.revision} moved since this publish started (412): another commit landed"
            " first; nothing was committed, rerun to publish on top of the new head"
        )
    server = _first_line(server_message)
    detail = f": {server}" if server else ""
    if status >= 500:
        return (
            f"the Hub at {host} failed with HTTP {status} while trying to {step}{detail}; the repo was left"
            " unchanged or fully updated, never partially: rerun to finish"
        )
    return f"the Hub at {host} refused to {step} for {ctx.repo_id} (HTTP {status}){detail}"


def _step_from_url(url: str) -> str | None:
    for marker, step in (
        ("/preupload/", "prepare the upload"),
        ("/info/lfs/", "upload LFS files"),
        ("/xet-write-token/", "start the xet upload"),
        ("/commit/", "commit"),
        ("/branch/", "create the branch"),
        ("/repos/create", "create the repo"),
    ):
        if marker in url:
            return step
    return None


def _exception_chain(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _request_url(err: BaseException) -> str:
    try:
        return str(err.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx2 raises RuntimeError when no request is attached
        return ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _redact(message: str, secret: str | None) -> str:
    one_line = " ".join(message.split())
    return one_line.replace(secret, "***") if secret else one_line
