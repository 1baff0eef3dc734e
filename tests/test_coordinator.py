"""The one coordinator of concurrency (xnatio.coordinator), as the REST engine uses it.

REST tests run against the sandbox over real HTTP: the executor is injected, nothing is patched.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from xnatio.coordinator import BoundedExecutor, Coordinator, SerialExecutor
from xnatio.discover import discover
from xnatio.models import Manifest, Outcome, Phase, ProgressEvent
from xnatio.pipeline import resumable_rest_upload
from xnatio.plan import RestPlanner, plan_batches
from xnatio.resume import ResumeOptions
from xnatio.sandbox.server import SandboxServer
from xnatio.synth import SyntheticSession, generate_session
from xnatio.transports.rest import RestTarget, RestUploader
from xnatio.xnat.client import XnatClient

T = TypeVar("T")
USER, PASSWORD = "admin", "admin-secret"
P, S, E = "PROJ", "SUBJ01", "SUBJ01_MR1"
BATCHES = 4


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSession:
    return generate_session(
        tmp_path_factory.mktemp("session") / "MR1", series=2, instances=12, image_size=(16, 16)
    )


def four_batches(manifest: Manifest) -> Any:
    return plan_batches(manifest, BATCHES, single_max_files=4, single_max_bytes=0)


# The same four batches through the planner interface (targets carry num_batches=BATCHES).
FOUR_BATCHES = RestPlanner(single_max_files=4, single_max_bytes=0)


class RecordingSerial(SerialExecutor):
    """A serial executor that notes which thread ran each task and how wide the pool was."""

    def __init__(self, workers: int, log: list[tuple[str, int]]) -> None:
        log.append(("workers", workers))
        self.log = log

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        self.log.append(("task", threading.get_ident()))
        return super().submit(fn, *args, **kwargs)


@pytest.mark.integration
def test_a_rest_upload_replays_serially_with_an_injected_executor(
    xnat_server: SandboxServer, session_dir: SyntheticSession, tmp_path: Path
) -> None:
    log: list[tuple[str, int]] = []

    def serial(workers: int) -> Executor:
        return RecordingSerial(workers, log)

    target = RestTarget(
        project=P, subject=S, session=E, num_batches=BATCHES, upload_workers=3, archive_workers=2
    )
    with XnatClient(xnat_server.url, username=USER, password=PASSWORD) as client:
        result = resumable_rest_upload(
            client,
            discover(session_dir.root),
            target,
            options=ResumeOptions(journal=tmp_path / "journal"),
            planner=FOUR_BATCHES,
            executor=serial,
        )
    assert result.success, result.errors
    assert {o.outcome for o in result.files} == {Outcome.VERIFIED}
    # Server-side evidence: one import per planned batch, every file archived once, one commit.
    assert xnat_server.stats()["POST /data/services/import"] == BATCHES
    assert sorted(xnat_server.archived_files(P, S, E)) == sorted(session_dir.instances)
    assert xnat_server.prearchive_sessions(P) == []
    # The pool was the injected one, as wide as configured, and every batch ran in this thread.
    assert log[0] == ("workers", 5)
    assert log[1:] == [("task", threading.get_ident())] * BATCHES


@pytest.mark.integration
def test_a_cancel_from_outside_ends_every_worker_before_the_upload_returns(
    xnat_server: SandboxServer, session_dir: SyntheticSession
) -> None:
    xnat_server.set_knobs(bandwidth_mbps=1)  # slow enough to cancel in the middle
    cancel = threading.Event()

    def cancel_on_first_bytes(event: ProgressEvent) -> None:
        if event.phase is Phase.UPLOAD and event.bytes_done > 0:
            cancel.set()

    manifest = discover(session_dir.root)
    target = RestTarget(
        project=P, subject=S, session=E, num_batches=BATCHES, upload_workers=2, archive_workers=1
    )
    with XnatClient(xnat_server.url, username=USER, password=PASSWORD, pool_size=2) as client:
        uploader = RestUploader(
            client, target, progress_callback=cancel_on_first_bytes, cancel=cancel
        )
        result = uploader.upload(manifest, four_batches(manifest))
        # Outcomes are collected under the coordinator: no worker outlives the call.
        assert [t.name for t in threading.enumerate() if t.name.startswith("xnatio-rest")] == []
    assert uploader.coordinator.cancelled
    assert not result.success
    assert len(result.files) == len(manifest.files)  # every file accounted for
    assert xnat_server.archived_files(P, S, E) == {}  # nothing committed


def test_a_fatal_error_in_a_task_cancels_the_others_and_is_raised() -> None:
    coordinator = Coordinator()
    stopped: list[str] = []
    coordinator.add_stopper(lambda: stopped.append("body"))
    ran: list[int] = []

    def task(n: int) -> None:
        try:
            if coordinator.cancelled:
                return
            ran.append(n)
            if n == 1:
                raise KeyboardInterrupt  # a BaseException no task handles
        except BaseException as exc:
            coordinator.cancel(exc)
            raise

    with BoundedExecutor(2, lambda _workers: SerialExecutor()) as pool:
        for n in range(4):
            if coordinator.cancelled:
                break
            pool.submit(task, n)
    assert ran == [0, 1]
    assert stopped == ["body"]
    assert isinstance(coordinator.exception, KeyboardInterrupt)


def test_a_coordinator_shares_the_callers_cancel_event() -> None:
    event = threading.Event()
    coordinator = Coordinator(event)
    event.set()
    assert coordinator.cancelled
    late: list[str] = []
    coordinator.add_stopper(lambda: late.append("stopped at once"))
    assert late == ["stopped at once"]


@pytest.mark.integration
def test_the_library_leaves_the_sigterm_handler_as_it_found_it(
    xnat_server: SandboxServer, session_dir: SyntheticSession, tmp_path: Path
) -> None:
    """SIGTERM -> interrupt is the CLI's choice (xnatio.cli.options.sigterm_as_interrupt); the
    library never swaps a process-wide handler, not even while it sends."""

    def ours(signum: int, frame: object) -> None:  # never called: identity is what is checked
        raise AssertionError("not expected to run")

    seen: set[object] = set()

    def watch(event: ProgressEvent) -> None:
        seen.add(signal.getsignal(signal.SIGTERM))

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        target = RestTarget(project=P, subject=S, session=E, num_batches=BATCHES)
        with XnatClient(xnat_server.url, username=USER, password=PASSWORD) as client:
            result = resumable_rest_upload(
                client,
                discover(session_dir.root),
                target,
                options=ResumeOptions(journal=tmp_path / "journal"),
                planner=FOUR_BATCHES,
                progress_callback=watch,
                executor=lambda _workers: SerialExecutor(),
            )
        assert result.success, result.errors
        assert seen == {ours}  # while sending, too
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_cli_turns_sigterm_into_an_interrupt_and_puts_the_handler_back() -> None:
    from xnatio.cli.options import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.integration
def test_ctrl_c_cuts_a_request_whose_body_is_sent_and_whose_answer_is_awaited(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    """Once the last byte of a batch is out, its worker waits for XNAT's answer; a Ctrl-C then
    shuts that connection down (xnatio.xnat.inflight) instead of waiting for the answer or the
    60 s read timeout. Evidence from the server: it had not answered (no file imported yet)
    when the upload had already raised, and no worker outlived the call."""
    from xnatio.resume import UploadInterrupted

    files = 4
    session = generate_session(tmp_path / "MR", series=1, instances=files, image_size=(16, 16))
    xnat_server.set_knobs(per_file_ms=2500)  # the answer comes ~10 s after the body
    main = threading.get_ident()
    interrupted = threading.Event()

    def ctrl_c_once_the_body_is_sent(event: ProgressEvent) -> None:
        sent = event.phase is Phase.UPLOAD and 0 < event.bytes_total == event.bytes_done
        if sent and not interrupted.is_set():
            interrupted.set()
            threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT)).start()

    target = RestTarget(
        project=P, subject=S, session=E, num_batches=1, upload_workers=1, archive_workers=1
    )
    with XnatClient(xnat_server.url, username=USER, password=PASSWORD, timeout=60) as client:
        with pytest.raises(UploadInterrupted):
            resumable_rest_upload(
                client,
                discover(session.root),
                target,
                options=ResumeOptions(journal=tmp_path / "journal"),
                progress_callback=ctrl_c_once_the_body_is_sent,
            )
        assert interrupted.is_set()
        assert xnat_server.stats().get("files_imported", 0) == 0  # XNAT had not answered yet
        workers = [t for t in threading.enumerate() if t.name.startswith("xnatio-rest")]
        for t in workers:  # its task is over; the thread itself may take a moment to exit
            t.join(timeout=5)
        assert not any(t.is_alive() for t in workers)
    xnat_server.set_knobs(per_file_ms=0)  # let the server finish the cut request quickly
    assert xnat_server.archived_files(P, S, E) == {}


def test_a_cut_wakes_a_reader_and_cuts_a_request_that_starts_after_the_cancel() -> None:
    """xnatio.xnat.inflight without HTTP: the cut shuts the tracked connection's socket down, so
    a thread blocked reading it wakes at once; a connection tracked after the cut is cut too."""
    from urllib3.connection import HTTPConnection

    from xnatio.xnat.inflight import InFlight

    coordinator = Coordinator()
    ours, theirs = socket.socketpair()
    late_ours, late_theirs = socket.socketpair()
    try:
        conn = HTTPConnection("localhost")
        conn.sock = ours
        inflight = InFlight()
        inflight.track(conn)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(ours.recv(1)))
        coordinator.add_stopper(inflight.cut)
        reader.start()
        coordinator.cancel()
        reader.join(timeout=10)
        assert not reader.is_alive() and got == [b""]  # woken by the shutdown: end of stream
        late = HTTPConnection("localhost")
        late.sock = late_ours
        inflight.track(late)  # after the cut: cut at once
        assert late_ours.recv(1) == b""
    finally:
        for s in (ours, theirs, late_ours, late_theirs):
            s.close()
