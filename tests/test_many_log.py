"""`xio upload-many` as a log (stderr a pipe: cron, CI), issue 17: every line timestamped, the
run's progress at a steady ``--log-interval`` (the same LogDisplay as upload-dicom's), a line per
study event, and a line count bounded by duration / interval + events, never by the size.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest

from upload_helpers import run_xio_stamped
from xnatio.cli.options import OutputArgs
from xnatio.cli.upload_many import ManyDisplay
from xnatio.many.ledger import StudyRecord
from xnatio.many.runner import ManyEvent
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ")


_xio = run_xio_stamped


@pytest.mark.integration
def test_upload_many_log_is_timestamped_at_a_steady_interval(
    tmp_path: Path, xnat_server: SandboxServer
) -> None:
    root = tmp_path / "outbox"
    for i in range(2):
        generate_session(
            root / f"study{i}",
            series=2,
            instances=8,
            image_size=(8, 8),
            patient_id=f"PAT{i}",
            seed=i + 1,
        )
    # Slowed server (60 ms a file, one batch at a time): the run lasts a few seconds, long
    # enough for periodic lines at a 0.5 s interval.
    xnat_server.set_knobs(per_file_ms=60.0)
    interval = 0.5
    env = {
        "XNAT_SERVER": xnat_server.url,
        "XNAT_USERNAME": xnat_server.username,
        "XNAT_PASSWORD": xnat_server.password,
    }
    time.sleep(1.1)  # older than --settle 1s
    started = time.monotonic()
    proc = _xio(
        "upload-many",
        str(root),
        *("--project", "P", "--state-dir", str(tmp_path / "state"), "--settle", "1s"),
        *("--parallel-studies", "1", "--num-batches", "4", "--upload-workers", "1"),
        *("--log-interval", str(interval)),
        env=env,
        home=tmp_path,
    )
    duration = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(STAMP.match(ln) for ln in lines), lines  # stamped once, by the CLI
    text = [STAMP.sub("", ln) for ln in lines]
    assert not any(STAMP.match(t) for t in text), text  # not twice
    assert "\x1b[" not in proc.stderr
    progress = [t for t in text if t.startswith("upload: ")]
    assert progress, text
    assert progress[-1].startswith("upload: 32/32 files"), progress
    # 2 studies x (planned, started, verified) event lines; the progress lines one per
    # interval, plus the first and the completing one of each study.
    events = [t for t in text if not t.startswith("upload: ")]
    assert len(events) == 6, events
    assert events[-1] == "verified P/PAT1/PAT1_20260101_MR (16 files, 0.0 MB)", events
    bound = duration / interval + 2 * 2 + 1
    assert len(progress) <= bound, (len(progress), bound, text)
    assert "verified" in proc.stdout  # the summary table, on stdout


def test_upload_many_heartbeat_while_a_study_makes_no_progress() -> None:
    """The log's heartbeat: a line at the interval while nothing moves (XNAT importing)."""
    out = io.StringIO()
    display = ManyDisplay(OutputArgs(), out, log_interval=0.1)
    record = StudyRecord(
        key="k", server="http://x", study_uid="1.2.3", project="P", subject="S", session="E"
    )
    record.files, record.bytes = 10, 1000
    with display:
        display(ManyEvent(kind="planned", record=record))
        display(ManyEvent(kind="started", record=record))
        display(ManyEvent(kind="progress", record=record, files_done=5, bytes_done=500))
        deadline = time.monotonic() + 10
        while out.getvalue().count("upload: 5/10 files") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        display(ManyEvent(kind="verified", record=record))
    lines = out.getvalue().splitlines()
    assert sum("upload: 5/10 files" in ln for ln in lines) >= 2, lines
    assert lines[-1].startswith("upload: 10/10 files"), lines
    assert lines[:2] == ["planned  P/S/E (10 files, 0.0 MB)", "started  P/S/E (10 files, 0.0 MB)"]
