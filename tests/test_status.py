"""`xio status`: the ledger as a person reads it the next morning (no server needed)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner

from xnatio.cli.main import cli
from xnatio.many import ledger as states
from xnatio.many.ledger import Ledger, StudyRecord, study_key


def record(uid: str, state: str, **kw: object) -> StudyRecord:
    return StudyRecord(
        key=study_key("https://xnat.example.org", "P", uid),
        server="https://xnat.example.org",
        study_uid=uid,
        project="P",
        subject=f"S{uid}",
        session=f"S{uid}_MR",
        state=state,
        patient_id=f"PAT{uid}",
        files=10,
        first_seen=float(uid),
        **kw,  # type: ignore[arg-type]
    )


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["status", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_status_lists_every_study_worst_first(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "state").ensure()
    ledger.put(record("1", states.VERIFIED, reason="verified"))
    ledger.put(record("2", states.QUARANTINED, attempts=3, last_error="label holds another study"))
    ledger.put(record("3", states.WAITING, reason="settling: newest file 2 min old"))
    code, out, _ = invoke("--state-dir", str(tmp_path / "state"))
    assert code == 1  # a quarantined study needs a person
    lines = out.splitlines()
    assert lines[0] == "3 studies: 1 verified, 1 quarantined, 1 waiting"
    assert lines[2].split()[:4] == ["quarantined", "P/S2/S2_MR", "PAT2", "10"]
    assert "label holds another study" in lines[2]
    assert lines[-1].startswith("verified")


def test_status_json_and_exit_0_when_all_verified_or_waiting(
    tmp_path: Path, monkeypatch: object
) -> None:
    ledger = Ledger(tmp_path / "state").ensure()
    ledger.put(record("1", states.VERIFIED))
    ledger.put(record("2", states.WAITING, reason="PatientID is empty"))
    code, out, _ = invoke("--state-dir", str(tmp_path / "state"), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["totals"]["verified"] == 1 and doc["totals"]["waiting"] == 1
    assert {s["study_uid"] for s in doc["studies"]} == {"1", "2"}


def test_status_reads_the_default_state_dir_and_an_empty_one(
    tmp_path: Path, isolated_home: Path
) -> None:
    code, out, _ = invoke()
    assert code == 0 and out.strip() == "no studies"
    Ledger().ensure().put(record("7", states.FAILED, attempts=1, last_error="boom"))
    assert (isolated_home / ".local/state/xnatio/many/studies").is_dir()
    code, out, _ = invoke()
    assert code == 1 and "boom" in out


def test_records_are_written_0600_atomically_and_a_damaged_one_is_skipped(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "state").ensure()
    r = record("1", states.VERIFIED)
    ledger.put(r)
    path = ledger.file_of(r.key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob(".*.tmp"))
    (path.parent / "broken.json").write_text("{not json")
    assert [x.study_uid for x in ledger.records()] == ["1"]


def test_live_display_shows_studies_in_flight_and_totals() -> None:
    """The terminal display: a line per study in flight and a totals line, redrawn; a line per
    finished study above it; then the summary table."""
    import io

    from rich.console import Console

    from xnatio.cli.options import OutputArgs
    from xnatio.cli.upload_many import LiveDisplay, summary_table
    from xnatio.many.runner import ManyEvent, ManyResult, StudyOutcome

    out = io.StringIO()
    display = LiveDisplay(OutputArgs(), Console(file=out, force_terminal=True, width=120))
    r = record("1", states.PLANNED)
    r.bytes = 2_000_000
    with display:
        display(ManyEvent(kind="planned", record=r))
        display(ManyEvent(kind="started", record=r))
        display(ManyEvent(kind="progress", record=r, files_done=5, bytes_done=1_000_000))
        assert "P/S1/S1_MR: 5/10 files, 1.0/2.0 MB" in str(display._render())
        assert "0/1 studies, 1.0/2.0 MB" in str(display._render())
        r.state = states.VERIFIED
        display(ManyEvent(kind="verified", record=r))
        assert "1/1 studies, 2.0/2.0 MB" in str(display._render())
    assert "verified P/S1/S1_MR (10 files, 2.0 MB)" in out.getvalue()
    table = summary_table(ManyResult(studies=[StudyOutcome(record=r, ran=True, sent_files=10)]))
    assert table.splitlines()[0].startswith("1 studies: 1 verified, 0 failed")
    assert table.splitlines()[2].split()[:4] == ["verified", "P/S1/S1_MR", "10", "10"]
