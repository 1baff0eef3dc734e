"""Secrets never leave the process: logs, errors, reports, --json and -v tracebacks.

Each test plants a distinctive secret and fails if it shows up anywhere it could leak.
"""

from __future__ import annotations

import io
import logging
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from xnatio import redact
from xnatio.archive import make_archive_stream
from xnatio.models import DicomFile

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


# -- archive member names ------------------------------------------------------------------------


def _dicom_file(path: Path) -> DicomFile:
    st = path.stat()
    return DicomFile(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        study_uid="1.2",
        series_uid="1.2.3",
        sop_instance_uid=f"1.2.3.{abs(hash(path)) % 10_000}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_number=1,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="PAT",
    )


@pytest.mark.parametrize("fmt", ["tar", "zip", "tgz"])
def test_archive_member_names_are_relative_and_safe(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "etc" / "passwd"
    outside.parent.mkdir(parents=True)
    files = []
    for p in (
        root / "a" / "b" / "ok.dcm",
        root / "..dots..",
        root / "a" / "ctl\x01name",
        root / "a" / "back\\slash",
        outside,  # reached through a symlink, discovery can hand a path outside the root
    ):
        p.write_bytes(b"DICM" * 8)
        files.append(_dicom_file(p))
    stream = make_archive_stream(files, fmt, root=root)
    data = b"".join(stream)
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    else:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            names = tf.getnames()
    assert len(names) == len(files)
    for name in names:
        assert not name.startswith("/") and not PurePosixPath(name).is_absolute()
        assert ".." not in PurePosixPath(name).parts
        assert not any(ord(c) < 32 for c in name)
    # Extracting with the strict filter of the standard library accepts every name.
    if fmt != "zip":
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            tf.extractall(tmp_path / "out", filter="data")
        assert sum(1 for p in (tmp_path / "out").rglob("*") if p.is_file()) == len(files)
