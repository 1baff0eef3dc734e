"""Plain data that flows through the upload pipeline.

    PATH -discover-> Manifest -plan-> Batches -pack-> streams -send-> XNAT -verify-> Result

Every stage takes and returns these records; both transports share them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote


class DicomFile:
    """One DICOM instance found on disk (header fields only; pixel data is never read).

    Immutable, compared and hashed by value, and a dataclass to ``dataclasses`` (``replace``,
    ``fields``, ``asdict``: :class:`_DicomFileFields`). Compact, because an upload holds one
    per file (issue 16 item 4: 100,000 files in well under 120 MB): the path is kept as the
    string discovery walked (``fspath``), the very object :func:`file_path` returns, so the
    outcome records, the transports' indexes and the report share it rather than each making
    its own copy; ``path`` makes a ``Path`` when asked (a ``Path`` per file and the parts it
    caches cost ~340 bytes a file). Study, series, class, syntax and patient strings are
    shared too (discovery interns them).
    """

    # In constructor order (_init, _key, __repr__ and pickling follow it).
    __slots__ = _SLOTS = (
        "fspath",
        "size",
        "mtime_ns",
        "study_uid",
        "series_uid",
        "sop_instance_uid",
        "sop_class_uid",
        "series_number",
        "transfer_syntax_uid",
        "patient_id",
        "member",
        "ctime_ns",
    )

    fspath: str  # str(path): the file, or the archive holding it
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
    member: str | None
    # The inode change time (ns; 0 when unknown, e.g. inside an archive): any write changes it,
    # even one that puts the modification time back (the journal's change check, issue 13).
    ctime_ns: int

    def __init__(
        self,
        path: Path | str,
        size: int,
        mtime_ns: int,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        series_number: int | None,
        transfer_syntax_uid: str,
        patient_id: str,
        member: str | None = None,
        ctime_ns: int = 0,
    ) -> None:
        # Named as str(Path(path)), as records always were ("a//b" and "./a" read "a/b", "a");
        # discovery, whose walked strings are in that form already, uses :meth:`walked`.
        _init(
            self,
            str(Path(path)),
            size,
            mtime_ns,
            study_uid,
            series_uid,
            sop_instance_uid,
            sop_class_uid,
            series_number,
            transfer_syntax_uid,
            patient_id,
            member,
            ctime_ns,
        )

    @classmethod
    def walked(cls, fspath: str, *values: object) -> DicomFile:
        """The record of ``fspath``, a path string already as ``str(Path(fspath))`` would be,
        kept as that very object (discovery's walk: no second string per file); ``values``:
        the other fields in constructor order."""
        self = cls.__new__(cls)
        _init(self, fspath, *values)
        return self

    @property
    def path(self) -> Path:
        """The file (or, for an archive member, the archive) as a ``Path`` (made when asked)."""
        return Path(self.fspath)

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, a) for a in DicomFile._SLOTS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not DicomFile:
            return NotImplemented
        assert isinstance(other, DicomFile)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"DicomFile is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"DicomFile is immutable: cannot delete {name!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{a}={getattr(self, a)!r}" for a in DicomFile._SLOTS[1:])
        return f"DicomFile(path={self.path!r}, {fields})"


@dataclass(frozen=True)
class _DicomFileFields:
    """The fields :class:`DicomFile` is built from, as a dataclass declares them: DicomFile
    carries their ``__dataclass_fields__``, so ``dataclasses.replace``, ``fields`` and
    ``asdict`` treat it as the dataclass it was before it stored its path compactly."""

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
    member: str | None = None
    ctime_ns: int = 0


DicomFile.__dataclass_fields__ = _DicomFileFields.__dataclass_fields__  # type: ignore[attr-defined]
_set = object.__setattr__


def _init(self: DicomFile, *values: object) -> None:
    for attr, value in zip(DicomFile._SLOTS, values, strict=True):
        _set(self, attr, value)


def _rebuild(*values: object) -> DicomFile:
    self = DicomFile.__new__(DicomFile)
    _init(self, *values)
    return self


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file under PATH that will not be sent, and why (one short sentence)."""

    path: Path
    reason: str
    size: int = 0
    # A duplicate's instance (the one its first copy is sent as); empty for non-DICOM files.
    sop_instance_uid: str = ""
    series_uid: str = ""


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


class Origin(str, enum.Enum):
    """Who vouches for an outcome: this run, an earlier run (the journal), or the server."""

    RUN = "run"  # this run sent it (or failed to), or read it back
    JOURNAL = "journal"  # an earlier run sent it and the server confirmed it then
    SERVER = "server"  # the server held it already when this run read the session first


@dataclass(slots=True)
class FileOutcome:
    path: str
    outcome: Outcome
    reason: str = ""
    sop_instance_uid: str = ""
    series_uid: str = ""
    size: int = 0
    batch: int | None = None
    origin: Origin = Origin.RUN

    @property
    def sent_now(self) -> bool:
        """Bytes this run put on the wire (not an earlier run's, not the server's own)."""
        return self.origin is Origin.RUN


def file_path(f: DicomFile) -> str:
    """How outcomes, the journal, verification and the report name a file: its path, or
    ``ARCHIVE/member`` for a member of an archive PATH (the one copy of this rule)."""
    return str(f.path / f.member) if f.member is not None else f.fspath


class SessionKind(str, enum.Enum):
    """Where a session a transport reported lives on XNAT (facts 1.2, 1.6, 3)."""

    PREARCHIVE = "prearchive"  # received, waiting for a commit
    ARCHIVE = "archive"  # committed: an experiment
    DIRECT_ARCHIVE = "direct-archive"  # sent with Direct-Archive, archived by XNAT when idle


@dataclass(frozen=True, slots=True)
class SessionRef:
    """A session a transport reported, typed once where its URI is read (XNAT answers with a
    ``/data/prearchive/…``, ``/data/archive/…`` or ``/xapi/direct-archive/…`` URI, facts 1.3,
    1.6); the stages above look at ``kind``, never at the URI's text."""

    uri: str
    kind: SessionKind

    @classmethod
    def parse(cls, uri: str) -> SessionRef | None:
        """The reference of ``uri``; None for "" (nothing landed, or nothing remembered)."""
        if not uri:
            return None
        if "/direct-archive/" in uri:
            return cls(uri, SessionKind.DIRECT_ARCHIVE)
        if "/prearchive/" in uri:
            return cls(uri, SessionKind.PREARCHIVE)
        return cls(uri, SessionKind.ARCHIVE)

    @property
    def label(self) -> str:
        """The last path segment: the session's label (Direct-Archive and archive URIs)."""
        return unquote(self.uri.rstrip("/").rsplit("/", 1)[-1])


class Phase(str, enum.Enum):
    SYNTH = "synth"  # xio demo writing its synthetic session
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
    While uploading, ``current`` counts the files XNAT confirmed, ``files_in_flight`` those
    whose request is out, and ``wire_bytes`` the bytes on the wire (fewer than ``bytes_done``
    when compressed).
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
    files_in_flight: int = 0
    wire_bytes: int = 0


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
    # REST: True when the session is committed (archived, or handed to Direct-Archive); False
    # when it still waits in the prearchive (the next run only commits). None: the transport
    # has no commit step (C-STORE: XNAT files the session itself, facts 6).
    committed: bool | None = None
    # The run's own output could not be written (its --report): the upload may have succeeded,
    # the run still ends "error" with exit 2 (xnatio.errors.OutputError) and says so here.
    output_error: str = ""

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
