"""The one result assembler: an :class:`~xnatio.models.UploadResult` from a run's file outcomes.

Both transports (and ``--dry-run``) end here, so a result means the same whatever made it: one
outcome per file of the manifest in discovery order (a file the transport never got to is FAILED
"not sent": every file is accounted for), then what discovery set aside (SKIPPED), the batches
that failed, and ``success`` only when nothing failed and everything sent has landed.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence, ValuesView

from xnatio import defaults
from xnatio.events import ProgressCounter
from xnatio.models import (
    DicomFile,
    FileOutcome,
    FileTable,
    Manifest,
    Outcome,
    Phase,
    UploadResult,
    file_path,
    row_outcome,
)

NOT_SENT = "not sent"


class RunOutcomes(Mapping[str, FileOutcome]):
    """One outcome per file of a manifest, FAILED "not sent" until a transport says otherwise,
    by :func:`~xnatio.models.file_path` (a Mapping) and, cheaply, by record (:meth:`of`).

    Each outcome reads its path and UIDs from the manifest's columns, and a record made from
    those columns finds its outcome by its row: no key string or path string per file (an
    upload of 100,000 files held ~400 bytes a file here: issue 16 item 4). An outcome is made
    when its file is first asked for (a batch confirmed or failed), or when all are listed: while
    an upload sends, only the files reported so far have one (112 bytes each).
    """

    def __init__(self, files: FileTable) -> None:
        self._files = files
        self._outcomes: list[FileOutcome | None] = [None] * len(files)
        # Row in the columns -> position here (-1: not one of ours), when ``files`` is a view.
        self._positions: array[int] | None = None
        if files.is_view:
            self._positions = array("q", [-1]) * (max(files.rows(), default=-1) + 1)
            for position, row in enumerate(files.rows()):
                self._positions[row] = position
        self._by_path: dict[str, int] | None = None  # built only if a path is ever asked for

    def of(self, f: DicomFile) -> FileOutcome:
        """The outcome of ``f`` (KeyError when it is not a file of the manifest)."""
        if self._files.holds(f):
            row: int = f._row
            positions = self._positions
            if positions is None:
                position = row if row < len(self._outcomes) else -1
            else:
                position = positions[row] if row < len(positions) else -1
            if position >= 0:
                return self._at(position)
        return self[file_path(f)]

    def _at(self, position: int) -> FileOutcome:
        o = self._outcomes[position]
        if o is None:  # FAILED "not sent" until a transport says otherwise
            o = self._outcomes[position] = row_outcome(
                self._files, position, Outcome.FAILED, NOT_SENT
            )
        return o

    def __getitem__(self, path: str) -> FileOutcome:
        if self._by_path is None:
            files = self._files
            self._by_path = {files.name_of(i): i for i in range(len(files))}
        return self._at(self._by_path[path])

    def __iter__(self) -> Iterator[str]:
        return (o.path for o in self.in_order())

    def __len__(self) -> int:
        return len(self._outcomes)

    def values(self) -> ValuesView[FileOutcome]:
        return _Values(self)

    def covers(self, files: FileTable) -> bool:
        """True when these are the outcomes of exactly ``files`` (the same rows, in order)."""
        mine = self._files
        return files.same_rows(mine)

    def in_order(self) -> list[FileOutcome]:
        """Every outcome, in the manifest's order (those not made yet made now)."""
        outcomes = self._outcomes
        for position, o in enumerate(outcomes):
            if o is None:
                self._at(position)
        return outcomes  # type: ignore[return-value]  # no None left


class _Values(ValuesView[FileOutcome]):
    """The outcomes themselves (Mapping's own view would find each by its path)."""

    _mapping: RunOutcomes

    def __iter__(self) -> Iterator[FileOutcome]:
        return iter(self._mapping.in_order())


def assemble_result(
    manifest: Manifest,
    outcomes: Mapping[str, FileOutcome],
    *,
    transport: str,
    duration: float,
    batches_total: int,
    batches_failed: int | None = None,
    errors: Sequence[str] = (),
    project: str = "",
    subject: str = "",
    session: str = "",
    landed: bool = True,
    upload_id: str = "",
    session_uri: str = "",
    session_uris: Sequence[str] = (),
    pending: Sequence[str] = (),
    committed: bool | None = None,
    progress: ProgressCounter | None = None,
) -> UploadResult:
    """The result of sending ``manifest``; ``outcomes`` maps :func:`~xnatio.models.file_path`
    to each file's outcome.

    ``batches_failed``: the batches the transport counted as failed (default: those holding a
    failed file). ``landed``: what the transport sent is where it goes (REST: committed into a
    session); with it False, or anything ``pending`` (sent, not yet archived), the run is not a
    success even when no file failed. ``progress``: told the DONE event.
    """
    if isinstance(outcomes, RunOutcomes) and outcomes.covers(manifest.files):
        files = list(outcomes.in_order())
    else:
        files = [outcomes.get(file_path(f)) or not_sent(f) for f in manifest.files]
    files += skipped_outcomes(manifest)
    if batches_failed is None:
        failed = {o.batch for o in files if o.outcome is Outcome.FAILED and o.batch is not None}
        batches_failed = len(failed)
    result = UploadResult(
        success=landed and not pending and not any(o.outcome is Outcome.FAILED for o in files),
        total_files=len(manifest.files),
        duration=duration,
        total_size_mb=manifest.total_bytes / 1e6,
        errors=list(errors),
        files=files,
        transport=transport,
        upload_id=upload_id,
        project=project,
        subject=subject,
        session=session,
        studies=manifest.studies(),
        batches_total=batches_total,
        batches_failed=batches_failed,
        session_uri=session_uri,
        session_uris=list(session_uris),
        pending=list(pending),
        committed=committed,
    )
    if progress is not None:
        progress.phase(Phase.DONE, len(result.uploaded), result.total_files, "done")
    return result


def not_sent(f: DicomFile, reason: str = NOT_SENT) -> FileOutcome:
    """The outcome of a file the transport did not (yet) send: FAILED until it says otherwise."""
    return FileOutcome(
        path=file_path(f),
        outcome=Outcome.FAILED,
        reason=reason,
        sop_instance_uid=f.sop_instance_uid,
        series_uid=f.series_uid,
        size=f.size,
    )


def skipped_outcomes(manifest: Manifest) -> list[FileOutcome]:
    """SKIPPED outcomes for what discovery set aside (not DICOM, DICOMDIR, duplicates)."""
    return [
        FileOutcome(
            path=str(s.path),
            outcome=Outcome.SKIPPED,
            reason=s.reason,
            size=s.size,
            sop_instance_uid=s.sop_instance_uid,  # a duplicate's instance; "" for other files
            series_uid=s.series_uid,
        )
        for s in [*manifest.skipped, *manifest.duplicates]
    ]


def failed_file_lines(
    files: Sequence[FileOutcome], limit: int = defaults.MAX_ERROR_LINES
) -> list[str]:
    """One error line per failed file, up to a screenful; every reason stays in ``files``."""
    failed = [o for o in files if o.outcome is Outcome.FAILED]
    lines = [f"{o.path}: {o.reason}" for o in failed[:limit]]
    if len(failed) > limit:
        lines.append(f"... and {len(failed) - limit} more failed file(s)")
    return lines
