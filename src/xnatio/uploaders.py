"""The public Python API: upload a DICOM session to XNAT, get every file's outcome back.

    from xnatio.uploaders import upload_dicom_parallel_rest
    result = upload_dicom_parallel_rest(
        "https://xnat.example.org", "me", password, source_dir="/data/MR1",
        project="P", subject="S", session="S_MR1", progress_callback=print,
    )
    result.success, result.total_files, result.duration, result.total_size_mb, result.errors
    [f for f in result.files if f.outcome is Outcome.FAILED]   # each with XNAT's reason

Both functions go through :func:`xnatio.pipeline.upload`, the same call ``xio upload-dicom``
makes: the resume journal and its lock, the pre-flight, convergence on an existing session, the
commit and (REST) the read-back are on by default, as on the command line. The engines live in
``xnatio.transports``; every default in :mod:`xnatio.defaults`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xnatio import defaults
from xnatio.discover import check_single_study, discover
from xnatio.errors import UsageError
from xnatio.many.runner import ManyOptions, upload_many
from xnatio.models import (
    Batch,
    FileOutcome,
    Manifest,
    Outcome,
    ProgressCallback,
    ProgressEvent,
    UploadResult,
    file_path,
)
from xnatio.pipeline import UploadOptions, upload
from xnatio.plan import RestPlanner, make_plan
from xnatio.result import assemble_result
from xnatio.retry import RetryPolicy
from xnatio.settings import Secret, Settings
from xnatio.transports.rest import RestTarget, RestUploader, session_labels
from xnatio.xnat.client import XnatClient

if TYPE_CHECKING:
    from xnatio.coordinator import ExecutorFactory

__all__ = [
    "FileOutcome",
    "ManyOptions",
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
    "upload_many",
]


@dataclass(frozen=True)
class RestPlan:
    """What an upload would send: the discovered manifest and its batches (one for an archive)."""

    manifest: Manifest
    batches: list[Batch]


def plan_rest_upload(
    source_dir: str | Path,
    *,
    num_batches: int = defaults.REST_BATCHES,
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
    if manifest.files:
        check_single_study(manifest, allow_multiple=allow_multiple_studies)
    batches = make_plan(
        manifest, parts=num_batches, planner=RestPlanner(), progress=progress_callback
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
    num_batches: int = defaults.REST_BATCHES,
    upload_workers: int = defaults.UPLOAD_WORKERS,
    archive_workers: int = defaults.ARCHIVE_WORKERS,
    archive_format: str = defaults.ARCHIVE_FORMAT,
    progress_callback: ProgressCallback | None = None,
    *,
    timeout: float = defaults.REQUEST_TIMEOUT,
    overwrite: str = defaults.OVERWRITE,
    direct_archive: bool = False,
    archive_wait: float = defaults.ARCHIVE_WAIT,
    retries: int = defaults.RETRIES,
    allow_multiple_studies: bool = False,
    manifest: Manifest | None = None,
    dry_run: bool = False,
    client: XnatClient | None = None,
    cancel: threading.Event | None = None,
    on_confirmed: Callable[[Sequence[FileOutcome]], None] | None = None,
    preflight: bool = True,
    verify: bool = True,
    resume: bool = True,
    journal: str | Path | None = None,
    restart: bool = False,
    wait: bool = False,
    executor: ExecutorFactory | None = None,
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
    not archived by then).

    As ``xio upload-dicom`` does (both go through :func:`xnatio.pipeline.upload`): an existing
    session is read first and only what it lacks is sent (facts 1.5); with ``resume`` (default)
    the journal remembers what the server confirmed, so running the same call again sends only
    the rest (``journal``: its file, default as the CLI's; ``restart``: forget it; ``wait``: wait
    for another run on the same session instead of raising); with ``verify`` (default) the
    committed session is read back and every file found is VERIFIED. ``resume=False`` and
    ``verify=False`` send everything given, keep no journal and do not read back.

    ``allow_multiple_studies``: send a PATH holding several StudyInstanceUIDs. XNAT makes one
    session per study, so each is archived under its own label: the largest study as
    ``session``, the others as ``session_2``, ``session_3``… (by decreasing file count);
    ``result.session_uris`` lists every archived session, ``result.session_uri`` the first.

    Peak memory is bounded by the worker counts, not by the session's size (see
    :mod:`xnatio.transports.rest`). With ``dry_run`` nothing is sent: the result lists every
    file as SKIPPED with the batch it would go in (``batches_total`` set, ``success`` True).
    Raises :class:`~xnatio.errors.UsageError` (bad input, several studies),
    :class:`~xnatio.errors.AuthError` and :class:`~xnatio.errors.UnreachableError`; per-file
    and per-batch failures are in the result, never raised. ``KeyboardInterrupt`` cancels every
    request in flight, also one whose body is sent and whose answer is awaited (its connection
    is shut down), and is re-raised (``UploadInterrupted`` with ``resume``); setting ``cancel``
    stops the upload too (bodies stop mid-read, no batch starts; every file is in the result).
    ``on_confirmed`` receives, from worker threads, the outcomes of each batch as the server
    confirms it (for the resume journal). ``preflight``: check the destination first
    (:func:`xnatio.preflight.before_sending`: labels XNAT would change, project, rights, an
    existing session of another study); a refusal raises ``PreflightError`` before any DICOM
    byte is sent. ``executor(workers)`` makes the pool the batches run in (default: threads;
    ``xnatio.coordinator.SerialExecutor`` runs them one by one in the calling thread).
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
    if dry_run:
        plan = plan_rest_upload(
            source_dir,
            num_batches=num_batches,
            allow_multiple_studies=allow_multiple_studies,
            manifest=manifest,
            progress_callback=progress_callback,
        )
        return dry_run_result(plan, target)
    # Discovery inside upload(), after the login and the run lock (cheap checks first).
    return upload(
        settings=_settings(server, username, password, verify_tls),
        options=UploadOptions(
            project=project,
            subject=subject,
            session=session,
            path=Path(source_dir),
            transport="rest",
            num_batches=num_batches,
            upload_workers=upload_workers,
            archive_workers=archive_workers,
            archive_format=archive_format,
            timeout=timeout,
            overwrite=overwrite,
            direct_archive=direct_archive,
            archive_wait=archive_wait,
            retries=retries,
            allow_multiple_studies=allow_multiple_studies,
            preflight=preflight,
            verify=verify,
            resume=resume,
            journal=Path(journal) if journal is not None else None,
            restart=restart,
            wait=wait,
        ),
        manifest=manifest,
        progress=progress_callback,
        client=client,
        cancel=cancel,
        on_confirmed=on_confirmed,
        executor=executor,
    )


def _settings(
    server: str | None, username: str | None, password: str | Secret | None, verify_tls: bool | str
) -> Settings:
    """Settings from the API's arguments (never prompts: the CLI resolves its own)."""
    if isinstance(password, str):
        password = Secret(password)
    return Settings(
        server=server,
        username=username,
        password=password,
        verify_tls=verify_tls is not False,
        ca_bundle=verify_tls if isinstance(verify_tls, str) else None,
    )


def send_dicom_store(
    source_dir: str | Path,
    host: str,
    port: int = defaults.DICOM_PORT,
    called_aet: str = defaults.CALLED_AET,
    calling_aet: str = defaults.CALLING_AET,
    num_batches: int = defaults.DICOM_STORE_BATCHES,
    progress_callback: ProgressCallback | None = None,
    *,
    project: str | None = None,
    subject: str | None = None,
    session: str | None = None,
    routing: bool = True,
    max_pdu: int = defaults.MAX_PDU,
    acse_timeout: float = defaults.ACSE_TIMEOUT,
    dimse_timeout: float = defaults.DIMSE_TIMEOUT,
    network_timeout: float = defaults.NETWORK_TIMEOUT,
    retries: int = defaults.DICOM_STORE_API_RETRIES,
    allow_multiple_studies: bool = False,
    manifest: Manifest | None = None,
    on_confirmed: Callable[[Sequence[FileOutcome]], None] | None = None,
    retry: RetryPolicy | None = None,
    executor: ExecutorFactory | None = None,
    resume: bool = True,
    journal: str | Path | None = None,
    restart: bool = False,
    wait: bool = False,
) -> UploadResult:
    """Send every DICOM file under ``source_dir`` to the SCP at ``host:port`` with C-STORE.

    The engine is :func:`xnatio.transports.dicom_store.send_associations` (its docstring has
    the details); this function goes through :func:`xnatio.pipeline.upload`, as ``xio upload-dicom
    --transport dicom-store`` does: with ``resume`` (default) the journal records each file the
    peer stored, so running the same call again sends only the rest (``journal``, ``restart``,
    ``wait`` as for :func:`upload_dicom_parallel_rest`). No read-back: XNAT's DICOM receiver
    builds the session only after an idle period; check later with ``verify_session``.
    ``retry`` (a :class:`~xnatio.retry.RetryPolicy`) replaces ``retries``; ``executor(workers)``
    makes the pool the associations run in.
    """
    return upload(
        settings=Settings(
            dicom_host=host,
            dicom_port=port,
            dicom_called_aet=called_aet,
            dicom_calling_aet=calling_aet,
        ),
        options=UploadOptions(
            project=project or "",
            subject=subject or "",
            session=session or "",
            path=Path(source_dir),
            transport="dicom-store",
            num_batches=num_batches,
            routing=routing,
            max_pdu=max_pdu,
            acse_timeout=acse_timeout,
            dimse_timeout=dimse_timeout,
            network_timeout=network_timeout,
            retries=retries,
            retry=retry,
            allow_multiple_studies=allow_multiple_studies,
            verify=False,
            resume=resume,
            journal=Path(journal) if journal is not None else None,
            restart=restart,
            wait=wait,
        ),
        manifest=manifest,
        progress=progress_callback,
        on_confirmed=on_confirmed,
        executor=executor,
    )


def dry_run_result(plan: RestPlan, target: RestTarget) -> UploadResult:
    """The result of ``dry_run``: every file SKIPPED ("dry run") with its planned batch (and,
    with several studies, the session label it would be archived under)."""
    labels = session_labels(plan.manifest.studies(), target.session)
    many = len(labels) > 1
    outcomes = {
        file_path(f): FileOutcome(
            path=file_path(f),
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
    }
    return assemble_result(
        plan.manifest,
        outcomes,
        transport="rest",
        duration=0.0,
        batches_total=len(plan.batches),
        project=target.project,
        subject=target.subject,
        session=target.session,
    )
