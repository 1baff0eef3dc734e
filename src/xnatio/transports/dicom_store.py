"""Send a session to a DICOM SCP (XNAT's receiver, port 8104) over parallel C-STORE associations.

    Manifest --plan--> associations (<= 128 contexts each) --C-STORE--> peer --status--> Result

* C-ECHO first, so a wrong AE title or a closed port is one sentence before anything is sent.
* Each association proposes only the (SOP class, transfer syntax) pairs its files need: each
  file's own syntax and the two uncompressed ones, one syntax per context so that the peer's
  answer tells which it accepts. Files then go as they are on disk; only when the peer refused a
  file's own syntax is it re-encoded (decompressed when a pixel decoder is installed).
* Routing: XNAT files a received instance by ``Project:/Subject:/Session:`` entries in Patient
  Comments (0010,4000) (facts file, section 6), so that element is spliced into the sent bytes;
  the files on disk are never touched and pixel data leaves byte for byte.
* Every file ends with the status of its C-STORE-RSP. An association that is aborted, rejected or
  broken is opened again with backoff and resumes after the last confirmed file.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydicom.uid import UID

from xnatio.errors import ConfigError, UnreachableError, UsageError
from xnatio.models import (
    DicomFile,
    FileOutcome,
    Manifest,
    Outcome,
    Phase,
    ProgressCallback,
    ProgressEvent,
    UploadResult,
)
from xnatio.transports.dicom_store_encode import (
    DEFLATED_LE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    UNCOMPRESSED,
    EncodeError,
    inflated,
    read_as_is,
    transcode,
    ts_name,
)
from xnatio.transports.dicom_store_source import SourceReader
from xnatio.transports.dicom_store_status import meaning
from xnatio.transports.dicom_store_ul import (
    CONTEXT_RESULTS,
    VERIFICATION,
    Association,
    AssociationLost,
    AssociationRejected,
    PeerUnreachable,
    ProposedContext,
    UpperLayerError,
    open_association,
)

log = logging.getLogger(__name__)

TRANSPORT = "dicom-store"
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1..255
BACKOFF_BASE = 0.5  # seconds; doubled on each retry of an association, capped at BACKOFF_MAX
BACKOFF_MAX = 10.0
# XNAT's routing values match [\w-]* (facts file, section 6).
_ROUTE_VALUE = re.compile(r"^[\w-]+$")


def routing_comment(project: str | None, subject: str | None, session: str | None) -> str | None:
    """``Project:P Subject:S Session:E`` with the parts given, or None if none is."""
    parts = []
    for key, value in (("Project", project), ("Subject", subject), ("Session", session)):
        if value is None or value == "":
            continue
        if not _ROUTE_VALUE.match(value):
            raise UsageError(
                f"{key.lower()} {value!r} cannot be routed over C-STORE: XNAT reads only letters, "
                "digits, '_' and '-' in Patient Comments."
            )
        parts.append(f"{key}:{value}")
    return " ".join(parts) if parts else None


def plan_associations(files: Sequence[DicomFile], count: int) -> list[list[DicomFile]]:
    """Split ``files`` (in order, so series stay together) into about ``count`` groups of similar
    byte size, then split any group that would need more than 128 presentation contexts."""
    if not files:
        return []
    count = max(1, min(count, len(files)))
    total = sum(f.size for f in files) or len(files)
    groups: list[list[DicomFile]] = []
    current: list[DicomFile] = []
    done = 0
    for f in files:
        current.append(f)
        done += f.size or 1
        # Close the group when its share of the bytes is reached.
        if done * count >= total * (len(groups) + 1) and len(groups) < count - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    out: list[list[DicomFile]] = []
    for group in groups:
        keys: set[tuple[str, str]] = set()
        part: list[DicomFile] = []
        for f in group:
            need = _needed(f) - keys
            if part and len(keys) + len(need) > MAX_CONTEXTS:
                out.append(part)
                part, keys = [], set()
                need = _needed(f)
            part.append(f)
            keys |= need
        out.append(part)
    return out


def _needed(f: DicomFile) -> set[tuple[str, str]]:
    return {(f.sop_class_uid, ts) for ts in (f.transfer_syntax_uid, *UNCOMPRESSED)}


def proposed_contexts(files: Sequence[DicomFile]) -> list[ProposedContext]:
    """One context per (SOP class, transfer syntax), one syntax each, in first-seen order."""
    pairs: dict[tuple[str, str], None] = {}
    for f in files:
        for ts in (f.transfer_syntax_uid, *UNCOMPRESSED):
            pairs.setdefault((f.sop_class_uid, ts))
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} presentation contexts needed; the limit is 128")
    return [ProposedContext(2 * i + 1, sop, (ts,)) for i, (sop, ts) in enumerate(pairs)]


@dataclass(frozen=True, slots=True)
class _Peer:
    host: str
    port: int
    called_aet: str
    calling_aet: str
    max_pdu: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float

    def open(self, contexts: list[ProposedContext]) -> Association:
        return open_association(
            self.host,
            self.port,
            self.called_aet,
            self.calling_aet,
            contexts,
            max_pdu=self.max_pdu,
            acse_timeout=self.acse_timeout,
            dimse_timeout=self.dimse_timeout,
            network_timeout=self.network_timeout,
        )

    @property
    def where(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"


def echo(peer: _Peer) -> None:
    """C-ECHO; raises UnreachableError or ConfigError with the reason in one sentence."""
    try:
        assoc = peer.open([ProposedContext(1, VERIFICATION, (IMPLICIT_LE,))])
    except PeerUnreachable as exc:
        raise UnreachableError(f"DICOM peer {peer.where} is unreachable: {exc}.") from None
    except AssociationRejected as exc:
        if exc.bad_ae_title:
            which = "called" if exc.reason == 7 else "calling"
            title = peer.called_aet if exc.reason == 7 else peer.calling_aet
            flag = f"--dicom-{which}-aet"
            raise ConfigError(
                f"DICOM peer {peer.host}:{peer.port} rejected the association: {which} AE title "
                f"{title!r} is not recognised there (check {flag})."
            ) from None
        raise UnreachableError(
            f"DICOM peer {peer.where} rejected the association: {exc.why}."
        ) from None
    except AssociationLost as exc:
        raise UnreachableError(f"DICOM peer {peer.where}: {exc} during C-ECHO.") from None
    try:
        # A peer that accepts the association but not Verification is still there to store.
        if 1 in assoc.accepted:
            status = assoc.c_echo(1)
            if status.status != 0:
                raise UnreachableError(
                    f"DICOM peer {peer.where} answered C-ECHO with status 0x{status.status:04X}."
                )
        assoc.release()
    except AssociationLost as exc:
        raise UnreachableError(f"DICOM peer {peer.where}: {exc} during C-ECHO.") from None
    finally:
        assoc.abort()


class _Tracker:
    """Outcomes and progress shared by the association threads."""

    def __init__(self, callback: ProgressCallback | None, files: int, size: int, batches: int):
        self.callback = callback
        self.lock = threading.Lock()
        self.total, self.bytes_total, self.batches_total = files, size, batches
        self.done = self.bytes_done = self.batches_done = self.batches_failed = 0
        self.cancel = threading.Event()
        self.open: set[Association] = set()
        # The resume journal's hook: told of every file the peer confirmed, as it happens.
        self.on_confirmed: Callable[[Sequence[FileOutcome]], None] | None = None

    def opened(self, assoc: Association | None, closed: Association | None = None) -> None:
        with self.lock:
            if assoc is not None:
                self.open.add(assoc)
            if closed is not None:
                self.open.discard(closed)
        if assoc is not None and self.cancel.is_set():
            assoc.interrupt()

    def stop(self) -> None:
        """Ctrl-C or a fatal error: every association stops now, mid-file if need be."""
        self.cancel.set()
        with self.lock:
            for assoc in self.open:
                assoc.interrupt()

    def confirmed(self, outcome: FileOutcome) -> None:
        if self.on_confirmed is not None and outcome.outcome is Outcome.UPLOADED:
            self.on_confirmed([outcome])

    def report(
        self, *, files: int = 0, size: int = 0, batch: bool | None = None, msg: str = ""
    ) -> None:
        with self.lock:
            self.done += files
            self.bytes_done += size
            if batch is not None:
                self.batches_done += 1
                self.batches_failed += 0 if batch else 1
            if self.callback is not None:
                self.callback(
                    ProgressEvent(
                        Phase.UPLOAD,
                        self.done,
                        self.total,
                        message=msg,
                        bytes_done=self.bytes_done,
                        bytes_total=self.bytes_total,
                        batches_done=self.batches_done,
                        batches_failed=self.batches_failed,
                        batches_total=self.batches_total,
                    )
                )


def display_path(f: DicomFile) -> str:
    """The file's path, or ``archive/member`` for a member of an archive PATH (as REST does)."""
    return str(f.path / f.member) if f.member is not None else str(f.path)


def _outcome(f: DicomFile, batch: int, outcome: Outcome, reason: str = "") -> FileOutcome:
    return FileOutcome(
        display_path(f), outcome, reason, f.sop_instance_uid, f.series_uid, f.size, batch
    )


def _choose(assoc: Association, f: DicomFile) -> tuple[int, str] | str:
    """(context id, transfer syntax to send in) or the reason no context fits."""
    by_pair = {
        (c.abstract_syntax, c.transfer_syntax): c.context_id for c in assoc.accepted.values()
    }
    for ts in (f.transfer_syntax_uid, *UNCOMPRESSED):
        ctx = by_pair.get((f.sop_class_uid, ts))
        if ctx is not None:
            return ctx, ts
    sop = UID(f.sop_class_uid)
    sop_name = sop.name if sop.name != sop else f"SOP class {sop}"
    results = {r for r in assoc.refused.values()}
    if results == {3}:
        return f"the peer does not accept {sop_name} (abstract syntax not supported)"
    why = ", ".join(CONTEXT_RESULTS.get(r, str(r)) for r in sorted(results)) or "no answer"
    return (
        f"the peer accepted no transfer syntax for {sop_name} "
        f"(proposed {ts_name(f.transfer_syntax_uid)} and the uncompressed ones: {why})"
    )


def _payload(
    f: DicomFile, target_ts: str, route: str | None, reader: SourceReader
) -> Iterator[bytes]:
    source_ts = f.transfer_syntax_uid
    source = reader.open(f)
    if target_ts == source_ts:
        return _closing(source, read_as_is(source, source_ts, route))
    with contextlib.nullcontext(source) if isinstance(source, Path) else source:
        if source_ts == DEFLATED_LE and target_ts == EXPLICIT_LE:
            return iter([inflated(source, route)])
        return iter([transcode(source, source_ts, target_ts, route)])


def _closing(source: Path | IO[bytes], pieces: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from pieces
    finally:
        if not isinstance(source, Path):
            source.close()


def _send_one(
    assoc: Association, f: DicomFile, route: str | None, reader: SourceReader
) -> tuple[Outcome, str]:
    """Send one file; AssociationLost propagates (the file is then not confirmed)."""
    choice = _choose(assoc, f)
    if isinstance(choice, str):
        return Outcome.FAILED, choice
    context_id, target = choice
    try:
        pieces = _payload(f, target, route, reader)
        # Read the first piece before the request goes out: a file that vanished or cannot be
        # parsed fails alone, and the association stays usable.
        first = next(pieces, b"")
    except EncodeError as exc:
        return Outcome.FAILED, str(exc)
    except OSError as exc:
        return Outcome.FAILED, f"cannot read the file: {exc.strerror or exc}"
    except Exception as exc:  # pydicom raises many types on a malformed file
        return Outcome.FAILED, f"cannot encode the file: {exc}"

    def chained() -> Iterator[bytes]:
        yield first
        yield from pieces

    status = assoc.c_store(context_id, f.sop_class_uid, f.sop_instance_uid, chained())
    result = meaning(status.status, status.error_comment)
    if result.stored:
        note = result.reason
        if target != f.transfer_syntax_uid:
            conv = f"sent as {ts_name(target)} (the peer refused {ts_name(f.transfer_syntax_uid)})"
            note = f"{note}; {conv}" if note else conv
        return Outcome.UPLOADED, note
    return Outcome.FAILED, result.reason


def _run_association(
    index: int,
    files: list[DicomFile],
    peer: _Peer,
    route: str | None,
    retries: int,
    tracker: _Tracker,
    reader: SourceReader,
) -> tuple[list[FileOutcome], str | None]:
    """Send one planned association's files; reopen it after a loss, resuming after the last
    confirmed file. Returns the outcomes and, if it gave up, the one-line reason."""
    contexts = proposed_contexts(files)
    outcomes: list[FileOutcome] = []
    pending = list(files)
    failures = 0
    error = ""
    suspect: DicomFile | None = None  # in flight when the last association was lost
    while pending and not tracker.cancel.is_set():
        lost: UpperLayerError
        in_flight: DicomFile | None = None
        try:
            assoc = peer.open(contexts)
        except UpperLayerError as exc:
            lost = exc
        else:
            tracker.opened(assoc)
            log.debug(
                "association %d: %d of %d contexts accepted, peer max PDU %d, %d file(s) to send",
                index,
                len(assoc.accepted),
                len(contexts),
                assoc.peer_max_pdu,
                len(pending),
            )
            try:
                while pending and not tracker.cancel.is_set():
                    f = in_flight = pending[0]
                    outcome, reason = _send_one(assoc, f, route, reader)
                    in_flight = suspect = None
                    # The peer answered: this file is settled and never sent again.
                    pending.pop(0)
                    outcomes.append(_outcome(f, index, outcome, reason))
                    tracker.confirmed(outcomes[-1])
                    tracker.report(files=1, size=f.size)
                    failures = 0
                assoc.release()
                continue
            except AssociationLost as exc:
                lost = exc
            finally:
                assoc.abort()
                tracker.opened(None, closed=assoc)
        if tracker.cancel.is_set():
            break
        error = str(lost)
        failures += 1
        if in_flight is not None and in_flight is suspect:
            # Lost twice in a row on the same file: the file is the likely cause; give it up
            # alone so that the rest of the association can go on.
            pending.pop(0)
            why = f"not sent: {error} twice while this file was being sent"
            outcomes.append(_outcome(in_flight, index, Outcome.FAILED, why))
            tracker.report(files=1)
            in_flight = None
        suspect = in_flight
        if isinstance(lost, AssociationRejected) and lost.bad_ae_title:
            break  # a wrong AE title will not fix itself
        if failures > retries:
            break
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (failures - 1))
        log.debug(
            "association %d: %s; retry %d of %d in %.1f s, %d file(s) left",
            index,
            error,
            failures,
            retries,
            delay,
            len(pending),
        )
        if tracker.cancel.wait(delay * random.uniform(0.8, 1.2)):
            break
    gave_up = None
    if pending:
        what = "interrupted" if tracker.cancel.is_set() else f"not sent: {error}"
        gave_up = f"association {index}: {len(pending)} file(s) {what}"
        for f in pending:
            outcomes.append(_outcome(f, index, Outcome.FAILED, what))
        tracker.report(files=len(pending))
    return outcomes, gave_up


def send_dicom_store(
    source_dir: str | Path,
    host: str,
    port: int = 8104,
    called_aet: str = "XNAT",
    calling_aet: str = "XNATIO",
    num_batches: int = 45,
    progress_callback: ProgressCallback | None = None,
    *,
    project: str | None = None,
    subject: str | None = None,
    session: str | None = None,
    routing: bool = True,
    max_pdu: int = 0,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    retries: int = 3,
    allow_multiple_studies: bool = False,
    manifest: Manifest | None = None,
    on_confirmed: Callable[[Sequence[FileOutcome]], None] | None = None,
) -> UploadResult:
    """Send every DICOM file under ``source_dir`` to the SCP at ``host:port`` with C-STORE.

    ``num_batches`` parallel associations share the files (series kept together). With
    ``routing`` (the default) each sent data set carries ``Project:P Subject:S Session:E`` (the
    parts given) in Patient Comments, which XNAT uses to file it; the files on disk are never
    changed. ``max_pdu`` is the largest PDU we accept from the peer, announced in the association
    request; 0 means no limit, which costs nothing since the peer only sends small responses
    (what we send always follows the peer's own limit). Timeouts are in seconds, 0 for none:
    ``acse_timeout`` for association set-up and release, ``dimse_timeout`` for each C-STORE
    response, ``network_timeout`` for connecting and any other read. An association that is
    lost is reopened up to ``retries`` times, with backoff, resuming after the last confirmed
    file. ``manifest`` skips discovery when the caller has already run it. ``on_confirmed`` is
    called from the association threads with each file the peer stored (the resume journal).

    Raises UsageError for bad arguments or several studies (unless ``allow_multiple_studies``),
    ConfigError when the peer rejects the AE titles, UnreachableError when the C-ECHO cannot get
    through; every other problem is a failed file in the result.
    """
    started = time.monotonic()
    if not 0 < port < 65536:
        raise UsageError(f"DICOM port must be between 1 and 65535, not {port}.")
    for name, title in (("called", called_aet), ("calling", calling_aet)):
        if not 0 < len(title.strip()) <= 16 or not title.isascii() or "\\" in title:
            raise UsageError(f"The {name} AE title must be 1 to 16 ASCII characters: {title!r}.")
    if num_batches < 1:
        raise UsageError(f"--num-batches must be at least 1, not {num_batches}.")
    if max_pdu < 0 or retries < 0:
        raise UsageError("max PDU and retries cannot be negative.")
    route = routing_comment(project, subject, session) if routing else None
    emit = progress_callback or (lambda event: None)

    from xnatio.discover import check_single_study, discover

    if manifest is None:
        manifest = discover(source_dir, progress=progress_callback)
    check_single_study(manifest, allow_multiple=allow_multiple_studies)
    reader = SourceReader(manifest.source_archive)

    peer = _Peer(
        host,
        port,
        called_aet.strip(),
        calling_aet.strip(),
        max_pdu,
        acse_timeout,
        dimse_timeout,
        network_timeout,
    )
    emit(ProgressEvent(Phase.CONNECT, 0, 1, message=f"C-ECHO {peer.where}"))
    echo(peer)
    emit(ProgressEvent(Phase.CONNECT, 1, 1, message=f"{peer.where} answered C-ECHO"))

    groups = plan_associations(manifest.files, num_batches)
    tracker = _Tracker(progress_callback, len(manifest.files), manifest.total_bytes, len(groups))
    tracker.on_confirmed = on_confirmed
    tracker.report(msg=f"{len(groups)} association(s)")
    outcomes: dict[str, FileOutcome] = {}
    failed_batches = 0
    with ThreadPoolExecutor(max_workers=max(1, len(groups)), thread_name_prefix="c-store") as pool:
        futures = {
            pool.submit(_run_association, i, g, peer, route, retries, tracker, reader): i
            for i, g in enumerate(groups)
        }
        gave_up: dict[int, str] = {}
        try:
            # As they finish, so that "batches done" moves when an association ends.
            for fut in as_completed(futures):
                got, why = fut.result()
                for o in got:
                    outcomes[o.path] = o
                ok = why is None and all(o.outcome is Outcome.UPLOADED for o in got)
                failed_batches += 0 if ok else 1
                tracker.report(batch=ok)
                if why:
                    gave_up[futures[fut]] = why
        except BaseException:
            tracker.stop()  # Ctrl-C (or a callback that raised): every association stops now
            raise
    errors = [gave_up[i] for i in sorted(gave_up)]

    files = [outcomes[display_path(f)] for f in manifest.files]
    for o in files:
        if o.outcome is Outcome.FAILED and len(errors) < 20:
            errors.append(f"{o.path}: {o.reason}")
    files += [
        FileOutcome(str(s.path), Outcome.SKIPPED, s.reason, size=s.size)
        for s in (*manifest.skipped, *manifest.duplicates)
    ]
    duration = time.monotonic() - started
    emit(ProgressEvent(Phase.DONE, len(manifest.files), len(manifest.files)))
    return UploadResult(
        success=all(o.outcome is not Outcome.FAILED for o in files),
        total_files=len(manifest.files),
        duration=duration,
        total_size_mb=manifest.total_bytes / 1e6,
        errors=errors,
        files=files,
        transport=TRANSPORT,
        project=project or "",
        subject=subject or "",
        session=session or "",
        studies=manifest.studies(),
        batches_total=len(groups),
        batches_failed=failed_batches,
    )
