"""One resumable, verified upload, whatever the transport:

    lock target -> journal: what is still unconfirmed -> send only that (the transport reports each
    confirmed batch/file as it goes) -> commit if needed -> read back and compare -> journal update

Both transports plug in through :data:`Send`; everything else (lock, journal, earlier-run
outcomes, verification, the resume hint on Ctrl-C) lives here once. Callers: ``xio upload-dicom``
(``xnatio.cli.upload``) and the Python API.

Outcomes of a resumed run: files confirmed by an earlier run are ``UPLOADED`` with the reason
``"sent by an earlier run (journal)"``; read-back turns every file it finds into ``VERIFIED``.

Existing sessions converge (REST, facts 1.5): before sending, the session is read back
(``on_server``) and every instance it already holds by name is not sent again (reason
:data:`ALREADY_REASON`), whatever the journal knows (a fresh journal, ``--restart``, another
machine). XNAT's merge refuses (409) an incoming SOP Instance UID the scan already holds, identical
bytes included, and leaves a CONFLICT entry in the prearchive; so only what is missing is sent,
and it merges. Exceptions, sent although there: files the journal saw change since an earlier run
sent them, and everything with ``--overwrite delete`` (both archived with ``overwrite=delete``).
A confirmed file that read-back cannot find (lost on the server) is sent again once, in the same
run, and the session read back again; what is still missing or different then is ``FAILED``
with the reason, and dropped from the journal so that the next run sends it again. A run exits 0
only when every DICOM file was confirmed and, unless ``--no-verify``, found on the server.

Where the session is not committed (REST commit failed) the run fails without reading back; the
next run sends nothing and only commits. Where read-back itself fails, the run fails; the next
one sends nothing and only verifies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from xnatio.errors import EXIT_INTERRUPTED, ServerError, UsageError, XnatioError
from xnatio.journal import Journal, JournalRun, Target, outcome_path
from xnatio.models import (
    Batch,
    DicomFile,
    FileOutcome,
    Manifest,
    Outcome,
    ProgressCallback,
    ProgressEvent,
    UploadResult,
)
from xnatio.report import ALREADY_REASON
from xnatio.retry import RetryPolicy
from xnatio.verify import VerifyReport, already_on_server, read_server_session, verify_session
from xnatio.xnat.client import XnatClient, quote

if TYPE_CHECKING:
    from xnatio.transports.rest import RestTarget

log = logging.getLogger(__name__)


class Confirmations(Protocol):
    """What a transport reports into, from its worker threads, as the server confirms files."""

    def files_confirmed(self, files: Sequence[DicomFile], session_uri: str = "") -> None: ...

    def on_confirmed(self, outcomes: Sequence[FileOutcome]) -> None: ...


class _NoJournal:
    def files_confirmed(self, files: Sequence[DicomFile], session_uri: str = "") -> None:
        pass

    def on_confirmed(self, outcomes: Sequence[FileOutcome]) -> None:
        pass


Send = Callable[[Manifest, Confirmations, "str | None"], UploadResult]
"""``send(manifest_of_files_to_send, confirmations, overwrite)``: one transport run.

``overwrite`` is None for a first run; ``"append"`` when files of this session were sent by an
earlier run (the server may already hold the session, which must merge, not answer 409), and
``"delete"`` when some of the files to send changed since an earlier run sent them (the server's
copy must be replaced). A user's own ``--overwrite delete`` wins over ``append``.
"""

DIRECT_ARCHIVE_PREFIX = "/xapi/direct-archive/"

Commit = Callable[[str], str]
"""Commit what earlier runs sent when nothing is left to send (REST). Gets the session URI the
journal remembered ("" if none); the REST one asks the server which prearchive sessions of this
label still wait (:func:`waiting_prearchive_sessions`). Returns the archived session's URI."""

ReadBack = Callable[[Sequence[DicomFile]], VerifyReport]

OnServer = Callable[[Sequence[DicomFile]], list[DicomFile]]
"""The files (of those given) whose instances the server's session already holds (REST)."""


class UploadInterrupted(XnatioError):
    """Ctrl-C or SIGTERM: the journal is consistent; the same command resumes."""

    exit_code = EXIT_INTERRUPTED


@dataclass(frozen=True, kw_only=True)
class ResumeOptions:
    journal: Path | None = None  # None: the default journal (see xnatio.journal)
    restart: bool = False  # forget what the journal remembers for this target and source
    wait: bool = False  # wait for another run on the same target instead of refusing
    verify: bool = True
    use_journal: bool = True  # False: no journal, no lock (dry runs, library users who opt out)


def resumable_upload(
    target: Target,
    manifest: Manifest,
    send: Send,
    *,
    options: ResumeOptions = ResumeOptions(),
    commit: Commit | None = None,
    read_back: ReadBack | None = None,
    notify: Callable[[str], None] | None = None,
    on_server: OnServer | None = None,
) -> UploadResult:
    """Send what the journal has not seen confirmed and the server does not hold (``on_server``),
    commit, verify; see the module docstring."""
    say = notify or (lambda msg: log.info("%s", msg))
    if not options.verify:
        read_back = None
    if not options.use_journal:
        result = send(manifest, _NoJournal(), None)
        committed = _committed(result, needs_commit=commit is not None)
        return _finish(result, manifest, None, read_back, say, committed=committed)
    journal = Journal(options.journal)
    lock = journal.lock(target)
    try:
        lock.acquire(wait=options.wait, on_wait=say)
        run = journal.open_run(target, manifest, restart=options.restart)
        done, todo = run.split()
        if done:
            say(
                f"resuming: {len(done)} of {len(manifest.files)} files were confirmed by an "
                f"earlier run; sending the other {len(todo)}"
            )
        try:
            with _sigterm_as_interrupt():
                result, committed = _send_rest_of(
                    run, manifest, done, todo, send, commit, say, on_server
                )
                return _finish(
                    result,
                    manifest,
                    run,
                    read_back,
                    say,
                    committed=committed,
                    heal=lambda lost: _heal(run, manifest, lost, send, commit),
                )
        except KeyboardInterrupt:
            confirmed = len(run.split()[0])
            raise UploadInterrupted(
                f"interrupted: {confirmed} of {len(manifest.files)} files are confirmed; "
                "run the same command again to send the rest"
            ) from None
    finally:
        lock.release()
        journal.close()


def _heal(
    run: JournalRun, manifest: Manifest, lost: list[DicomFile], send: Send, commit: Commit | None
) -> tuple[UploadResult, bool]:
    """Send ``lost`` again, once, into the (existing) session; also says if it committed."""
    part = Manifest(root=manifest.root, files=lost, source_archive=manifest.source_archive)
    result = send(part, run, "append")
    run.record_outcomes(result.files)
    committed = _committed(result, needs_commit=commit is not None)
    if committed:
        run.record_commit(result.session_uri)
    return result, committed


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager stopping us, a cron timeout) stops like Ctrl-C: in-flight
    requests cancelled, the journal consistent, the resume hint printed. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _send_rest_of(
    run: JournalRun,
    manifest: Manifest,
    done: list[DicomFile],
    todo: list[DicomFile],
    send: Send,
    commit: Commit | None,
    say: Callable[[str], None],
    on_server: OnServer | None = None,
) -> tuple[UploadResult, bool]:
    """Send ``todo`` (or only commit); returns the result and whether the session is committed."""
    started = time.monotonic()
    already: list[FileOutcome] = []
    if todo and on_server is not None:
        todo, already = _not_on_server(run, manifest, todo, on_server, say)
    if not todo and already and not done:
        run.record_commit()  # the server holds every file: nothing of ours waits for a commit
    pending = ""  # a Direct-Archive session still not archived (facts 1.6)
    if not todo and commit is not None and not run.committed:
        if run.session_uri.startswith(DIRECT_ARCHIVE_PREFIX):
            say("every file was sent by an earlier run; waiting for XNAT to archive them")
        else:
            say("every file was sent by an earlier run; committing the session")
        try:
            uri = commit(run.session_uri)
        except ServerError as exc:
            if exc.status != 404:
                raise
            # The prearchive session the earlier run filled is gone (deleted by someone, or
            # archived elsewhere): what the journal remembers is stale, so send it all again.
            say("the earlier run's prearchive session is gone; sending every file again")
            run.forget(done)
            done, todo = [], list(manifest.files)
        else:
            if uri.startswith(DIRECT_ARCHIVE_PREFIX):
                pending = uri
            else:
                run.record_commit(uri)
    if todo:
        part = Manifest(
            root=manifest.root,
            files=todo,
            skipped=manifest.skipped,
            duplicates=manifest.duplicates,
            source_archive=manifest.source_archive,
        )
        changed = run.changed_since_sent(todo)
        overwrite = "delete" if changed else ("append" if done else None)
        if changed:
            say(
                f"{len(changed)} file(s) changed since an earlier run sent them: sending them "
                "again, replacing the server's copies (overwrite=delete)"
            )
        result = send(part, run, overwrite)
        # The hook may have seen them already; recording twice is harmless (same rows).
        run.record_outcomes(result.files)
        committed = _committed(result, needs_commit=commit is not None)
        if result.pending:
            # Sent, not archived yet: the next run waits for it again (its commit step).
            run.record_session_uri(result.pending[0])
        elif committed:
            run.record_commit(result.session_uri)
    else:
        result = UploadResult(success=True, total_files=0, duration=0.0, total_size_mb=0.0)
        if not run.committed and not pending:
            run.record_commit()  # nothing known to commit: read-back will tell
        committed = True
        result.session_uri = pending or run.session_uri
        result.pending = [pending] if pending else []
        result.duration = time.monotonic() - started
    result.files.extend(already)
    result.files.extend(run.earlier_outcomes(done))
    result.total_files = len(manifest.files)
    result.total_size_mb = manifest.total_bytes / 1e6
    return result, committed


def _not_on_server(
    run: JournalRun,
    manifest: Manifest,
    todo: list[DicomFile],
    on_server: OnServer,
    say: Callable[[str], None],
) -> tuple[list[DicomFile], list[FileOutcome]]:
    """Split ``todo`` into what the server lacks and outcomes for what it holds already.

    Files that changed since an earlier run sent them are sent anyway (they replace the server's
    copy). What the server holds is recorded in the journal as confirmed, like a sent file.
    """
    changed = {outcome_path(f) for f in run.changed_since_sent(todo)}
    there = on_server([f for f in todo if outcome_path(f) not in changed])
    if not there:
        return todo, []
    held = {outcome_path(f) for f in there}
    outcomes = [
        FileOutcome(
            path=outcome_path(f),
            outcome=Outcome.UPLOADED,
            reason=ALREADY_REASON,
            sop_instance_uid=f.sop_instance_uid,
            series_uid=f.series_uid,
            size=f.size,
        )
        for f in there
    ]
    run.on_confirmed(outcomes)
    left = [f for f in todo if outcome_path(f) not in held]
    say(
        f"{len(there)} of {len(manifest.files)} files are already on the server: "
        + (f"sending only the other {len(left)}" if left else "nothing to send")
    )
    return left, outcomes


def _committed(result: UploadResult, *, needs_commit: bool) -> bool:
    """Did the transport's run end with the session committed (REST) or sent (C-STORE)?

    The REST transport reports the archive URI after a successful commit and the prearchive URI
    when the commit failed (section 1: every batch answers with the prearchive URI).
    """
    if not needs_commit:
        return True
    return bool(result.session_uri) and "/prearchive/" not in result.session_uri


def _finish(
    result: UploadResult,
    manifest: Manifest,
    run: JournalRun | None,
    read_back: ReadBack | None,
    say: Callable[[str], None],
    *,
    committed: bool,
    heal: Callable[[list[DicomFile]], tuple[UploadResult, bool]] | None = None,
) -> UploadResult:
    """Read back (if asked and the session was committed) and settle every file's outcome.

    ``heal``, when given, is tried once with the files read-back did not find at all: it sends
    them again and returns the outcomes of that pass and whether it committed; then the session
    is read back again (if it did not commit, that pass's failures stand). Files on the server
    with different bytes are not re-sent (an anonymization script on the server would make
    that loop); they are reported.
    """
    sent = [o for o in result.files if o.outcome is Outcome.UPLOADED]
    if not committed and sent:
        result.errors.append(
            "the session was not committed, so its files are not archived yet; "
            "run the same command again to retry the commit"
        )
    elif result.pending:
        # Direct-Archive: XNAT archives after its idle interval (facts 1.6); nothing to read yet.
        result.success = False
        return result
    elif read_back is not None and sent:
        say(f"verifying {len(manifest.files)} files against the server")
        try:
            report = read_back(manifest.files)
        except XnatioError as exc:
            # The files are confirmed and committed, but nobody has seen them land: not "done".
            # The journal keeps them; the next run sends nothing and verifies again.
            result.verified = False
            result.errors.append(
                f"could not read the session back to verify it ({exc}); "
                "run the same command again to verify"
            )
            result.success = False
            return result
        # Confirmed (by the server, now or by an earlier run) yet not found: lost on the way.
        uploaded = {o.path for o in sent}
        lost = [f for f in report.missing if outcome_path(f) in uploaded]
        # Not for Direct-Archive: a re-send into an existing archive folder would fall back to
        # the prearchive (section 1), a second copy rather than a repair.
        if heal is not None and lost and "/direct-archive/" not in result.session_uri:
            say(f"{len(lost)} confirmed file(s) are not on the server; sending them again")
            again, healed = heal(lost)
            _merge(result, again)
            if healed:
                return _finish(result, manifest, run, read_back, say, committed=True)
        apply_verification(result, report)
        if run is not None:
            missing = [f for f, _ in report.problems]
            if missing:
                run.forget(missing)
                result.errors.append(
                    f"the next run of the same command sends these {len(missing)} file(s) again"
                )
            if report.ok and not result.failed:
                run.record_verified()
    result.success = committed and not result.failed and bool(result.uploaded or not manifest.files)
    return result


def _merge(result: UploadResult, again: UploadResult) -> None:
    """Replace the outcomes of re-sent files with those of the pass that re-sent them."""
    newer = {o.path: o for o in again.files if o.outcome is not Outcome.SKIPPED}
    result.files = [newer.pop(o.path, o) for o in result.files] + list(newer.values())
    result.errors.extend(again.errors)
    result.batches_total += again.batches_total
    result.batches_failed += again.batches_failed
    result.duration += again.duration
    if again.session_uri and "/prearchive/" not in again.session_uri:
        result.session_uri = again.session_uri


def apply_verification(result: UploadResult, report: VerifyReport) -> None:
    """VERIFIED for what read-back found; FAILED (with why) for what it did not."""
    # (outcome, reason) per path, the pairs shared: no new FileOutcome per file at 50,000 files.
    by_path: dict[str, tuple[Outcome, str]] = {}
    shared: dict[tuple[Outcome, str], tuple[Outcome, str]] = {}
    for path, outcome, reason in report.verdicts():
        pair = (outcome, reason)
        by_path[path] = shared.setdefault(pair, pair)
    for o in result.files:
        if o.outcome is not Outcome.UPLOADED:
            continue  # a failed file keeps the transport's reason; skipped stays skipped
        found = by_path.get(o.path)
        if found is None:
            continue
        o.outcome, found_reason = found
        if o.outcome is Outcome.FAILED:
            o.reason = found_reason
        elif found_reason:  # verified by count only (the server rewrote it): say so, too
            o.reason = "; ".join(r for r in (o.reason, found_reason) if r)
        # VERIFIED keeps its reason ("sent by an earlier run (journal)", transport notes).
    result.verified = report.ok
    if report.warning and report.warning not in result.warnings:
        result.warnings.append(report.warning)
    if report.rewritten_note and report.rewritten_note not in result.notes:
        result.notes.append(report.rewritten_note)
    if not report.ok:
        problems = report.problems
        result.errors.append(
            f"verification: {len(problems)} file(s) missing or different on the server"
        )
        if report.note:
            result.errors.append(f"verification: {report.note}")
        result.errors.extend(f"{f.path}: {why}" for f, why in problems[:20])


# -- the two transports, wired for resume ---------------------------------------------------------


def resumable_rest_upload(
    client: XnatClient,
    manifest: Manifest,
    target: RestTarget,
    *,
    options: ResumeOptions = ResumeOptions(),
    retry: RetryPolicy | None = None,
    progress_callback: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    notify: Callable[[str], None] | None = None,
    plan: Callable[[Manifest], list[Batch]] | None = None,
    preflight: bool = True,
) -> UploadResult:
    """A REST upload of ``manifest`` through the journal, committed and read back with ``client``.

    ``plan`` replaces the batch planner (default: :func:`xnatio.uploaders.plan_rest_upload`).
    ``preflight``: first check the destination (:func:`xnatio.preflight.before_sending`); a
    refusal raises :class:`xnatio.preflight.PreflightError` before any DICOM byte is sent.

    Before sending, each session label is read back: what it holds by instance name is not sent
    again (module docstring), unless ``target.overwrite`` is ``delete`` (everything is sent and
    replaces the server's copies, facts 1.5). A Direct-Archive upload into a session that exists
    goes through the prearchive instead: Direct-Archive never merges, it falls back to the
    prearchive when the label's folder exists (facts 1.6), and only a commit merges.
    """
    from xnatio.transports.rest import RestUploader, session_labels
    from xnatio.uploaders import plan_rest_upload

    if not target.study_labels:
        # Labels from the whole manifest, so each study keeps its label whatever part is sent.
        labels = session_labels(manifest.studies(), target.session)
        target = dataclasses.replace(target, study_labels=tuple(labels.items()))
    study_labels = dict(target.study_labels)
    if preflight:
        from xnatio.preflight import before_sending

        found = before_sending(
            client,
            manifest,
            project=target.project,
            subject=target.subject,
            labels=study_labels,
            notify=notify,
        )
        target = dataclasses.replace(target, project=found.project, subject=found.subject)
    existing: set[str] = set()  # labels whose session the server holds already
    say = notify or (lambda msg: log.info("%s", msg))

    def on_server(files: Sequence[DicomFile]) -> list[DicomFile]:
        by_label: dict[str, list[DicomFile]] = {}
        for f in files:
            by_label.setdefault(study_labels.get(f.study_uid, target.session), []).append(f)
        there: list[DicomFile] = []
        for label, part in by_label.items():
            try:
                server = read_server_session(client, target.project, target.subject, label)
            except ServerError as exc:
                # Unknown, so not "absent": sending all could re-send what is there (a 409 and a
                # CONFLICT entry on the server, facts 1.5). Nothing is sent.
                raise ServerError(
                    f"could not read session {label} back before sending ({exc.message}); "
                    "nothing was sent; run the same command again",
                    status=exc.status,
                ) from None
            if server is None:
                continue
            studies = {f.study_uid for f in part}
            if server.study_uid and server.study_uid not in studies:
                # XNAT refuses to merge another study into a session (facts 1.5, "Invalid
                # modification of session UID"); never send it there (the pre-flight says so
                # first on the command line).
                raise UsageError(
                    f"session {label} in project {target.project} holds another study "
                    f"(StudyInstanceUID {server.study_uid}); nothing was sent: choose another "
                    "session label"
                )
            existing.add(label)
            there.extend(already_on_server(server, part))
        return there

    def send(part: Manifest, hook: Confirmations, overwrite: str | None) -> UploadResult:
        t = target
        if overwrite is not None and t.overwrite != "delete":
            t = dataclasses.replace(t, overwrite=overwrite)
        if t.direct_archive and existing:
            say(
                "the session exists already and Direct-Archive never merges (facts 1.6): "
                "sending the missing files through the prearchive, committed into it"
            )
            t = dataclasses.replace(t, direct_archive=False)
        if plan is not None and part.source_archive is None:
            batches = plan(part)
        else:
            batches = plan_rest_upload(
                part.root, num_batches=t.num_batches, manifest=part, allow_multiple_studies=True
            ).batches
        uploader = RestUploader(
            client,
            t,
            retry=retry,
            progress_callback=progress_callback,
            cancel=cancel,
            on_confirmed=hook.on_confirmed,
        )
        return uploader.upload(part, batches)

    def commit(remembered_uri: str) -> str:
        t = (
            target
            if target.overwrite != "none"
            else dataclasses.replace(target, overwrite="append")
        )
        uploader = RestUploader(
            client, t, retry=retry, progress_callback=progress_callback, cancel=cancel
        )
        if remembered_uri.startswith(DIRECT_ARCHIVE_PREFIX):
            # Sent by an earlier run that stopped waiting: wait again (facts 1.6).
            label = unquote(remembered_uri.rstrip("/").rsplit("/", 1)[-1])
            return uploader.await_direct_archive(remembered_uri, label)
        archived = ""
        # The server, not our memory, says what is waiting: every prearchive session of these
        # labels still receiving (section 3), committed with the transport's own final step.
        for label in dict.fromkeys([target.session, *study_labels.values()]):
            for uri in waiting_prearchive_sessions(client, target.project, label):
                done = uploader.commit_session(uri, label)
                archived = archived or done
        return archived

    def read_back(files: Sequence[DicomFile]) -> VerifyReport:
        # Several studies are archived under one label each (xnatio.transports.rest).
        by_label: dict[str, list[DicomFile]] = {}
        for f in files:
            by_label.setdefault(study_labels.get(f.study_uid, target.session), []).append(f)
        if not by_label:
            return verify_session(client, target.project, target.subject, target.session, [])
        # One VERIFY count over all sessions: each one's events are shifted by those before it.
        totals = (len(files), sum(f.size for f in files))
        done = (0, 0)
        reports: list[VerifyReport] = []
        for label, part in by_label.items():
            progress = _shifted(progress_callback, done, totals)
            reports.append(
                verify_session(
                    client, target.project, target.subject, label, part, progress=progress
                )
            )
            done = (done[0] + len(part), done[1] + sum(f.size for f in part))
        return merge_reports(reports) if len(reports) > 1 else reports[0]

    result = resumable_upload(
        Target.rest(client.server, target.project, target.subject, target.session),
        manifest,
        send,
        options=options,
        commit=commit,
        read_back=read_back,
        notify=notify,
        on_server=None if target.overwrite == "delete" else on_server,
    )
    result.transport = "rest"
    result.project, result.subject, result.session = target.project, target.subject, target.session
    return result


def _shifted(
    callback: ProgressCallback | None, before: tuple[int, int], totals: tuple[int, int]
) -> ProgressCallback | None:
    """Phase.VERIFY events of one session of a multi-study upload, counted over all of them:
    ``before`` and ``totals`` are (files, bytes)."""
    if callback is None:
        return None

    def shifted(event: ProgressEvent) -> None:
        callback(
            dataclasses.replace(
                event,
                current=before[0] + event.current,
                total=totals[0],
                bytes_done=before[1] + event.bytes_done,
                bytes_total=totals[1],
            )
        )

    return shifted


def merge_reports(reports: Sequence[VerifyReport]) -> VerifyReport:
    """One report for the sessions of a multi-study upload (named after the first)."""
    first = reports[0]
    return VerifyReport(
        first.project,
        first.subject,
        first.session,
        found=all(r.found for r in reports),
        series=[s for r in reports for s in r.series],
        unmatched_scans=[x for r in reports for x in r.unmatched_scans],
        unreadable=[x for r in reports for x in r.unreadable],
    )


# Prearchive states in which a session still waits for a commit (section 3).
_WAITING = {"RECEIVING", "RECEIVING_INTERRUPT", "READY"}


def waiting_prearchive_sessions(client: XnatClient, project: str, label: str) -> list[str]:
    """``/data/prearchive/...`` URIs of the prearchive sessions named ``label`` awaiting commit."""
    data = client.get_json(f"/data/prearchive/projects/{quote(project)}")
    try:
        rows = data["ResultSet"]["Result"]
    except (KeyError, TypeError):
        return []
    out = []
    for row in rows:
        if not isinstance(row, dict) or row.get("name") != label:
            continue
        if str(row.get("status", "")) in _WAITING and row.get("url"):
            url = str(row["url"])
            out.append(url if url.startswith("/data/") else "/data" + url)
    return out


def resumable_dicom_store_upload(
    manifest: Manifest,
    host: str,
    port: int,
    called_aet: str,
    *,
    project: str,
    subject: str,
    session: str,
    options: ResumeOptions = ResumeOptions(),
    notify: Callable[[str], None] | None = None,
    client: XnatClient | None = None,
    **send_options: Any,
) -> UploadResult:
    """A C-STORE upload of ``manifest`` through the journal (every C-STORE success response is a
    confirmation, recorded as it arrives). ``send_options`` go to
    :func:`xnatio.transports.dicom_store.send_dicom_store` (calling AE title, batches, timeouts,
    routing, retries, progress). With ``client`` (XNAT's REST API, credentials), the destination
    is checked first (:func:`xnatio.preflight.before_sending`; every study is routed to
    ``session``).

    No read-back here: XNAT's DICOM receiver builds the session only after an idle period
    (section 6), so the files cannot be checked right after sending; run ``xio verify`` later.
    """
    from xnatio.transports.dicom_store import send_dicom_store

    if client is not None:
        from xnatio.preflight import before_sending

        labels = {s.study_uid: session for s in manifest.studies()}
        found = before_sending(
            client, manifest, project=project, subject=subject, labels=labels, notify=notify
        )
        project, subject = found.project, found.subject

    def send(part: Manifest, hook: Confirmations, overwrite: str | None) -> UploadResult:
        # No overwrite with C-STORE: XNAT files a re-sent instance over the same one.
        return send_dicom_store(
            part.root,
            host,
            port,
            called_aet,
            project=project,
            subject=subject,
            session=session,
            manifest=part,
            on_confirmed=hook.on_confirmed,
            **send_options,
        )

    target = Target.dicom(host, port, called_aet, project, subject, session)
    result = resumable_upload(target, manifest, send, options=options, notify=notify)
    if result.success and notify is not None:
        notify(
            "not read back: XNAT files C-STORE sessions after an idle period; check with "
            f"`xio verify {project} {subject} {session} PATH --wait-for 900`"
        )
    result.transport = "dicom-store"
    result.project, result.subject, result.session = project, subject, session
    return result
