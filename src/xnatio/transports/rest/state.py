"""The state of one REST upload, shared by its workers: every file's outcome and the sessions."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from xnatio.models import DicomFile, FileOutcome, FileTable, Manifest, Outcome
from xnatio.result import NOT_SENT, RunOutcomes

OnConfirmed = Callable[[Sequence[FileOutcome]], None]


@dataclass
class UploadRun:
    """What one upload has learnt so far; every change goes through ``lock``.

    Each file starts FAILED "not sent" and changes only when the server confirms it (UPLOADED)
    or it fails with a reason, so a cancel or a crash leaves every file accounted for.
    """

    # file_path() of each DicomFile -> its outcome
    # One per file of the manifest (result.RunOutcomes: found by record, no string per file).
    outcomes: RunOutcomes = field(default_factory=lambda: RunOutcomes(FileTable()))
    session_uris: list[str] = field(default_factory=list)
    # StudyInstanceUID -> label it is sent and archived under; session URI -> its label
    labels: dict[str, str] = field(default_factory=dict)
    uri_labels: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Direct-Archive URIs whose experiment did not appear within archive_wait (facts 1.6)
    pending: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def of(cls, manifest: Manifest, labels: dict[str, str]) -> UploadRun:
        return cls(labels=labels, outcomes=RunOutcomes(manifest.files))

    def fail(self, files: Iterable[DicomFile], reason: str, batch: int | None = None) -> None:
        with self.lock:
            for f in files:
                o = self.outcomes.of(f)
                o.outcome, o.reason = Outcome.FAILED, reason
                if batch is not None:
                    o.batch = batch

    def error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def not_sent(self, files: Iterable[DicomFile]) -> list[DicomFile]:
        """Those of ``files`` neither confirmed nor failed with a reason of their own."""
        with self.lock:
            return [f for f in files if self.outcomes.of(f).reason == NOT_SENT]

    def confirm(
        self, files: Sequence[DicomFile], uris: Sequence[str], batch: int, label: str
    ) -> list[FileOutcome]:
        """The server holds ``files`` (in the sessions ``uris``): their outcomes, now UPLOADED."""
        with self.lock:
            confirmed = [self.outcomes.of(f) for f in files]
            for o in confirmed:
                o.outcome, o.reason, o.batch = Outcome.UPLOADED, "", batch
            for uri in uris:
                if uri not in self.session_uris:
                    self.session_uris.append(uri)
                    self.uri_labels[uri] = label
        return confirmed

    def label_of(self, files: Sequence[DicomFile], default: str) -> str:
        """The label a request's files go under (one study per request when there are several)."""
        return self.labels.get(files[0].study_uid, default) if files else ""
