"""Reading XNAT's answers to the REST upload: session URIs, errors about one file, final failures.

Everything here is a pure function of an answer (or an exception) and the request it answered;
the batch sender (:mod:`.send`) and the commit (:mod:`.commit`) decide what to do with it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import requests

from xnatio.archive import SourceChangedError
from xnatio.errors import ServerError, XnatioError
from xnatio.models import DicomFile
from xnatio.retry import Reachability, RetryPolicy, Sleep
from xnatio.xnat.errors import TransientError, bad_member

log = logging.getLogger(__name__)


class UnassignedError(ServerError):
    """XNAT filed the upload in its Unassigned prearchive (facts 1.2): not in the project."""


def uri_list(text: str) -> list[str]:
    """Lines of a ``text/uri-list`` answer (CRLF-separated; comments start with ``#``)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def session_uris(resp: requests.Response, what: str) -> list[str]:
    """The XNAT URIs of a 200 ``text/uri-list`` answer (facts 1.3), checked.

    A line that is not an XNAT URI (an HTML login page a proxy answered with 200, facts-less
    servers) is a one-line error naming the URL; an Unassigned prearchive URI raises
    :class:`UnassignedError` (the project is unknown or not readable to the user, facts 1.2).
    """
    uris = uri_list(resp.text)
    bad = [u for u in uris if not u.startswith(("/data/", "/xapi/"))]
    if bad:
        raise ServerError(
            f"{what}: {path_only(resp.url)} answered {resp.status_code} with something that is "
            f"not a list of XNAT URIs ({bad[0][:60]!r}…); is the server URL the XNAT itself?",
            status=resp.status_code,
        )
    unassigned = [u for u in uris if u.startswith("/data/prearchive/projects/Unassigned/")]
    if unassigned:
        raise UnassignedError(
            "XNAT put the files in its Unassigned prearchive, not in the project (the project "
            "does not exist or you cannot read it, facts 1.2); nothing was archived. Delete "
            f"{unassigned[0]} from the prearchive (XNAT's prearchive page, or "
            f"DELETE {unassigned[0]}) and check the project",
            status=resp.status_code,
        )
    return uris


def path_only(url: str) -> str:
    return url.split("?", 1)[0]


def prearchive_path(uri: str) -> str:
    """``/prearchive/projects/P/TS/F`` from a URI with or without the ``/data`` prefix."""
    return uri[len("/data") :] if uri.startswith("/data/") else uri


def redirected(resp: requests.Response, what: str) -> ServerError:
    """A 3xx (or unexpected status) where XNAT answers 200/301: a proxy or a login page."""
    location = resp.headers.get("Location", "")
    where = f" to {location}" if location else ""
    return ServerError(
        f"{what}: {path_only(resp.url)} answered {resp.status_code}{where} instead of XNAT's "
        "answer; a proxy or login page is in the way (check --server)",
        status=resp.status_code,
    )


def final_archive_failure(message: str) -> bool:
    """XNAT's archive step failed for good: "FAILED: …" or its archive timeout (facts 3.3/3.4)."""
    text = message.strip().lower()
    return text.startswith("failed") or "did not complete within" in text


def reason(exc: BaseException) -> str:
    """One line for a file's reason: XNAT's own message for server errors."""
    if isinstance(exc, ServerError):
        return exc.message
    if isinstance(exc, XnatioError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def culprit(
    err: BaseException, members: Sequence[tuple[str, DicomFile]]
) -> tuple[DicomFile, str] | None:
    """The one file to drop from a batch, and why, when ``err`` is about a single file."""
    if isinstance(err, SourceChangedError):
        return err.file, err.reason
    if isinstance(err, ServerError) and err.status == 400:
        found = find_member(bad_member(err.message), members)
        if found is not None:
            return found, f"XNAT could not read it: {err.message}"
    return None


def find_member(name: str | None, members: Sequence[tuple[str, DicomFile]]) -> DicomFile | None:
    """The file behind the archive entry name XNAT reported (exact, then by path suffix)."""
    if not name:
        return None
    name = name.strip().lstrip("/")
    by_name = dict(members)
    if name in by_name:
        return by_name[name]
    # XNAT may report the entry under a prefix of its own (or we under a longer one).
    matches = [f for n, f in members if n.endswith("/" + name) or name.endswith("/" + n)]
    return matches[0] if len(matches) == 1 else None


def refused_in_a_row(err: BaseException, count: int) -> ServerError:
    message = err.message if isinstance(err, ServerError) else str(err)
    return ServerError(
        f"{message} (XNAT refused {count} files in a row that read as DICOM here: its disk may "
        "be full or its anonymization failing, facts 1.4; the rest of the batch was not sent)",
        status=400,
    )


def wait_to_retry(
    err: BaseException,
    retry_number: int,
    what: str,
    *,
    retry: RetryPolicy,
    cancel: threading.Event,
    sleep: Sleep | None,
    since: float | None = None,
    reach: Reachability | None = None,
) -> bool:
    """Back off before another attempt when ``err`` is transient and retries are left: fewer
    than ``--retries`` so far, within ``--retry-budget`` of ``since`` (the first failure of this
    request; xnatio.retry). False when not (or when cancelled while waiting). ``reach``: the
    client's count of answers; a broken connection (no status) waits only until another request
    is answered (xnatio.retry)."""
    if not isinstance(err, TransientError) or retry_number >= retry.retries:
        return False
    log.info("%s: %s; retrying (%d/%d)", what, err, retry_number + 1, retry.retries)
    return retry.wait(
        retry_number,
        err.retry_after,
        cancel=cancel,
        sleep=sleep,
        since=since,
        reach=reach if err.status is None else None,
    )
