"""Reading XNAT's error answers: the message, whether a retry can help, which archive entry broke.

XNAT's REST layer (Restlet) answers errors with an HTML status page whose only meaningful text is
inside ``<h3>…</h3>``; xnatpy, xnatctl and the Desktop Client scrape it from there too. The
transient messages are the archive races and concurrent-send clashes listed in section 1 of
``shared/xnat-api.md``: XNAT mostly wraps them as 400, sometimes 409/423 (403 for an archive
operation already running on a prearchive entry); they go away when the request is sent again.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

from xnatio.errors import ServerError

# Gateway and overload statuses: nothing was decided, the same request may succeed later.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# Statuses on which XNAT reports the races below (mostly wrapped as 400).
_RACE_STATUSES = frozenset({400, 403, 409, 423})
_TRANSIENT_MESSAGES = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"concurrent file sends",
        r"session processing.{0,40}in progress",
        r"concurrent modification is discouraged",
        r"duplicate archive attempt",
        r"destination session in use",
        r"unable to lock session for archiving",
        r"operation already in progress on this prearchive entry",
        r"session document locked",
    )
)
# "unable to read DICOM object {name}" / "object {name} contains no SOP Class UID": one archive
# entry is not an importable DICOM object and the request stopped there (no Ignore-Unparsable).
_BAD_MEMBER = (
    re.compile(r"unable to read DICOM object\s+(?P<name>.+?)\s*$", re.IGNORECASE | re.DOTALL),
    re.compile(r"object\s+(?P<name>.+?)\s+contains no SOP (?:Class|Instance) UID", re.IGNORECASE),
)

_H3 = re.compile(r"<h3[^>]*>(.*?)</h3>", re.IGNORECASE | re.DOTALL)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
MAX_MESSAGE = 500


class TransientError(ServerError):
    """A failure worth retrying (``status`` None for a broken or timed-out connection).

    Raised once the retries allowed for the request are used up, so its message is the last one
    seen; ``retry_after`` is the server's ``Retry-After`` in seconds, if it sent one.
    """

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``<hidden>`` (servers sometimes echo input)."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "<hidden>")
    return text


def error_message(status: int, body: str, content_type: str = "", reason: str = "") -> str:
    """XNAT's message for an error answer: the ``<h3>`` of its status page, else a short text."""
    text = ""
    match = _H3.search(body)
    if match:
        text = _TAG.sub("", match.group(1))
    elif "html" in content_type.lower() or body.lstrip().startswith("<"):
        title = _TITLE.search(body)
        text = _TAG.sub(" ", title.group(1)) if title else ""
    else:
        text = body
    text = _SPACE.sub(" ", html.unescape(text)).strip()
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    if not text:
        text = f"HTTP {status} {reason}".strip()
    return text


def is_transient(status: int, message: str) -> bool:
    """True when resending the same request may succeed (overload, gateways, archive races)."""
    if status in TRANSIENT_STATUSES:
        return True
    if status in _RACE_STATUSES:
        return any(p.search(message) for p in _TRANSIENT_MESSAGES)
    return False


def bad_member(message: str) -> str | None:
    """The archive entry XNAT could not read as DICOM, from its 400 message, or None."""
    for pattern in _BAD_MEMBER:
        match = pattern.search(message)
        if match:
            return match.group("name").strip().strip("'\"")
    return None
