"""One planned association's work, run in a worker thread: open, send file by file, reopen after
a loss.

Every file ends with the status of its C-STORE-RSP. A lost association (A-ABORT, rejection,
broken connection, DIMSE timeout) is reopened after the shared :class:`~xnatio.retry.RetryPolicy`
backoff and resumes after the last confirmed file, so nothing the peer confirmed is sent twice; a
file that was in flight at two losses in a row is given up alone, so one poison instance cannot
sink its association. A cancel (:class:`xnatio.coordinator.Coordinator`) interrupts the open
association, which then ends with A-ABORT; the files not confirmed end "interrupted".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pydicom.uid import UID

from xnatio.coordinator import Coordinator
from xnatio.events import ProgressCounter
from xnatio.models import (
    DicomFile,
    FileOutcome,
    Outcome,
    file_path,
)
from xnatio.retry import RetryPolicy
from xnatio.transports.dicom_store.encode import (
    DEFLATED_LE,
    EXPLICIT_LE,
    UNCOMPRESSED,
    EncodeError,
    inflated,
    read_as_is,
    transcode,
    ts_name,
)
from xnatio.transports.dicom_store.plan import proposed_contexts
from xnatio.transports.dicom_store.source import SourceReader
from xnatio.transports.dicom_store.status import meaning
from xnatio.transports.dicom_store.ul import (
    CONTEXT_RESULTS,
    Association,
    AssociationLost,
    AssociationRejected,
    ProposedContext,
    UpperLayerError,
    open_association,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Peer:
    host: str
    port: int
    called_aet: str
    calling_aet: str
    max_pdu: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float

    def open(
        self,
        contexts: list[ProposedContext],
        on_connect: Callable[[Association], None] | None = None,
    ) -> Association:
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
            on_connect=on_connect,
        )

    @property
    def where(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"


def _outcome(f: DicomFile, batch: int, outcome: Outcome, reason: str = "") -> FileOutcome:
    return FileOutcome(
        file_path(f), outcome, reason, f.sop_instance_uid, f.series_uid, f.size, batch
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
    results = {r for sop_uid, r in assoc.refused.values() if sop_uid == f.sop_class_uid}
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


class _FileBroke(Exception):
    """This file could not be read to the end after its request had started."""


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
        try:
            yield from pieces
        except Exception as exc:  # e.g. an I/O error halfway through a file on a network share
            raise _FileBroke(f"reading the file failed while sending it: {exc}") from exc

    try:
        status = assoc.c_store(context_id, f.sop_class_uid, f.sop_instance_uid, chained())
    except _FileBroke:
        # Half a data set went out: the association cannot carry on; the caller opens another.
        assoc.abort()
        raise
    result = meaning(status.status, status.error_comment)
    if result.stored:
        note = result.reason
        if target != f.transfer_syntax_uid:
            conv = f"sent as {ts_name(target)} (the peer refused {ts_name(f.transfer_syntax_uid)})"
            note = f"{note}; {conv}" if note else conv
        return Outcome.UPLOADED, note
    return Outcome.FAILED, result.reason


@dataclass(frozen=True, slots=True)
class Job:
    """What every association of one upload shares."""

    peer: Peer
    route: str | None
    retry: RetryPolicy
    coordinator: Coordinator
    progress: ProgressCounter
    reader: SourceReader
    # The resume journal's hook: told of every file the peer confirmed, as it happens.
    on_confirmed: Callable[[Sequence[FileOutcome]], None] | None = None


class AssociationWorker:
    """The files of one planned association, sent in order over as many associations as it takes
    (one at a time)."""

    def __init__(self, index: int, files: list[DicomFile], job: Job) -> None:
        self.index, self.job = index, job
        self.contexts = proposed_contexts(files)
        self.pending = list(files)
        self.outcomes: list[FileOutcome] = []
        self.in_flight: DicomFile | None = None
        self.suspect: DicomFile | None = None  # in flight when the last association was lost
        self.failures = 0  # associations lost in a row without an answered file between
        self.since: float | None = None  # when the first of them was lost (the retry budget)

    def run(self) -> tuple[list[FileOutcome], str | None]:
        """Returns the outcomes and, if it gave up, the one-line reason."""
        job, cancel = self.job, self.job.coordinator
        error = ""
        while self.pending and not cancel.cancelled:
            lost = self._attempt()
            if lost is None:
                continue  # done, or a fresh association after a file that broke
            if cancel.cancelled:
                break
            error = str(lost)
            self.failures += 1
            if self.failures == 1:
                self.since = job.retry.clock()
            if self.in_flight is not None and self.in_flight is self.suspect:
                # Lost twice in a row on the same file: the file is the likely cause; give it up
                # alone so that the rest of the association can go on.
                why = f"not sent: {error} twice while this file was being sent"
                self._settle(self.pending.pop(0), Outcome.FAILED, why)
                self.in_flight = None
            self.suspect = self.in_flight
            if isinstance(lost, AssociationRejected) and lost.bad_ae_title:
                break  # a wrong AE title will not fix itself
            if self.failures >= job.retry.attempts:
                break
            log.debug(
                "association %d: %s; retry %d of %d, %d file(s) left",
                self.index,
                error,
                self.failures,
                job.retry.retries,
                len(self.pending),
            )
            if not job.retry.wait(self.failures - 1, cancel=cancel.event, since=self.since):
                break
        gave_up = None
        if self.pending:
            what = "interrupted" if cancel.cancelled else f"not sent: {error}"
            gave_up = f"association {self.index}: {len(self.pending)} file(s) {what}"
            for f in self.pending:
                self.outcomes.append(_outcome(f, self.index, Outcome.FAILED, what))
            job.progress.update(files=len(self.pending))
        return self.outcomes, gave_up

    def _attempt(self) -> UpperLayerError | None:
        """One association: open it, send the pending files until done, cancelled or lost.

        Returns why it was lost, or None. ``in_flight`` is the file whose request was out when it
        was lost (None if between files).
        """
        job = self.job
        self.in_flight = None
        opened: list[Association] = []

        def connected(assoc: Association) -> None:
            opened.append(assoc)
            job.coordinator.add_stopper(assoc.interrupt)

        try:
            try:
                assoc = job.peer.open(self.contexts, on_connect=connected)
            except UpperLayerError as exc:
                return exc
            log.debug(
                "association %d: %d of %d contexts accepted, peer max PDU %d, %d file(s) to send",
                self.index,
                len(assoc.accepted),
                len(self.contexts),
                assoc.peer_max_pdu,
                len(self.pending),
            )
            try:
                while self.pending and not job.coordinator.cancelled:
                    f = self.in_flight = self.pending[0]
                    job.progress.update(in_flight=1)  # the display's "K in flight"
                    try:
                        outcome, reason = _send_one(assoc, f, job.route, job.reader)
                    finally:
                        job.progress.update(in_flight=-1)
                    self.in_flight = self.suspect = None
                    # The peer answered: this file is settled and never sent again.
                    self._settle(self.pending.pop(0), outcome, reason, confirmed=True)
                if not job.coordinator.cancelled:
                    assoc.release()  # else the finally below aborts it: no waiting for the peer
                return None
            except _FileBroke as exc:
                self.in_flight = None
                self._settle(self.pending.pop(0), Outcome.FAILED, str(exc))
                return None  # a fresh association for the rest; not a failure of the peer
            except AssociationLost as exc:
                return exc
        finally:
            for assoc in opened:  # also one interrupted while it was being negotiated
                job.coordinator.remove_stopper(assoc.interrupt)
                assoc.abort()  # A-ABORT unless released or closed; closes the socket

    def _settle(self, f: DicomFile, outcome: Outcome, reason: str, confirmed: bool = False) -> None:
        self.outcomes.append(_outcome(f, self.index, outcome, reason))
        if confirmed:
            self.failures = 0
            if outcome is Outcome.UPLOADED and self.job.on_confirmed is not None:
                self.job.on_confirmed([self.outcomes[-1]])
        self.job.progress.update(files=1, nbytes=f.size if confirmed else 0)
