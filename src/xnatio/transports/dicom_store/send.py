"""The C-STORE entry point: C-ECHO, plan the associations, run them, assemble the result."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from xnatio.errors import ConfigError, UnreachableError, UsageError
from xnatio.models import (
    FileOutcome,
    Manifest,
    Outcome,
    Phase,
    ProgressCallback,
    ProgressEvent,
    UploadResult,
)
from xnatio.transports.dicom_store.encode import IMPLICIT_LE
from xnatio.transports.dicom_store.plan import (
    plan_associations,
    proposed_contexts,
    routing_comment,
)
from xnatio.transports.dicom_store.source import SourceReader
from xnatio.transports.dicom_store.ul import (
    VERIFICATION,
    AssociationLost,
    AssociationRejected,
    PeerUnreachable,
    ProposedContext,
)
from xnatio.transports.dicom_store.worker import Peer, Tracker, display_path, run_association

__all__ = [
    "TRANSPORT",
    "echo",
    "plan_associations",
    "proposed_contexts",
    "routing_comment",
    "send_dicom_store",
]

TRANSPORT = "dicom-store"
MAX_ERROR_LINES = 20


def echo(peer: Peer) -> None:
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
    parts given) in Patient Comments, replacing any comment the file had (a stale ``Project:``
    entry there would route it elsewhere); the files on disk are never changed.

    ``max_pdu`` is the largest PDU we accept from the peer, announced in the association
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

    peer = Peer(
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
    tracker = Tracker(progress_callback, len(manifest.files), manifest.total_bytes, len(groups))
    tracker.on_confirmed = on_confirmed
    tracker.report(msg=f"{len(groups)} association(s)")
    outcomes: dict[str, FileOutcome] = {}
    failed_batches = 0
    with ThreadPoolExecutor(max_workers=max(1, len(groups)), thread_name_prefix="c-store") as pool:
        futures = {
            pool.submit(run_association, i, g, peer, route, retries, tracker, reader): i
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
    failed = [o for o in files if o.outcome is Outcome.FAILED]
    # One line per failed file, up to a screenful; every file's reason is in ``files``.
    errors += [f"{o.path}: {o.reason}" for o in failed[:MAX_ERROR_LINES]]
    if len(failed) > MAX_ERROR_LINES:
        errors.append(f"... and {len(failed) - MAX_ERROR_LINES} more failed file(s)")
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
