"""The one place that scrubs secrets from text on its way out (logs, errors, reports).

Secrets are redacted at their source first (``Settings.password`` is a ``Secret``; the HTTP client
redacts its password and session id from every message it builds). This module is the safety net
behind that: every secret xnatio learns (password, alias-token secret, JSESSIONID) is
:func:`register`-ed, and :func:`install` puts a log-record factory in place that scrubs every log
record of the process, whichever logger or handler it goes to, including formatted tracebacks.

Besides registered values it removes the shapes secrets travel in: ``Authorization`` headers,
``JSESSIONID=…`` cookies, ``user:password@`` in URLs and ``password=…`` / ``secret=…`` pairs.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from typing import Any

HIDDEN = "<hidden>"
MIN_SECRET = 4  # shorter values would scrub ordinary words

_lock = threading.Lock()
_secrets: set[str] = set()
_installed = False

_PATTERNS = (
    (re.compile(r"(?i)(authorization:\s*(?:basic|bearer)\s+)[A-Za-z0-9+/=._-]+"), r"\1" + HIDDEN),
    (re.compile(r"(?i)(jsessionid=)[A-Za-z0-9._-]+"), r"\1" + HIDDEN),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^@\s/]+@"), r"\1" + HIDDEN + "@"),
    (
        re.compile(r"(?i)\b((?:password|passwd|secret|token)[\"']?\s*[=:]\s*[\"']?)[^\s\"',&]+"),
        r"\1" + HIDDEN,
    ),
)


def register(*secrets: str | None) -> None:
    """Remember secret values so :func:`scrub` removes them wherever they appear.

    The first call also :func:`install`-s the log scrubber: a process that holds a secret has
    every log record scrubbed, without any setup by the caller.
    """
    with _lock:
        for s in secrets:
            if s and len(s) >= MIN_SECRET:
                _secrets.add(s)
    install()


def scrub(text: str) -> str:
    """``text`` without any registered secret or credential-shaped substring."""
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for s in known:
        if s in text:
            text = text.replace(s, HIDDEN)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def scrub_exception(exc: BaseException) -> str:
    """A one-line, scrubbed description of ``exc`` (for messages built from foreign errors)."""
    return scrub(f"{type(exc).__name__}: {exc}")


def _scrub_record(record: logging.LogRecord) -> logging.LogRecord:
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
    return record


def install() -> None:
    """Scrub every log record of this process from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return _scrub_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
