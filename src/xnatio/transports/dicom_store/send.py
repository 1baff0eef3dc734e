"""The C-STORE engine: C-ECHO, plan the associations, run them, assemble the result.

:func:`send_associations` is what :class:`xnatio.pipeline.DicomStoreTransport` calls for each
part the journal leaves to send; the public API is :func:`xnatio.uploaders.send_dicom_store`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from xnatio import defaults
from xnatio.coordinator import (
    BoundedExecutor,
    Coordinator,
    ExecutorFactory,
    thread_pool,
)
from xnatio.errors import ConfigError, UnreachableError, UsageError
from xnatio.events import ProgressCounter
from xnatio.models import (
    DicomFile,
    FileOutcome,
    Manifest,
    Outcome,
    Phase,
    ProgressCallback,
    ProgressEvent,
    UploadResult,
    file_path,
)
from xnatio.plan import Planner
from xnatio.result import assemble_result, failed_file_lines
from xnatio.retry import RetryPolicy
from xnatio.transports.dicom_store.encode import IMPLICIT_LE
from xnatio.transports.dicom_store.plan import AssociationPlanner, routing_comment
from xnatio.transports.dicom_store.source import SourceReader
from xnatio.transports.dicom_store.ul import (
    VERIFICATION,
    AssociationLost,
    AssociationRejected,
    PeerUnreachable,
    ProposedContext,
)
from xnatio.transports.dicom_store.worker import (
    AssociationWorker,
    Job,
    Peer,
)

__all__ = ["TRANSPORT", "echo", "send_associations"]

TRANSPORT = "dicom-store"


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


def send_associations(
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
    planner: Planner | None = None,
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
    file; ``retry`` (the :class:`~xnatio.retry.RetryPolicy` REST takes too) replaces ``retries``
    and the default backoff when given. ``manifest`` skips discovery when the caller has already
    run it. ``on_confirmed`` is called from the association threads with each file the peer
    stored (the resume journal).

    At most ``num_batches`` associations are open at once (a plan split further by the limit of
    128 presentation contexts runs its extra groups as slots free up). Ctrl-C (KeyboardInterrupt,
    which xio's CLI also makes of SIGTERM) or an exception from a callback interrupts
    every open association (A-ABORT) and is re-raised once their threads have ended; a file not
    confirmed by then was not told to ``on_confirmed``. ``executor(workers)`` makes the pool the
    associations run in (default: a thread pool). ``planner`` groups the files into associations
    (default: :class:`~xnatio.transports.dicom_store.plan.AssociationPlanner`).

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

    planned = (planner or AssociationPlanner()).plan(manifest, num_batches)
    groups = [list(batch.files) for batch in planned]
    progress = ProgressCounter(
        progress_callback,
        files_total=len(manifest.files),
        bytes_total=manifest.total_bytes,
        batches_total=len(groups),
    )
    progress.update(message=f"{len(groups)} association(s)")
    job = Job(
        peer=peer,
        route=route,
        retry=retry if retry is not None else RetryPolicy(retries=retries),
        coordinator=Coordinator(),
        progress=progress,
        reader=reader,
        on_confirmed=on_confirmed,
    )
    ran = _run_associations(groups, job, min(num_batches, len(groups)), executor)
    outcomes: dict[str, FileOutcome] = {}
    gave_up: dict[int, str] = {}
    failed_batches = 0
    for i, (got, why) in enumerate(ran):
        for o in got:
            outcomes[o.path] = o
        failed_batches += 0 if _batch_ok(got, why) else 1
        if why:
            gave_up[i] = why
    errors = [gave_up[i] for i in sorted(gave_up)]
    errors += failed_file_lines([outcomes[file_path(f)] for f in manifest.files])
    return assemble_result(
        manifest,
        outcomes,
        transport=TRANSPORT,
        duration=time.monotonic() - started,
        batches_total=len(groups),
        batches_failed=failed_batches,
        errors=errors,
        project=project or "",
        subject=subject or "",
        session=session or "",
        progress=progress,
    )


def _batch_ok(got: Sequence[FileOutcome], why: str | None) -> bool:
    return why is None and all(o.outcome is Outcome.UPLOADED for o in got)


Ran = tuple[list[FileOutcome], str | None]


def _run_associations(
    groups: list[list[DicomFile]], job: Job, workers: int, executor: ExecutorFactory | None
) -> list[Ran]:
    """Run every group's association, at most ``workers`` at once; the results in plan order.

    The one cancel path: KeyboardInterrupt here (Ctrl-C; SIGTERM via the CLI) or any
    exception in a worker cancels the coordinator, which interrupts every open association; the
    pool is then waited for (promptly) and the exception re-raised.
    """
    coordinator = job.coordinator

    def task(index: int, group: list[DicomFile]) -> Ran:
        try:
            got, why = AssociationWorker(index, group, job).run()
            # As each ends, so that "batches done" moves when an association ends.
            job.progress.update(batch_done=True, failed=not _batch_ok(got, why))
            return got, why
        except BaseException as exc:
            coordinator.cancel(exc)
            raise

    with BoundedExecutor(max(1, workers), executor or thread_pool("c-store")) as pool:
        try:
            futures = []
            for index, group in enumerate(groups):
                if coordinator.cancelled:
                    break
                futures.append(pool.submit(task, index, group))  # blocks while all are busy
            ran = [future.result() for future in futures]
        except BaseException as exc:
            coordinator.cancel(exc)
            raise
    if coordinator.exception is not None:
        raise coordinator.exception
    return ran
