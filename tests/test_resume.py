"""Resume against the local XNAT server: a re-run sends only what the server has not confirmed.

Every test checks the server's side too: what it imported (``files_imported`` in its stats) and
that the archived session holds each instance exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import requests

from proc_helpers import reap
from upload_helpers import (
    PASSWORD,
    TEST_PROJECTS,
    USER,
    assert_each_file_once,
    big_session,
    import_tar,
    imported,
    journal_rows,
    run_xio,
    upload,
    wait_for,
    xio_command,
    xio_env,
)
from xnatio.discover import discover
from xnatio.errors import XnatioError
from xnatio.journal import EARLIER_RUN_REASON
from xnatio.models import Origin, Outcome
from xnatio.report import summary_text
from xnatio.resume import ALREADY_REASON
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session

pytestmark = pytest.mark.integration


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}, projects=TEST_PROJECTS) as server:
        yield server


@pytest.fixture
def exam(tmp_path: Path) -> Path:
    root = tmp_path / "exam"
    generate_session(root, series=3, instances=4, image_size=(32, 32), seed=11)
    return root


def test_partial_failure_then_rerun_sends_only_the_rest(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite"
    manifest = discover(exam)
    # The first two import requests fail for good (507: XNAT's disk is full).
    sandbox.set_knobs(fail_next=2, fail_status=507, fault_path="/data/services/import")
    first = upload(sandbox.url, exam, journal)
    failed = [o for o in first.files if o.outcome is Outcome.FAILED]
    landed = [o for o in first.files if o.outcome is Outcome.VERIFIED]
    assert failed and landed and len(failed) + len(landed) == len(manifest.files)
    assert not first.success
    assert all("Injected failure (507)" in o.reason for o in failed)
    sent_first = imported(sandbox)
    assert sent_first == len(landed)

    second = upload(sandbox.url, exam, journal)
    assert second.success and second.verified
    assert imported(sandbox) - sent_first == len(failed)  # only the rest was sent
    by_reason = {o.path: o.reason for o in second.files}
    assert {by_reason[o.path] for o in landed} == {EARLIER_RUN_REASON}
    assert {o.outcome for o in second.files} == {Outcome.VERIFIED}
    assert_each_file_once(sandbox, manifest)


def test_disk_full_fails_clearly_then_completes(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite"
    manifest = discover(exam)
    sandbox.set_knobs(disk_full=True, fault_path="/data/services/import")
    first = upload(sandbox.url, exam, journal)
    assert not first.success
    assert {o.outcome for o in first.files} == {Outcome.FAILED}
    # XNAT reports a full disk as 400 "unable to read DICOM object NAME" (facts 1.4, no 507).
    assert all("unable to read DICOM object" in o.reason for o in first.files)
    sandbox.set_knobs(disk_full=False)
    second = upload(sandbox.url, exam, journal)
    assert second.success and {o.outcome for o in second.files} == {Outcome.VERIFIED}
    assert_each_file_once(sandbox, manifest)


def test_failed_commit_is_retried_without_resending(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite"
    manifest = discover(exam)
    sandbox.set_knobs(fail_next=1, fail_status=400, fault_path="/data/prearchive")
    first = upload(sandbox.url, exam, journal)
    assert not first.success
    assert any("not committed" in e for e in first.errors)
    assert sandbox.archived_files("P", "S", "E") == {}
    sent = imported(sandbox)
    assert sent == len(manifest.files)

    second = upload(sandbox.url, exam, journal)
    assert second.success and second.verified
    assert imported(sandbox) == sent  # nothing sent again, only committed
    assert_each_file_once(sandbox, manifest)


def test_changed_file_is_sent_again_and_replaces_the_server_copy(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite"
    assert upload(sandbox.url, exam, journal).success
    sent = imported(sandbox)
    manifest = discover(exam)
    changed = manifest.files[3].path
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0x01  # one pixel value: same instance, different bytes
    changed.write_bytes(bytes(data))

    again = upload(sandbox.url, exam, journal)
    assert again.success and again.verified, again.errors
    assert imported(sandbox) - sent == 1
    assert_each_file_once(sandbox, discover(exam))


def test_rerun_of_a_complete_upload_sends_nothing_even_with_restart(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.sqlite"
    manifest = discover(exam)
    assert upload(sandbox.url, exam, journal).success
    sent = imported(sandbox)
    again = upload(sandbox.url, exam, journal)
    assert again.success and again.verified
    assert imported(sandbox) == sent
    assert {o.reason for o in again.files} == {EARLIER_RUN_REASON}
    # Who vouches for each outcome is typed (issue 12): the journal, so nothing was sent now.
    assert {o.origin for o in again.files} == {Origin.JOURNAL}
    assert "nothing new to send" in summary_text(again).splitlines()[0]

    # --restart forgets the journal: the session is read back before sending, and every
    # instance it holds by name is not sent again (XNAT would refuse it with 409 and leave a
    # CONFLICT entry, facts 1.5). Exit 0, "already on the server".
    fresh = upload(sandbox.url, exam, journal, restart=True)
    assert fresh.success and fresh.verified, fresh.errors
    assert {o.reason for o in fresh.files} == {ALREADY_REASON}
    assert {o.origin for o in fresh.files} == {Origin.SERVER}
    assert imported(sandbox) == sent
    assert_each_file_once(sandbox, manifest)
    # --overwrite delete sends everything again and replaces the server's copies.
    replaced = upload(sandbox.url, exam, journal, restart=True, overwrite="delete")
    assert replaced.success and replaced.verified, replaced.errors
    assert imported(sandbox) - sent == len(manifest.files)
    assert_each_file_once(sandbox, manifest)


def _prearchive_statuses(url: str) -> list[str]:
    rows = requests.get(
        url + "/data/prearchive/projects/P",
        params={"format": "json"},
        auth=(USER, PASSWORD),
        timeout=10,
    ).json()["ResultSet"]["Result"]
    return [str(r["status"]) for r in rows]


def test_same_files_from_another_machine_converge_without_conflicts(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    """The same files sent again with a fresh journal (another machine): `xio upload-dicom`
    reads the session first, sends nothing, exits 0 "already on the server", and leaves no
    CONFLICT or ERROR entry in the prearchive (XNAT's merge refuses any instance the session
    holds already, facts 1.5)."""
    manifest = discover(exam)
    home = tmp_path / "home"
    home.mkdir()
    args = ["upload-dicom", "P", "S", "E", str(exam)]
    first = run_xio([*args, "--journal", str(tmp_path / "a.sqlite")], xio_env(sandbox.url, home))
    assert first.returncode == 0, first.stderr
    sent = imported(sandbox)
    again = run_xio([*args, "--journal", str(tmp_path / "b.sqlite")], xio_env(sandbox.url, home))
    assert again.returncode == 0, again.stderr
    assert f"All {len(manifest.files)} files already on the server at P/S/E: nothing sent" in (
        again.stdout
    )
    assert "verified on the server" in again.stdout
    assert imported(sandbox) == sent
    assert_each_file_once(sandbox, manifest)
    assert not {"CONFLICT", "ERROR"} & set(_prearchive_statuses(sandbox.url))


def test_only_what_the_session_lacks_is_sent_and_merged(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    """Half the session is on the server (sent by xio elsewhere): a fresh run sends the other
    half only; XNAT merges it (facts 1.5); nothing twice, no CONFLICT/ERROR rows."""
    manifest = discover(exam)
    import_tar(sandbox.url, manifest.files[:5])
    before = imported(sandbox)
    result = upload(sandbox.url, exam, tmp_path / "j.sqlite")
    assert result.success and result.verified, result.errors
    assert imported(sandbox) - before == len(manifest.files) - 5
    reasons = [o.reason for o in result.files]
    assert reasons.count(ALREADY_REASON) == 5
    assert_each_file_once(sandbox, manifest)
    assert not {"CONFLICT", "ERROR"} & set(_prearchive_statuses(sandbox.url))


def test_another_study_under_the_label_is_refused_before_sending(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    """XNAT never merges another StudyInstanceUID into a session (facts 1.5): the read before
    sending sees it and nothing is sent (exit 2), instead of a CONFLICT left on the server."""
    assert upload(sandbox.url, exam, tmp_path / "a.sqlite").success
    sent = imported(sandbox)
    other = tmp_path / "other"
    generate_session(other, series=1, instances=2, image_size=(32, 32), seed=99)
    # (UsageError from the read before sending; the pre-flight's own error once it runs first.)
    with pytest.raises(XnatioError, match="holds another study") as err:
        upload(sandbox.url, other, tmp_path / "b.sqlite")
    assert err.value.exit_code == 2
    assert imported(sandbox) == sent
    assert not {"CONFLICT", "ERROR"} & set(_prearchive_statuses(sandbox.url))


def test_direct_archive_into_an_existing_session_goes_through_the_prearchive(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    """Direct-Archive never merges (facts 1.6): the files a session lacks are sent to the
    prearchive and committed into it instead, and the run says so."""
    from xnatio.pipeline import ResumeOptions, resumable_rest_upload
    from xnatio.transports.rest import RestTarget
    from xnatio.xnat.client import XnatClient

    manifest = discover(exam)
    import_tar(sandbox.url, manifest.files[:5])
    target = RestTarget(
        project="P",
        subject="S",
        session="E",
        upload_workers=1,
        archive_workers=1,
        direct_archive=True,
        archive_wait=5,
    )
    said: list[str] = []
    with XnatClient(sandbox.url, username=USER, password=PASSWORD) as client:
        result = resumable_rest_upload(
            client,
            manifest,
            target,
            options=ResumeOptions(journal=tmp_path / "j.sqlite"),
            notify=said.append,
        )
    assert result.success and result.verified, result.errors
    assert any("Direct-Archive never merges" in m for m in said)
    assert_each_file_once(sandbox, manifest)
    assert not {"CONFLICT", "ERROR"} & set(_prearchive_statuses(sandbox.url))


# -- the real command, in a subprocess -------------------------------------------------------------


def _start_cli(server: SandboxServer, exam: Path, home: Path, *extra: str) -> subprocess.Popen[str]:
    args = ["upload-dicom", "P", "S", "E", str(exam), "--num-batches", "12"]
    args += ["--upload-workers", "2", "--archive-workers", "1", *extra]
    return subprocess.Popen(
        xio_command(args),
        env=xio_env(server.url, home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def settled(server: SandboxServer) -> None:
    """Wait until the server has been idle a moment (requests in flight are done)."""
    last = -1
    while (now := server.stats().get("requests", 0)) != last:
        last = now
        time.sleep(0.5)


@pytest.fixture
def big_exam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return big_session(tmp_path_factory.mktemp("big"))


@pytest.mark.slow
def test_sigkill_mid_upload_then_rerun_sends_only_the_rest(
    sandbox: SandboxServer, big_exam: Path, tmp_path: Path
) -> None:
    manifest = discover(big_exam)
    journal = tmp_path / "home" / ".local/state/xnatio/journal.sqlite"
    sandbox.set_knobs(per_file_ms=40)
    proc = _start_cli(sandbox, big_exam, tmp_path / "home")
    try:
        # Kill it once a few batches are confirmed and others are in flight.
        assert wait_for(lambda: journal_rows(journal) >= 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        reap(proc)
    confirmed = journal_rows(journal)
    assert 20 <= confirmed < len(manifest.files)
    assert sandbox.archived_files("P", "S", "E") == {}  # never committed
    settled(sandbox)  # the server finishes the requests that were in flight
    before = imported(sandbox)

    sandbox.set_knobs(per_file_ms=0)
    done = run_xio(
        ["upload-dicom", "P", "S", "E", str(big_exam), "--num-batches", "12", "--json"],
        xio_env(sandbox.url, tmp_path / "home"),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "success"
    assert "resuming: " in done.stderr
    # The second run sent exactly what the journal had not seen confirmed.
    assert imported(sandbox) - before == len(manifest.files) - confirmed
    assert_each_file_once(sandbox, manifest)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(
    sandbox: SandboxServer, big_exam: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    manifest = discover(big_exam)
    journal = tmp_path / "home" / ".local/state/xnatio/journal.sqlite"
    sandbox.set_knobs(per_file_ms=40)
    proc = _start_cli(sandbox, big_exam, tmp_path / "home")
    try:
        assert wait_for(lambda: journal_rows(journal) >= 10)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "run the same command again" in last and "Traceback" not in err
    confirmed = journal_rows(journal)  # consistent (integrity_check) and partial
    assert 10 <= confirmed < len(manifest.files)

    sandbox.set_knobs(per_file_ms=0)
    settled(sandbox)
    before = imported(sandbox)
    done = run_xio(
        ["upload-dicom", "P", "S", "E", str(big_exam), "--num-batches", "12"],
        xio_env(sandbox.url, tmp_path / "home"),
    )
    assert done.returncode == 0, done.stderr
    assert imported(sandbox) - before <= len(manifest.files) - confirmed
    assert_each_file_once(sandbox, manifest)


@pytest.mark.slow
def test_second_run_on_the_same_target_refuses_or_waits(
    sandbox: SandboxServer, big_exam: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "home" / ".local/state/xnatio/journal.sqlite"
    env = xio_env(sandbox.url, tmp_path / "home")
    sandbox.set_knobs(per_file_ms=300)  # the first run holds the target while the others start
    first = _Running(_start_cli(sandbox, big_exam, tmp_path / "home"))
    waited: _Running | None = None
    try:
        assert wait_for(lambda: journal_rows(journal) >= 1)
        refused = run_xio(["upload-dicom", "P", "S", "E", str(big_exam)], env)
        assert refused.returncode == 2
        assert "another xio run (pid " in refused.stderr and "--wait" in refused.stderr
        args = ["upload-dicom", "P", "S", "E", str(big_exam), "--wait", "--json"]
        waited = _Running(
            subprocess.Popen(
                xio_command(args),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        assert wait_for(lambda: "waiting for another xio run" in waited.err())
        assert first.proc.poll() is None  # it really is waiting on the first run
        sandbox.set_knobs(per_file_ms=0)  # now let the first run finish
        assert first.finish() == 0, first.err()
        assert waited.finish() == 0, waited.err()
    finally:
        for r in (first, waited):
            if r is not None:
                reap(r.proc)
    # The waiting run started after the first one had finished: nothing left to send.
    assert json.loads(waited.out())["status"] == "success"
    assert "sending the other 0" in waited.err()
    assert_each_file_once(sandbox, discover(big_exam))


class _Running:
    """A subprocess whose stdout and stderr are drained as they come (no pipe can fill up)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._out: list[str] = []
        self._err: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._drain, args=(proc.stderr, self._err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _drain(stream: IO[str] | None, into: list[str]) -> None:
        assert stream is not None
        for line in stream:
            into.append(line)

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(10)
        return code

    def out(self) -> str:
        return "".join(self._out)

    def err(self) -> str:
        return "".join(self._err)


def test_archive_path_resumes_from_another_folder(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    """PATH is a .zip, given absolute once and relative (from another folder) the next time:
    the same journal entry, so the second run sends nothing and verifies every member."""
    archive = tmp_path / "exam.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(exam.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(exam).as_posix())
    env = xio_env(sandbox.url, tmp_path / "home")
    report = tmp_path / "report.json"

    def outcomes() -> list[dict[str, str]]:
        rows: list[dict[str, str]] = json.loads(report.read_text())["files"]["uploaded"]
        return rows

    args = ["upload-dicom", "P", "S", "E", str(archive), "--report", str(report)]
    first = run_xio(args, env)
    assert first.returncode == 0, first.stderr
    assert len(outcomes()) == 12 and {f["outcome"] for f in outcomes()} == {"verified"}
    sent = imported(sandbox)
    args = ["upload-dicom", "P", "S", "E", "exam.zip", "--report", str(report)]
    again = run_xio(args, env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert imported(sandbox) == sent
    assert len(outcomes()) == 12 and {f["outcome"] for f in outcomes()} == {"verified"}
    assert {f["reason"] for f in outcomes()} == {EARLIER_RUN_REASON}


def test_file_lost_on_the_server_is_found_and_sent_again(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    """The journal says sent, but the server lost a file (someone deleted it): read-back finds
    out and the same run sends that file again, once, then verifies the whole session."""
    journal = tmp_path / "journal.sqlite"
    manifest = discover(exam)
    assert upload(sandbox.url, exam, journal).success
    victim = next(iter(sandbox.archived_files("P", "S", "E").values()))
    gone = requests.delete(
        f"{sandbox.url}/data/projects/P/subjects/S/experiments/E/scans/{victim.scan_id}"
        f"/resources/DICOM/files/{victim.name}",
        auth=(USER, PASSWORD),
        timeout=10,
    )
    assert gone.status_code < 300
    assert len(sandbox.archived_files("P", "S", "E")) == len(manifest.files) - 1
    sent = imported(sandbox)
    healed = upload(sandbox.url, exam, journal)
    assert healed.success and healed.verified, healed.errors
    assert {o.outcome for o in healed.files} == {Outcome.VERIFIED}
    assert imported(sandbox) - sent == 1  # only the lost file went again
    assert_each_file_once(sandbox, manifest)


def test_file_that_keeps_getting_lost_fails_after_one_more_try(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    """If the re-sent file does not land either, the run stops after that one extra pass,
    names the file, and leaves it for the next run (the journal forgot it)."""
    journal = tmp_path / "journal.sqlite"
    assert upload(sandbox.url, exam, journal).success
    uid, victim = next(iter(sandbox.archived_files("P", "S", "E").items()))
    url = (
        f"{sandbox.url}/data/projects/P/subjects/S/experiments/E/scans/{victim.scan_id}"
        f"/resources/DICOM/files/{victim.name}"
    )
    requests.delete(url, auth=(USER, PASSWORD), timeout=10).raise_for_status()
    # The extra pass's import fails for good (a full disk: 400, facts 1.4), so it stays missing.
    sandbox.set_knobs(disk_full=True, fault_path="/data/services/import")
    result = upload(sandbox.url, exam, journal)
    assert not result.success
    failed = [o for o in result.files if o.outcome is Outcome.FAILED]
    assert [o.sop_instance_uid for o in failed] == [uid]
    assert "unable to read DICOM object" in failed[0].reason
    sandbox.set_knobs(disk_full=False)
    assert upload(sandbox.url, exam, journal).success


def test_read_back_settles_outcomes_by_row_and_earlier_runs_by_path() -> None:
    """apply_verification finds a verdict by the manifest row where the outcome and the
    report's file were both made from its columns (no dict of every path, issue 16 item 4),
    and by path for outcomes made otherwise (an earlier run's, from the journal)."""
    from xnatio.models import FileOutcome, FileTable, Origin, Outcome, UploadResult, row_outcome
    from xnatio.resume import apply_verification
    from xnatio.verify import SeriesCheck, VerifyReport

    files = FileTable()
    for i in range(6):
        files.add(
            f"/exam/s1/IM{i}.dcm",
            100 + i,
            0,
            "1.2",
            "1.2.1",
            f"1.2.1.{i}",
            "1.2.840",
            1,
            "1.2",
            "P",
        )
    result = UploadResult(success=True, total_files=6, duration=1.0, total_size_mb=0.0)
    result.files = [row_outcome(files, i, Outcome.UPLOADED) for i in range(4)]
    result.files += [
        FileOutcome(
            files.fspath(i),
            Outcome.UPLOADED,
            reason=EARLIER_RUN_REASON,
            sop_instance_uid=files.sop_instance_uid(i),
            origin=Origin.JOURNAL,
        )
        for i in (4, 5)
    ]
    check = SeriesCheck("1.2.1", 1, "1", local=6, on_server=4)
    check.verified, check.missing = files.take([0, 1, 2, 4]), files.take([3, 5])
    report = VerifyReport("P", "S", "E", found=True, series=[check])
    apply_verification(result, report)
    V, F = Outcome.VERIFIED, Outcome.FAILED
    assert [o.outcome for o in result.files] == [V, V, V, F, V, F]
    assert "1.2.1.3" in result.files[3].reason and "not on the server" in result.files[3].reason
    assert result.files[4].reason == EARLIER_RUN_REASON
    assert "1.2.1.5" in result.files[5].reason
    assert result.verified is False
