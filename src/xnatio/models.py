"""Plain data that flows through the upload pipeline.

    PATH -discover-> Manifest -plan-> Batches -pack-> streams -send-> XNAT -verify-> Result

Every stage takes and returns these records; both transports share them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class DicomFile:
    """One DICOM instance found on disk (header fields only; pixel data is never read)."""

    path: Path
    size: int
    mtime_ns: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    series_number: int | None
    transfer_syntax_uid: str
    patient_id: str
    # Member name inside an archive when PATH is an archive, else None.
    member: str | None = None


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file under PATH that will not be sent, and why (one short sentence)."""

    path: Path
    reason: str
    size: int = 0


@dataclass(slots=True)
class StudySummary:
    study_uid: str
    patient_id: str
    file_count: int
    total_bytes: int


@dataclass(slots=True)
class Manifest:
    """Everything discovery found under one PATH."""

    root: Path
    files: list[DicomFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    # Second and later copies of a SOP Instance UID: not sent, reported.
    duplicates: list[SkippedFile] = field(default_factory=list)
    # Set when PATH is an archive file (.zip/.tar/.tar.gz) rather than a directory.
    source_archive: Path | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def studies(self) -> list[StudySummary]:
        out: dict[str, StudySummary] = {}
        for f in self.files:
            s = out.get(f.study_uid)
            if s is None:
                s = out[f.study_uid] = StudySummary(f.study_uid, f.patient_id, 0, 0)
            s.file_count += 1
            s.total_bytes += f.size
        return sorted(out.values(), key=lambda s: -s.file_count)

    def series(self) -> dict[str, list[DicomFile]]:
        out: dict[str, list[DicomFile]] = {}
        for f in self.files:
            out.setdefault(f.series_uid, []).append(f)
        return out


@dataclass(frozen=True, slots=True)
class Batch:
    """Files sent together in one request (REST) or one association (C-STORE)."""

    index: int
    files: tuple[DicomFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class Outcome(str, enum.Enum):
    UPLOADED = "uploaded"  # the server confirmed it
    VERIFIED = "verified"  # confirmed and found on read-back
    SKIPPED = "skipped"  # not sent on purpose (not DICOM, DICOMDIR, duplicate, already sent)
    FAILED = "failed"  # should have been sent and was not, or did not land


@dataclass(slots=True)
class FileOutcome:
    path: str
    outcome: Outcome
    reason: str = ""
    sop_instance_uid: str = ""
    series_uid: str = ""
    size: int = 0
    batch: int | None = None


class Phase(str, enum.Enum):
    DISCOVER = "discover"
    PLAN = "plan"
    CONNECT = "connect"
    UPLOAD = "upload"
    COMMIT = "commit"
    VERIFY = "verify"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """What a progress callback receives.

    ``current``/``total`` count files in the UPLOAD phase (and steps elsewhere);
    ``bytes_done``/``bytes_total`` count payload bytes. Progress may go backwards after a retry.
    """

    phase: Phase
    current: int
    total: int
    message: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    batches_done: int = 0
    batches_failed: int = 0
    batches_total: int = 0


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(slots=True)
class UploadResult:
    """What an upload returns, whatever the transport."""

    success: bool
    total_files: int
    duration: float
    total_size_mb: float
    errors: list[str] = field(default_factory=list)
    files: list[FileOutcome] = field(default_factory=list)
    transport: str = "rest"
    upload_id: str = ""
    project: str = ""
    subject: str = ""
    session: str = ""
    studies: list[StudySummary] = field(default_factory=list)
    batches_total: int = 0
    batches_failed: int = 0
    session_uri: str = ""
    verified: bool | None = None
    # Every session the upload filled (REST: one per StudyInstanceUID), ``session_uri`` first.
    session_uris: list[str] = field(default_factory=list)
    # Things that did not fail the run but the user should know (one line each), e.g. that the
    # server rewrote every file so read-back compared instance counts, not bytes.
    warnings: list[str] = field(default_factory=list)
    # Facts the user may want to know that are neither failures nor warnings (one line each),
    # e.g. that XNAT stored its own copies of the files (facts 1.7), so bytes were not compared.
    notes: list[str] = field(default_factory=list)
    # Direct-Archive URIs whose experiment XNAT had not created yet when xio stopped waiting
    # (facts 1.6): the files were sent, not yet archived; ``xio verify --wait-for`` later.
    pending: list[str] = field(default_factory=list)

    @property
    def uploaded(self) -> list[FileOutcome]:
        return [f for f in self.files if f.outcome in (Outcome.UPLOADED, Outcome.VERIFIED)]

    @property
    def failed(self) -> list[FileOutcome]:
        return [f for f in self.files if f.outcome is Outcome.FAILED]

    @property
    def skipped(self) -> list[FileOutcome]:
        return [f for f in self.files if f.outcome is Outcome.SKIPPED]

    @property
    def mb_per_s(self) -> float:
        return self.total_size_mb / self.duration if self.duration > 0 else 0.0
