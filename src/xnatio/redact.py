"""The one place that scrubs secrets from text on its way out (logs, errors, reports).

Secrets are redacted at their source first (``Settings.password`` is a ``Secret``; the HTTP client
redacts its password and session id from every message it builds). This module is the safety net
behind that, and it behaves as a guest in the process that imports xnatio:

- Secrets are held per owner: an ``XnatClient`` :func:`hold`-s its password, alias-token secret
  and JSESSIONID while it is open and :func:`forget`-s them when it closes (or is collected).
  Nothing is kept for the life of the process.
- :class:`SecretFilter` is a ``logging.Filter`` that the CLI puts on its own handler (see
  :func:`xnatio.progress.cli_logging`). The library never installs a log-record factory, never
  adds a handler or filter to the root logger: an application embedding xnatio decides how its
  logs are handled, and may add a ``SecretFilter`` to its own handlers.

Besides held values it removes the shapes secrets travel in: ``Authorization`` headers,
``JSESSIONID=…`` cookies, ``user:password@`` in URLs and ``password=…`` / ``secret=…`` pairs.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
import weakref

HIDDEN = "<hidden>"
MIN_SECRET = 4  # shorter values would scrub ordinary words

_lock = threading.Lock()
# owner -> the secrets it holds; an owner that is collected without closing drops out too.
_held: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()

_PATTERNS = (
    (re.compile(r"(?i)(authorization:\s*(?:basic|bearer)\s+)[A-Za-z0-9+/=._-]+"), r"\1" + HIDDEN),
    (re.compile(r"(?i)(jsessionid=)[A-Za-z0-9._-]+"), r"\1" + HIDDEN),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@"), r"\1" + HIDDEN + "@"),
    (
        re.compile(r"(?i)\b((?:password|passwd|secret|token)[\"']?\s*[=:]\s*[\"']?)[^\s\"',&]+"),
        r"\1" + HIDDEN,
    ),
)


def hold(owner: object, *secrets: str | None) -> None:
    """Scrub ``secrets`` wherever they appear until ``owner`` :func:`forget`-s them.

    ``owner`` must be weak-referenceable (an ``XnatClient``); values shorter than
    :data:`MIN_SECRET` are ignored (they would scrub ordinary words).
    """
    values = {s for s in secrets if s and len(s) >= MIN_SECRET}
    if not values:
        return
    with _lock:
        _held.setdefault(owner, set()).update(values)


def forget(owner: object) -> None:
    """Drop every secret ``owner`` holds (idempotent)."""
    with _lock:
        _held.pop(owner, None)


def held() -> list[str]:
    """Every secret currently held by any owner, longest first (so a longer one wins)."""
    with _lock:
        values = set().union(*_held.values()) if _held else set()
    return sorted(values, key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` without any held secret or credential-shaped substring."""
    for s in held():
        if s in text:
            text = text.replace(s, HIDDEN)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def scrub_record(record: logging.LogRecord) -> None:
    """Scrub ``record`` in place: its message, its formatted exception and its stack."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: keep what logging itself would show
        message = str(record.msg)
    record.msg, record.args = scrub(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)).rstrip())
        # The scrubbed text replaces the exception; formatters use exc_text when present.
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)


class SecretFilter(logging.Filter):
    """A handler filter that scrubs every record it sees (and lets it through).

    On a handler it sees records of every logger that propagates to that handler's logger. It
    changes the record in place, so handlers of parent loggers that run afterwards (pytest's
    ``caplog`` on the root logger, an application's own) get the scrubbed text too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


def printable(text: str) -> str:
    """``text`` with what no UTF-8 output can carry made visible: a file name holding bytes that
    are not UTF-8 (Python gives them to us as lone surrogates, ``os.fsdecode``'s
    ``surrogateescape``) shows those bytes as ``\\xNN`` escapes, as ``repr`` would.

    Every path or reason that reaches a terminal, a JSON document, a CSV report or the journal
    goes through here: writing a lone surrogate to any of them raises ``UnicodeEncodeError``.
    Text that is valid (the usual case) is returned as is, without a copy.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text
