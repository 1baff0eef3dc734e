"""REST transport: stream series-aligned archives into XNAT's import service, then archive once.

The shape of one upload (sections 1 and 3 of ``shared/xnat-api.md``, "facts")::

    PUT subject ─▶ N × POST /data/services/import (prevent_auto_commit, no dest)
                ─▶ the same prearchive URI from every batch (facts 1.2: one row per study+label)
                ─▶ POST {URI}?action=commit ─▶ 301 text/plain archive URI (auto-archive project)
                                             └▶ 200 ─▶ POST /data/services/archive?src=…
                                                       &subject=…&session=… (200 or 303)
    (--overwrite append|delete: POST {URI}?action=build, then the archive service with
     overwrite=…, the one path on which XNAT overwrites clashing files, facts 1.5)

Every instance is sent as ``{series}/{SOP Instance UID}.dcm``: XNAT keeps that name (facts 1.2)
while it rewrites the bytes (facts 1.7), so read-back finds each instance by it
(:mod:`xnatio.verify`), and a re-run finds what the session already holds (:mod:`xnatio.resume`).

Direct-Archive (facts 1.6): the import answers ``/xapi/direct-archive/{P}/{UID}/{label}`` and the
experiment appears only after XNAT's idle interval (5 min, checked every 60 s). The uploader polls
that URI until it answers 404, then the experiment, for at most ``archive_wait`` seconds; when the
bound is reached, the result lists the URI in ``pending`` (sent, not yet archived).

Sending every batch to the prearchive without ``dest`` and committing once is what the XNAT Desktop
Client does: with an ``/archive`` dest every request would build and archive the same session and
concurrent requests would race ("Unable to lock session for archiving", lost files).

Several studies (``allow_multiple_studies``): XNAT keys prearchive sessions by StudyInstanceUID
(section 1), so each study becomes a session of its own, and two of them under one label would
collide in the archive ("Session already exists", or a CONFLICT entry left in the prearchive). So
each study gets its own label (:func:`session_labels`): the largest study (most files; the first
found on a tie) keeps SESSION, the others become SESSION_2, SESSION_3, … in that order; every
request carries the files of one study only, and every session is committed and archived.
``UploadResult.session_uris`` lists them all, the SESSION one first (``session_uri``).

A commit or archive request whose success answer is lost (reset, timeout) is retried and may then
fail ("Session already exists", the prearchive entry 404). After any such error the session is
looked up: when the experiment exists at PROJECT/SUBJECT/label and the prearchive entry is gone,
the server did the work and the commit counts as done.

Concurrency and memory (s3transfer-style bounds, taken where work is submitted):

* Each batch is one task (prepare, then send) in an :class:`xnatio.coordinator.BoundedExecutor`
  of ``upload_workers + archive_workers`` slots: a slot is taken before the batch is submitted
  (the submitter blocks while all are taken) and given back when its upload ends, so at most that
  many batches exist at once.
* A gate of ``upload_workers`` lets only that many tasks send: never more import requests in
  flight, and the connection pool of the client is sized to it. The other tasks prepare the next
  batches meanwhile (stat every source file against discovery, lay out the archive); packing
  itself (tar/zip headers, deflate for zip-deflated) happens inside the streaming request body, so
  nothing is built ahead in memory or on disk.
* One :class:`xnatio.coordinator.Coordinator` per upload is the one cancel path (Ctrl-C, SIGTERM
  turned into KeyboardInterrupt by the CLI, ``cancel`` set from outside, an unhandled error in a
  task): bodies check its event mid-read and backoffs wait on it.

Peak memory ≈ manifest (~1 KiB per file) + (upload_workers + archive_workers) × (~1 KiB per file
in a batch, its archive layout) + upload_workers × (2 × ``bodies.CHUNK`` [+ ~256 KiB zlib for
zip-deflated]). For 15,000 files in 42 batches with 42 + 5 workers: ~15 MB + ~17 MB + ~22 MB. No
temporary copy of the dataset is ever written.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from xnatio import defaults
from xnatio.archive import (
    SourceChangedError,
    check_sources,
    instance_member_names,
    make_archive_stream,
)
from xnatio.coordinator import BoundedExecutor, Coordinator, ExecutorFactory, thread_pool
from xnatio.errors import AuthError, ServerError, UnreachableError, UsageError, XnatioError
from xnatio.models import (
    Batch,
    DicomFile,
    FileOutcome,
    Manifest,
    Outcome,
    Phase,
    ProgressCallback,
    SessionKind,
    SessionRef,
    StudySummary,
    UploadResult,
    file_path,
)
from xnatio.retry import RetryPolicy, Sleep
from xnatio.transports.bodies import (
    ArchiveMembers,
    SizedBody,
    StreamBody,
    UploadCancelled,
    UploadProgress,
)
from xnatio.xnat.client import XnatClient, quote
from xnatio.xnat.errors import TransientError, bad_member

log = logging.getLogger(__name__)

IMPORT_PATH = "/data/services/import"
ARCHIVE_PATH = "/data/services/archive"
OVERWRITE_MODES = ("none", "append", "delete")
# "tgz" is kept for older scripts and sends "zip-deflated": XNAT refuses a chunked body of any type
# but application/zip (facts 1.1), and a gzip'd tar's length is known only once it is compressed.
ARCHIVE_FORMATS = ("tar", "zip", "zip-deflated", "tgz")
WIRE_FORMATS = {"tar": "tar", "zip": "zip", "zip-deflated": "zip-deflated", "tgz": "zip-deflated"}
# XNAT answers a full disk or a failing anonymization script as 400 "unable to read DICOM object
# NAME" (facts 1.4), like a file that is not DICOM. Files discovery read as DICOM refused this many
# times in a row stop the batch: the cause is the server, and one request per file would follow.
BAD_MEMBERS_IN_A_ROW = 3
DIRECT_ARCHIVE_POLL = 5.0  # seconds between reads while Direct-Archive's experiment is awaited


@dataclass(frozen=True, kw_only=True)
class RestTarget:
    """Where a session goes and how: the knobs of one REST upload.

    ``overwrite`` is what the archive step sends (facts 1.5; the import's own ``overwrite`` only
    matters when the import archives in the request, which xio never asks for, so it is never
    sent): ``none`` commits with ``action=commit`` / the archive service without ``overwrite``,
    which merge into an existing session and refuse (409) an instance it already holds;
    ``append`` and ``delete`` build, then archive with ``overwrite=append|delete``, which merges
    and overwrites clashing files. What is *sent* is decided above (:mod:`xnatio.resume`: only
    instances the session lacks, all of them with ``delete``). ``direct_archive``: XNAT ≥ 1.8.3
    Direct-Archive; ``archive_wait``: seconds to wait for its experiment (facts 1.6).
    ``study_labels``: (StudyInstanceUID, session label) pairs when the upload holds several
    studies; empty means :func:`session_labels` of the manifest being sent. A resumed run passes
    the labels of the whole manifest, so a study keeps its label whatever is left to send.
    """

    project: str
    subject: str
    session: str
    num_batches: int = defaults.REST_BATCHES
    upload_workers: int = defaults.UPLOAD_WORKERS
    archive_workers: int = defaults.ARCHIVE_WORKERS
    archive_format: str = defaults.ARCHIVE_FORMAT
    overwrite: str = defaults.OVERWRITE
    direct_archive: bool = False
    archive_wait: float = defaults.ARCHIVE_WAIT
    study_labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("project", "subject", "session"):
            if not getattr(self, name).strip():
                raise UsageError(f"the XNAT {name} label must not be empty")
        if self.archive_format not in ARCHIVE_FORMATS:
            raise UsageError(f"archive format must be one of {', '.join(ARCHIVE_FORMATS)}")
        if self.overwrite not in OVERWRITE_MODES:
            raise UsageError(f"--overwrite must be one of {', '.join(OVERWRITE_MODES)}")
        for name in ("num_batches", "upload_workers", "archive_workers"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1")
        if self.archive_wait < 0:
            raise UsageError("--archive-wait must not be negative")

    @property
    def wire_format(self) -> str:
        """The archive actually sent (``tgz`` sends a deflated zip, see ARCHIVE_FORMATS)."""
        return WIRE_FORMATS[self.archive_format]

    def archive_dest_for(self, label: str) -> str:
        return (
            f"/archive/projects/{quote(self.project)}/subjects/{quote(self.subject)}"
            f"/experiments/{quote(label)}"
        )


def session_labels(studies: Sequence[StudySummary], session: str) -> dict[str, str]:
    """StudyInstanceUID -> archive label: the first study (``Manifest.studies()`` puts the largest
    first, ties in the order found) keeps ``session``, the others get ``session_2``, ``_3``…"""
    return {s.study_uid: session if i == 0 else f"{session}_{i + 1}" for i, s in enumerate(studies)}


def split_by_study(batches: Sequence[Batch]) -> list[Batch]:
    """The batches cut so that each holds one study (renumbered, order kept): XNAT files each
    StudyInstanceUID into its own prearchive session, and each must go under its own label."""
    out: list[Batch] = []
    for batch in batches:
        groups: dict[str, list[DicomFile]] = {}
        for f in batch.files:
            groups.setdefault(f.study_uid, []).append(f)
        for group in groups.values():
            out.append(Batch(index=len(out), files=tuple(group)))
    return out


def _uris(text: str) -> list[str]:
    """Lines of a ``text/uri-list`` answer (CRLF-separated; comments start with ``#``)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class UnassignedError(ServerError):
    """XNAT filed the upload in its Unassigned prearchive (facts 1.2): not in the project."""


def session_uris(resp: requests.Response, what: str) -> list[str]:
    """The XNAT URIs of a 200 ``text/uri-list`` answer (facts 1.3), checked.

    A line that is not an XNAT URI (an HTML login page a proxy answered with 200, facts-less
    servers) is a one-line error naming the URL; an Unassigned prearchive URI raises
    :class:`UnassignedError` (the project is unknown or not readable to the user, facts 1.2).
    """
    uris = _uris(resp.text)
    bad = [u for u in uris if not u.startswith(("/data/", "/xapi/"))]
    if bad:
        raise ServerError(
            f"{what}: {_path_only(resp.url)} answered {resp.status_code} with something that is "
            f"not a list of XNAT URIs ({bad[0][:60]!r}…); is the server URL the XNAT itself?",
            status=resp.status_code,
        )
    unassigned = [u for u in uris if u.startswith("/data/prearchive/projects/Unassigned/")]
    if unassigned:
        raise UnassignedError(
            "XNAT put the files in its Unassigned prearchive, not in the project (the project "
            "does not exist or you cannot read it, facts 1.2); nothing was archived. Delete "
            f"{unassigned[0]} from the prearchive (XNAT's prearchive page, or "
            f"DELETE {unassigned[0]}) and check the project",
            status=resp.status_code,
        )
    return uris


def _path_only(url: str) -> str:
    return url.split("?", 1)[0]


# -- the engine -------------------------------------------------------------------------------


@dataclass
class _Run:
    """State of one upload shared by the workers (guarded by ``lock``)."""

    # file_path() of each DicomFile -> its outcome
    outcomes: dict[str, FileOutcome] = field(default_factory=dict)
    session_uris: list[str] = field(default_factory=list)
    # StudyInstanceUID -> label it is sent and archived under; session URI -> its label
    labels: dict[str, str] = field(default_factory=dict)
    uri_labels: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    # Direct-Archive URIs whose experiment did not appear within archive_wait (facts 1.6)
    pending: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class RestUploader:
    """Sends one discovered session with a shared :class:`XnatClient`.

    Side effects are constructor arguments so tests replace them without patching: ``clock``
    (durations, progress throttling), ``sleep`` (retry backoff), ``cancel`` (set it from another
    thread to stop the upload; Ctrl-C in the calling thread sets it too). ``on_confirmed`` is called
    from worker threads with the outcomes of each batch the server confirmed (the resume journal).
    ``executor(workers)`` makes the pool batches run in (default: threads; a test passes
    :class:`xnatio.coordinator.SerialExecutor` to replay the upload serially).
    """

    def __init__(
        self,
        client: XnatClient,
        target: RestTarget,
        *,
        retry: RetryPolicy | None = None,
        progress_callback: ProgressCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep | None = None,
        cancel: threading.Event | None = None,
        on_confirmed: Callable[[Sequence[FileOutcome]], None] | None = None,
        executor: ExecutorFactory | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.retry = retry if retry is not None else RetryPolicy()
        self.progress_callback = progress_callback
        self.clock = clock
        self.sleep = sleep
        self.cancel = cancel if cancel is not None else threading.Event()
        # The one cancel path of this upload: its event is ``cancel``, so either way is the same.
        self.coordinator = Coordinator(self.cancel)
        self.executor = executor
        self.on_confirmed = on_confirmed

    # -- public ---------------------------------------------------------------------------

    def upload(self, manifest: Manifest, batches: list[Batch]) -> UploadResult:
        """Send ``batches`` (planned from ``manifest``), commit, and account for every file.

        Several studies: each goes under its own label (see the module docstring), and batches
        that mix studies are cut per study. A subject that cannot be created fails every file
        with the reason (nothing is sent); only a refused login or an unreachable server raise.
        """
        started = self.clock()
        run = _Run()
        run.labels = dict(self.target.study_labels) or session_labels(
            manifest.studies(), self.target.session
        )
        if len(set(run.labels.values())) > 1:
            batches = split_by_study(batches)
        progress = UploadProgress(
            self.progress_callback,
            files_total=len(manifest.files),
            bytes_total=manifest.total_bytes,
            batches_total=len(batches),
            clock=self.clock,
        )
        for f in manifest.files:
            run.outcomes[file_path(f)] = FileOutcome(
                path=file_path(f),
                outcome=Outcome.FAILED,
                reason="not sent",
                sop_instance_uid=f.sop_instance_uid,
                series_uid=f.series_uid,
                size=f.size,
            )
        committed = True
        try:
            progress.phase(Phase.CONNECT, 0, 1, f"connecting to {self.client.server}")
            if not self.client.logged_in:
                self.client.login()
            if not self.target.direct_archive and not self._put_subject(manifest, run):
                return self._result(manifest, batches, run, progress, started, False)
            progress.phase(Phase.CONNECT, 1, 1, "connected")
            progress.phase(Phase.UPLOAD, 0, len(manifest.files), "uploading")
            if manifest.source_archive is not None:
                for batch in batches:  # one, or one per study
                    self._send_archive_file(manifest, batch, len(batches) > 1, run, progress)
            else:
                self._pipeline(manifest, batches, run, progress)
            if run.session_uris and not self.cancel.is_set():
                committed = self._commit(run, progress)
            if committed and not self.cancel.is_set():
                self._await_direct_archive(run, progress)
        except BaseException:
            self.cancel.set()
            raise
        return self._result(manifest, batches, run, progress, started, committed)

    def _put_subject(self, manifest: Manifest, run: _Run) -> bool:
        """Create the subject the archive step needs; on failure fail every file and say why.

        A Direct-Archive upload must not pre-create anything (section 4: pre-created sessions
        make XNAT fall back to the prearchive), so it is not called for one. The client has
        retried transient errors already; a refused login or an unreachable server is raised.
        """
        t = self.target
        try:
            self.client.put_subject(t.project, t.subject)
        except (AuthError, UnreachableError):
            raise
        except XnatioError as exc:
            reason = f"could not create subject {t.subject} in project {t.project}: {_reason(exc)}"
            if isinstance(exc, ServerError) and exc.status is not None:
                reason += f" (HTTP {exc.status})"
            with run.lock:
                for f in manifest.files:
                    o = run.outcomes[file_path(f)]
                    o.outcome, o.reason = Outcome.FAILED, reason
            self._error(run, reason)
            return False
        return True

    # -- sending ----------------------------------------------------------------------------

    def _pipeline(
        self, manifest: Manifest, batches: list[Batch], run: _Run, progress: UploadProgress
    ) -> None:
        """Prepare and send every batch under the coordinator; return once all have ended.

        One task per batch (prepare, then send) in a :class:`BoundedExecutor` of
        ``upload_workers + archive_workers`` slots: submitting blocks while that many batches are
        in the pipeline (no polling), and a gate of ``upload_workers`` lets only that many send at
        once while the others are prepared ahead. The one cancel path: Ctrl-C or SIGTERM here
        (KeyboardInterrupt), ``cancel`` set from outside, or an exception a task did not handle
        cancels the coordinator; streaming bodies and backoffs see its event and stop mid-read, the
        pool is waited for (promptly), and the exception re-raised. Outcomes are read only after
        the pool has ended.
        """
        t = self.target
        coordinator = self.coordinator
        sending = threading.BoundedSemaphore(t.upload_workers)

        def task(batch: Batch) -> None:
            try:
                if coordinator.cancelled:
                    return
                try:
                    files = self._prepare(batch, run)
                except Exception as exc:  # the batch is reported, others go on
                    self._fail(run, batch.files, f"could not prepare the batch: {exc}", batch.index)
                    progress.update(batch_done=True, failed=True)
                    return
                with sending:
                    if coordinator.cancelled:
                        return
                    self._send_guarded(batch, files, manifest.root, run, progress)
            except BaseException as exc:
                coordinator.cancel(exc)
                raise

        workers = t.upload_workers + t.archive_workers
        with BoundedExecutor(workers, self.executor or thread_pool("xnatio-rest")) as pool:
            try:
                for batch in batches:
                    if coordinator.cancelled:
                        break
                    pool.submit(task, batch)  # blocks while `workers` batches are in flight
            except BaseException as exc:
                coordinator.cancel(exc)
                raise
        if coordinator.exception is not None:
            raise coordinator.exception

    def _prepare(self, batch: Batch, run: _Run) -> list[DicomFile]:
        """Check the batch's files against discovery; return those still fit to send."""
        ok, bad = check_sources(list(batch.files))
        for f, reason in bad:
            self._fail(run, [f], reason, batch.index)
        return list(ok)

    def _label(self, run: _Run, files: Sequence[DicomFile]) -> str:
        """The label a request's files go under (one study per request when there are several)."""
        return run.labels.get(files[0].study_uid, self.target.session) if files else ""

    def _params(self, label: str) -> dict[str, str]:
        t = self.target
        params = {
            "import-handler": "DICOM-zip",
            "PROJECT_ID": t.project,
            "SUBJECT_ID": t.subject,
            "EXPT_LABEL": label or t.session,
            "inbody": "true",
        }
        # No "overwrite" here: the import's overwrite only matters when it archives in the
        # request (facts 1.5), and xio archives in a separate step (or Direct-Archive does).
        if t.direct_archive:
            params["Direct-Archive"] = "true"
        else:
            # No dest: the batch stays RECEIVING in the prearchive until our single commit.
            params["prevent_auto_commit"] = "true"
        return params

    def _send_guarded(
        self, batch: Batch, files: list[DicomFile], root: Path, run: _Run, progress: UploadProgress
    ) -> None:
        """:meth:`_send_batch`, with a bug in it reported on the batch's files, not lost."""
        try:
            self._send_batch(batch, files, root, run, progress)
        except Exception as exc:
            log.exception("batch %d: unexpected error", batch.index + 1)
            with run.lock:
                left = [f for f in files if run.outcomes[file_path(f)].reason == "not sent"]
            self._give_up(
                run, left, RuntimeError(f"internal error: {exc!r}"), 0, batch.index, progress
            )

    def _send_batch(
        self, batch: Batch, files: list[DicomFile], root: Path, run: _Run, progress: UploadProgress
    ) -> None:
        """Send one batch until it lands, fails for good, or the upload is cancelled.

        Files XNAT cannot read as DICOM, and files that vanish or change while streaming, are
        failed one by one with their reason and the rest of the batch is sent again (no
        ``Ignore-Unparsable``: every file must be accounted for). Transient failures are retried
        with backoff; anything else fails the batch with XNAT's message.
        """
        remaining = list(files)
        partial = len(remaining) < len(batch.files)
        label = self._label(run, batch.files)
        retry_number = 0
        since: float | None = None  # when this batch first failed (the retry budget's start)
        refused = 0  # files XNAT could not read, in a row
        while remaining and not self.cancel.is_set():
            stream = make_archive_stream(
                remaining,
                self.target.wire_format,
                root=root,
                names=instance_member_names(remaining),
            )
            payload = sum(f.size for f in remaining)
            body = (
                SizedBody(stream, payload, progress, self.cancel, stream.size)
                if stream.size is not None
                else StreamBody(stream, payload, progress, self.cancel)
            )
            try:
                resp = self._post_import(body, stream.content_type, label)
            except Exception as exc:  # classified below; the batch is always accounted for
                err = body.failure(exc)
                if isinstance(err, UploadCancelled) or self.cancel.is_set():
                    return
                culprit = _culprit(err, stream.members)
                if culprit is not None:
                    self._fail(run, [culprit[0]], culprit[1], batch.index)
                    gone = file_path(culprit[0])
                    remaining = [f for f in remaining if file_path(f) != gone]
                    partial = True
                    refused = refused + 1 if isinstance(err, ServerError) else 0
                    if refused >= BAD_MEMBERS_IN_A_ROW and remaining:
                        self._give_up(
                            run, remaining, _in_a_row(err, refused), 0, batch.index, progress
                        )
                        return
                    continue
                since = self.retry.clock() if since is None else since
                if self._wait_to_retry(err, retry_number, f"batch {batch.index + 1}", since):
                    retry_number += 1
                    continue
                self._give_up(run, remaining, err, retry_number, batch.index, progress)
                return
            self._landed(run, remaining, resp, batch.index, progress, partial, label)
            return
        if not self.cancel.is_set():  # every file of the batch failed on its own
            progress.update(batch_done=True, failed=True)

    def _send_archive_file(
        self, manifest: Manifest, batch: Batch, per_study: bool, run: _Run, progress: UploadProgress
    ) -> None:
        """PATH is an archive: its DICOM members (of one study, ``batch`` being one of the
        ``per_study`` requests when it holds several) re-packed into a tar on the fly
        (:class:`ArchiveMembers`), each under its instance name so that read-back finds it
        (facts 1.2), never extracted to disk.
        """
        archive = manifest.source_archive
        assert archive is not None
        remaining = list(batch.files)
        label = self._label(run, batch.files)
        retry_number = 0
        since: float | None = None  # when this batch first failed (the retry budget's start)
        refused = 0  # files XNAT could not read, in a row
        while remaining and not self.cancel.is_set():
            payload = sum(f.size for f in remaining)
            try:
                packed = ArchiveMembers(archive, remaining, instance_member_names(remaining))
            except OSError as exc:
                self._give_up(run, remaining, exc, 0, batch.index, progress)
                return
            members = packed.members
            chunks: Iterable[bytes] = packed
            size, content_type = packed.size, packed.content_type
            body = SizedBody(chunks, payload, progress, self.cancel, size)
            try:
                resp = self._post_import(body, content_type, label)
            except Exception as exc:  # classified below; the files are always accounted for
                err = body.failure(exc)
                if isinstance(err, UploadCancelled) or self.cancel.is_set():
                    return
                culprit = _culprit(err, members)
                if culprit is not None:
                    self._fail(run, [culprit[0]], culprit[1], batch.index)
                    gone = file_path(culprit[0])
                    remaining = [f for f in remaining if file_path(f) != gone]
                    refused = refused + 1 if isinstance(err, ServerError) else 0
                    if refused >= BAD_MEMBERS_IN_A_ROW and remaining:
                        self._give_up(
                            run, remaining, _in_a_row(err, refused), 0, batch.index, progress
                        )
                        return
                    continue
                since = self.retry.clock() if since is None else since
                if self._wait_to_retry(err, retry_number, archive.name, since):
                    retry_number += 1
                    continue
                self._give_up(run, remaining, err, retry_number, batch.index, progress)
                return
            partial = len(remaining) < len(batch.files)
            self._landed(run, remaining, resp, batch.index, progress, partial, label)
            return
        if not self.cancel.is_set():  # every member failed on its own
            progress.update(batch_done=True, failed=True)

    def _post_import(self, body: StreamBody, content_type: str, label: str) -> requests.Response:
        # Not retried inside the client: a streamed body is rebuilt (and its files re-checked)
        # by the caller for every attempt.
        return self.client.request(
            "POST",
            IMPORT_PATH,
            params=self._params(label),
            data=body,
            headers={"Content-Type": content_type},
            idempotent_retry=False,
        )

    def _wait_to_retry(
        self, err: BaseException, retry_number: int, what: str, since: float | None = None
    ) -> bool:
        """Back off before another attempt when ``err`` is transient and retries are left:
        fewer than ``--retries`` so far, within ``--retry-budget`` of ``since`` (the first
        failure of this request; xnatio.retry)."""
        if not isinstance(err, TransientError) or retry_number >= self.retry.retries:
            return False
        log.info("%s: %s; retrying (%d/%d)", what, err, retry_number + 1, self.retry.retries)
        return self.retry.wait(
            retry_number, err.retry_after, cancel=self.cancel, sleep=self.sleep, since=since
        )

    def _give_up(
        self,
        run: _Run,
        files: list[DicomFile],
        err: BaseException,
        retry_number: int,
        batch: int,
        progress: UploadProgress,
    ) -> None:
        reason = _reason(err)
        if isinstance(err, TransientError) and retry_number:
            reason = f"{reason} (gave up after {retry_number + 1} attempts)"
        self._fail(run, files, reason, batch)
        self._error(run, f"batch {batch + 1}: {reason}")
        progress.update(batch_done=True, failed=True)

    def _landed(
        self,
        run: _Run,
        files: list[DicomFile],
        resp: requests.Response,
        batch: int,
        progress: UploadProgress,
        partial: bool,
        label: str,
    ) -> None:
        try:
            uris = session_uris(resp, f"batch {batch + 1}")
        except ServerError as exc:
            self._fail(run, files, exc.message, batch)
            self._error(run, f"batch {batch + 1}: {exc.message}")
            progress.update(batch_done=True, failed=True)
            return
        if not uris:
            # 200 with an empty body: a series filter or the site script's "reject" dropped
            # every file, or a skipped in-request build (facts 1.3); nothing stored.
            reason = (
                "XNAT answered 200 with no session URI: it stored none of these files (a series "
                "filter or anonymization 'reject' on the server drops them, facts 1.3)"
            )
            self._fail(run, files, reason, batch)
            self._error(run, f"batch {batch + 1}: {reason}")
            progress.update(batch_done=True, failed=True)
            return
        # Every URI: a request can fill several sessions (one per study XNAT found in it).
        self._confirm(run, files, uris, batch, label)
        progress.update(files=len(files), batch_done=True, failed=partial)

    # -- commit -----------------------------------------------------------------------------

    def _commit(self, run: _Run, progress: UploadProgress) -> bool:
        """Build and archive each session the batches landed in; True when all did."""
        ok = True
        uris = list(dict.fromkeys(run.session_uris))
        for i, uri in enumerate(uris):
            label = run.uri_labels.get(uri, self.target.session)
            progress.phase(Phase.COMMIT, i, len(uris), f"committing {uri}")
            try:
                archived = self.commit_session(uri, label)
            except XnatioError as exc:
                message = exc.message if isinstance(exc, ServerError) else str(exc)
                self._error(run, f"commit of {uri} failed: {message}")
                ok = False
                continue
            run.session_uris[run.session_uris.index(uri)] = archived
            run.uri_labels[archived] = label
            progress.phase(Phase.COMMIT, i + 1, len(uris), f"archived as {archived}")
        run.session_uris[:] = list(dict.fromkeys(run.session_uris))
        return ok

    def commit_session(self, uri: str, label: str | None = None) -> str:
        """Build and archive one prearchive session as ``label`` (default: the target's session);
        return its archive URI.

        ``--overwrite none``: ``POST {uri}?action=commit`` answers 301 ``text/plain`` with the
        archive URI and no Location when the project auto-archives (facts 3.3; the Desktop
        Client reads it so), else 200 and the session waits in the prearchive, so it is archived
        with ``POST /data/services/archive?src=…&subject=…&session=…`` (facts 3.4: ``dest`` with
        ``src`` is suspect, the label overrides are not). Both merge into an existing session
        (facts 1.5). ``append``/``delete``: ``action=build`` (never archives, facts 1.3), then the
        archive service with ``overwrite``, which is what makes XNAT overwrite clashing files;
        ``action=commit`` would archive without it on an auto-archive project (facts 1.5).

        The archive service answers 200 ``text/uri-list`` or 303 to ``{siteUrl}/data/archive/…``
        (facts 3.4). A failure "FAILED: …" (500) is final, with XNAT's text; other transient
        errors are retried. When a request still fails, the session is read back
        (:meth:`archived_anyway`): a success whose answer was lost counts as a success. Any other
        redirect (a proxy, a login page) is an error naming the URL. Also the way to finish a
        resumed upload with nothing left to send.
        """
        if "/prearchive/" not in uri:
            return uri  # already in the archive (Direct-Archive, or a site routing rule)
        label = label or self.target.session
        t = self.target
        action = "commit" if t.overwrite == "none" else "build"
        try:
            resp = self._archive_request(uri, {"action": action})
            if action == "commit" and resp.status_code == 301:
                archived = [u for u in _uris(resp.text) if u.startswith("/data/archive/")]
                if archived:
                    return archived[0]
            if resp.status_code != 200:
                raise _redirected(resp, f"{action} of {uri}")
            params = {"src": _prearchive_path(uri), "subject": t.subject, "session": label}
            if t.overwrite != "none":
                params["overwrite"] = t.overwrite
            resp = self._archive_request(ARCHIVE_PATH, params)
        except ServerError:
            archived_uri = self.archived_anyway(uri, label)
            if archived_uri is None:
                raise
            return archived_uri
        if resp.status_code == 303:
            location = resp.headers.get("Location", "")
            if "/data/archive/" in location:
                return location[location.index("/data/archive/") :].split("?", 1)[0]
        if resp.status_code != 200:
            raise _redirected(resp, f"archiving {uri}")
        found = [u for u in session_uris(resp, f"archiving {uri}") if "/archive/" in u]
        if not found:
            raise ServerError(f"archiving {uri} returned no archive URI", status=resp.status_code)
        return found[0]

    def _archive_request(self, path: str, params: dict[str, str]) -> requests.Response:
        """One commit/build/archive POST, retried on transient errors except XNAT's final
        archive failures: "FAILED: …" and the archive timeout (facts 3.3, 3.4)."""
        retry_number = 0
        since: float | None = None
        while True:
            try:
                return self.client.request("POST", path, params=params, idempotent_retry=False)
            except TransientError as err:
                if _final_archive_failure(err.message):
                    raise ServerError(err.message, status=err.status) from None
                since = self.retry.clock() if since is None else since
                if not self._wait_to_retry(err, retry_number, f"POST {path}", since):
                    raise
                retry_number += 1

    # -- Direct-Archive ---------------------------------------------------------------------

    def _await_direct_archive(self, run: _Run, progress: UploadProgress) -> None:
        """Wait for the experiments of Direct-Archive URIs, up to ``archive_wait`` (facts 1.6).

        XNAT archives a Direct-Archive session only once it has been idle for its interval (5
        minutes, checked every 60 s): ``GET /xapi/direct-archive/…`` answers 200 while that is
        pending and 404 once done, then the experiment exists. URIs still pending at the bound go
        to ``run.pending`` (sent, not yet archived); a session XNAT could not archive (moved to
        the prearchive) is an error.
        """
        waiting = [u for u in run.session_uris if u.startswith("/xapi/direct-archive/")]
        if not waiting:
            return
        started = self.clock()
        deadline = started + self.target.archive_wait
        for uri in waiting:
            label = run.uri_labels.get(uri, self.target.session)
            try:
                archived = self._wait_for_experiment(uri, label, started, deadline, progress)
            except (AuthError, UnreachableError):
                raise
            except XnatioError as exc:
                message = exc.message if isinstance(exc, ServerError) else str(exc)
                reason = f"Direct-Archive of {label}: {message}"
                self._error(run, reason)
                with run.lock:  # sent, but not archived: not landed
                    for o in run.outcomes.values():
                        if o.outcome is Outcome.UPLOADED:
                            o.outcome, o.reason = Outcome.FAILED, reason
                continue
            if archived is None:
                run.pending.append(uri)
            else:
                run.session_uris[run.session_uris.index(uri)] = archived
                run.uri_labels[archived] = label

    def await_direct_archive(self, uri: str, label: str) -> str:
        """Wait up to ``archive_wait`` for the experiment of a Direct-Archive ``uri`` an earlier
        run sent (facts 1.6); its archive URI, or ``uri`` itself when still not archived."""
        progress = UploadProgress(
            self.progress_callback, files_total=0, bytes_total=0, batches_total=0, clock=self.clock
        )
        started = self.clock()
        deadline = started + self.target.archive_wait
        archived = self._wait_for_experiment(uri, label, started, deadline, progress)
        return archived or uri

    def _wait_for_experiment(
        self, uri: str, label: str, started: float, deadline: float, progress: UploadProgress
    ) -> str | None:
        t = self.target
        experiment = (
            f"/data/projects/{quote(t.project)}/subjects/{quote(t.subject)}"
            f"/experiments/{quote(label)}"
        )
        row_gone = False
        while True:
            waited = self.clock() - started
            progress.phase(
                Phase.COMMIT,
                0,
                1,
                f"waiting for XNAT to archive {label} (Direct-Archive archives after the session "
                f"has been idle, about 5-6 min; {waited:.0f} of {t.archive_wait:.0f} s)",
            )
            if not row_gone:
                try:
                    self.client.request("GET", uri)
                except ServerError as exc:
                    if exc.status != 404:
                        raise
                    row_gone = True
            if row_gone:
                try:
                    self.client.get_json(experiment)
                except ServerError as exc:
                    if exc.status != 404:
                        raise
                    self._moved_to_prearchive(label)
                else:
                    return "/data" + t.archive_dest_for(label)
            if self.clock() >= deadline or self.cancel.is_set():
                return None
            self.cancel.wait(min(DIRECT_ARCHIVE_POLL, max(0.0, deadline - self.clock())))

    def _moved_to_prearchive(self, label: str) -> None:
        """Raise when XNAT moved the Direct-Archive session to the prearchive (facts 1.6)."""
        listing = self.client.get_json(f"/data/prearchive/projects/{quote(self.target.project)}")
        try:
            rows = listing["ResultSet"]["Result"]
        except (KeyError, TypeError):
            return
        for row in rows:
            if isinstance(row, dict) and row.get("name") == label:
                raise ServerError(
                    f"XNAT could not archive it and moved it to the prearchive "
                    f"(status {row.get('status', '?')}): see {row.get('url', '')}"
                )

    def archived_anyway(self, uri: str, label: str) -> str | None:
        """After a failed commit/archive of ``uri``: its archive URI if the server did it anyway.

        A retried commit or archive whose first answer was lost (connection reset, timeout)
        fails ("Session already exists", prearchive entry 404) although the server archived the
        session. It counts as archived when the experiment exists at PROJECT/SUBJECT/``label``
        (section 4) and the prearchive entry is gone (section 3: archiving removes it). An
        experiment that was already there (a refused second upload) leaves the entry in place,
        so that stays a failure. None when not archived, or when the read-back itself fails.
        """
        t = self.target
        experiment = (
            f"/data/projects/{quote(t.project)}/subjects/{quote(t.subject)}"
            f"/experiments/{quote(label)}"
        )
        try:
            self.client.get_json(experiment)
            listing = self.client.get_json(f"/data/prearchive/projects/{quote(t.project)}")
            rows = listing["ResultSet"]["Result"]
        except (XnatioError, KeyError, TypeError):
            return None
        src = _prearchive_path(uri)
        if any(isinstance(r, dict) and _prearchive_path(str(r.get("url"))) == src for r in rows):
            return None  # still waiting in the prearchive: not archived
        log.info("%s: the answer was lost, but the session is archived as %s", uri, label)
        return "/data" + t.archive_dest_for(label)

    # -- bookkeeping ------------------------------------------------------------------------

    def _fail(self, run: _Run, files: Iterable[DicomFile], reason: str, batch: int) -> None:
        with run.lock:
            for f in files:
                o = run.outcomes[file_path(f)]
                o.outcome, o.reason, o.batch = Outcome.FAILED, reason, batch

    def _error(self, run: _Run, message: str) -> None:
        with run.lock:
            run.errors.append(message)

    def _confirm(
        self, run: _Run, files: list[DicomFile], uris: list[str], batch: int, label: str
    ) -> None:
        with run.lock:
            confirmed = [run.outcomes[file_path(f)] for f in files]
            for o in confirmed:
                o.outcome, o.reason, o.batch = Outcome.UPLOADED, "", batch
            for uri in uris:
                if uri not in run.session_uris:
                    run.session_uris.append(uri)
                    run.uri_labels[uri] = label
        if self.on_confirmed is not None:
            self.on_confirmed(confirmed)

    def _result(
        self,
        manifest: Manifest,
        batches: list[Batch],
        run: _Run,
        progress: UploadProgress,
        started: float,
        committed: bool,
    ) -> UploadResult:
        files = [run.outcomes[file_path(f)] for f in manifest.files]
        files += skipped_outcomes(manifest)
        failed_batches = {o.batch for o in files if o.outcome is Outcome.FAILED}
        duration = self.clock() - started
        t = self.target
        # The target's own label first, then the suffixed ones in order (SESSION, SESSION_2, …).
        order = list(dict.fromkeys([t.session, *run.labels.values()]))
        uris = sorted(
            run.session_uris,
            key=lambda u: order.index(run.uri_labels[u]) if run.uri_labels.get(u) in order else 0,
        )
        waiting = [u for u in uris if _kind(u) is SessionKind.PREARCHIVE]
        # Not committed: the prearchive session waiting for it is named first.
        session_uri = waiting[0] if waiting and not committed else (uris[0] if uris else "")
        ref = SessionRef.parse(session_uri)
        result = UploadResult(
            success=committed
            and bool(run.session_uris)
            and not run.pending
            and not any(o.outcome is Outcome.FAILED for o in files),
            total_files=len(manifest.files),
            duration=duration,
            total_size_mb=manifest.total_bytes / 1e6,
            errors=list(run.errors),
            files=files,
            transport="rest",
            upload_id=uuid.uuid4().hex,
            project=t.project,
            subject=t.subject,
            session=t.session,
            studies=manifest.studies(),
            batches_total=len(batches),
            batches_failed=len(failed_batches - {None}),
            session_uri=session_uri,
            session_uris=[session_uri, *(u for u in uris if u != session_uri)] if uris else [],
            pending=list(run.pending),
            # What resume reads instead of the URI's text: nothing landed, or it still waits
            # in the prearchive, means the commit is still to do.
            committed=ref is not None and ref.kind is not SessionKind.PREARCHIVE,
        )
        progress.phase(Phase.DONE, len(result.uploaded), result.total_files, "done")
        return result


def _kind(uri: str) -> SessionKind | None:
    ref = SessionRef.parse(uri)
    return ref.kind if ref is not None else None


def _reason(exc: BaseException) -> str:
    """One line for a file's reason: XNAT's own message for server errors."""
    if isinstance(exc, ServerError):
        return exc.message
    if isinstance(exc, XnatioError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def skipped_outcomes(manifest: Manifest) -> list[FileOutcome]:
    """SKIPPED outcomes for what discovery set aside (not DICOM, DICOMDIR, duplicates)."""
    return [
        FileOutcome(path=str(s.path), outcome=Outcome.SKIPPED, reason=s.reason, size=s.size)
        for s in [*manifest.skipped, *manifest.duplicates]
    ]


def _culprit(
    err: BaseException, members: Sequence[tuple[str, DicomFile]]
) -> tuple[DicomFile, str] | None:
    """The one file to drop from a batch, and why, when ``err`` is about a single file."""
    if isinstance(err, SourceChangedError):
        return err.file, err.reason
    if isinstance(err, ServerError) and err.status == 400:
        culprit = _find_member(bad_member(err.message), members)
        if culprit is not None:
            return culprit, f"XNAT could not read it: {err.message}"
    return None


def _find_member(name: str | None, members: Sequence[tuple[str, DicomFile]]) -> DicomFile | None:
    """The file behind the archive entry name XNAT reported (exact, then by path suffix)."""
    if not name:
        return None
    name = name.strip().lstrip("/")
    by_name = dict(members)
    if name in by_name:
        return by_name[name]
    # XNAT may report the entry under a prefix of its own (or we under a longer one).
    matches = [f for n, f in members if n.endswith("/" + name) or name.endswith("/" + n)]
    return matches[0] if len(matches) == 1 else None


def _in_a_row(err: BaseException, count: int) -> ServerError:
    message = err.message if isinstance(err, ServerError) else str(err)
    return ServerError(
        f"{message} (XNAT refused {count} files in a row that read as DICOM here: its disk may "
        "be full or its anonymization failing, facts 1.4; the rest of the batch was not sent)",
        status=400,
    )


def _final_archive_failure(message: str) -> bool:
    """XNAT's archive step failed for good: "FAILED: …" or its archive timeout (facts 3.3/3.4)."""
    text = message.strip().lower()
    return text.startswith("failed") or "did not complete within" in text


def _redirected(resp: requests.Response, what: str) -> ServerError:
    """A 3xx (or unexpected status) where XNAT answers 200/301: a proxy or a login page."""
    location = resp.headers.get("Location", "")
    where = f" to {location}" if location else ""
    return ServerError(
        f"{what}: {_path_only(resp.url)} answered {resp.status_code}{where} instead of XNAT's "
        "answer; a proxy or login page is in the way (check --server)",
        status=resp.status_code,
    )


def _prearchive_path(uri: str) -> str:
    """``/prearchive/projects/P/TS/F`` from a URI with or without the ``/data`` prefix."""
    return uri[len("/data") :] if uri.startswith("/data/") else uri


def _strip_server(uri: str, server: str) -> str:
    if uri.startswith(server):
        return uri[len(server) :]
    if "://" in uri:
        return "/" + uri.split("://", 1)[1].split("/", 1)[-1]
    return uri
