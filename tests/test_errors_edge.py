"""Issue 13, items 7–12, 14, 16: what the real CLI does at the edges of its world.

Odd file names, a journal that cannot be written, stdout that is closed, full or a broken pipe,
Ctrl-C pressed again, FIFOs and devices under PATH, report files, and a server that restarts for
longer than a few retries last. Each test drives the real CLI (a subprocess, or ``CliRunner``)
against the local XNAT-compatible server, and asserts the one line a user sees and the exit code.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from upload_helpers import PASSWORD, TEST_PROJECTS, USER, run_xio, xio_env
from xnatio.archive import instance_file_name
from xnatio.sandbox import SandboxServer
from xnatio.synth import SyntheticSession, generate_session


@pytest.fixture
def xnat_server(tmp_path: Path) -> Iterator[SandboxServer]:
    """The local server with the login ``xio_env`` gives the CLI."""
    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}, projects=TEST_PROJECTS) as server:
        yield server


@pytest.fixture
def session(tmp_path: Path) -> SyntheticSession:
    return generate_session(tmp_path / "in", series=2, instances=3, image_size=(16, 16))


def _no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


# --- item 7: file names that are not UTF-8 -----------------------------------------------------


@pytest.mark.integration
def test_a_file_name_that_is_not_utf8_is_uploaded_and_reported_with_escapes(
    xnat_server: SandboxServer, session: SyntheticSession, tmp_path: Path
) -> None:
    """A DICOM file whose name holds bytes that are not UTF-8 is sent like any other (it goes
    to XNAT as {SOP Instance UID}.dcm), and shown as ``\\xNN`` in JSON, the report and the
    journal; a non-DICOM file with such a name is skipped with its reason. A rerun resumes."""
    victim = next(iter(session.instances.values()))
    odd = os.fsencode(victim.parent) + b"/scan\xff\xfe.dcm"
    os.rename(victim, odd)
    (session.root / os.fsdecode(b"notes\xe9.txt")).write_bytes(b"not dicom\n")
    report = tmp_path / "report.csv"
    env = xio_env(xnat_server.url, tmp_path / "home")
    args = ["upload-dicom", "P", "S", "E", str(session.root)]

    first = run_xio([*args, "--json", "--report", str(report)], env)
    assert first.returncode == 0, first.stderr
    _no_traceback(first.stderr)
    result = json.loads(first.stdout)
    assert result["status"] == "success"
    shown = f"{victim.parent}/scan\\xff\\xfe.dcm"
    assert shown in result["files"]["uploaded"]
    assert [(f["path"], f["outcome"]) for f in result["files"]["skipped"]] == [
        (f"{session.root}/notes\\xe9.txt", "skipped")
    ]
    with report.open(encoding="utf-8") as fh:
        rows = {row["path"]: row["outcome"] for row in csv.DictReader(fh)}
    assert rows[shown] == "verified"
    archived = xnat_server.archived_files("P", "S", "E")
    assert set(archived) == set(session.instances)
    assert {r.name.rsplit("/", 1)[-1] for r in archived.values()} >= {
        instance_file_name(next(iter(session.instances)))
    }

    again = run_xio(args, env)
    assert again.returncode == 0, again.stderr
    assert "resuming: 6 of 6 files were confirmed by an earlier run" in again.stderr
    assert "scan\\xff\\xfe.dcm" not in again.stdout  # nothing failed, nothing listed
    assert "notes\\xe9.txt" in again.stdout  # the skipped file, listed with its escapes
