"""The summary, the --json result and the --report file, built from UploadResult records."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from xnatio.errors import UsageError
from xnatio.models import (
    Batch,
    DicomFile,
    FileOutcome,
    Manifest,
    Outcome,
    SkippedFile,
    StudySummary,
    UploadResult,
)
from xnatio.report import (
    RESULT_SCHEMA,
    account_for_skipped,
    exit_code_of,
    plan_to_dict,
    result_to_dict,
    status_of,
    summary_text,
    write_report,
)


def _result(uploaded: int = 3, failed: int = 0, skipped: int = 1, **kw: object) -> UploadResult:
    files = [
        FileOutcome(f"d/ok{i}", Outcome.UPLOADED, sop_instance_uid=f"1.2.{i}", size=1000, batch=0)
        for i in range(uploaded)
    ]
    files += [
        FileOutcome(f"d/bad{i}", Outcome.FAILED, reason="HTTP 500: disk full", size=1000, batch=1)
        for i in range(failed)
    ]
    files += [
        FileOutcome(f"d/skip{i}.txt", Outcome.SKIPPED, reason="not DICOM") for i in range(skipped)
    ]
    defaults: dict[str, object] = dict(
        success=failed == 0,
        total_files=uploaded + failed,
        duration=2.0,
        total_size_mb=(uploaded + failed) * 1000 / 1e6,
        files=files,
        upload_id="u-123",
        project="P",
        subject="S",
        session="E",
        studies=[StudySummary("1.2.3", "PAT1", uploaded + failed, 1000 * (uploaded + failed))],
        batches_total=2,
        batches_failed=1 if failed else 0,
        session_uri="/data/archive/projects/P/subjects/S/experiments/E",
    )
    defaults.update(kw)
    return UploadResult(**defaults)  # type: ignore[arg-type]


def test_status_and_exit_code() -> None:
    assert status_of(_result()) == "success"
    assert exit_code_of(_result()) == 0
    assert status_of(_result(failed=2)) == "partial"
    assert exit_code_of(_result(failed=2)) == 1
    assert status_of(_result(uploaded=0, failed=2)) == "failed"
    # Everything sent but verification found a mismatch: not a success.
    assert exit_code_of(_result(verified=False)) == 1
    # The transport said no (e.g. the commit failed) although no file is marked failed.
    assert status_of(_result(success=False)) == "failed"


def test_json_result_schema() -> None:
    d = result_to_dict(_result(uploaded=2, failed=1, skipped=1))
    assert d["schema"] == RESULT_SCHEMA
    assert d["status"] == "partial" and d["exit_code"] == 1
    assert (d["project"], d["subject"], d["session"]) == ("P", "S", "E")
    assert d["totals"] == {
        "files": 4,
        "bytes": 3000,
        "uploaded": 2,
        "verified": 0,
        "failed": 1,
        "skipped": 1,
        "uploaded_bytes": 2000,
    }
    assert d["files"]["uploaded"] == ["d/ok0", "d/ok1"]
    assert d["files"]["failed"][0]["path"] == "d/bad0"
    assert d["files"]["failed"][0]["reason"] == "HTTP 500: disk full"
    assert d["files"]["skipped"][0]["reason"] == "not DICOM"
    assert d["batches"] == {"total": 2, "failed": 1}
    assert d["studies"] == [{"study_uid": "1.2.3", "patient_id": "PAT1", "files": 3, "bytes": 3000}]
    assert d["mb_per_s"] == pytest.approx(0.0015)
    json.dumps(d)  # serialisable as is


def test_summary_lists_failures_with_reasons_and_caps_them() -> None:
    text = summary_text(_result(uploaded=1, failed=25, skipped=0), cap=20)
    assert text.startswith("Partly uploaded: 1 of 26 files")
    assert "reached P/S/E, 25 failed" in text
    assert "d/bad0: HTTP 500: disk full" in text
    assert "d/bad19" in text and "d/bad20" not in text
    assert "and 5 more — use --report FILE or --json" in text
    assert "batches 2 (1 failed)" in text


def test_summary_of_success() -> None:
    text = summary_text(_result(verified=True))
    assert text.splitlines()[0].startswith("Uploaded 3 of 3 files")
    assert "verified on the server" in text
    assert "Skipped files (1):" in text and "d/skip0.txt: not DICOM" in text
    assert "session: /data/archive/projects/P/subjects/S/experiments/E" in text
    assert "Failed files" not in text


def test_report_csv_has_one_row_per_file(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    write_report(_result(uploaded=2, failed=1, skipped=1), out)
    with out.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["outcome"] for r in rows] == ["uploaded", "uploaded", "failed", "skipped"]
    assert rows[2]["reason"] == "HTTP 500: disk full"
    assert rows[0]["sop_instance_uid"] == "1.2.0"
    assert rows[3]["batch"] == ""


def test_report_json_lists_uploaded_files_in_full(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    write_report(_result(uploaded=2), out)
    data = json.loads(out.read_text("utf-8"))
    assert data["files"]["uploaded"][1]["sop_instance_uid"] == "1.2.1"


def test_report_to_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot write report"):
        write_report(_result(), tmp_path / "nope" / "r.json")


def _dicom(name: str, series: str = "s1") -> DicomFile:
    return DicomFile(Path(name), 10, 0, "st", series, name, "1.2", 1, "1.2.840.10008.1.2.1", "P")


def test_account_for_skipped_adds_each_once() -> None:
    m = Manifest(
        root=Path("d"),
        files=[_dicom("a")],
        skipped=[SkippedFile(Path("d/skip0.txt"), "not DICOM"), SkippedFile(Path("d/x"), "empty")],
        duplicates=[SkippedFile(Path("d/dup"), "duplicate of d/a")],
    )
    r = account_for_skipped(_result(uploaded=1, skipped=1), m)
    assert sorted(f.path for f in r.skipped) == ["d/dup", "d/skip0.txt", "d/x"]


def test_plan_dict() -> None:
    files = [_dicom("a", "s1"), _dicom("b", "s1"), _dicom("c", "s2")]
    m = Manifest(root=Path("d"), files=files, skipped=[SkippedFile(Path("d/t"), "not DICOM")])
    d = plan_to_dict(m, [Batch(0, tuple(files[:2])), Batch(1, (files[2],))])
    assert d["status"] == "dry-run"
    assert d["totals"]["batches"] == 2 and d["totals"]["series"] == 2
    assert d["batches"][0] == {"index": 0, "files": 2, "bytes": 20, "series": ["s1"]}
    assert d["skipped"] == [{"path": "d/t", "reason": "not DICOM"}]


def test_summary_does_not_repeat_per_file_errors() -> None:
    r = _result(uploaded=1, failed=1, errors=["d/bad0: HTTP 500: disk full", "batch 2: gave up"])
    text = summary_text(r)
    assert text.count("d/bad0: HTTP 500: disk full") == 1
    assert "Errors (1):\n  batch 2: gave up" in text


def test_several_sessions_are_all_listed() -> None:
    uris = ["/data/archive/projects/P/subjects/S/experiments/E", "/data/.../experiments/E_2"]
    r = _result(session_uri=uris[0], session_uris=uris)
    assert result_to_dict(r)["session_uris"] == uris
    text = summary_text(r)
    assert "sessions (2, one per study):" in text and "    /data/.../experiments/E_2" in text
    # A transport that fills only session_uri still gives the list.
    assert result_to_dict(_result())["session_uris"] == [_result().session_uri]


def test_summary_rate_counts_only_what_this_run_sent() -> None:
    # A resumed run with nothing left to send takes a fraction of a second: its rate must not
    # divide the whole session's bytes by that (it once printed 193570.8 MB/s).
    # Who vouches for an outcome is a typed field (issue 12), not a reason's wording.
    from xnatio.models import Origin

    earlier = _result(uploaded=3, duration=0.001)
    for f in earlier.files:
        f.origin = Origin.JOURNAL
    assert "nothing new to send" in summary_text(earlier).splitlines()[0]
    mixed = _result(uploaded=2, duration=0.0001)  # 1,000 bytes sent now in 0.1 ms
    mixed.files[0].origin = Origin.SERVER
    assert "(10.0 MB/s)" in summary_text(mixed).splitlines()[0]
