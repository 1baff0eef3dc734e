"""The REST upload under the faults of a real XNAT, injected by the local server's knobs.

For each fault: every file ends accounted for, a transient fault ends in full success without
the user doing anything (the result's exit code is 0, every file VERIFIED by read-back), a final
one ends in exit code 1 with the reason per file, and the server never holds a file twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from upload_helpers import (
    PASSWORD,
    TEST_PROJECTS,
    USER,
    SandboxProcess,
    assert_each_file_once,
    assert_server_holds_each_once,
    import_tar,
    imported,
    upload,
)
from xnatio.discover import discover
from xnatio.models import Outcome, UploadResult
from xnatio.report import exit_code_of
from xnatio.retry import RetryPolicy
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
    generate_session(root, series=3, instances=4, image_size=(32, 32), seed=23)
    return root


def assert_complete(result: UploadResult, sandbox: SandboxServer, exam: Path) -> None:
    manifest = discover(exam)
    assert exit_code_of(result) == 0, result.errors
    assert result.success and result.verified
    assert len(result.files) == len(manifest.files)
    assert {o.outcome for o in result.files} == {Outcome.VERIFIED}
    assert_each_file_once(sandbox, manifest)


def when(condition: Callable[[], bool], action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` once ``condition`` holds (polled), in a background thread."""

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if condition():
                action()
                return
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    ("knobs", "fault"),
    [
        ({"fail_next": 3, "fail_status": 500}, "fault.fail_next"),
        ({"fail_next": 2, "fail_status": 503, "retry_after": 1}, "fault.fail_next"),
        ({"reset_next": 2}, "fault.reset_next"),
    ],
    ids=["500", "503-retry-after", "reset-mid-body"],
)
def test_transient_import_faults_end_in_full_success(
    sandbox: SandboxServer, exam: Path, tmp_path: Path, knobs: dict[str, object], fault: str
) -> None:
    sandbox.set_knobs(fault_path="/data/services/import", **knobs)
    result = upload(sandbox.url, exam, tmp_path / "j.sqlite")
    assert sandbox.stats().get(fault, 0) >= 1  # the fault did happen
    assert_complete(result, sandbox, exam)


def test_server_that_stops_answering(sandbox: SandboxServer, exam: Path, tmp_path: Path) -> None:
    # One import gets no answer; the client's read timeout gives up on it and sends it again.
    sandbox.set_knobs(hang_next=1, hang_seconds=5, fault_path="/data/services/import")
    result = upload(sandbox.url, exam, tmp_path / "j.sqlite", timeout=1.0)
    assert sandbox.stats().get("fault.hang_next", 0) == 1
    assert_complete(result, sandbox, exam)


def test_session_expiry_mid_run(sandbox: SandboxServer, exam: Path, tmp_path: Path) -> None:
    # Slow enough that the expiry lands between batches; the client logs in again and goes on.
    sandbox.set_knobs(per_file_ms=30)
    watcher = when(lambda: imported(sandbox) >= 3, lambda: sandbox.set_knobs(expire_sessions=True))
    result = upload(sandbox.url, exam, tmp_path / "j.sqlite")
    watcher.join(5)
    assert sandbox.stats().get("POST /data/JSESSION", 0) >= 2  # logged in again
    assert sandbox.stats().get("status.401", 0) >= 1
    assert_complete(result, sandbox, exam)


def test_archive_race_with_a_concurrent_archiver(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    """Another client imports part of the same session straight into the archive (``dest``) while
    we upload: XNAT answers our requests with its race messages ("Concurrent modification is
    discouraged", "Destination session in use"), which go away on retry (section 1)."""
    files = discover(exam).files
    sandbox.set_knobs(archive_ms=1500)
    rogue = threading.Thread(target=import_tar, args=(sandbox.url, files[:6]), daemon=True)
    rogue.start()
    # Wait until the rogue request is archiving, so ours collide with it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        s.status == "ARCHIVING" for s in sandbox.prearchive_sessions("P")
    ):
        time.sleep(0.01)
    # Short backoffs, enough attempts to outlast the rogue archive on a loaded machine.
    retry = RetryPolicy(retries=100, base=0.2, cap=0.5)
    result = upload(sandbox.url, exam, tmp_path / "j.sqlite", overwrite="append", retry=retry)
    rogue.join(10)
    raced = sum(sandbox.stats().get(f"status.{s}", 0) for s in (400, 403, 409, 423))
    assert raced >= 1  # the race did happen
    assert_complete(result, sandbox, exam)


def test_disk_full_is_final_then_a_rerun_completes(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "j.sqlite"
    sandbox.set_knobs(disk_full=True, fault_path="/data/services/import")
    failed = upload(sandbox.url, exam, journal)
    assert exit_code_of(failed) == 1
    assert {o.outcome for o in failed.files} == {Outcome.FAILED}
    # XNAT's message for a full disk (facts 1.4): the file's "unable to read DICOM object".
    assert all("unable to read DICOM object" in o.reason for o in failed.files)
    sandbox.set_knobs(disk_full=False)
    assert_complete(upload(sandbox.url, exam, journal), sandbox, exam)


def test_server_restarted_mid_upload(exam: Path, tmp_path: Path) -> None:
    """The server process is killed mid-upload and started again on the same data and port: the
    connections die, the JSESSION is gone, the prearchive survives (it is on disk)."""
    server = SandboxProcess(
        tmp_path / "xnat", None, "--per-file-ms", "40", "--project", "P"
    ).start()
    restarted: list[SandboxProcess] = []

    def restart() -> None:
        server.stop()
        time.sleep(0.5)
        again = SandboxProcess(
            tmp_path / "xnat", server.port, "--per-file-ms", "40", "--project", "P"
        )
        restarted.append(again.start())

    watcher = when(lambda: server.stats().get("files_imported", 0) >= 3, restart)
    try:
        # Short backoffs, but enough attempts to outlast a restart on a loaded machine.
        retry = RetryPolicy(retries=100, base=0.3, cap=1.0)
        result = upload(server.url, exam, tmp_path / "j.sqlite", retry=retry)
        watcher.join(10)
        assert restarted  # the restart did happen
        assert exit_code_of(result) == 0, result.errors
        assert {o.outcome for o in result.files} == {Outcome.VERIFIED}
        assert_server_holds_each_once(server.url, discover(exam))
    finally:
        server.stop()
        for s in restarted:
            s.stop()


def test_read_back_failure_is_not_done_and_a_rerun_verifies(
    sandbox: SandboxServer, exam: Path, tmp_path: Path
) -> None:
    journal = tmp_path / "j.sqlite"
    # Every read-back request fails (more than the retries): the upload itself succeeded.
    # (The scan listing: the read before sending only finds that the experiment does not exist.)
    sandbox.set_knobs(
        fail_next=100, fail_status=500, fault_path="/data/projects/P/subjects/S/experiments/E/scans"
    )
    first = upload(sandbox.url, exam, journal)
    assert exit_code_of(first) == 1
    assert any("could not read the session back" in e for e in first.errors), first.errors
    assert {o.outcome for o in first.files} == {Outcome.UPLOADED}
    sent = imported(sandbox)
    sandbox.set_knobs(fail_next=0)
    second = upload(sandbox.url, exam, journal)
    assert imported(sandbox) == sent  # nothing sent again
    assert_complete(second, sandbox, exam)
