"""Secrets never leave the process: logs, errors, reports, --json and -v tracebacks.

Each test plants a distinctive secret and fails if it shows up anywhere it could leak.
"""

from __future__ import annotations

import logging

import pytest

from xnatio import redact

SECRET = "Pa55-w0rd-do-not-leak-7431"


def test_scrub_removes_registered_values_and_credential_shapes() -> None:
    redact.register(SECRET)
    text = (
        f"login with {SECRET}; Authorization: Basic YWRtaW46c2VjcmV0; "
        "Cookie: JSESSIONID=ABCDEF0123;"
        " url https://alice:hunter2@xnat.example.org/data password=letmein token: tkn-123"
    )
    out = redact.scrub(text)
    for leaked in (SECRET, "YWRtaW46c2VjcmV0", "ABCDEF0123", "hunter2", "letmein", "tkn-123"):
        assert leaked not in out
    assert "https://alice:<hidden>@xnat.example.org/data" in out


def test_short_values_are_not_registered() -> None:
    redact.register("abc", "", None)
    assert redact.scrub("abc abcdef") == "abc abcdef"


def test_every_log_record_is_scrubbed(caplog: pytest.LogCaptureFixture) -> None:
    redact.register(SECRET)
    log = logging.getLogger("anything.at.all")
    with caplog.at_level(logging.DEBUG):
        log.debug("sending %s to the server", SECRET)
        try:
            raise RuntimeError(f"server echoed {SECRET}")
        except RuntimeError:
            log.exception("request failed")
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert SECRET not in text
    assert "<hidden>" in text and "RuntimeError" in text
