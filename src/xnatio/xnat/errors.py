"""Reading XNAT's error answers: the message, whether a retry can help, which archive entry broke.

XNAT's REST layer (Restlet) answers errors with an HTML status page whose only meaningful text is
inside ``<h3>…</h3>`` (facts 1.4); xnatpy, xnatctl and the Desktop Client scrape it from there too.

Which answers are transient follows the codes and texts XNAT really sends (facts 1.4, 3.3, 3.4):

* 429/502/503/504 (overload, a proxy in front of XNAT: nginx gives 504 after 100 s while XNAT
  carries on, facts 7) and a 500 that is not the archive's own verdict;
* 400 "Concurrent file sends of the same data is not supported." (GDI:370-379);
* the archive races, as PrearcSessionArchiver raises them (read in NrgXnat/xnat-web
  ``PrearcSessionArchiver.java``, ``call()`` and ``preventConcurrentArchiving``): 409 "Session
  processing may already be in progress: X.  Concurrent modification is discouraged.", 423
  "Duplicate archive attempt. Prearchive session already archiving." / "Duplicate archive
  attempt.  Destination session in use."; 403 "Operation already in progress on this prearchive
  entry." and 409 "session document locked" for a locked prearchive row (facts 3.3, 3.4);
* 400 "unable to archive for the Prearchive session": the import's in-request archive failed and
  XNAT dropped the cause (facts 1.4), which may be one of the races above. xnatio does not archive
  in the import request, so this arrives only from callers that do; retried within the policy.
* 500 "…did not complete within the configured timeout interval." (facts 3.4): the archive goes on
  in the background, so a later attempt meets it done (or still locked: 403 above).

Final: every other 4xx, notably the data errors 400 "unable to read DICOM object NAME" and
"object NAME contains no SOP Class UID" (disk full and anonymization failures arrive so too: no
507 reaches a client, facts 1.4), and the archive's verdict 500 "FAILED: …" (facts 3.3, 3.4) —
unless the text after "FAILED:" is one of the races above.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

from xnatio.errors import EXIT_USAGE, ServerError, XnatioError

# Gateway and overload statuses: nothing was decided, the same request may succeed later.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# The archive races and send clashes, by the status XNAT sends each with (facts 1.4, 3.3, 3.4).
# A 500 "FAILED: <race>" (the archive service reporting a race) counts too.
_RACES: tuple[tuple[frozenset[int], re.Pattern[str]], ...] = tuple(
    (frozenset(statuses), re.compile(pattern, re.IGNORECASE))
    for statuses, pattern in (
        ({400}, r"^concurrent file sends of the same data is not supported"),
        ({409, 500}, r"session processing may already be in progress"),
        ({423, 500}, r"duplicate archive attempt"),
        ({403, 500}, r"operation already in progress on this prearchive entry"),
        ({409}, r"^session document locked"),
        ({400}, r"^unable to archive for the prearchive session"),
    )
)
_ARCHIVE_VERDICT = re.compile(r"^FAILED:\s*", re.IGNORECASE)
_ARCHIVE_TIMEOUT = re.compile(r"did not complete within the configured timeout", re.IGNORECASE)
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


class NotXnatError(XnatioError):
    """The server at ``--server`` answered, but not as XNAT's REST API does (a plain web server,
    a login page, a proxy's redirect): the URL or the way to reach XNAT is wrong. Exit 2."""

    exit_code = EXIT_USAGE


class RedirectError(NotXnatError):
    """A 3xx answer that XNAT itself does not send for this request: never followed, never
    taken as success (facts 1.3: XNAT's answers are URI lists; facts 3.3/3.4 list its own 3xx).

    ``url`` is where the request was sent, ``location`` where the answer pointed (or "")."""

    def __init__(self, message: str, *, url: str, location: str, status: int) -> None:
        super().__init__(message)
        self.url = url
        self.location = location
        self.status = status


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
    """True when resending the same request may succeed (see the module docstring)."""
    text = message.strip()
    verdict = _ARCHIVE_VERDICT.match(text) if status == 500 else None
    if verdict is not None:
        # The archive's own verdict is final, unless what failed it was a race.
        text = text[verdict.end() :]
        return any(500 in codes and p.search(text) for codes, p in _RACES)
    if status == 500 and _ARCHIVE_TIMEOUT.search(text):
        return True
    if status in TRANSIENT_STATUSES:
        return True
    return any(status in codes and p.search(text) for codes, p in _RACES)


def bad_member(message: str) -> str | None:
    """The archive entry XNAT could not read as DICOM, from its 400 message, or None."""
    for pattern in _BAD_MEMBER:
        match = pattern.search(message)
        if match:
            return match.group("name").strip().strip("'\"")
    return None
