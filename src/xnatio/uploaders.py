"""The public Python API: upload a DICOM session to XNAT, get every file's outcome back.

    from xnatio.uploaders import upload_dicom_parallel_rest
    result = upload_dicom_parallel_rest(
        "https://xnat.example.org", "me", password, source_dir="/data/MR1",
        project="P", subject="S", session="S_MR1", progress_callback=print,
    )
    result.success, result.total_files, result.duration, result.total_size_mb, result.errors
    [f for f in result.files if f.outcome is Outcome.FAILED]   # each with XNAT's reason

The CLI (``xio upload-dicom``) is a thin layer over these functions; the engines live in
``xnatio.transports``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xnatio.discover import check_single_study, discover
from xnatio.errors import UsageError
from xnatio.models import (
    Batch,
    FileOutcome,
    Manifest,
    Outcome,
    Phase,
    ProgressCallback,
    ProgressEvent,
    UploadResult,
)
from xnatio.plan import plan_batches
from xnatio.retry import RetryPolicy
from xnatio.settings import Secret
from xnatio.transports.rest import (
    RestTarget,
    RestUploader,
    display_path,
    session_labels,
    skipped_outcomes,
    split_by_study,
)
from xnatio.xnat.client import XnatClient

__all__ = [
    "FileOutcome",
    "Outcome",
    "ProgressCallback",
    "ProgressEvent",
    "RestPlan",
    "RestTarget",
    "RestUploader",
    "UploadResult",
    "XnatClient",
    "plan_rest_upload",
    "send_dicom_store",
    "upload_dicom_parallel_rest",
]

if TYPE_CHECKING:
    from xnatio.transports.dicom_store import send_dicom_store


def __getattr__(name: str) -> Any:
    # The C-STORE transport is re-exported lazily: importing it pulls in pynetdicom's status
    # tables and pydicom's encoders (~0.2 s), which a REST upload does not need.
    if name == "send_dicom_store":
        from xnatio.transports.dicom_store import send_dicom_store

        return send_dicom_store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class RestPlan:
    """What an upload would send: the discovered manifest and its batches (one for an archive)."""

    manifest: Manifest
    batches: list[Batch]


def plan_rest_upload(
    source_dir: str | Path,
    *,
    num_batches: int = 42,
    allow_multiple_studies: bool = False,
    manifest: Manifest | None = None,
    progress_callback: ProgressCallback | None = None,
) -> RestPlan:
    """Discover (unless ``manifest`` is given), refuse mixed studies, and plan the batches.

    With several studies (allowed), batches are cut so that each holds one study: each study is
    sent and archived under its own label (:mod:`xnatio.transports.rest`). Sends nothing;
    ``xnatio.plan.describe_plan`` renders the result for ``--dry-run``.
    """
    if manifest is None:
        path = Path(source_dir)
        if not path.exists():
            raise UsageError(f"{path} does not exist")
        manifest = discover(path, progress=progress_callback)
    if not manifest.files:
        where = manifest.source_archive or manifest.root
        raise UsageError(
            f"no DICOM files found in {where} ({len(manifest.skipped)} other files skipped)"
        )
    check_single_study(manifest, allow_multiple=allow_multiple_studies)
    if progress_callback is not None:
        progress_callback(ProgressEvent(phase=Phase.PLAN, current=0, total=1, message="planning"))
    if manifest.source_archive is not None:
        # An archive PATH is sent in one request (its DICOM members re-packed).
        batches = [Batch(index=0, files=tuple(manifest.files))]
    else:
        batches = plan_batches(manifest, max(1, num_batches))
    if len(manifest.studies()) > 1:
        batches = split_by_study(batches)
    if progress_callback is not None:
        progress_callback(
            ProgressEvent(
                phase=Phase.PLAN,
                current=1,
                total=1,
                message=f"{len(batches)} batch{'es' if len(batches) != 1 else ''}",
                bytes_total=manifest.total_bytes,
                batches_total=len(batches),
            )
        )
    return RestPlan(manifest, batches)


def upload_dicom_parallel_rest(
    server: str,
    username: str,
    password: str | Secret,
    verify_tls: bool | str = True,
    source_dir: str | Path = ".",
    project: str = "",
    subject: str = "",
    session: str = "",
    num_batches: int = 42,
    upload_workers: int = 42,
    archive_workers: int = 5,
    archive_format: str = "tar",
    progress_callback: ProgressCallback | None = None,
    *,
    timeout: float = 10800.0,
    overwrite: str = "none",
    direct_archive: bool = False,
    archive_wait: float = 900.0,
    retries: int = 5,
    allow_multiple_studies: bool = False,
    manifest: Manifest | None = None,
    dry_run: bool = False,
    client: XnatClient | None = None,
    cancel: threading.Event | None = None,
    on_confirmed: Callable[[Sequence[FileOutcome]], None] | None = None,
    preflight: bool = True,
) -> UploadResult:
    """Upload the DICOM session under ``source_dir`` (a folder or a .zip/.tar/.tar.gz) to XNAT.

    Discovers every DICOM file by content, plans up to ``num_batches`` series-aligned batches,
    streams them as ``archive_format`` archives (tar, zip, or zip-deflated; tgz sends
    zip-deflated) to the prearchive with at most ``upload_workers`` requests in flight while
    ``archive_workers`` threads prepare the next ones, then commits and archives the session once
    as PROJECT/SUBJECT/SESSION. ``verify_tls`` is True, False or a CA bundle path; ``timeout`` is
    per request (seconds); ``retries`` per batch on transient failures; ``overwrite`` is none,
    append or delete (what the archive step sends, see :class:`RestTarget`); ``direct_archive``
    uses XNAT ≥ 1.8.3 Direct-Archive instead of prearchive + commit, and waits up to
    ``archive_wait`` seconds for XNAT to archive it (facts 1.6; ``result.pending`` lists what was
    not archived by then). This function sends everything it is given: reading an existing
    session first and sending only what it lacks is :func:`xnatio.resume.resumable_rest_upload`
    (``xio upload-dicom``).

    ``allow_multiple_studies``: send a PATH holding several StudyInstanceUIDs. XNAT makes one
    session per study, so each is archived under its own label: the largest study as
    ``session``, the others as ``session_2``, ``session_3``… (by decreasing file count);
    ``result.session_uris`` lists every archived session, ``result.session_uri`` the first.

    Peak memory is bounded by the worker counts, not by the session's size (see
    :mod:`xnatio.transports.rest`). With ``dry_run`` nothing is sent: the result lists every
    file as SKIPPED with the batch it would go in (``batches_total`` set, ``success`` True).
    Raises :class:`~xnatio.errors.UsageError` (bad input, several studies),
    :class:`~xnatio.errors.AuthError` and :class:`~xnatio.errors.UnreachableError`; per-file
    and per-batch failures are in the result, never raised. ``KeyboardInterrupt`` (or setting
    ``cancel``) cancels the in-flight requests, closes the session and is re-raised.
    ``on_confirmed`` receives, from worker threads, the outcomes of each batch as the server
    confirms it (for the resume journal). ``preflight``: check the destination first
    (:func:`xnatio.preflight.before_sending`: labels XNAT would change, project, rights, an
    existing session of another study); a refusal raises ``PreflightError`` before any DICOM
    byte is sent.
    """
    target = RestTarget(
        project=project,
        subject=subject,
        session=session,
        num_batches=num_batches,
        upload_workers=upload_workers,
        archive_workers=archive_workers,
        archive_format=archive_format,
        overwrite=overwrite,
        direct_archive=direct_archive,
        archive_wait=archive_wait,
    )
    plan = plan_rest_upload(
        source_dir,
        num_batches=num_batches,
        allow_multiple_studies=allow_multiple_studies,
        manifest=manifest,
        progress_callback=progress_callback,
    )
    if dry_run:
        return dry_run_result(plan, target)
    retry = RetryPolicy(retries=max(0, retries))
    own_client = client is None
    if client is None:
        client = XnatClient(
            server,
            username=username,
            password=password,
            verify=verify_tls,
            timeout=timeout,
            pool_size=upload_workers,
            retry=retry,
        )
    try:
        if preflight:
            from dataclasses import replace

            from xnatio.preflight import before_sending

            labels = session_labels(plan.manifest.studies(), session)
            found = before_sending(
                client, plan.manifest, project=project, subject=subject, labels=labels
            )
            target = replace(target, project=found.project, subject=found.subject)
        uploader = RestUploader(
            client,
            target,
            retry=retry,
            progress_callback=progress_callback,
            cancel=cancel,
            on_confirmed=on_confirmed,
        )
        return uploader.upload(plan.manifest, plan.batches)
    finally:
        if own_client:
            client.close()


def dry_run_result(plan: RestPlan, target: RestTarget) -> UploadResult:
    """The result of ``dry_run``: every file SKIPPED ("dry run") with its planned batch (and,
    with several studies, the session label it would be archived under)."""
    labels = session_labels(plan.manifest.studies(), target.session)
    many = len(labels) > 1
    files = [
        FileOutcome(
            path=display_path(f),
            outcome=Outcome.SKIPPED,
            reason=f"dry run: would be sent in batch {b.index + 1}"
            + (f" as session {labels[f.study_uid]}" if many else ""),
            sop_instance_uid=f.sop_instance_uid,
            series_uid=f.series_uid,
            size=f.size,
            batch=b.index,
        )
        for b in plan.batches
        for f in b.files
    ]
    files += skipped_outcomes(plan.manifest)
    return UploadResult(
        success=True,
        total_files=len(plan.manifest.files),
        duration=0.0,
        total_size_mb=plan.manifest.total_bytes / 1e6,
        files=files,
        transport="rest",
        project=target.project,
        subject=target.subject,
        session=target.session,
        studies=plan.manifest.studies(),
        batches_total=len(plan.batches),
    )
