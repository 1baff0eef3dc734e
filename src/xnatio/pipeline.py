"""One upload, whatever the transport, as one library call:

    login, lock -> PATH -discover-> Manifest -pre-flight-> -plan-> Batches -send-> XNAT -commit->
        verify -> Result      (journal and lock around send/commit/verify: xnatio.resume)

Cheap checks first: PATH exists, the login (REST; C-STORE's REST pre-flight) and the run lock of
the session come before discovery, which may read 50,000 headers.

No byte is sent before discovery has read every header, by design: the refusal of several
studies must come before any byte (a file read last may be of another study), and each study's
label depends on all of them (the largest study keeps SESSION, :func:`xnatio.transports.rest.
session_labels`), as does which copy of a duplicated SOP Instance UID is sent (the first in path
order). Nothing short of reading every header tells that no other study is there, so the first
request is made fast instead of early (issue 16 item 4): the headers are read by worker
processes on every core (:mod:`xnatio.examine`), and what follows discovery does no work per
file where it need not (a first run's journal, the plan in O(n) over the file table's columns,
the fingerprint written after sending).

:func:`upload` is the entry point. ``xio upload-dicom`` is options → :func:`upload` → render;
``xio demo`` and the public Python API (:mod:`xnatio.uploaders`) call it too, so a Python user
gets exactly what a shell user gets: the resume journal and its lock, the pre-flight, convergence
on an existing session, the commit and the read-back.

Where each stage lives (one place each, shared by both transports):

* discover — :mod:`xnatio.discover` (PATH → :class:`~xnatio.models.Manifest`);
* pre-flight — :mod:`xnatio.preflight`;
* plan — :mod:`xnatio.plan` (:class:`~xnatio.plan.Planner`; the transport picks the planner,
  :func:`planner_for`);
* send and commit — a :class:`~xnatio.transports.base.Transport`: :mod:`xnatio.transports.rest`
  or :mod:`xnatio.transports.dicom_store`, on the one :mod:`xnatio.coordinator` (bounded pool,
  one cancel path), counting into the one :class:`~xnatio.events.ProgressCounter`, ending in the
  one :func:`~xnatio.result.assemble_result`;
* journal, lock, verify — :mod:`xnatio.resume` around the transport, :mod:`xnatio.journal`,
  :mod:`xnatio.verify`; rendering — :mod:`xnatio.report`, :mod:`xnatio.progress`.

Every default lives in :mod:`xnatio.defaults`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xnatio import defaults
from xnatio.errors import ConfigError, UsageError
from xnatio.journal import Target
from xnatio.malloc import cap_arenas
from xnatio.models import (
    Batch,
    FileOutcome,
    Manifest,
    Phase,
    ProgressCallback,
    ProgressEvent,
    UploadResult,
)
from xnatio.plan import Planner, RestPlanner, make_plan
from xnatio.report import account_for_skipped, plan_to_dict
from xnatio.resume import ResumeOptions, RunLocks, resumable_upload
from xnatio.settings import Settings

if TYPE_CHECKING:
    from xnatio.coordinator import ExecutorFactory
    from xnatio.retry import RetryPolicy
    from xnatio.transports.rest import RestTarget
    from xnatio.xnat.client import XnatClient

DEFAULT_RESUME = ResumeOptions()  # the journal, verification on: as `xio upload-dicom`
Notify = Callable[[str], None]
OnConfirmed = Callable[[Sequence[FileOutcome]], None]


@dataclass(frozen=True, kw_only=True)
class UploadOptions:
    """What one upload needs besides Settings: the target, the source and the knobs.

    Transport-neutral; built by the CLI, the demo or the Python API (defaults: xnatio.defaults).
    """

    project: str
    subject: str
    session: str
    path: Path
    transport: str = "rest"
    num_batches: int | None = None  # None: defaults.BATCHES[transport]
    upload_workers: int = defaults.UPLOAD_WORKERS
    archive_workers: int = defaults.ARCHIVE_WORKERS
    archive_format: str = defaults.ARCHIVE_FORMAT
    compress: str = defaults.COMPRESS  # auto|always|never (xnatio.compress)
    timeout: float = defaults.REQUEST_TIMEOUT
    overwrite: str = defaults.OVERWRITE
    direct_archive: bool = False
    archive_wait: float = defaults.ARCHIVE_WAIT
    retries: int = defaults.RETRIES  # a cap on further attempts per request
    retry_budget: float = defaults.RETRY_BUDGET  # seconds after a request's first failure
    retry: RetryPolicy | None = None  # replaces ``retries``/``retry_budget`` when given
    allow_multiple_studies: bool = False
    dry_run: bool = False
    preflight: bool = True
    # C-STORE only
    routing: bool = True
    max_pdu: int = defaults.MAX_PDU
    acse_timeout: float = defaults.ACSE_TIMEOUT
    dimse_timeout: float = defaults.DIMSE_TIMEOUT
    network_timeout: float = defaults.NETWORK_TIMEOUT
    # Resume and read-back verification (xnatio.resume): verify after commit, ignore the
    # journal and start over, journal location, wait for another run on the same target;
    # ``resume=False``: no journal and no lock (every file is sent, nothing remembered).
    verify: bool = True
    restart: bool = False
    journal: Path | None = None
    wait: bool = False
    resume: bool = True
    lock_dir: Path | None = None  # None: the per-user lock folder (xnatio.journal)

    def resume_options(self) -> ResumeOptions:
        return ResumeOptions(
            journal=self.journal,
            lock_dir=self.lock_dir,
            restart=self.restart,
            wait=self.wait,
            verify=self.verify,
            use_journal=self.resume,
        )

    @property
    def batches(self) -> int:
        return self.num_batches or defaults.BATCHES[self.transport]


def upload(
    *,
    settings: Settings,
    options: UploadOptions,
    manifest: Manifest | None = None,
    progress: ProgressCallback | None = None,
    notify: Notify | None = None,
    client: XnatClient | None = None,
    cancel: threading.Event | None = None,
    on_confirmed: OnConfirmed | None = None,
    executor: ExecutorFactory | None = None,
) -> UploadResult:
    """Discover (unless ``manifest`` is given), then send ``options.path`` with the chosen
    transport through the journal, commit and read back; every file ends up accounted for.

    ``progress`` receives every :class:`~xnatio.models.ProgressEvent`; ``notify`` one-line
    messages for people (resuming, already on the server, waiting for a lock). ``client``: an
    open :class:`~xnatio.xnat.client.XnatClient` to use (and leave open) for REST instead of one
    made from ``settings``. ``cancel``: setting it cancels in-flight REST requests.
    ``on_confirmed``: called from worker threads with each batch's outcomes as the server
    confirms them. ``executor(workers)`` makes the pool REST's batches and C-STORE's
    associations run in (tests pass ``xnatio.coordinator.SerialExecutor`` to replay either
    transport serially). Raises :class:`~xnatio.errors.XnatioError` subclasses for what stops the
    whole run (bad input, pre-flight, credentials, unreachable); per-file failures are in the
    result.
    """
    if options.transport not in ("rest", "dicom-store"):
        raise UsageError(f"unknown transport {options.transport!r}")
    cap_arenas()  # before the upload's threads start (xnatio.malloc); once per process
    if manifest is None and not os.path.lexists(options.path):  # the cheapest check of all
        raise UsageError(f"{options.path} does not exist.")
    with contextlib.ExitStack() as stack:
        # Cheap checks before the expensive walk (issue 17): the server and the credentials
        # (a login, facts 2), then the run lock of this session, and only then discovery, which
        # may read 50,000 headers. A wrong password, a server that is down, or another run on
        # the same session is reported at once.
        send: Callable[[Manifest, RunLocks], UploadResult]
        if options.transport == "rest":
            if client is None and progress is not None:
                server = settings.require_server()
                progress(ProgressEvent(Phase.CONNECT, 0, 1, f"logging in to {server}"))
            rest = (  # logs in
                client
                if client is not None
                else stack.enter_context(rest_client(options, settings))
            )
            if client is None and progress is not None:
                progress(ProgressEvent(Phase.CONNECT, 1, 1, f"logged in to {rest.server}"))
            early = Target.rest(rest.server, options.project, options.subject, options.session)

            def send(m: Manifest, locks: RunLocks) -> UploadResult:
                return _send_rest(
                    options, m, progress, notify, rest, cancel, on_confirmed, executor, locks
                )

        else:
            host = dicom_host(settings)
            # Pre-flight over REST where XNAT's address and credentials are known (facts 2,
            # 3.5): logged in now, before discovery, like a REST upload.
            pre = preflight_client(options, settings) if options.preflight else None
            if pre is not None:
                stack.enter_context(pre)  # logs in
            early = Target.dicom(
                host,
                settings.dicom_port,
                settings.dicom_called_aet,
                options.project,
                options.subject,
                options.session,
            )

            def send(m: Manifest, locks: RunLocks) -> UploadResult:
                return _send_dicom_store(
                    options, settings, m, progress, notify, on_confirmed, executor, locks, pre
                )

        locks = stack.enter_context(RunLocks(options.resume_options(), notify))
        locks.hold(early)
        if manifest is None:
            manifest = discover_for_upload(options, progress)
        else:  # a caller's manifest is held to the same rule as a discovered one
            from xnatio.discover import check_single_study

            check_single_study(manifest, allow_multiple=options.allow_multiple_studies)
        result = send(manifest, locks)
    result.project = result.project or options.project
    result.subject = result.subject or options.subject
    result.session = result.session or options.session
    return account_for_skipped(result, manifest)


def discover_for_upload(opts: UploadOptions, progress: ProgressCallback | None) -> Manifest:
    """Discovery, once, with its own progress; refuses several studies unless allowed."""
    from xnatio.discover import check_single_study, discover

    manifest = discover(opts.path, progress=progress)
    check_single_study(manifest, allow_multiple=opts.allow_multiple_studies)
    return manifest


def rest_client(opts: UploadOptions, settings: Settings) -> XnatClient:
    """The REST client of an upload (asks for credentials when the settings allow it)."""
    from xnatio.xnat.client import XnatClient

    server = settings.require_server()
    username, password = settings.require_credentials()
    return XnatClient(
        server,
        username=username,
        password=password,
        verify=settings.verify,
        timeout=opts.timeout,
        pool_size=opts.upload_workers,
        retry=opts.retry or _retry_policy(opts),
    )


def _send_rest(
    opts: UploadOptions,
    manifest: Manifest,
    progress: ProgressCallback | None,
    notify: Notify | None,
    client: XnatClient,
    cancel: threading.Event | None,
    on_confirmed: OnConfirmed | None,
    executor: ExecutorFactory | None,
    locks: RunLocks,
) -> UploadResult:
    """Through the resume journal: only what the server has not confirmed is sent, then the
    session is committed and read back (see :mod:`xnatio.resume`)."""
    from xnatio.compress import for_server
    from xnatio.transports.rest import RestTarget

    compress = for_server(opts.compress, opts.compress == "auto" and client.on_this_machine())
    target = RestTarget(
        project=opts.project,
        subject=opts.subject,
        session=opts.session,
        num_batches=opts.batches,
        upload_workers=opts.upload_workers,
        archive_workers=opts.archive_workers,
        archive_format=opts.archive_format,
        compress=compress,
        overwrite=opts.overwrite,
        direct_archive=opts.direct_archive,
        archive_wait=opts.archive_wait,
    )
    return resumable_rest_upload(
        client,
        manifest,
        target,
        options=opts.resume_options(),
        retry=opts.retry or _retry_policy(opts),
        progress_callback=progress,
        cancel=cancel,
        notify=notify,
        preflight=opts.preflight,
        on_confirmed=on_confirmed,
        executor=executor,
        locks=locks,
    )


def _send_dicom_store(
    opts: UploadOptions,
    settings: Settings,
    manifest: Manifest,
    progress: ProgressCallback | None,
    notify: Notify | None,
    on_confirmed: OnConfirmed | None,
    executor: ExecutorFactory | None,
    locks: RunLocks,
    client: XnatClient | None,
) -> UploadResult:
    return resumable_dicom_store_upload(
        manifest,
        dicom_host(settings),
        settings.dicom_port,
        settings.dicom_called_aet,
        calling_aet=settings.dicom_calling_aet,
        num_batches=opts.batches,
        progress_callback=progress,
        project=opts.project,
        subject=opts.subject,
        session=opts.session,
        options=opts.resume_options(),
        notify=notify,
        routing=opts.routing,
        max_pdu=opts.max_pdu,
        acse_timeout=opts.acse_timeout,
        dimse_timeout=opts.dimse_timeout,
        network_timeout=opts.network_timeout,
        retries=opts.retries,
        retry=opts.retry,
        executor=executor,
        allow_multiple_studies=opts.allow_multiple_studies,
        client=client,
        on_confirmed=on_confirmed,
        locks=locks,
    )


def preflight_client(opts: UploadOptions, settings: Settings) -> XnatClient | None:
    """A REST client for the pre-flight checks when the server and credentials are known
    (never prompts); None otherwise."""
    from xnatio.xnat.client import XnatClient

    if not (settings.server and settings.username and settings.password):
        return None
    return XnatClient(
        settings.server,
        username=settings.username,
        password=settings.password,
        verify=settings.verify,
        timeout=opts.timeout,
        pool_size=1,
    )


def planner_for(transport: str) -> Planner:
    """The transport's planner: REST import requests, or C-STORE associations (at most 128
    presentation contexts each)."""
    if transport == "rest":
        return RestPlanner()
    if transport == "dicom-store":
        from xnatio.transports.dicom_store.plan import AssociationPlanner

        return AssociationPlanner()
    raise UsageError(f"unknown transport {transport!r}")


def plan_upload(
    opts: UploadOptions, manifest: Manifest, progress: ProgressCallback | None = None
) -> list[Batch]:
    """The batches an upload of ``manifest`` would send; nothing is sent."""
    return make_plan(
        manifest, parts=opts.batches, planner=planner_for(opts.transport), progress=progress
    )


def _retry_policy(opts: UploadOptions) -> RetryPolicy:
    from xnatio.retry import RetryPolicy

    return RetryPolicy(retries=max(0, opts.retries), budget=max(0.0, opts.retry_budget))


def describe_dry_run(
    opts: UploadOptions, manifest: Manifest, progress: ProgressCallback | None = None
) -> tuple[str, dict[str, object]]:
    """The plan as text and as the ``--dry-run --json`` result; nothing is sent."""
    from xnatio.plan import describe_plan

    batches = plan_upload(opts, manifest, progress)
    data = plan_to_dict(manifest, batches)
    data.update(transport=opts.transport, project=opts.project, subject=opts.subject)
    data["session"] = opts.session
    return describe_plan(manifest, batches), data


def dry_run_preflight(
    opts: UploadOptions, settings: Settings, manifest: Manifest
) -> tuple[str, dict[str, object] | None]:
    """``--dry-run``'s pre-flight: the labels always; the server too when credentials are known.

    Raises :class:`xnatio.preflight.PreflightError` (exit 2) as a real upload would."""
    from xnatio.preflight import check_labels, check_manifest
    from xnatio.transports.rest import session_labels

    if opts.transport == "rest":
        labels = session_labels(manifest.studies(), opts.session)
    else:  # C-STORE routes every study to SESSION
        labels = {s.study_uid: opts.session for s in manifest.studies()}
    check_labels(opts.subject, labels.values())
    client = preflight_client(opts, settings)
    if client is None:
        return (
            "pre-flight: labels checked; the server was not asked (no server or credentials)",
            None,
        )
    with client:
        found = check_manifest(
            client, manifest, project=opts.project, subject=opts.subject, labels=labels
        )
    return found.describe(), found.to_dict()


def check_ready(opts: UploadOptions, settings: Settings) -> None:
    """Fail on missing configuration before the (possibly long) discovery, not after it."""
    from xnatio.preflight import check_labels

    # Labels XNAT would clean (facts 3.5) need no server and no discovery (SESSION_2… of
    # further studies are clean when SESSION is).
    check_labels(opts.subject, [opts.session])
    if opts.dry_run:
        return
    if opts.transport == "rest":
        settings.require_server()
        settings.require_credentials()
    else:
        dicom_host(settings)


def dicom_host(settings: Settings) -> str:
    """The DICOM receiver's host, or a ConfigError saying how to give it."""
    if not settings.dicom_host:
        raise ConfigError(
            "no DICOM receiver given: pass --dicom-host (or --server) or set XNAT_DICOM_HOST"
        )
    return settings.dicom_host


# -- the two transports, wired for resume ---------------------------------------------------------


def resumable_rest_upload(
    client: XnatClient,
    manifest: Manifest,
    target: RestTarget,
    *,
    options: ResumeOptions = DEFAULT_RESUME,
    retry: RetryPolicy | None = None,
    progress_callback: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    notify: Notify | None = None,
    planner: Planner | None = None,
    preflight: bool = True,
    on_confirmed: OnConfirmed | None = None,
    executor: ExecutorFactory | None = None,
    locks: RunLocks | None = None,
) -> UploadResult:
    """A REST upload of ``manifest`` through the journal, committed and read back with ``client``.

    ``planner`` cuts what is sent into import requests (default: :class:`xnatio.plan.RestPlanner`);
    ``executor(workers)`` makes the pool the batches run in (default: threads).
    ``preflight``: first check the destination (:func:`xnatio.preflight.before_sending`); a
    refusal raises :class:`xnatio.preflight.PreflightError` before any DICOM byte is sent.

    Before sending, each session label is read back: what it holds by instance name is not sent
    again (:mod:`xnatio.resume`), unless ``target.overwrite`` is ``delete`` (everything is sent
    and replaces the server's copies, facts 1.5). A Direct-Archive upload into a session that
    exists goes through the prearchive instead: Direct-Archive never merges, it falls back to
    the prearchive when the label's folder exists (facts 1.6), and only a commit merges.
    """
    from xnatio.transports.rest import session_labels
    from xnatio.transports.rest.transport import RestTransport

    if not target.study_labels:
        # Labels from the whole manifest, so each study keeps its label whatever part is sent.
        labels = session_labels(manifest.studies(), target.session)
        target = dataclasses.replace(target, study_labels=tuple(labels.items()))
    if preflight:
        from xnatio.preflight import before_sending

        found = before_sending(
            client,
            manifest,
            project=target.project,
            subject=target.subject,
            labels=dict(target.study_labels),
            notify=notify,
        )
        target = dataclasses.replace(target, project=found.project, subject=found.subject)
    transport = RestTransport(
        client,
        target,
        retry=retry,
        progress_callback=progress_callback,
        cancel=cancel,
        notify=notify,
        planner=planner,
        on_confirmed=on_confirmed,
        executor=executor,
        verify=options.verify,
    )
    result = resumable_upload(
        Target.rest(client.server, target.project, target.subject, target.session),
        manifest,
        transport,
        options=options,
        notify=notify,
        locks=locks,
    )
    result.transport = "rest"
    result.project, result.subject, result.session = target.project, target.subject, target.session
    return result


def resumable_dicom_store_upload(
    manifest: Manifest,
    host: str,
    port: int,
    called_aet: str,
    *,
    project: str,
    subject: str,
    session: str,
    options: ResumeOptions = DEFAULT_RESUME,
    notify: Notify | None = None,
    client: XnatClient | None = None,
    on_confirmed: OnConfirmed | None = None,
    locks: RunLocks | None = None,
    **send_options: Any,
) -> UploadResult:
    """A C-STORE upload of ``manifest`` through the journal (every C-STORE success response is a
    confirmation, recorded as it arrives). ``send_options`` go to
    :func:`xnatio.transports.dicom_store.send_associations` (calling AE title, batches, timeouts,
    routing, retries, progress). With ``client`` (XNAT's REST API, credentials), the destination
    is checked first (:func:`xnatio.preflight.before_sending`; every study is routed to
    ``session``).

    No read-back here: XNAT's DICOM receiver builds the session only after an idle period
    (facts 3.2, 6), so the files cannot be checked right after sending; run ``xio verify`` later.
    """
    if client is not None:
        from xnatio.preflight import before_sending

        labels = {s.study_uid: session for s in manifest.studies()}
        found = before_sending(
            client, manifest, project=project, subject=subject, labels=labels, notify=notify
        )
        project, subject = found.project, found.subject
    from xnatio.transports.dicom_store.transport import DicomStoreTransport

    transport = DicomStoreTransport(
        host,
        port,
        called_aet,
        project=project,
        subject=subject,
        session=session,
        on_confirmed=on_confirmed,
        send_options=send_options,
    )
    target = Target.dicom(host, port, called_aet, project, subject, session)
    result = resumable_upload(
        target, manifest, transport, options=options, notify=notify, locks=locks
    )
    if result.success and notify is not None:
        notify(
            "not read back: XNAT files C-STORE sessions after an idle period; check with "
            f"`xio verify {shlex.quote(project)} {shlex.quote(subject)} {shlex.quote(session)} "
            f"{shlex.quote(str(manifest.source_archive or manifest.root))} --wait-for 900`"
        )
    result.transport = "dicom-store"
    result.project, result.subject, result.session = project, subject, session
    return result
