"""One REST upload from start to end: subject, batches, commit, and every file accounted for.

:class:`RestUploader` runs the stages of :mod:`xnatio.transports.rest` in order: ``PUT`` the
subject (not for Direct-Archive, facts 1.6), the batches through :class:`.send.BatchSender`, the
commit of every session they landed in through :class:`.commit.Committer`, the wait for
Direct-Archive's experiments, and the :class:`~xnatio.models.UploadResult`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence

from xnatio.coordinator import Coordinator, ExecutorFactory
from xnatio.errors import AuthError, ServerError, UnreachableError, XnatioError
from xnatio.events import ProgressCounter
from xnatio.models import (
    Batch,
    FileOutcome,
    Manifest,
    Outcome,
    Phase,
    ProgressCallback,
    SessionKind,
    SessionRef,
    UploadResult,
)
from xnatio.plan import split_by_study
from xnatio.result import assemble_result
from xnatio.retry import RetryPolicy, Sleep
from xnatio.transports.rest.answers import reason
from xnatio.transports.rest.commit import Committer
from xnatio.transports.rest.send import BatchSender
from xnatio.transports.rest.state import UploadRun
from xnatio.transports.rest.target import RestTarget, session_labels
from xnatio.verify import SentDigests
from xnatio.xnat.client import XnatClient


class RestUploader:
    """Sends one discovered session with a shared :class:`XnatClient`.

    Side effects are constructor arguments so tests replace them without patching: ``clock``
    (durations, progress throttling), ``sleep`` (retry backoff), ``cancel`` (set it from another
    thread to stop the upload; Ctrl-C in the calling thread sets it too). ``on_confirmed`` is called
    from worker threads with the outcomes of each batch the server confirmed (the resume journal).
    ``executor(workers)`` makes the pool batches run in (default: threads; a test passes
    :class:`xnatio.coordinator.SerialExecutor` to replay the upload serially). ``sender_class``
    is the batch sender (a test's subclass observes or disturbs a batch's life).
    """

    sender_class: type[BatchSender] = BatchSender

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
        digests: SentDigests | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.digests = digests  # filled while sending, for read-back (xnatio.verify)
        self.retry = retry if retry is not None else RetryPolicy()
        self.progress_callback = progress_callback
        self.clock = clock
        self.sleep = sleep
        self.cancel = cancel if cancel is not None else threading.Event()
        # The one cancel path of this upload: its event is ``cancel``, so either way is the same.
        self.coordinator = Coordinator(self.cancel)
        self.executor = executor
        self.on_confirmed = on_confirmed
        self.committer = Committer(
            client, target, retry=self.retry, cancel=self.cancel, clock=clock, sleep=sleep
        )

    def upload(self, manifest: Manifest, batches: list[Batch]) -> UploadResult:
        """Send ``batches`` (planned from ``manifest``), commit, and account for every file.

        Several studies: each goes under its own label (see :mod:`xnatio.transports.rest`), and
        batches that mix studies are cut per study. A subject that cannot be created fails every
        file with the reason (nothing is sent); only a refused login or an unreachable server
        raise.
        """
        started = self.clock()
        labels = dict(self.target.study_labels) or session_labels(
            manifest.studies(), self.target.session
        )
        run = UploadRun.of(manifest, labels)
        if len(set(labels.values())) > 1:
            batches = split_by_study(batches)
        progress = ProgressCounter(
            self.progress_callback,
            files_total=len(manifest.files),
            bytes_total=manifest.total_bytes,
            batches_total=len(batches),
            clock=self.clock,
        )
        committed = True
        try:
            # The pipeline logs in before discovery and shows it; a guest's client may not be.
            connecting = not self.client.logged_in
            if connecting:
                progress.phase(Phase.CONNECT, 0, 1, f"connecting to {self.client.server}")
                self.client.login()
            if not self.target.direct_archive and not self._put_subject(manifest, run):
                return self._result(manifest, batches, run, progress, started, False)
            if connecting:
                progress.phase(Phase.CONNECT, 1, 1, "connected")
            progress.phase(Phase.UPLOAD, 0, len(manifest.files), "uploading")
            sender = self.sender_class(
                self.client,
                self.target,
                run,
                progress,
                coordinator=self.coordinator,
                retry=self.retry,
                sleep=self.sleep,
                executor=self.executor,
                on_confirmed=self.on_confirmed,
                digests=self.digests,
            )
            sender.send_all(manifest, batches)
            if run.session_uris and not self.cancel.is_set():
                committed = self._commit(run, progress)
            if committed and not self.cancel.is_set():
                self._await_direct_archive(run, progress)
        except BaseException as exc:
            self.coordinator.cancel(exc)
            raise
        return self._result(manifest, batches, run, progress, started, committed)

    def _put_subject(self, manifest: Manifest, run: UploadRun) -> bool:
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
            why = f"could not create subject {t.subject} in project {t.project}: {reason(exc)}"
            if isinstance(exc, ServerError) and exc.status is not None:
                why += f" (HTTP {exc.status})"
            run.fail(manifest.files, why)
            run.error(why)
            return False
        return True

    # -- commit -----------------------------------------------------------------------------

    def commit_session(self, uri: str, label: str | None = None) -> str:
        """Build and archive one prearchive session (:meth:`.commit.Committer.commit_session`)."""
        return self.committer.commit_session(uri, label)

    def await_direct_archive(self, uri: str, label: str) -> str:
        """Wait up to ``archive_wait`` for the experiment of a Direct-Archive ``uri`` an earlier
        run sent (facts 1.6); its archive URI, or ``uri`` itself when still not archived."""
        progress = ProgressCounter(
            self.progress_callback, files_total=0, bytes_total=0, batches_total=0, clock=self.clock
        )
        return self.committer.await_direct_archive(uri, label, progress.phase)

    def _commit(self, run: UploadRun, progress: ProgressCounter) -> bool:
        """Build and archive each session the batches landed in; True when all did."""
        ok = True
        uris = list(dict.fromkeys(run.session_uris))
        for i, uri in enumerate(uris):
            label = run.uri_labels.get(uri, self.target.session)
            progress.phase(Phase.COMMIT, i, len(uris), f"committing {uri}")
            try:
                archived = self.committer.commit_session(uri, label)
            except XnatioError as exc:
                message = exc.message if isinstance(exc, ServerError) else str(exc)
                run.error(f"commit of {uri} failed: {message}")
                ok = False
                continue
            run.session_uris[run.session_uris.index(uri)] = archived
            run.uri_labels[archived] = label
            progress.phase(Phase.COMMIT, i + 1, len(uris), f"archived as {archived}")
        run.session_uris[:] = list(dict.fromkeys(run.session_uris))
        return ok

    def _await_direct_archive(self, run: UploadRun, progress: ProgressCounter) -> None:
        """Wait for the experiments of Direct-Archive URIs, up to ``archive_wait`` (facts 1.6).

        URIs still pending at the bound go to ``run.pending`` (sent, not yet archived); a session
        XNAT could not archive (moved to the prearchive) is an error, and its files not landed.
        """
        waiting = [u for u in run.session_uris if u.startswith("/xapi/direct-archive/")]
        if not waiting:
            return
        started = self.clock()
        deadline = started + self.target.archive_wait
        for uri in waiting:
            label = run.uri_labels.get(uri, self.target.session)
            try:
                archived = self.committer.wait_for_experiment(
                    uri, label, started, deadline, progress.phase
                )
            except (AuthError, UnreachableError):
                raise
            except XnatioError as exc:
                message = exc.message if isinstance(exc, ServerError) else str(exc)
                why = f"Direct-Archive of {label}: {message}"
                run.error(why)
                with run.lock:  # sent, but not archived: not landed
                    for o in run.outcomes.values():
                        if o.outcome is Outcome.UPLOADED:
                            o.outcome, o.reason = Outcome.FAILED, why
                continue
            if archived is None:
                run.pending.append(uri)
            else:
                run.session_uris[run.session_uris.index(uri)] = archived
                run.uri_labels[archived] = label

    # -- the result -------------------------------------------------------------------------

    def _result(
        self,
        manifest: Manifest,
        batches: list[Batch],
        run: UploadRun,
        progress: ProgressCounter,
        started: float,
        committed: bool,
    ) -> UploadResult:
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
        return assemble_result(
            manifest,
            run.outcomes,
            transport="rest",
            duration=self.clock() - started,
            batches_total=len(batches),
            errors=run.errors,
            project=t.project,
            subject=t.subject,
            session=t.session,
            landed=committed and bool(run.session_uris),
            upload_id=uuid.uuid4().hex,
            session_uri=session_uri,
            session_uris=[session_uri, *(u for u in uris if u != session_uri)] if uris else [],
            pending=run.pending,
            # What resume reads instead of the URI's text: nothing landed, or it still waits
            # in the prearchive, means the commit is still to do.
            committed=ref is not None and ref.kind is not SessionKind.PREARCHIVE,
            progress=progress,
        )


def _kind(uri: str) -> SessionKind | None:
    ref = SessionRef.parse(uri)
    return ref.kind if ref is not None else None
