"""Issue 13, items 7–12, 14, 16: what the real CLI does at the edges of its world.

Odd file names, a journal that cannot be written, stdout that is closed, full or a broken pipe,
Ctrl-C pressed again, FIFOs and devices under PATH, report files, and a server that restarts for
longer than a few retries last. Each test drives the real CLI (a subprocess, or ``CliRunner``)
against the local XNAT-compatible server, and asserts the one line a user sees and the exit code.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from upload_helpers import (
    PASSWORD,
    TEST_PROJECTS,
    USER,
    SandboxProcess,
    assert_server_holds_each_once,
    big_session,
    journal_rows,
    run_xio,
    wait_for,
    xio_command,
    xio_env,
)
from xnatio.archive import instance_file_name
from xnatio.cli.options import ABORT_LINE
from xnatio.discover import discover
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


# --- item 10: stdout closed, full, or a reader that went away ----------------------------------


def _xio_with_stdout(
    args: list[str], env: dict[str, str], stdout: int | IO[bytes] | None, close_fd1: bool = False
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.Popen(
        xio_command(args),
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        preexec_fn=(lambda: os.close(1)) if close_fd1 else None,
    )
    if stdout == subprocess.PIPE:
        assert proc.stdout is not None
        proc.stdout.close()  # the reader goes away before a byte is written (`| head -c0`)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)


@pytest.mark.integration
def test_stdout_that_cannot_be_written_is_a_quiet_exit_or_one_line(
    xnat_server: SandboxServer, session: SyntheticSession, tmp_path: Path
) -> None:
    env = xio_env(xnat_server.url, tmp_path / "home")
    args = ["upload-dicom", "P", "S", "E", str(session.root), "--json"]

    # A reader that went away (EPIPE): quiet, exit 141 as a tool stopped by SIGPIPE.
    piped = _xio_with_stdout(args, env, subprocess.PIPE)
    err = piped.stderr.decode()
    assert piped.returncode == 141, err
    _no_traceback(err)
    assert "error" not in err and "BrokenPipe" not in err
    assert set(xnat_server.archived_files("P", "S", "E")) == set(session.instances)

    # A full device, with and without --json: one line, exit 2.
    for variant in (args, args[:-1]):
        with open("/dev/full", "wb") as full:
            done = _xio_with_stdout(variant, env, full)
        err = done.stderr.decode()
        assert done.returncode == 2, err
        _no_traceback(err)
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith("error: cannot write to standard output (No space left on device)")
        )

    # stdout closed (`>&-`) with --json: one line, exit 2 (was: AttributeError traceback).
    closed = _xio_with_stdout(args, env, None, close_fd1=True)
    err = closed.stderr.decode()
    assert closed.returncode == 2, err
    _no_traceback(err)
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("error: cannot write to standard output (it is closed)")
    )


# --- item 11: Ctrl-C pressed again ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_ctrl_c_says_stopping_at_once_and_more_presses_exit_cleanly(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    exam = big_session(tmp_path / "big")
    journal = tmp_path / "home" / ".local/state/xnatio/journal.sqlite"
    env = xio_env(xnat_server.url, tmp_path / "home")
    xnat_server.set_knobs(per_file_ms=40)
    args = ["upload-dicom", "P", "S", "E", str(exam), "--num-batches", "12"]
    proc = subprocess.Popen(
        xio_command([*args, "--upload-workers", "3"]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: journal_rows(journal) >= 10)
        for _ in range(3):  # three presses, as an impatient user does
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # 130 from the CLI, or death by SIGINT itself once the interpreter is past its handlers
    # (a shell shows both as 130).
    assert proc.returncode in (130, -signal.SIGINT), err
    _no_traceback(err)
    stopping = [ln for ln in err.splitlines() if ln.startswith("stopping: ")]
    assert len(stopping) == 1, err
    assert re.fullmatch(
        r"stopping: finishing (\d+ requests?|the \w+ request) in flight… "
        r"\(Ctrl-C again to abort now\)",
        stopping[0],
    ), stopping

    xnat_server.set_knobs(per_file_ms=0)
    done = run_xio(args, env)
    assert done.returncode == 0, done.stderr
    assert set(xnat_server.archived_files("P", "S", "E")) == {
        f.sop_instance_uid for f in discover(exam).files
    }


SLOW_STOP = """
import sys, time
from xnatio.cli.options import stop_in_two_steps
with stop_in_two_steps(lambda: "finishing 3 requests in flight"):
    try:
        print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("stopping slowly", flush=True)
        time.sleep(60)  # in-flight requests that take their time to end
"""


def test_a_second_ctrl_c_while_stopping_aborts_at_once(tmp_path: Path) -> None:
    """The CLI's two-step handler in a real process: the first SIGINT prints its line and
    raises KeyboardInterrupt; the second, while the first is still being handled, ends the
    process at once with one line and exit 130, never "Exception ignored"."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_STOP],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "stopping slowly\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    _no_traceback(err)
    assert err.strip().splitlines() == [
        "stopping: finishing 3 requests in flight… (Ctrl-C again to abort now)",
        ABORT_LINE.strip(),
    ]


# --- item 9: a journal that cannot be used ----------------------------------------------------

DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
needs_setpriv = pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="running as root without setpriv to drop the DAC bypass",
)


def _unprivileged(command: list[str], *, uid: int | None = None) -> list[str]:
    """``command`` in a process that cannot read or write past file modes (root's DAC bypass
    dropped), optionally as ``uid``, a user with no passwd entry.

    As ``uid``, the process runs in a user namespace that maps ``uid`` onto ours (util-linux
    ``unshare --map-user``): it is ``uid`` to itself (no passwd entry, so no home) yet still
    reads the checkout and the venv, which may sit in a folder private to root (a CI clone in
    a 0700 ``mktemp -d`` folder); a real ``setpriv --reuid`` is the fallback without unshare.
    """
    if os.geteuid() != 0:
        return command
    if uid is None:
        return [*DROP_DAC, *command]
    if shutil.which("unshare") is not None:
        return ["unshare", "--user", f"--map-user={uid}", f"--map-group={uid}", *command]
    ids = ["--reuid", str(uid), "--regid", str(uid), "--clear-groups"]
    return [DROP_DAC[0], *ids, DROP_DAC[1], *command]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder any user can reach and read (pytest's own tmp folders are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="xnatio-open-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_setpriv
@pytest.mark.integration
@pytest.mark.parametrize("broken", ["read-only journal", "locks not writable", "no HOME, no user"])
def test_a_journal_that_cannot_be_used_is_one_line_and_exit_2(
    xnat_server: SandboxServer,
    session: SyntheticSession,
    tmp_path: Path,
    open_dir: Path,
    broken: str,
) -> None:
    # The journal and the run locks both live under XDG_STATE_HOME/xnatio.
    state = tmp_path / "state"
    journal, locks = state / "xnatio" / "journal.sqlite", state / "xnatio" / "locks"
    env = xio_env(xnat_server.url, tmp_path / "home", {"XDG_STATE_HOME": str(state)})
    args = ["upload-dicom", "P", "S", "E", str(session.root), "--json"]
    first = run_xio(args, env)  # creates the journal and the locks folder
    assert first.returncode == 0, first.stderr
    uid: int | None = None
    if broken == "read-only journal":
        journal.chmod(0o400)
        expected = f"error: cannot use the resume journal {journal} (attempt to write a readonly"
        fix = "make it writable, or choose another file with --journal FILE"
    elif broken == "locks not writable":
        locks.chmod(0o500)
        args[3] = "E2"  # a lock file that does not exist yet
        expected = f"error: cannot create the run lock {locks}/"
        fix = f"make {locks} writable"
    else:
        del env["HOME"], env["XDG_STATE_HOME"]
        uid = 12345  # no passwd entry: no home directory either
        shutil.copytree(session.root, open_dir / "in")
        args[4] = str(open_dir / "in")
        expected = "error: no folder for the "  # the journal's (or the run locks')
        fix = "HOME is not set and user 12345"
    proc = subprocess.run(
        _unprivileged(xio_command(args), uid=uid),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert proc.returncode == 2, proc.stderr
    _no_traceback(proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expected) and fix in last, last
    assert uid is None or "XDG_STATE_HOME" in last  # the fix
    assert json.loads(proc.stdout)["exit_code"] == 2  # --json still gives scripts a document

    if uid is not None:  # the fix the line names works for that user
        env["XDG_STATE_HOME"] = str(open_dir / "state")
        done = subprocess.run(
            _unprivileged(xio_command(args), uid=uid),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
        assert done.returncode == 0, done.stderr


# --- item 12: FIFOs, devices and links to them; a report that cannot be written ----------------


@pytest.mark.integration
def test_fifos_and_devices_are_skipped_with_their_kind_and_never_opened(
    xnat_server: SandboxServer, session: SyntheticSession, tmp_path: Path
) -> None:
    os.mkfifo(session.root / "pipe")  # opening it would block discovery forever
    os.symlink("/dev/zero", session.root / "zero")  # reading it would never end
    os.symlink("/dev/null", session.root / "null")
    os.symlink(session.root / "pipe", session.root / "to pipe")
    os.symlink("nowhere", session.root / "dangling")
    env = xio_env(xnat_server.url, tmp_path / "home")
    done = run_xio(["upload-dicom", "P", "S", "E", str(session.root), "--json"], env, timeout=60)
    assert done.returncode == 0, done.stderr
    reasons = {
        Path(f["path"]).name: f["reason"] for f in json.loads(done.stdout)["files"]["skipped"]
    }
    assert reasons == {
        "pipe": "not a regular file: FIFO (named pipe)",
        "zero": "symbolic link to /dev/zero: not a regular file: character device",
        "null": "symbolic link to /dev/null: not a regular file: character device",
        "to pipe": f"symbolic link to {session.root / 'pipe'}: not a regular file: FIFO "
        "(named pipe)",
        "dangling": "broken symbolic link",
    }
    assert set(xnat_server.archived_files("P", "S", "E")) == set(session.instances)


# --- item 14: report files hold patient data ---------------------------------------------------


@pytest.mark.integration
def test_reports_are_private_atomic_and_never_written_through_a_link(
    xnat_server: SandboxServer, session: SyntheticSession, tmp_path: Path
) -> None:
    env = xio_env(xnat_server.url, tmp_path / "home")
    out = tmp_path / "out"
    out.mkdir()
    report = out / "report.json"
    report.write_text("an older report\n")
    report.chmod(0o644)
    old = os.umask(0o022)
    try:
        done = run_xio(["upload-dicom", "P", "S", "E", session.root, "--report", report], env)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    assert report.stat().st_mode & 0o777 == 0o600
    assert json.loads(report.read_text())["studies"][0]["patient_id"]  # the new one, whole
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]  # no temp file left

    # A link planted where the report goes: refused before anything is sent.
    victim = tmp_path / "someone-elses-file"
    victim.write_text("precious\n")
    link = out / "linked.csv"
    link.symlink_to(victim)
    refused = run_xio(["upload-dicom", "P", "S", "E2", session.root, "--report", link], env)
    assert refused.returncode == 2, refused.stderr
    _no_traceback(refused.stderr)
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: refusing to write {link}: it is a symbolic link (to {victim})")
    )
    assert victim.read_text() == "precious\n" and link.is_symlink()
    assert xnat_server.archived_files("P", "S", "E2") == {}


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs (1 MiB) that tests fill with :func:`fill` (root only; skipped where
    mounting is refused)."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(where)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> None:
    """Write into ``folder`` until its file system is full."""
    with open(folder / "filler", "ab", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 512)


@pytest.mark.integration
def test_a_report_that_cannot_be_written_after_the_upload_shows_the_summary_first(
    xnat_server: SandboxServer, session: SyntheticSession, tmp_path: Path, full_disk: Path
) -> None:
    fill(full_disk)
    report = full_disk / "report.csv"
    env = xio_env(xnat_server.url, tmp_path / "home")
    done = run_xio(["upload-dicom", "P", "S", "E", session.root, "--report", report], env)
    assert done.returncode == 2, done.stderr
    _no_traceback(done.stderr)
    assert done.stdout.startswith("Uploaded 6 of 6 files")  # what was done, shown first
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write report {report} (No space left on device)")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]  # no half report
    assert set(xnat_server.archived_files("P", "S", "E")) == set(session.instances)


def test_a_report_that_cannot_be_written_is_in_the_json_record_too(
    xnat_server: SandboxServer, session: SyntheticSession, tmp_path: Path, full_disk: Path
) -> None:
    # --json is the run's record: it must not say exit_code 0 while the process exits 2.
    fill(full_disk)
    report = full_disk / "report.csv"
    env = xio_env(xnat_server.url, tmp_path / "home")
    args = ["upload-dicom", "P", "S", "E", session.root, "--report", report, "--json"]
    done = run_xio(args, env)
    assert done.returncode == 2, done.stderr
    _no_traceback(done.stderr)
    record = json.loads(done.stdout)
    assert (record["status"], record["exit_code"]) == ("error", 2)
    assert any("cannot write report" in e for e in record["errors"])
    assert record["totals"]["verified"] == 6  # the upload itself is there
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: cannot write report {report}")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


# --- item 8: the journal's disk fills mid-run -----------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_a_journal_whose_disk_fills_mid_run_degrades_and_the_upload_completes(
    xnat_server: SandboxServer, tmp_path: Path, full_disk: Path
) -> None:
    exam = big_session(tmp_path / "big")
    journal = full_disk / "journal.sqlite"
    env = xio_env(xnat_server.url, tmp_path / "home", {"XNATIO_JOURNAL": str(journal)})
    args = ["upload-dicom", "P", "S", "E", str(exam), "--num-batches", "12"]
    xnat_server.set_knobs(per_file_ms=30)
    proc = subprocess.Popen(
        xio_command([*args, "--upload-workers", "2"]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: journal_rows(journal) >= 10)
        fill(full_disk)  # the next confirmations find no room
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    _no_traceback(err)
    warnings = [ln for ln in err.splitlines() if "cannot be written" in ln]
    assert warnings == [
        f"warning: the resume journal {journal} cannot be written "
        "(database or disk is full): going on without it; the server's read-back says what "
        "landed, and the next run asks the server what it holds before sending"
    ], err
    assert "internal error" not in out + err
    assert out.startswith("Uploaded 120 of 120 files") and "verified on the server" in out
    manifest = discover(exam)
    assert set(xnat_server.archived_files("P", "S", "E")) == {
        f.sop_instance_uid for f in manifest.files
    }

    # A run that starts on the still full disk says what to do, exit 2; once there is room,
    # the next one asks the server, finds everything there, and sends nothing.
    xnat_server.set_knobs(per_file_ms=0)
    before = xnat_server.stats().get("files_imported", 0)
    full = run_xio(args, env)
    assert full.returncode == 2, full.stderr
    _no_traceback(full.stderr)
    assert full.stderr.strip().splitlines()[-1] == (
        f"error: cannot use the resume journal {journal} (database or disk is full); free some "
        "space on its disk, or choose another file with --journal FILE or XNATIO_JOURNAL"
    )
    (full_disk / "filler").unlink()
    again = run_xio(args, env)
    assert again.returncode == 0, again.stderr
    _no_traceback(again.stderr)
    assert xnat_server.stats().get("files_imported", 0) == before


# --- item 16: retrying outlasts a server restart ----------------------------------------------

OUTAGE_S = 20.0  # longer than the old budget's every backoff together (5 retries: 15.5 s)


@pytest.mark.slow
@pytest.mark.integration
def test_an_upload_outlasts_a_server_restart_of_twenty_seconds(tmp_path: Path) -> None:
    """The server process is killed mid-upload and started again on the same port and data
    OUTAGE_S seconds later (a Tomcat restart takes a minute or more; this is a short one): the CLI,
    with its default --retries and --retry-budget, waits it out and completes, every instance
    once on the server."""
    exam = big_session(tmp_path / "big")
    server = SandboxProcess(tmp_path / "xnat", None, "--per-file-ms", "30").start()
    restarted: list[SandboxProcess] = []
    env = xio_env(server.url, tmp_path / "home")
    args = ["upload-dicom", "P", "S", "E", str(exam), "--num-batches", "12"]
    proc = subprocess.Popen(
        xio_command([*args, "--upload-workers", "3", "--json"]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        landed = wait_for(lambda: server.stats().get("files_imported", 0) >= 10)
        assert landed and proc.poll() is None, proc.communicate()[1]
        server.stop()
        stopped = time.monotonic()
        while time.monotonic() - stopped < OUTAGE_S and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]  # still waiting for the server
        restarted.append(SandboxProcess(tmp_path / "xnat", server.port).start())
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        _no_traceback(err)
        result = json.loads(out)
        assert result["status"] == "success" and result["totals"]["verified"] == 120
        assert_server_holds_each_once(server.url, discover(exam))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
        for s in restarted:
            s.stop()


def test_the_stopping_line_counts_what_is_in_flight() -> None:
    from xnatio.cli.upload import InFlight
    from xnatio.models import Phase, ProgressEvent

    seen: list[ProgressEvent] = []
    rest = InFlight(42)
    rest.display = seen.append
    assert rest.describe() == ""  # nothing sent yet: plain "stopping…"
    rest.stopping = False
    rest(ProgressEvent(Phase.UPLOAD, 0, 0, batches_total=12, batches_done=9))
    assert rest.describe() == "finishing 3 requests in flight"
    rest(ProgressEvent(Phase.UPLOAD, 0, 0, batches_total=12, batches_done=11))
    assert rest.describe() == "finishing 1 request in flight"
    rest(ProgressEvent(Phase.COMMIT, 0, 1))
    assert rest.describe() == "finishing the commit request in flight"
    assert len(seen) == 1  # once stopping, workers winding down are not shown
    cstore = InFlight(4, "association")
    cstore(ProgressEvent(Phase.UPLOAD, 0, 0, batches_total=45, batches_done=0))
    assert cstore.describe() == "finishing 4 associations in flight"


def test_stdout_escapes_bytes_that_are_not_utf8_instead_of_raising() -> None:
    """The edge's safety net: any command's text holding a non-UTF-8 file name is written with
    ``\\xNN`` escapes, on a strict UTF-8 stream that would raise UnicodeEncodeError."""
    import io

    from xnatio.cli.main import GuardedStdout

    raw = io.BytesIO()
    strict = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    out = GuardedStdout(strict)
    out.write("missing: /data/scan" + os.fsdecode(b"\xff") + ".dcm\n")
    out.flush()
    assert raw.getvalue() == b"missing: /data/scan\\xff.dcm\n"
