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

from upload_helpers import PASSWORD, USER, import_tar
from xnatio.cli import verify as cli_verify
from xnatio.cli.main import cli
from xnatio.discover import discover
from xnatio.models import DicomFile, Outcome
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session
from xnatio.verify import ServerFile, ServerScan, compare, md5_of, read_session, verify_session
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
    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}) as server:
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
    rows = list(csv.DictReader(report.open()))
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
    assert {row["outcome"] for row in csv.DictReader(report.open())} == {"uploaded"}
    r = runner.invoke(cli, [*args, "--restart", "--overwrite", "append"])
    assert r.exit_code == 0, r.output
    assert reads() == 3  # one DICOM file listing per scan
    assert {row["outcome"] for row in csv.DictReader(report.open())} == {"verified"}
