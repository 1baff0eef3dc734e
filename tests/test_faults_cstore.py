"""C-STORE under faults, through the resume journal, against a real pynetdicom SCP.

For each fault: every file ends accounted for, transient faults end in full success without
the user doing anything, a re-run after failures sends only the files the peer did not store,
and no instance the peer confirmed is ever sent to it again.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from proc_helpers import reap
from xnatio.discover import discover
from xnatio.errors import ConfigError
from xnatio.journal import EARLIER_RUN_REASON
from xnatio.models import Outcome, UploadResult
from xnatio.report import exit_code_of
from xnatio.resume import ResumeOptions, resumable_dicom_store_upload
from xnatio.synth import generate_session

pytestmark = pytest.mark.integration


@dataclass
class Peer:
    """What the SCP saw: every C-STORE request (SOP Instance UID) and what it stored."""

    port: int = 0
    ae: Any = None
    requests: Counter[str] = field(default_factory=Counter)
    stored: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


Decide = Callable[[str, int, Any], int | None]
"""(SOP Instance UID, how many requests so far, event) -> status, or None to abort."""


@pytest.fixture
def peer() -> Iterator[Callable[..., Peer]]:
    servers: list[Any] = []

    def start(decide: Decide, handlers: list[tuple[Any, Any]] | None = None) -> Peer:
        p = Peer()
        ae = AE(ae_title="XNAT")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            uid = str(event.request.AffectedSOPInstanceUID)
            with p.lock:
                p.requests[uid] += 1
                n = sum(p.requests.values())
            status = decide(uid, n, event)
            if status is None:
                event.assoc.abort()  # the peer drops the association mid-way
                return 0xA700
            if status == 0x0000:
                with p.lock:
                    p.stored[uid] += 1
            return status

        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, on_store), *(handlers or [])],
        )
        servers.append(server)
        p.port, p.ae = server.server_address[1], ae
        return p

    yield start
    for s in servers:
        s.shutdown()


@pytest.fixture
def exam(tmp_path: Path) -> Path:
    root = tmp_path / "exam"
    generate_session(root, series=2, instances=6, image_size=(32, 32), seed=31)
    return root


def send(exam: Path, port: int, journal: Path, called: str = "XNAT") -> UploadResult:
    return resumable_dicom_store_upload(
        discover(exam),
        "127.0.0.1",
        port,
        called,
        project="P",
        subject="S",
        session="E",
        options=ResumeOptions(journal=journal),
        num_batches=2,
        retries=3,
    )


def all_uids(exam: Path) -> set[str]:
    return {f.sop_instance_uid for f in discover(exam).files}


def test_failure_statuses_then_a_rerun_sends_only_those(
    peer: Callable[..., Peer], exam: Path, tmp_path: Path
) -> None:
    uids = sorted(all_uids(exam))
    refused = set(uids[:3])
    full = {"on": True}  # the peer is out of resources for these, until it is not

    p = peer(lambda uid, n, e: 0xA700 if full["on"] and uid in refused else 0x0000)
    journal = tmp_path / "j.sqlite"
    first = send(exam, p.port, journal)
    assert exit_code_of(first) == 1
    failed = {o.sop_instance_uid: o.reason for o in first.files if o.outcome is Outcome.FAILED}
    assert set(failed) == refused
    assert all("A700" in r.upper() or "out of resources" in r for r in failed.values()), failed
    assert sum(o.outcome is Outcome.UPLOADED for o in first.files) == len(uids) - 3

    full["on"] = False
    before = Counter(p.requests)
    second = send(exam, p.port, journal)
    assert exit_code_of(second) == 0 and second.success
    sent_again = p.requests - before
    assert set(sent_again) == refused  # only the refused files went again
    assert {o.reason for o in second.files if o.sop_instance_uid not in refused} == {
        EARLIER_RUN_REASON
    }
    assert set(p.stored) == set(uids) and max(p.stored.values()) == 1


def test_peer_aborting_mid_association(
    peer: Callable[..., Peer], exam: Path, tmp_path: Path
) -> None:
    uids = sorted(all_uids(exam))
    victims = {uids[2], uids[8]}  # the peer drops the association while receiving these
    aborted: list[str] = []

    def decide(uid: str, n: int, event: Any) -> int | None:
        if uid in victims and uid not in aborted:
            aborted.append(uid)
            return None
        return 0x0000

    p = peer(decide)
    result = send(exam, p.port, tmp_path / "j.sqlite")
    assert sorted(aborted) == sorted(victims)  # both aborts did happen
    assert exit_code_of(result) == 0, result.errors
    assert {o.outcome for o in result.files} == {Outcome.UPLOADED}
    assert set(p.stored) == all_uids(exam) and max(p.stored.values()) == 1
    # Only a file in flight when the peer aborted was ever sent twice.
    assert {uid for uid, n in p.requests.items() if n > 1} <= set(aborted)


def test_association_rejected_while_the_peer_is_busy(
    peer: Callable[..., Peer], exam: Path, tmp_path: Path
) -> None:
    """The peer turns associations away for a while (A-ASSOCIATE-RJ rejected-transient,
    local-limit-exceeded, as pynetdicom does past its maximum_associations), then accepts again:
    the sender backs off and gets everything through."""
    rejected = Counter[str]()
    box: list[Peer] = []

    def on_echo(event: Any) -> int:
        box[0].ae.maximum_associations = 1  # busy from now on: one association at a time
        return 0x0000

    def on_rejected(event: Any) -> None:
        rejected["n"] += 1
        if rejected["n"] >= 2:
            box[0].ae.maximum_associations = 10  # no longer busy

    def slow(uid: str, n: int, event: Any) -> int:
        time.sleep(0.02)  # keeps the first association open while the second is requested
        return 0x0000

    box.append(peer(slow, [(evt.EVT_C_ECHO, on_echo), (evt.EVT_REJECTED, on_rejected)]))
    result = send(exam, box[0].port, tmp_path / "j.sqlite")
    assert rejected["n"] >= 1  # the peer did turn us away
    assert exit_code_of(result) == 0, result.errors
    assert {o.outcome for o in result.files} == {Outcome.UPLOADED}
    assert set(box[0].stored) == all_uids(exam) and max(box[0].stored.values()) == 1


def test_association_rejected_for_a_wrong_called_ae_title(
    peer: Callable[..., Peer], exam: Path, tmp_path: Path
) -> None:
    p = peer(lambda uid, n, e: 0x0000)
    p.ae.require_called_aet = True
    with pytest.raises(ConfigError) as err:
        send(exam, p.port, tmp_path / "j.sqlite", called="NOT-XNAT")
    assert "NOT-XNAT" in str(err.value)
    assert err.value.exit_code == 2
    assert not p.requests  # nothing was sent


def _upload_command(exam: Path, port: int, journal: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xnatio",
        "upload-dicom",
        "P",
        "S",
        "E",
        str(exam),
        "--transport",
        "dicom-store",
        "--dicom-host",
        "127.0.0.1",
        "--dicom-port",
        str(port),
        "--dicom-called-aet",
        "XNAT",
        "--num-batches",
        "2",
        "--journal",
        str(journal),
        "--json",
    ]


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # pynetdicom's SCP, on the A-ABORTs
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sigint_to_the_cli_aborts_the_associations_and_a_rerun_sends_the_rest(
    peer: Callable[..., Peer], tmp_path: Path
) -> None:
    """A real SIGINT to `xio upload-dicom --transport dicom-store` while a slow peer receives:
    exit 130 with the resume hint, the associations stop (the peer does not get every file), the
    journal holds exactly what the peer confirmed, and the same command then sends only the rest."""
    exam = tmp_path / "exam"
    generate_session(exam, series=2, instances=20, image_size=(16, 16), seed=41)
    uids = all_uids(exam)
    answered = threading.Event()
    slow = {"on": True}

    def decide(uid: str, n: int, event: Any) -> int:
        if n >= 6:
            answered.set()
        if slow["on"]:
            time.sleep(0.1)
        return 0x0000

    p = peer(decide)
    journal = tmp_path / "j.sqlite"
    proc = subprocess.Popen(
        _upload_command(exam, p.port, journal),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert answered.wait(60), "the upload never reached the peer"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 130, err
    assert "run the same command again to send the rest" in err
    assert "Traceback" not in err
    first = Counter(p.requests)
    # Without the cancel both associations would go on to the end (40 files, ~2 s at 0.1 s each).
    assert len(first) < len(uids)
    confirmed_line = next(line for line in err.splitlines() if "interrupted: " in line)
    confirmed = int(confirmed_line.split("interrupted: ")[1].split(" of ")[0])
    assert 1 <= confirmed <= len(p.stored)

    slow["on"] = False
    done = subprocess.run(
        _upload_command(exam, p.port, journal), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    second = Counter(p.requests) - first
    # Only the files the journal had not seen confirmed went again: the rest of the session,
    # plus at most the one file per association that was in flight at the interrupt.
    assert sum(second.values()) == len(uids) - confirmed
    assert set(second) | set(first) == uids and max(second.values()) == 1
    assert len(set(second) & set(first)) <= 2
    assert f"{confirmed} of {len(uids)} files were confirmed by an earlier run" in done.stderr
