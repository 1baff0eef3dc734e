"""One resumable, verified upload, whatever the transport:

    lock target -> journal: what is still unconfirmed -> send only that (the transport reports each
    confirmed batch/file as it goes) -> commit if needed -> read back and compare -> journal update

Both transports plug in through :class:`xnatio.transports.base.Transport` (send and confirm;
commit; read back), and this module knows nothing of REST or DICOM networking; everything else
(lock, journal, earlier-run outcomes, verification, the resume hint on Ctrl-C) lives here once.
Caller: :func:`xnatio.pipeline.upload` (``xio upload-dicom``, ``xio demo``, the Python API).

Outcomes of a resumed run: files confirmed by an earlier run are ``UPLOADED`` with the reason
``"sent by an earlier run (journal)"``; read-back turns every file it finds into ``VERIFIED``.

Existing sessions converge (REST, facts 1.5): before sending, the session is read back
(``on_server``) and every instance it already holds by name is not sent again (reason
:data:`ALREADY_REASON`), whatever the journal knows (a fresh journal, ``--restart``, another
machine). XNAT's merge refuses (409) an incoming SOP Instance UID the scan already holds, identical
bytes included, and leaves a CONFLICT entry in the prearchive; so only what is missing is sent,
and it merges. Exceptions, sent although there: files the journal saw change since an earlier run
sent them, files whose server copy a read-back found different (remembered in the journal until
verified), and everything with ``--overwrite delete`` (all archived with ``overwrite=delete``).
A confirmed file that read-back cannot find (lost on the server) is sent again once, in the same
run, and so is one whose copy differs where the server stores our bytes (replacing it); then the
session is read back again. What is still missing then is ``FAILED`` and dropped from the journal
so that the next run sends it again; what still differs is ``FAILED`` with one line naming what to
check, and stays marked for replacement. A run exits 0 only when every DICOM file was confirmed
and, unless ``--no-verify``, found on the server.

A commit-only run whose commit fails is a result like any other (one line, exit 1, the report),
never a bare exception; a 409 names ``--overwrite delete`` (facts 1.5).

Where the session is not committed (REST commit failed) the run fails without reading back; the
next run sends nothing and only commits. Where read-back itself fails, the run fails; the next
one sends nothing and only verifies.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from xnatio.errors import EXIT_INTERRUPTED, ServerError, XnatioError
from xnatio.journal import Journal, JournalRun, RunLock, Target
from xnatio.models import (
    DicomFile,
    FileOutcome,
    Manifest,
    Origin,
    Outcome,
    SessionKind,
    SessionRef,
    UploadResult,
    columns_rows,
    file_path,
    table_row,
)
from xnatio.report import ALREADY_REASON
from xnatio.transports.base import Transport

if TYPE_CHECKING:
    from xnatio.verify import VerifyReport

ReadBack = Callable[[Sequence[DicomFile]], "VerifyReport"]

log = logging.getLogger(__name__)


class _NoJournal:
    def on_confirmed(self, outcomes: Sequence[FileOutcome]) -> None:
        pass


class UploadInterrupted(XnatioError):
    """Ctrl-C or SIGTERM: the journal is consistent; the same command resumes."""

    exit_code = EXIT_INTERRUPTED


@dataclass(frozen=True, kw_only=True)
class ResumeOptions:
    journal: Path | None = None  # None: the default journal (see xnatio.journal)
    # None: the per-user lock folder (xnatio.journal.default_lock_dir), whatever the journal
    lock_dir: Path | None = None
    restart: bool = False  # forget what the journal remembers for this target and source
    wait: bool = False  # wait for another run on the same target instead of refusing
    verify: bool = True
    use_journal: bool = True  # False: no journal, no lock (dry runs, library users who opt out)


class RunLocks:
    """The run locks one upload holds (:class:`xnatio.journal.RunLock`), each taken once.

    :func:`xnatio.pipeline.upload` takes the lock of the target as given *before* discovery, so
    a second run on the same session is refused (or waits, ``wait``) at once, not after reading
    50,000 headers; :func:`resumable_upload` then holds the target as pre-flight resolved it (a
    project alias becomes its ID, facts 2) -- the same lock unless the labels differ, then a
    second one. Every run takes the given labels' lock before the resolved one, and a resolved
    target resolves to itself, so two runs never wait on each other in a cycle. No lock at all
    without the journal (``use_journal=False``). Released together, in reverse order.
    """

    def __init__(self, options: ResumeOptions, notify: Callable[[str], None] | None = None):
        self.options = options
        self.say = notify or (lambda msg: log.info("%s", msg))
        self._held: dict[str, RunLock] = {}

    def hold(self, target: Target) -> None:
        """Take ``target``'s lock unless it is held already: :class:`~xnatio.journal.LockedError`
        when another run holds it (or wait for it with ``options.wait``)."""
        if not self.options.use_journal or target.lock_key() in self._held:
            return
        lock = RunLock(target, self.options.lock_dir)
        lock.acquire(wait=self.options.wait, on_wait=self.say)
        self._held[target.lock_key()] = lock

    def release(self) -> None:
        while self._held:
            self._held.popitem()[1].release()

    def __enter__(self) -> RunLocks:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def resumable_upload(
    target: Target,
    manifest: Manifest,
    transport: Transport,
    *,
    options: ResumeOptions = ResumeOptions(),
    notify: Callable[[str], None] | None = None,
    locks: RunLocks | None = None,
) -> UploadResult:
    """Send what the journal has not seen confirmed and the server does not hold, commit,
    verify, all through ``transport``; see the module docstring. ``locks``: the run locks the
    caller holds already (and releases); ``target``'s is added to them if it is another one."""
    say = notify or (lambda msg: log.info("%s", msg))
    read_back = transport.read_back if options.verify and transport.can_read_back else None
    if not options.use_journal:
        result = transport.send(manifest, _NoJournal(), None)
        committed = _committed(result, transport)
        return _finish(result, manifest, None, read_back, say, committed=committed)
    own = locks is None
    held = RunLocks(options, say) if locks is None else locks
    journal: Journal | None = None
    try:
        held.hold(target)
        journal = Journal(options.journal)
        run = journal.open_run(target, manifest, restart=options.restart)
        done, todo = run.split()
        if done:
            say(
                f"resuming: {len(done)} of {len(manifest.files)} files were confirmed by an "
                f"earlier run; sending the other {len(todo)}"
            )
        try:
            # SIGTERM becomes KeyboardInterrupt only where the CLI installs that (a process-wide
            # change a library must not make): xnatio.cli.options.sigterm_as_interrupt.
            result, committed = _send_rest_of(run, manifest, done, todo, transport, say)
            run.record_fingerprint()
            return _finish(
                result,
                manifest,
                run,
                read_back,
                say,
                committed=committed,
                heal=lambda lost, overwrite: _heal(run, manifest, lost, transport, overwrite),
            )
        except KeyboardInterrupt:
            confirmed = len(run.split()[0])
            # The live display counted this run's files: say both when earlier runs sent some.
            earlier = f" ({confirmed - len(done)} in this run)" if done else ""
            raise UploadInterrupted(
                f"interrupted: {confirmed} of {len(manifest.files)} files are confirmed"
                f"{earlier}; run the same command again to send the rest"
            ) from None
    finally:
        if own:
            held.release()
        if journal is not None:
            journal.close()


def _heal(
    run: JournalRun,
    manifest: Manifest,
    lost: list[DicomFile],
    transport: Transport,
    overwrite: str = "append",
) -> tuple[UploadResult, bool]:
    """Send ``lost`` again, once, into the (existing) session; also says if it committed.
    ``overwrite="delete"`` where the server holds another copy that must be replaced (facts
    1.5: the archive step then overwrites clashing files instead of refusing them)."""
    part = Manifest(root=manifest.root, files=lost, source_archive=manifest.source_archive)
    result = transport.send(part, run, overwrite)
    run.record_outcomes(result.files, only_new=True)  # the hook has recorded most
    committed = _committed(result, transport)
    if committed:
        run.record_commit(result.session_uri)
    return result, committed


def _send_rest_of(
    run: JournalRun,
    manifest: Manifest,
    done: Sequence[DicomFile],
    todo: Sequence[DicomFile],
    transport: Transport,
    say: Callable[[str], None],
) -> tuple[UploadResult, bool]:
    """Send ``todo`` (or only commit); returns the result and whether the session is committed."""
    started = time.monotonic()
    already: list[FileOutcome] = []
    if todo:
        todo, already = _not_on_server(run, manifest, todo, transport, say)
    if not todo and already and not done:
        run.record_commit()  # the server holds every file: nothing of ours waits for a commit
    pending = ""  # a Direct-Archive session still not archived (facts 1.6)
    if not todo and transport.needs_commit and not run.committed:
        if _is_direct_archive(run.session_uri):
            say("every file was sent by an earlier run; waiting for XNAT to archive them")
        else:
            say("every file was sent by an earlier run; committing the session")
        try:
            ref = transport.commit(SessionRef.parse(run.session_uri))
        except ServerError as exc:
            if exc.status != 404:
                # Not a traceback nor a bare message: the files stay sent-not-committed, the
                # run fails with one line saying what to do (exit 1, a --report is written).
                return _commit_failed(run, manifest, done, already, exc, started), False
            # The prearchive session the earlier run filled is gone (deleted by someone, or
            # archived elsewhere): what the journal remembers is stale, so send it all again.
            say("the earlier run's prearchive session is gone; sending every file again")
            run.forget(done)
            done, todo = [], manifest.files
        else:
            if ref is not None and ref.kind is SessionKind.DIRECT_ARCHIVE:
                pending = ref.uri
            else:
                run.record_commit(ref.uri if ref is not None else "")
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
        result = transport.send(part, run, overwrite)
        # What the hook has not seen (it records each batch as the server confirms it).
        run.record_outcomes(result.files, only_new=True)
        committed = _committed(result, transport)
        if not committed and not any(o.outcome is Outcome.UPLOADED for o in result.files):
            # Nothing of this pass awaits a commit (every file of it failed): what earlier runs
            # sent is committed if the journal says so, and what the server held is archived.
            # Else "run again to retry the commit" would repeat with nothing to commit.
            committed = run.committed or not done
            result.session_uri = result.session_uri or run.session_uri
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


def commit_failure_line(exc: ServerError) -> str:
    """One line for a commit the server refused, naming what to change where a rerun alone
    cannot help: XNAT refuses a merge with a 409 whatever the number of tries (facts 1.5)."""
    why = exc.message.strip().rstrip(".") or f"HTTP {exc.status}"
    if exc.status == 409:
        return (
            f"the commit was refused: {why} (XNAT refuses to merge these files into the existing "
            "session, facts 1.5); run the same command with --overwrite delete to replace the "
            "server's copies, or upload under another session label"
        )
    return f"the commit failed: {why}"


def _commit_failed(
    run: JournalRun,
    manifest: Manifest,
    done: Sequence[DicomFile],
    already: list[FileOutcome],
    exc: ServerError,
    started: float,
) -> UploadResult:
    """The result of a commit-only run whose commit failed: every file sent, none archived."""
    result = UploadResult(
        success=False,
        total_files=len(manifest.files),
        duration=0.0,
        total_size_mb=manifest.total_bytes / 1e6,
    )
    result.session_uri = run.session_uri
    result.files.extend(already)
    result.files.extend(run.earlier_outcomes(done))
    result.errors.append(commit_failure_line(exc))
    result.duration = time.monotonic() - started
    return result


def _not_on_server(
    run: JournalRun,
    manifest: Manifest,
    todo: Sequence[DicomFile],
    transport: Transport,
    say: Callable[[str], None],
) -> tuple[Sequence[DicomFile], list[FileOutcome]]:
    """Split ``todo`` into what the server lacks and outcomes for what it holds already.

    Files that changed since an earlier run sent them are sent anyway (they replace the server's
    copy). What the server holds is recorded in the journal as confirmed, like a sent file.
    """
    changed = {file_path(f) for f in run.changed_since_sent(todo)}
    # Asked as they are when nothing changed (a first run): no record made per file on the way
    # to the first request (issue 16).
    there = transport.on_server(
        [f for f in todo if file_path(f) not in changed] if changed else todo
    )
    if not there:
        return todo, []
    held = {file_path(f) for f in there}
    outcomes = [
        FileOutcome(
            path=file_path(f),
            outcome=Outcome.UPLOADED,
            reason=ALREADY_REASON,
            sop_instance_uid=f.sop_instance_uid,
            series_uid=f.series_uid,
            size=f.size,
            origin=Origin.SERVER,
        )
        for f in there
    ]
    run.on_confirmed(outcomes)
    left = [f for f in todo if file_path(f) not in held]
    say(
        f"{len(there)} of {len(manifest.files)} files are already on the server: "
        + (f"sending only the other {len(left)}" if left else "nothing to send")
    )
    return left, outcomes


def _committed(result: UploadResult, transport: Transport) -> bool:
    """Did the transport's run end with the session committed (REST) or sent (C-STORE)?"""
    return bool(result.committed) if transport.needs_commit else True


def _is_direct_archive(uri: str) -> bool:
    ref = SessionRef.parse(uri)
    return ref is not None and ref.kind is SessionKind.DIRECT_ARCHIVE


def _finish(
    result: UploadResult,
    manifest: Manifest,
    run: JournalRun | None,
    read_back: ReadBack | None,
    say: Callable[[str], None],
    *,
    committed: bool,
    heal: Callable[[list[DicomFile], str], tuple[UploadResult, bool]] | None = None,
    resent: frozenset[str] = frozenset(),
) -> UploadResult:
    """Read back (if asked and the session was committed) and settle every file's outcome.

    ``heal``, when given, is tried once with the files read-back did not find at all (sent
    again with ``append``) and with those whose copy on the server differs although the server
    stores our bytes (sent again with ``delete``, replacing the copy, facts 1.5): it returns
    the outcomes of that pass and whether it committed; then the session is read back again (if
    it did not commit, that pass's failures stand). Files are re-sent at most once per run: a
    difference that stays is reported, with what to check, and remembered in the journal (the
    next run replaces it again rather than finding it "on the server" by name). Where the
    server rewrote every file (facts 1.7) bytes are not compared, so nothing loops.
    """
    sent = [o for o in result.files if o.outcome is Outcome.UPLOADED]
    if not committed and sent:
        if not any(
            e.startswith(("the commit failed", "the commit was refused")) for e in result.errors
        ):
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
            refused = isinstance(exc, ServerError) and exc.status in (401, 403)
            result.errors.append(
                f"could not read the session back to verify it ({exc}); "
                + (  # a refusal stays: name what to change, not "again" (issue 13)
                    "this account may not read it: ask for read access to the project, or "
                    "pass --no-verify"
                    if refused
                    else "run the same command again to verify"
                )
            )
            result.success = False
            return result
        # Confirmed (by the server, now or by an earlier run) yet not found: lost on the way.
        missing = report.missing
        different = [f for s in report.series for f in s.different]
        # The set of paths sent only when something is amiss (a string per file otherwise).
        uploaded = {o.path for o in sent} if missing or different else set()
        lost = [f for f in missing if file_path(f) in uploaded]
        # Not for Direct-Archive: a re-send into an existing archive folder would fall back to
        # the prearchive (section 1), a second copy rather than a repair.
        differ = [f for f in different if file_path(f) in uploaded]
        if heal is not None and (lost or differ) and not _is_direct_archive(result.session_uri):
            healed = False
            if lost:
                say(f"{len(lost)} confirmed file(s) are not on the server; sending them again")
                again, healed = heal(lost, "append")
                _merge(result, again)
            if differ:
                if run is not None:
                    run.mark_different(differ)  # remembered even if this run is killed now
                say(
                    f"the server's copy of {len(differ)} file(s) differs from the local file "
                    "(changed since it was sent?); sending them again, replacing it "
                    "(overwrite=delete)"
                )
                again, replaced = heal(differ, "delete")
                _merge(result, again)
                healed = healed or replaced
            if healed:
                # What the server confirmed in this pass: if read-back still misses it, the
                # server drops it (below), not the network.
                again_sent = frozenset(
                    o.path for o in result.files if o.outcome is Outcome.UPLOADED
                ) & {file_path(f) for f in [*lost, *differ]}
                return _finish(
                    result, manifest, run, read_back, say, committed=True, resent=again_sent
                )
        apply_verification(result, report)
        if run is not None:
            _remember_problems(result, report, run, resent)
            if report.ok and not result.failed:
                run.record_verified()
    result.success = committed and not result.failed and bool(result.uploaded or not manifest.files)
    return result


def _remember_problems(
    result: UploadResult, report: VerifyReport, run: JournalRun, resent: frozenset[str]
) -> None:
    """What the journal keeps of files that did not verify, and one line per cause: "the next
    run sends them again" only where that can help (never twice for one cause, issue 13)."""
    different = [f for s in report.series for f in s.different]
    # By name: the checks' files may be views of the manifest, a new record at each read.
    names = {file_path(f) for f in different}
    others = [f for f, _ in report.problems if file_path(f) not in names]
    if different:
        # Replaced in this run already, or marked by an earlier run (so this run replaced it):
        # sending it once more would not help.
        before = run.different_before
        run.mark_different(different)  # replaced by the next run, not found "there" by name
        again = [f for f in different if file_path(f) in resent or f.sop_instance_uid in before]
        if again:
            result.errors.append(
                f"the server's copy of {len(again)} file(s) still differs from the local file "
                "after they were sent again replacing it: the server changes them on receipt "
                "(a project anonymization script) or stores them damaged; check its copies"
            )
        if len(again) < len(different):
            result.errors.append(
                f"the next run of the same command replaces the server's copy of "
                f"{len(different) - len(again)} file(s) (overwrite=delete, facts 1.5)"
            )
    if others:
        run.forget(others)
        runs = run.record_lost(others)
        # Sent and confirmed twice in this run, or lost in an earlier run too: the server drops
        # them; saying "the next run sends them again" once more would promise what cannot be.
        dropped = [
            f for f in others if file_path(f) in resent or runs.get(f.sop_instance_uid, 0) >= 2
        ]
        if dropped:
            result.errors.append(
                f"{len(dropped)} file(s) were sent again and are still not on the server: XNAT "
                "drops them (a series import filter, or an anonymization script's 'reject', "
                "facts 1.3) or something removes them; check the project's DICOM settings, "
                "sending again will not help"
            )
        if len(dropped) < len(others):
            result.errors.append(
                f"the next run of the same command sends these {len(others) - len(dropped)} "
                "file(s) again"
            )


def _merge(result: UploadResult, again: UploadResult) -> None:
    """Replace the outcomes of re-sent files with those of the pass that re-sent them."""
    newer = {o.path: o for o in again.files if o.outcome is not Outcome.SKIPPED}
    result.files = [newer.pop(o.path, o) for o in result.files] + list(newer.values())
    result.errors.extend(again.errors)
    result.batches_total += again.batches_total
    result.batches_failed += again.batches_failed
    result.duration += again.duration
    if again.committed and again.session_uri:
        result.session_uri = again.session_uri


class _Verdicts:
    """Read-back's (outcome, reason) per file, found by an outcome: by the row of the manifest's
    columns where both were made from them (4 bytes a file, issue 16 item 4: a dict of 100,000
    paths held ~15 MB at the peak), else by path (built only if an outcome asks: those of an
    earlier run or already on the server, a re-sent file's)."""

    def __init__(self, report: VerifyReport) -> None:
        self._report = report
        self._kinds: list[tuple[Outcome, str]] = []
        kind: dict[tuple[Outcome, str], int] = {}
        self._rows: dict[int, array[int]] = {}  # id(columns) -> kind per row (-1: none)
        self._tables: list[object] = []  # the columns, alive while their ids are keys
        self._by_path: dict[str, int] | None = None
        loose: dict[str, int] = {}
        for f, outcome, reason in report.verdict_files():
            k = kind.setdefault((outcome, reason), len(kind))
            if k == len(self._kinds):
                self._kinds.append((outcome, reason))
            at = table_row(f)
            if at is None:
                loose[file_path(f)] = k  # a later verdict of a file overrides an earlier one
                continue
            table, row = at
            rows = self._rows.get(id(table))
            if rows is None:
                rows = self._rows[id(table)] = array("i", [-1]) * columns_rows(table)
                self._tables.append(table)
            rows[row] = k
        self._loose = loose

    def of(self, o: FileOutcome) -> tuple[Outcome, str] | None:
        at = table_row(o)
        if at is not None:
            rows = self._rows.get(id(at[0]))
            if rows is not None and rows[at[1]] >= 0:
                return self._kinds[rows[at[1]]]
        if not self._rows:
            k = self._loose.get(o.path)
            return None if k is None else self._kinds[k]
        if self._by_path is None:  # every verdict by path, in the report's order
            kinds = {pair: k for k, pair in enumerate(self._kinds)}
            self._by_path = {
                file_path(f): kinds[(outcome, reason)]
                for f, outcome, reason in self._report.verdict_files()
            }
        k = self._by_path.get(o.path)
        return None if k is None else self._kinds[k]


def apply_verification(result: UploadResult, report: VerifyReport) -> None:
    """VERIFIED for what read-back found; FAILED (with why) for what it did not."""
    # (outcome, reason) per file, the pairs shared: no new FileOutcome per file at 50,000 files.
    verdicts = _Verdicts(report)
    for o in result.files:
        if o.outcome is not Outcome.UPLOADED:
            continue  # a failed file keeps the transport's reason; skipped stays skipped
        found = verdicts.of(o)
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
    for note in (report.extra_note, report.rewritten_note):
        if note and note not in result.notes:
            result.notes.append(note)
    if not report.ok:
        problems = report.problems
        result.errors.append(
            f"verification: {len(problems)} file(s) missing or different on the server"
        )
        if report.note:
            result.errors.append(f"verification: {report.note}")
        result.errors.extend(f"{f.path}: {why}" for f, why in problems[:20])
