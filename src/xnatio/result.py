"""The one result assembler: an :class:`~xnatio.models.UploadResult` from a run's file outcomes.

Both transports (and ``--dry-run``) end here, so a result means the same whatever made it: one
outcome per file of the manifest in discovery order (a file the transport never got to is FAILED
"not sent": every file is accounted for), then what discovery set aside (SKIPPED), the batches
that failed, and ``success`` only when nothing failed and everything sent has landed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from xnatio import defaults
from xnatio.events import ProgressCounter
from xnatio.models import (
    DicomFile,
    FileOutcome,
    Manifest,
    Outcome,
    Phase,
    UploadResult,
    file_path,
)


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


def not_sent(f: DicomFile, reason: str = "not sent") -> FileOutcome:
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
