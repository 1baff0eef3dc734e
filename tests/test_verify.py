"""Read-back verification: the matching rule (unit) and the HTTP reads (``responses``)."""

from __future__ import annotations

import csv
import hashlib
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses
from click.testing import CliRunner

from upload_helpers import PASSWORD, TEST_PROJECTS, USER, import_tar, upload
from xnatio.cli import verify as cli_verify
from xnatio.cli.main import cli
from xnatio.discover import discover
from xnatio.models import DicomFile, Outcome
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session
from xnatio.verify import (
    HEADER_SLACK,
    REWRITE_REASON,
    ServerFile,
    ServerScan,
    VerifyReport,
    compare,
    md5_of,
    read_session,
    verify_session,
)
from xnatio.xnat.client import XnatClient

BASE = "https://xnat.test/data/projects/P/subjects/S/experiments/E"


def local_file(
    path: Path, data: bytes, series: int, i: int, *, member: str | None = None
) -> DicomFile:
    if member is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return DicomFile(
        path=path,
        size=len(data),
        mtime_ns=0,
        study_uid="1.2",
        series_uid=f"1.2.{series}",
        sop_instance_uid=f"1.2.{series}.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_number=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="PAT",
        member=member,
    )


def session(tmp_path: Path, series: int = 2, per: int = 3) -> list[DicomFile]:
    return [
        local_file(tmp_path / f"s{s}" / f"f{i}", f"series {s} image {i} ".encode() * (i + 1), s, i)
        for s in range(1, series + 1)
        for i in range(per)
    ]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def as_server(
    files: list[DicomFile], *, digests: bool = True, uids: bool = True
) -> list[ServerScan]:
    scans: dict[int, ServerScan] = {}
    for n, f in enumerate(files):
        assert f.series_number is not None
        scan = scans.setdefault(
            f.series_number, ServerScan(str(f.series_number), f.series_uid if uids else "")
        )
        data = f.path.read_bytes()
        scan.files.append(ServerFile(f"renamed-{n}.dcm", len(data), md5(data) if digests else None))
    return list(scans.values())


def test_everything_landed(tmp_path: Path) -> None:
    files = session(tmp_path)
    checks, unmatched, unreadable = compare(files, as_server(files))
    assert [c.scan_id for c in checks] == ["1", "2"]
    assert all(c.ok and c.compared_md5 for c in checks)
    assert sum(len(c.verified) for c in checks) == 6
    assert unmatched == [] and unreadable == []


def test_missing_and_different_files_are_found(tmp_path: Path) -> None:
    files = session(tmp_path)
    scans = as_server(files)
    scans[0].files.pop()  # one file of series 1 never landed
    scans[1].files[0].md5 = "0" * 32  # one file of series 2 landed damaged
    checks, _, _ = compare(files, scans)
    s1, s2 = checks
    assert len(s1.missing) == 1 and not s1.different and len(s1.verified) == 2
    assert len(s2.different) == 1 and not s2.missing and s2.different[0] is files[3]
    assert not s1.ok and not s2.ok


def test_size_only_when_the_server_gives_no_digest(tmp_path: Path) -> None:
    files = session(tmp_path)
    scans = as_server(files, digests=False)
    checks, _, _ = compare(files, scans)
    assert all(c.ok and not c.compared_md5 for c in checks)
    scans[0].files[1].size += 1
    checks, _, _ = compare(files, scans)
    assert len(checks[0].different) == 1


def test_series_matched_by_number_without_uids_and_missing_scan(tmp_path: Path) -> None:
    files = session(tmp_path, series=3)
    scans = as_server(files, uids=False)
    scans = [s for s in scans if s.id != "3"]
    scans.append(ServerScan("99", "", [ServerFile("x.dcm", 10, None)]))
    checks, unmatched, _ = compare(files, scans)
    assert [c.ok for c in checks] == [True, True, False]
    assert checks[2].scan_id == "" and len(checks[2].missing) == 3
    assert unmatched == ["99"]


def test_extra_server_files_are_shown_but_not_a_failure(tmp_path: Path) -> None:
    files = session(tmp_path, series=1)
    scans = as_server(files)
    scans[0].files.append(ServerFile("older.dcm", 5, md5(b"older")))
    (check,), _, _ = compare(files, scans)
    assert check.ok and check.extra == ["older.dcm"]


def rewritten(scans: list[ServerScan], grow: int = 90) -> list[ServerScan]:
    """What a site anonymization script leaves: every file a little larger, another MD5."""
    for scan in scans:
        for sf in scan.files:
            sf.size += grow
            sf.md5 = md5(sf.name.encode() + b"anonymized") if sf.md5 else None
    return scans


def report_of(files: list[DicomFile], scans: list[ServerScan]) -> VerifyReport:
    report = VerifyReport("P", "S", "E", found=True)
    report.series, report.unmatched_scans, report.unreadable = compare(files, scans)
    return report


@pytest.mark.parametrize("digests", [True, False])
def test_server_that_rewrites_every_file_verifies_by_count(tmp_path: Path, digests: bool) -> None:
    files = session(tmp_path)
    report = report_of(files, rewritten(as_server(files, digests=digests)))
    assert report.ok and report.problems == []
    assert report.verified == [] and len(report.rewritten) == len(files)
    assert report.warning == (
        "warning: the server rewrote every file it stored (a site anonymization script?): "
        "6 files verified by instance count per series, bytes not compared"
    )
    assert {(o.outcome, o.reason) for o in report.outcomes()} == {
        (Outcome.VERIFIED, REWRITE_REASON)
    }
    data = report.to_dict()
    assert data["ok"] and data["server_rewrote"] and data["warnings"] == [report.warning]
    assert [(s["verified"], s["rewritten"]) for s in data["series"]] == [(3, 3), (3, 3)]
    assert "rewritten" in report.table().splitlines()[0]


def test_identical_files_next_to_different_ones_are_not_a_server_rewrite(tmp_path: Path) -> None:
    files = session(tmp_path)
    scans = as_server(files)
    rewritten([scans[1]])  # series 2 differs everywhere, series 1 is byte-identical
    report = report_of(files, scans)
    assert not report.ok and report.rewritten == [] and report.warning == ""
    assert len(report.verified) == 3
    assert [len(s.different) for s in report.series] == [0, 3]
    assert all("differs on the server (size/MD5; series 2" in why for _, why in report.problems)
    assert report.note.startswith("3 other file(s) are byte-identical on the server")
    assert "rewritten" not in report.table()


def test_rewriting_server_still_needs_every_instance(tmp_path: Path) -> None:
    files = session(tmp_path)
    scans = rewritten(as_server(files))
    scans[1].files.pop()  # series 2: 2 of 3 on the server
    report = report_of(files, scans)
    assert not report.ok
    s1, s2 = report.series
    assert s1.ok and len(s1.rewritten) == 3  # a complete series is counted in
    assert not s2.ok and len(s2.missing) == 1 and len(s2.different) == 2 and not s2.rewritten
    reasons = [why for _, why in report.problems]
    assert sum(why.startswith("not on the server after upload") for why in reasons) == 1
    assert sum("holds 2 of the 3 sent" in why for why in reasons) == 2
    assert "3 files verified by instance count" in report.warning

    # One more file in a scan than was sent: which ones are ours cannot be told either.
    scans = rewritten(as_server(files))
    scans[0].files.append(ServerFile("older.dcm", files[0].size + 90, md5(b"older")))
    report = report_of(files, scans)
    assert not report.ok and len(report.series[0].different) == 3
    assert "holds 4 for the 3 sent" in report.problems[0][1]


def test_rewrite_that_changes_the_size_too_much_is_not_accepted(tmp_path: Path) -> None:
    files = session(tmp_path, series=1)
    report = report_of(files, rewritten(as_server(files), grow=HEADER_SLACK + 1))
    assert not report.ok and len(report.series[0].different) == 3
    assert f"by up to {HEADER_SLACK + 1} bytes, more than a header rewrite" in report.problems[0][1]
    # A script that strips tags makes files smaller: that is a rewrite too.
    report = report_of(files, rewritten(as_server(files), grow=-10))
    assert report.ok and len(report.rewritten) == 3


def test_unreadable_local_file_is_reported(tmp_path: Path) -> None:
    files = session(tmp_path, series=1)
    scans = as_server(files)
    files[0].path.unlink()
    (check,), _, unreadable = compare(files, scans)
    assert len(check.verified) == len(files) - 1
    assert [f for f, _ in unreadable] == [files[0]]
    assert "cannot read it to verify" in unreadable[0][1]


def test_md5_streams_archive_members(tmp_path: Path) -> None:
    data = b"DICM" * 1000
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("dir/one.dcm", data)
    assert md5_of(archive, member="dir/one.dcm", chunk=7) == md5(data)
    plain = tmp_path / "p"
    plain.write_bytes(data)
    assert md5_of(plain, chunk=3) == md5(data)


class _Client:
    """The one method verification uses, over ``requests`` (``responses`` answers)."""

    def get_json(self, path: str, params: object = None) -> object:
        from xnatio.errors import ServerError

        resp = requests.get("https://xnat.test" + path, params={"format": "json"}, timeout=5)
        if resp.status_code >= 400:
            raise ServerError(resp.text, status=resp.status_code)
        return resp.json()


@responses.activate
def test_read_session_and_report(tmp_path: Path) -> None:
    files = session(tmp_path, series=1, per=2)
    responses.get(
        BASE,
        json={
            "items": [
                {
                    "data_fields": {"ID": "X1", "label": "E"},
                    "children": [
                        {
                            "field": "scans/scan",
                            "items": [{"data_fields": {"ID": "1", "UID": "1.2.1"}}],
                        }
                    ],
                }
            ]
        },
    )
    responses.get(BASE + "/scans", json={"ResultSet": {"Result": [{"ID": "1", "type": "T1"}]}})
    rows = [
        {"Name": f"n{i}.dcm", "Size": str(f.size), "digest": md5(f.path.read_bytes()), "URI": "/x"}
        for i, f in enumerate(files[:1])
    ]
    responses.get(BASE + "/scans/1/resources/DICOM/files", json={"ResultSet": {"Result": rows}})
    report = verify_session(_Client(), "P", "S", "E", files)
    assert report.found and not report.ok
    outcomes = {o.path: o for o in report.outcomes()}
    assert outcomes[str(files[0].path)].outcome is Outcome.VERIFIED
    assert outcomes[str(files[1].path)].outcome is Outcome.FAILED
    assert "not on the server" in outcomes[str(files[1].path)].reason
    table = report.table()
    assert "missing" in table.splitlines()[0]
    assert report.to_dict()["series"][0]["missing"] == [str(files[1].path)]


@responses.activate
def test_missing_session(tmp_path: Path) -> None:
    files = session(tmp_path, series=1, per=1)
    responses.get(BASE, status=404, body="Unable to find the specified experiment.")
    assert read_session(_Client(), "P", "S", "E") is None
    report = verify_session(_Client(), "P", "S", "E", files)
    assert not report.found and not report.ok
    assert [o.outcome for o in report.outcomes()] == [Outcome.FAILED]


@pytest.mark.parametrize("label", ["E 1", "a/b"])
@responses.activate
def test_labels_are_quoted(label: str) -> None:
    responses.get(
        "https://xnat.test/data/projects/P/subjects/S/experiments/"
        + requests.utils.quote(label, safe=""),
        status=404,
    )
    assert read_session(_Client(), "P", "S", label) is None


# -- against the local XNAT server -----------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}, projects=TEST_PROJECTS) as server:
        yield server


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, list[DicomFile]]:
    root = tmp_path / "exam"
    generate_session(root, series=3, instances=4, image_size=(32, 32), seed=5)
    return root, discover(root).files


@pytest.mark.integration
def test_verify_against_the_server(
    sandbox: SandboxServer, synthetic: tuple[Path, list[DicomFile]]
) -> None:
    _, files = synthetic
    import_tar(sandbox.url, files[:8])
    with XnatClient(sandbox.url, username=USER, password=PASSWORD) as client:
        partial = verify_session(client, "P", "S", "E", files)
        assert not partial.ok
        assert sorted(len(s.missing) for s in partial.series) == [0, 0, 4]
        assert all(s.compared_md5 for s in partial.series if s.scan_id)
        import_tar(sandbox.url, files[8:])
        full = verify_session(client, "P", "S", "E", files)
    assert full.ok and len(full.verified) == len(files)


@pytest.mark.integration
def test_verify_command(
    sandbox: SandboxServer,
    synthetic: tuple[Path, list[DicomFile]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    root, files = synthetic
    monkeypatch.setenv("XNAT_SERVER", sandbox.url)
    monkeypatch.setenv("XNAT_USERNAME", USER)
    monkeypatch.setenv("XNAT_PASSWORD", PASSWORD)
    runner = CliRunner()
    import_tar(sandbox.url, files)
    ok = runner.invoke(cli, ["verify", "P", "S", "E", str(root)])
    assert ok.exit_code == 0, ok.output
    assert f"holds all {len(files)} files (3 series)" in ok.output

    # A file that changed locally after the upload no longer matches what the server holds.
    changed = files[5].path
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF
    changed.write_bytes(bytes(data))
    report = tmp_path / "verify.csv"
    bad = runner.invoke(cli, ["verify", "P", "S", "E", str(root), "--report", str(report)])
    assert bad.exit_code == 1
    assert "1 file(s) missing or different" in bad.output
    assert f"{changed}: differs on the server (size/MD5" in bad.output
    rows = list(csv.DictReader(report.read_text().splitlines()))
    assert {r["outcome"] for r in rows if r["path"] == str(changed)} == {"failed"}
    assert sum(r["outcome"] == "verified" for r in rows) == len(files) - 1

    as_json = runner.invoke(cli, ["verify", "P", "S", "E", str(root), "--json"])
    assert as_json.exit_code == 1
    data_out = json.loads(as_json.stdout)
    assert data_out["ok"] is False
    assert sum(len(s["different"]) for s in data_out["series"]) == 1

    missing = runner.invoke(cli, ["verify", "P", "S", "NOPE", str(root)])
    assert missing.exit_code == 1 and "not found on the server" in missing.output
    assert PASSWORD not in ok.output + bad.output + as_json.output + missing.output


@pytest.mark.integration
def test_verify_waits_for_a_session_still_arriving(
    sandbox: SandboxServer,
    synthetic: tuple[Path, list[DicomFile]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--wait-for``: the first read-back finds half the files (as after a C-STORE upload that
    XNAT has not finished filing); the rest arrives meanwhile; verify then passes."""
    root, files = synthetic
    monkeypatch.setenv("XNAT_SERVER", sandbox.url)
    monkeypatch.setenv("XNAT_USERNAME", USER)
    monkeypatch.setenv("XNAT_PASSWORD", PASSWORD)
    monkeypatch.setattr(cli_verify, "POLL_SECONDS", 0.1)
    import_tar(sandbox.url, files[:6])

    def late_arrival() -> None:
        # Once the first read-back has listed the two scans there are so far, the rest lands.
        def listings() -> int:
            return sum(v for k, v in sandbox.stats().items() if k.endswith("/files"))

        deadline = time.monotonic() + 20
        while listings() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        import_tar(sandbox.url, files[6:])

    arrival = threading.Thread(target=late_arrival, daemon=True)
    arrival.start()
    runner = CliRunner()
    r = runner.invoke(cli, ["verify", "P", "S", "E", str(root), "--wait-for", "30"])
    arrival.join(20)
    assert r.exit_code == 0, r.output
    assert f"holds all {len(files)} files" in r.output
    # It did read back more than once: the first time the session was incomplete.
    assert sum(v for k, v in sandbox.stats().items() if k.endswith("/scans")) >= 2

    # Never complete: gives up after the wait with the per-series table.
    r = runner.invoke(cli, ["verify", "P", "S", "E2", str(root), "--wait-for", "0.3"])
    assert r.exit_code == 1 and "not found on the server" in r.output


@pytest.mark.integration
def test_upload_reads_back_unless_no_verify(
    sandbox: SandboxServer,
    synthetic: tuple[Path, list[DicomFile]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    root, _ = synthetic
    monkeypatch.setenv("XNAT_SERVER", sandbox.url)
    monkeypatch.setenv("XNAT_USERNAME", USER)
    monkeypatch.setenv("XNAT_PASSWORD", PASSWORD)
    runner = CliRunner()

    def reads() -> int:
        return sum(v for k, v in sandbox.stats().items() if k.endswith("/files"))

    report = tmp_path / "r.csv"
    args = ["upload-dicom", "P", "S", "E", str(root), "--report", str(report)]
    r = runner.invoke(cli, [*args, "--no-verify"])
    assert r.exit_code == 0, r.output
    assert reads() == 0  # nothing read back
    assert {row["outcome"] for row in csv.DictReader(report.read_text().splitlines())} == {
        "uploaded"
    }
    r = runner.invoke(cli, [*args, "--restart", "--overwrite", "append"])
    assert r.exit_code == 0, r.output
    assert reads() == 3  # one DICOM file listing per scan
    assert {row["outcome"] for row in csv.DictReader(report.read_text().splitlines())} == {
        "verified"
    }


# -- a server that rewrites what it stores (the sandbox's site_anonymization knob) -----------------


@pytest.fixture
def cli_env(sandbox: SandboxServer, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("XNAT_SERVER", sandbox.url)
    monkeypatch.setenv("XNAT_USERNAME", USER)
    monkeypatch.setenv("XNAT_PASSWORD", PASSWORD)
    return CliRunner()


@pytest.mark.integration
def test_upload_to_a_server_that_rewrites_every_file_ends_verified(
    sandbox: SandboxServer,
    synthetic: tuple[Path, list[DicomFile]],
    cli_env: CliRunner,
    tmp_path: Path,
) -> None:
    root, files = synthetic
    sandbox.set_knobs(site_anonymization=True)
    report = tmp_path / "r.csv"
    r = cli_env.invoke(cli, ["upload-dicom", "P", "S", "E", str(root), "--report", str(report)])
    assert r.exit_code == 0, r.output
    warning = (
        "Warning: the server rewrote every file it stored (a site anonymization script?): "
        f"{len(files)} files verified by instance count per series, bytes not compared"
    )
    assert "verified on the server" in r.stdout and r.stdout.count(warning) == 1
    rows = list(csv.DictReader(report.read_text().splitlines()))
    assert {(row["outcome"], row["reason"]) for row in rows} == {("verified", REWRITE_REASON)}
    # Really rewritten: no stored file has the bytes that were sent.
    stored = sandbox.archived_files("P", "S", "E")
    assert len(stored) == len(files)
    assert all(stored[f.sop_instance_uid].md5 != md5_of(f.path) for f in files)

    ok = cli_env.invoke(cli, ["verify", "P", "S", "E", str(root)])
    assert ok.exit_code == 0, ok.output
    # The result; progress lines are on stderr.
    assert ok.stdout.splitlines() == [
        f"verify: P/S/E holds all {len(files)} files (3 series)",
        warning[:1].lower() + warning[1:],
    ]
    as_json = json.loads(cli_env.invoke(cli, ["verify", "P", "S", "E", str(root), "--json"]).stdout)
    assert as_json["ok"] and as_json["server_rewrote"] and len(as_json["warnings"]) == 1


@pytest.mark.integration
def test_library_upload_to_a_rewriting_server(
    sandbox: SandboxServer, synthetic: tuple[Path, list[DicomFile]], tmp_path: Path
) -> None:
    root, files = synthetic
    sandbox.set_knobs(site_anonymization=True)
    result = upload(sandbox.url, root, tmp_path / "journal.sqlite")
    assert result.success and result.verified, result.errors
    assert len(result.files) == len(files)
    assert {o.outcome for o in result.files} == {Outcome.VERIFIED}
    assert len(result.warnings) == 1
    assert f"{len(files)} files verified by instance count" in result.warnings[0]


@pytest.mark.integration
def test_rewriting_server_missing_one_file_fails(
    sandbox: SandboxServer, synthetic: tuple[Path, list[DicomFile]], cli_env: CliRunner
) -> None:
    root, files = synthetic
    sandbox.set_knobs(site_anonymization=True)
    lost = files[-1]
    import_tar(sandbox.url, [f for f in files if f is not lost])
    r = cli_env.invoke(cli, ["verify", "P", "S", "E", str(root), "--json"])
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["ok"] is False
    by_series = {s["series_number"]: s for s in data["series"]}
    broken = by_series[lost.series_number]
    assert len(broken["missing"]) == 1 and broken["on_server"] == broken["local"] - 1
    # The complete series are counted in (the server evidently rewrites every file).
    complete = [s for n, s in by_series.items() if n != lost.series_number]
    assert [s["rewritten"] for s in complete] == [s["local"] for s in complete] == [4, 4]
    text = cli_env.invoke(cli, ["verify", "P", "S", "E", str(root)])
    assert text.exit_code == 1
    assert "file(s) missing or different" in text.output and "rewritten" in text.output


@pytest.mark.integration
def test_some_files_identical_and_some_rewritten_fails(
    sandbox: SandboxServer, synthetic: tuple[Path, list[DicomFile]], cli_env: CliRunner
) -> None:
    """Half the session stored as sent, half rewritten: not what a site script does (it rewrites
    every file), so the differences fail."""
    root, files = synthetic
    import_tar(sandbox.url, files[:6])
    sandbox.set_knobs(site_anonymization=True)
    import_tar(sandbox.url, files[6:])
    r = cli_env.invoke(cli, ["verify", "P", "S", "E", str(root)])
    assert r.exit_code == 1
    assert f"{len(files) - 6} file(s) missing or different" in r.output
    assert "note: 6 other file(s) are byte-identical on the server" in r.output
    assert "warning" not in r.output and "rewritten" not in r.output
    assert sum(": differs on the server (size/MD5" in line for line in r.output.splitlines()) == 6


# -- progress of the read-back (Phase.VERIFY) -----------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("studies", [1, 2])
def test_upload_read_back_emits_verify_progress(
    xnat_server: SandboxServer, tmp_path: Path, studies: int
) -> None:
    # A real resumable REST upload: the read-back after the commit reports files and bytes
    # hashed/compared, counted over every session of a multi-study upload, up to the whole.
    from xnatio.models import Phase, ProgressEvent
    from xnatio.resume import ResumeOptions, resumable_rest_upload
    from xnatio.transports.rest import RestTarget

    extras = ["second-study"] if studies == 2 else []
    generate_session(tmp_path / "exam", series=2, instances=3, image_size=(32, 32), extras=extras)
    manifest = discover(tmp_path / "exam")
    assert len(manifest.studies()) == studies
    events: list[ProgressEvent] = []
    with XnatClient(
        xnat_server.url, username=xnat_server.username, password=xnat_server.password
    ) as client:
        result = resumable_rest_upload(
            client,
            manifest,
            RestTarget(project="P", subject="S", session="E", num_batches=2),
            options=ResumeOptions(journal=tmp_path / "journal.sqlite"),
            progress_callback=events.append,
        )
    assert result.success and result.verified
    phases = [e.phase for e in events]
    verify = [e for e in events if e.phase is Phase.VERIFY]
    assert verify and Phase.UPLOAD in phases
    assert phases.index(Phase.VERIFY) > max(i for i, p in enumerate(phases) if p is Phase.UPLOAD)
    n, size = len(manifest.files), sum(f.size for f in manifest.files)
    assert {(e.total, e.bytes_total) for e in verify} == {(n, size)}
    assert verify[0].current == 0 and "back" in verify[0].message
    assert [e.current for e in verify] == sorted(e.current for e in verify)
    assert [e.bytes_done for e in verify] == sorted(e.bytes_done for e in verify)
    assert (verify[-1].current, verify[-1].bytes_done) == (n, size)
    # one "reading back" event per session, then (the sandbox keeps MD5 digests) one per file
    assert len([e for e in verify if "back" in e.message]) == studies
    assert len([e for e in verify if not e.message]) == n


def test_verify_progress_counts_series_compared_by_size_or_not_found(tmp_path: Path) -> None:
    from xnatio.models import Phase, ProgressEvent

    files = session(tmp_path, series=2, per=3)
    # series 1 on the server without digests (compared by size), series 2 not there at all
    scans = as_server(files[:3], digests=False)
    events: list[ProgressEvent] = []
    compare(files, scans, progress=events.append)
    size1, size = sum(f.size for f in files[:3]), sum(f.size for f in files)
    assert all(e.phase is Phase.VERIFY and (e.total, e.bytes_total) == (6, size) for e in events)
    assert [(e.current, e.bytes_done) for e in events] == [(3, size1), (6, size)]
