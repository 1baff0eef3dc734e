"""Many studies, each one call of the upload pipeline, under one cap on requests in flight:

    plan rows -my_studies-> (shard filter) -decide-> the ledger says run / skip / wait
      -run-> pipeline.upload(manifest=study files) -> ledger: verified | failed | quarantined

:func:`upload_many` is the library entry point (``xio upload-many`` and ``--watch`` call it, and
so can an Airflow or Prefect task for one study). It is a loop over :func:`xnatio.pipeline.upload`,
never a second pipeline: each study keeps its own resume journal, commit and read-back.

* **One cap on the server's load.** Every study's REST requests go through ONE
  :class:`~xnatio.xnat.client.XnatClient` whose connection pool holds ``max_requests``
  connections and *blocks* for a free one (``requests``' ``HTTPAdapter(pool_block=True)``), so
  however many studies and batch workers run, at most ``max_requests`` requests are in flight.
  Studies run ``parallel_studies`` at a time in a bounded pool (a slot is taken before submit).
* **Once and only once.** The ledger (:mod:`xnatio.many.ledger`) says which studies are
  verified; a rerun sends only new or unfinished ones. A verified study whose files changed
  (new instances arrived) is run again **into the session the ledger names** (its subject and
  session labels win over the plan's): XNAT merges new instances into an existing session
  (facts 1.5), and the pipeline first reads the session and sends only what it lacks.
* **Failures stay visible.** A failed study is retried by a later run after a backoff
  (:data:`~xnatio.defaults.MANY_RETRY_BACKOFF`, doubling per failed run); after
  ``max_attempts`` failed runs it is ``quarantined`` until ``retry_quarantined`` (or until its
  labels are edited in the plan). A server that cannot be reached, refused credentials or a
  configuration error stop the whole run instead (exit 4/3/2) and count against no study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xnatio import defaults
from xnatio.adaptive import AdaptiveLimit
from xnatio.coordinator import BoundedExecutor, ExecutorFactory
from xnatio.errors import (
    EXIT_FILES_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    AuthError,
    ConfigError,
    UnreachableError,
    UsageError,
    XnatioError,
)
from xnatio.journal import LockedError
from xnatio.many import ledger as states
from xnatio.many.ledger import Ledger, StudyRecord, study_key
from xnatio.many.plan import Plan, StudyPlan
from xnatio.many.shard import is_shard_spec, parse_shard, select
from xnatio.models import DicomFile, Manifest, Outcome, Phase, ProgressEvent, UploadResult
from xnatio.pipeline import UploadOptions, rest_client, upload
from xnatio.settings import Settings

if TYPE_CHECKING:
    from xnatio.many.group import Study
    from xnatio.xnat.client import XnatClient

log = logging.getLogger(__name__)

Clock = Callable[[], float]
SENT = (Outcome.UPLOADED, Outcome.VERIFIED)

# Plan statuses (xnatio.many.plan): only "ready" studies are sent.
READY, SETTLING, ERROR = "ready", "settling", "error"


class ManyInterrupted(XnatioError):
    """Ctrl-C (or a second SIGTERM): studies in flight were cancelled; rerun to go on."""

    exit_code = EXIT_INTERRUPTED


@dataclass(frozen=True, kw_only=True)
class StudyJob:
    """One row of the plan as the runner needs it: the labels and the study's files."""

    study_uid: str
    project: str
    subject: str
    session: str
    status: str = READY  # ready | settling | error (xnatio.many.plan)
    reason: str = ""
    # Usually one; a study spread over a folder and archives has one per source, all sent
    # under the same labels, which XNAT merges into one session (facts 1.5).
    manifests: tuple[Manifest, ...] = field(repr=False)
    patient_id: str = ""
    study_date: str = ""
    folders: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    settles_at: float = 0.0  # settling: when its newest file will be old enough (epoch seconds)

    @property
    def files(self) -> int:
        return sum(len(m.files) for m in self.manifests)

    @property
    def bytes(self) -> int:
        return sum(m.total_bytes for m in self.manifests)

    @property
    def all_files(self) -> list[DicomFile]:
        return [f for m in self.manifests for f in m.files]

    @property
    def series_count(self) -> int:
        """How many Series Instance UIDs its files hold: read from the tables' codes, with no
        record made per file (a dry run of a million files made a million; issue 16 item 4)."""
        uids: set[str] = set()
        for m in self.manifests:
            codes, values = m.files.code_column("series_uid")
            uids.update(values[code] for code in {codes[row] for row in m.files.rows()})
        return len(uids)


@dataclass(frozen=True, kw_only=True)
class ManyOptions:
    """How ``xio upload-many`` sends: the upload knobs of ``xio upload-dicom`` for each study,
    and the many-study ones. Defaults: :mod:`xnatio.defaults`.

    Memory and connections: at most ``parallel_studies`` studies are open at once, each with
    ``min(upload_workers, max_requests)`` batch workers, all sharing ``max_requests`` connections.
    """

    transport: str = "rest"
    num_batches: int | None = None
    upload_workers: int = defaults.UPLOAD_WORKERS
    archive_workers: int = defaults.ARCHIVE_WORKERS
    archive_format: str = defaults.ARCHIVE_FORMAT
    compress: str = defaults.COMPRESS
    timeout: float = defaults.REQUEST_TIMEOUT
    overwrite: str = defaults.OVERWRITE
    direct_archive: bool = False
    archive_wait: float = defaults.ARCHIVE_WAIT
    retries: int = defaults.RETRIES
    retry_budget: float = defaults.RETRY_BUDGET
    verify: bool = True
    journal: Path | None = None
    parallel_studies: int = defaults.MANY_PARALLEL_STUDIES
    max_requests: int = defaults.MANY_MAX_REQUESTS
    max_attempts: int = defaults.MANY_MAX_ATTEMPTS
    retry_quarantined: bool = False
    retry_backoff: float = defaults.MANY_RETRY_BACKOFF
    after: str = defaults.MANY_AFTER  # keep | delete | move
    after_dir: Path | None = None  # the DIR of move:DIR
    # "I/N", "auto", "auto/N": this run's shard (xnatio.many.shard, my_studies()); any other
    # text only names the run lock (one study per task: shard=study_uid).
    shard: str = "all"
    # Adapt the requests in flight to the server below max_requests (xnatio.adaptive: additive
    # increase while answers are fast and clean, halved on 429/503/timeouts/rising latency).
    adaptive: bool = False

    def check(self) -> None:
        if self.after not in ("keep", "delete", "move"):
            raise UsageError(f"--after must be keep, delete or move:DIR, not {self.after!r}")
        if self.after == "move" and self.after_dir is None:
            raise UsageError("--after move needs a folder: --after move:DIR")
        if self.after != "keep" and not (self.verify and self.transport == "rest"):
            raise UsageError(
                "--after delete/move acts only on studies read back from the server; it needs "
                "--verify and --transport rest (C-STORE sessions are read back later)"
            )
        if self.parallel_studies < 1 or self.max_requests < 1 or self.max_attempts < 1:
            raise UsageError("--parallel-studies, --max-requests and --max-attempts must be >= 1")

    def _batches(self) -> int | None:
        if self.transport == "rest":
            return self.num_batches  # requests wait for the shared pool: the cap holds anyway
        # C-STORE opens one association per batch, outside the REST pool: share the cap out.
        share = max(1, self.max_requests // self.parallel_studies)
        return min(self.num_batches or defaults.BATCHES[self.transport], share)

    def upload_options(
        self, job: StudyJob, manifest: Manifest, subject: str, session: str
    ) -> UploadOptions:
        return UploadOptions(
            project=job.project,
            subject=subject,
            session=session,
            path=manifest.source_archive or manifest.root,
            transport=self.transport,
            num_batches=self._batches(),
            upload_workers=min(self.upload_workers, self.max_requests),
            archive_workers=self.archive_workers,
            archive_format=self.archive_format,
            compress=self.compress,
            timeout=self.timeout,
            overwrite=self.overwrite,
            direct_archive=self.direct_archive,
            archive_wait=self.archive_wait,
            retries=self.retries,
            retry_budget=self.retry_budget,
            verify=self.verify,
            journal=self.journal,
        )


# -- events: what a display, a log or a JSON stream subscribes to ---------------------------------

PLANNED, STARTED, PROGRESS, VERIFIED, FAILED, QUARANTINED, WAITING, SKIPPED = (
    "planned",
    "started",
    "progress",
    "verified",
    "failed",
    "quarantined",
    "waiting",
    "skipped",
)


@dataclass(frozen=True, kw_only=True)
class ManyEvent:
    """One thing that happened to one study. ``record`` is a copy of its ledger record."""

    kind: str
    record: StudyRecord
    message: str = ""
    files_done: int = 0
    bytes_done: int = 0
    files_total: int = 0
    bytes_total: int = 0


Events = Callable[[ManyEvent], None]


@dataclass(kw_only=True)
class StudyOutcome:
    """How one study of the plan ended in this run."""

    record: StudyRecord
    sent_files: int = 0  # put on the wire by this run
    ran: bool = False  # this run called the pipeline for it

    @property
    def state(self) -> str:
        return self.record.state


@dataclass(kw_only=True)
class ManyResult:
    """What :func:`upload_many` returns: one outcome per study of the plan (this shard's)."""

    studies: list[StudyOutcome] = field(default_factory=list)
    duration: float = 0.0
    interrupted: bool = False  # drained on SIGTERM: studies left for the next run

    def count(self, state: str) -> int:
        return sum(1 for s in self.studies if s.state == state)

    @property
    def ran(self) -> int:
        return sum(1 for s in self.studies if s.ran)

    @property
    def sent_files(self) -> int:
        return sum(s.sent_files for s in self.studies)

    @property
    def ok(self) -> bool:
        """Every study verified or deliberately waiting (still being written, labels to fix,
        a failed study's backoff not over counts as failed)."""
        return all(s.state in (states.VERIFIED, states.WAITING) for s in self.studies)

    @property
    def exit_code(self) -> int:
        if self.interrupted and any(s.state == states.PLANNED for s in self.studies):
            return EXIT_INTERRUPTED
        return EXIT_OK if self.ok else EXIT_FILES_FAILED

    def totals(self) -> dict[str, int]:
        out = {state: self.count(state) for state in states.STATES}
        out.update(
            studies=len(self.studies),
            ran=self.ran,
            files_sent=self.sent_files,
            bytes=sum(s.record.bytes for s in self.studies if s.ran),
        )
        return out


# -- which studies, and what to do with each ------------------------------------------------------


def my_studies(jobs: Sequence[StudyJob], options: ManyOptions) -> list[StudyJob]:
    """The studies this run is responsible for: every one of the plan (sharding filters here).

    One writer per ledger file rests on this: a study belongs to exactly one run. With
    ``--shard I/N`` (resolved by :class:`ManyRun` from ``auto``), the shard's studies: decided by
    StudyInstanceUID alone (:mod:`xnatio.many.shard`), so every node agrees (issue 15).
    """
    if not is_shard_spec(options.shard):  # "all", or a run's own lock name
        return list(jobs)
    return select(jobs, parse_shard(options.shard, {}))


def files_fingerprint(files: Sequence[DicomFile]) -> str:
    """Changes when a file is added, removed or rewritten (its size or mtime change)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.sop_instance_uid):
        h.update(f"{f.sop_instance_uid}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Decision:
    run: bool
    state: str  # the record's state when not run
    reason: str = ""


def decide(job: StudyJob, record: StudyRecord, options: ManyOptions, now: float) -> Decision:
    """Run this study now, or leave it (and why)? Pure: the ledger record is the memory."""
    if job.status != READY:
        return Decision(False, states.WAITING, job.reason or job.status)
    if record.state == states.VERIFIED:
        if record.fingerprint == files_fingerprint(job.all_files):
            return Decision(False, states.VERIFIED, "already verified; nothing new")
        return Decision(True, states.PLANNED, "new or changed files since it was verified")
    if record.state == states.QUARANTINED:
        if options.retry_quarantined:
            return Decision(True, states.PLANNED, "quarantined; retried (--retry-quarantined)")
        return Decision(False, states.QUARANTINED, record.last_error)
    if record.state == states.FAILED and record.next_attempt > now:
        when = time.strftime("%H:%M:%S", time.localtime(record.next_attempt))
        return Decision(False, states.FAILED, f"{record.last_error} (next try after {when})")
    return Decision(True, states.PLANNED, "")


def _labels_for(job: StudyJob, record: StudyRecord | None) -> tuple[str, str, str]:
    """(subject, session, note): the ledger's labels once a session exists on the server, so
    new files go to the same session, never a second one (facts 1.5); else the plan's."""
    if record is not None and record.session_uri and record.session:
        if (record.subject, record.session) != (job.subject, job.session):
            note = (
                f"the plan now says {job.subject}/{job.session}, but this study is already in "
                f"{record.subject}/{record.session}: new files go there"
            )
            return record.subject, record.session, note
        return record.subject, record.session, ""
    return job.subject, job.session, ""


def backoff(attempts: int, base: float) -> float:
    """Seconds before failed run number ``attempts`` (1, 2, ...) is tried again."""
    return float(min(base * 2 ** max(0, attempts - 1), defaults.MANY_RETRY_BACKOFF_MAX))


# -- the run ---------------------------------------------------------------------------------------


class ManyRun:
    """One process's runs over a state folder: the ledger, the run lock and the shared client.

    :func:`upload_many` opens one for a single pass; ``--watch`` keeps one open across passes
    (the lock is held and the client logged in for the whole watch).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        options: ManyOptions,
        state_dir: Path | None = None,
        events: Events | None = None,
        cancel: threading.Event | None = None,
        executor: ExecutorFactory | None = None,
        clock: Clock = time.time,
        client: XnatClient | None = None,
    ) -> None:
        options.check()
        if is_shard_spec(options.shard):  # `auto` reads the scheduler's index once; names the lock
            options = dataclasses.replace(
                options, shard=str(parse_shard(options.shard, os.environ))
            )
        self.settings = settings
        self.options = options
        self.ledger = Ledger(state_dir, clock=clock)
        self.events = events or (lambda e: None)
        self.cancel = cancel or threading.Event()
        self.drain = threading.Event()  # set on SIGTERM: start no new study
        self.executor = executor
        self.clock = clock
        self._client = client
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> ManyRun:
        self.ledger.ensure()
        self.ledger.clean_temp_files()
        self._stack.enter_context(self.ledger.run_lock(self.options.shard).held())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def client(self) -> XnatClient | None:
        """The one REST client every study shares: its pool is the cap on requests in flight."""
        if self.options.transport != "rest":
            return None  # C-STORE: each study opens its own associations (num_batches of them)
        if self._client is None:
            base = UploadOptions(
                project="",
                subject="",
                session="",
                path=Path("."),
                timeout=self.options.timeout,
                upload_workers=self.options.max_requests,
                retries=self.options.retries,
                retry_budget=self.options.retry_budget,
            )
            self._client = self._stack.enter_context(rest_client(base, self.settings))
            if self.options.adaptive:  # AIMD below the pool's cap (xnatio.adaptive, issue 15)
                self._client.limiter = AdaptiveLimit(cap=self.options.max_requests)
        return self._client

    # -- one pass over a plan ---------------------------------------------------------------

    def run(self, jobs: Sequence[StudyJob]) -> ManyResult:
        started = time.monotonic()
        result = ManyResult()
        mine = my_studies(jobs, self.options)
        todo: list[tuple[StudyJob, StudyRecord, Decision]] = []
        now = self.clock()
        for job in mine:
            record = self._record_of(job)
            decision = decide(job, record, self.options, now)
            outcome = StudyOutcome(record=record)
            result.studies.append(outcome)
            if decision.run:
                if record.state == states.QUARANTINED:
                    record.attempts = 0
                record.state, record.reason = states.PLANNED, decision.reason
                self.ledger.put(record)
                self._emit(PLANNED, record, decision.reason)
                todo.append((job, record, decision))
            else:
                kind = WAITING if decision.state == states.WAITING else SKIPPED
                if decision.state == states.WAITING:
                    record.state, record.reason = states.WAITING, decision.reason
                    if record.verified_at:  # verified before; new files still being written
                        record.reason = f"{decision.reason} (earlier files verified)"
                    self.ledger.put(record)
                self._emit(kind, record, decision.reason)
        outcomes = {id(o.record): o for o in result.studies}
        if todo:
            client = self.client()
            self._send_all(todo, client, outcomes, result)
        result.duration = time.monotonic() - started
        return result

    def _record_of(self, job: StudyJob) -> StudyRecord:
        server = self._server()
        key = study_key(server, job.project, job.study_uid)
        record = self.ledger.get(key)
        now = self.clock()
        if record is None:
            record = StudyRecord(
                key=key,
                server=server,
                study_uid=job.study_uid,
                project=job.project,
                subject=job.subject,
                session=job.session,
                first_seen=now,
            )
        elif (
            record.state != states.VERIFIED
            and not record.session_uri
            and (record.subject, record.session) != (job.subject, job.session)
        ):
            # Nothing of it archived yet: labels edited in the plan win.
            record.subject, record.session = job.subject, job.session
            if record.state == states.QUARANTINED:
                record.state = states.FAILED  # an edited plan lifts the quarantine
                record.attempts, record.next_attempt = 0, 0.0
        record.patient_id, record.study_date = job.patient_id, job.study_date
        record.files, record.bytes = job.files, job.bytes
        record.folders = list(job.folders)
        record.host, record.shard = self.ledger.host, self.options.shard
        return record

    def _server(self) -> str:
        if self.options.transport == "rest":
            return self.settings.server or ""
        return f"dicom://{self.settings.dicom_host}:{self.settings.dicom_port}"

    def _send_all(
        self,
        todo: list[tuple[StudyJob, StudyRecord, Decision]],
        client: XnatClient | None,
        outcomes: dict[int, StudyOutcome],
        result: ManyResult,
    ) -> None:
        fatal: list[BaseException] = []
        pool = BoundedExecutor(self.options.parallel_studies, self.executor)
        futures: list[Future[None]] = []
        try:
            for job, record, _ in todo:
                if self.cancel.is_set() or self.drain.is_set() or fatal:
                    break
                outcome = outcomes[id(record)]
                futures.append(pool.submit(self._run_study, job, record, outcome, client, fatal))
            for fut in futures:
                fut.result()
        except KeyboardInterrupt:
            self.cancel.set()
            pool.shutdown(cancel_futures=True)
            raise ManyInterrupted(
                "interrupted: studies in flight were stopped; run the same command again to "
                "send what is left (nothing is sent twice)"
            ) from None
        finally:
            pool.shutdown()
        if fatal:
            raise fatal[0]
        if self.drain.is_set() and len(futures) < len(todo):
            result.interrupted = True

    def _run_study(
        self,
        job: StudyJob,
        record: StudyRecord,
        outcome: StudyOutcome,
        client: XnatClient | None,
        fatal: list[BaseException],
    ) -> None:
        if self.cancel.is_set() or fatal:
            return
        subject, session, note = _labels_for(job, record)
        record.subject, record.session = subject, session
        record.state, record.started, record.last_error = states.SENDING, self.clock(), ""
        record.reason = note
        self.ledger.put(record)
        self._emit(STARTED, record, note, files_total=job.files, bytes_total=job.bytes)
        outcome.ran = True
        try:
            results = [
                upload(
                    settings=self.settings,
                    options=self.options.upload_options(job, manifest, subject, session),
                    manifest=manifest,
                    progress=self._progress_of(record, job),
                    notify=lambda msg: log.info("%s: %s", session, msg),
                    client=client,
                    cancel=self.cancel,
                    executor=self.executor,
                )
                for manifest in job.manifests
            ]
        except (AuthError, UnreachableError, ConfigError) as exc:
            # Not this study's fault: stop the run, count nothing against the study.
            self._put_back(record, f"not sent: {exc}")
            fatal.append(exc)
            self.cancel.set()
            return
        except LockedError as exc:
            self._put_back(record, str(exc))  # another run sends it right now
            return
        except XnatioError as exc:
            if self.cancel.is_set():
                self._put_back(record, "interrupted")
                return
            self._failed(record, str(exc))
            return
        except KeyboardInterrupt:
            self._put_back(record, "interrupted")
            raise
        outcome.sent_files = sum(
            1 for res in results for o in res.files if o.sent_now and o.outcome in SENT
        )
        self._settle(job, record, results)

    def _put_back(self, record: StudyRecord, why: str) -> None:
        record.state = states.FAILED if record.attempts else states.PLANNED
        record.reason = why
        self.ledger.put(record)

    def _failed(self, record: StudyRecord, why: str) -> None:
        record.attempts += 1
        record.last_error = why
        record.finished = self.clock()
        if record.attempts >= self.options.max_attempts:
            record.state = states.QUARANTINED
            record.reason = (
                f"quarantined after {record.attempts} failed runs; fix the cause, then "
                "`xio upload-many ... --retry-quarantined`"
            )
            self.ledger.put(record)
            self._emit(QUARANTINED, record, why)
        else:
            record.state = states.FAILED
            record.next_attempt = record.finished + backoff(
                record.attempts, self.options.retry_backoff
            )
            record.reason = f"failed run {record.attempts} of {self.options.max_attempts}"
            self.ledger.put(record)
            self._emit(FAILED, record, why)

    def _settle(self, job: StudyJob, record: StudyRecord, results: list[UploadResult]) -> None:
        for res in results:
            record.session_uri = res.session_uri or record.session_uri
        failed = [res for res in results if not res.success]
        if self.cancel.is_set() and failed:
            self._put_back(record, "interrupted")
            return
        if failed:
            res = failed[0]
            why = "; ".join(res.errors[:3]) or f"{len(res.failed)} file(s) failed"
            self._failed(record, why)
            return
        record.state = states.VERIFIED
        record.attempts, record.next_attempt, record.last_error = 0, 0.0, ""
        record.finished = record.verified_at = self.clock()
        record.fingerprint = files_fingerprint(job.all_files)
        record.reason = "verified" if self.options.verify else "sent and committed (not verified)"
        try:
            record.reason += after_verified(job, self.options, record)
        except OSError as exc:
            record.reason += f"; --after {self.options.after} failed: {exc}"
        self.ledger.put(record)
        self._emit(VERIFIED, record, record.reason, files_total=job.files, bytes_total=job.bytes)

    def _progress_of(self, record: StudyRecord, job: StudyJob) -> Callable[[ProgressEvent], None]:
        def progress(event: ProgressEvent) -> None:
            if event.phase is Phase.UPLOAD:
                self._emit(
                    PROGRESS,
                    record,
                    files_done=event.current,
                    bytes_done=event.bytes_done,
                    files_total=event.total,
                    bytes_total=event.bytes_total,
                )

        return progress

    def _emit(self, kind: str, record: StudyRecord, message: str = "", **amounts: int) -> None:
        self.events(
            ManyEvent(kind=kind, record=dataclasses.replace(record), message=message, **amounts)
        )


def after_verified(job: StudyJob, options: ManyOptions, record: StudyRecord) -> str:
    """``--after delete|move:DIR`` for a study the server holds and read-back found: its source
    files (never members of an archive, which stay) are removed or moved under
    DIR/PROJECT/SUBJECT/SESSION/ (their path below the study's root kept). Returns a note."""
    if options.after == "keep":
        return ""
    for manifest in job.manifests:
        if manifest.source_archive is None:
            _after_files(manifest, options, record)
    verb = "deleted" if options.after == "delete" else f"moved to {options.after_dir}"
    return f"; source files {verb}"


def _after_files(manifest: Manifest, options: ManyOptions, record: StudyRecord) -> None:
    files, root = manifest.files, manifest.root
    for f in files:
        if options.after == "delete":
            with contextlib.suppress(FileNotFoundError):
                f.path.unlink()
        else:
            assert options.after_dir is not None
            rel = _relative(f.path, root)
            dest = options.after_dir / record.project / record.subject / record.session / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f.path), dest)
    _prune_empty_dirs({f.path.parent for f in files}, root)


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


def _prune_empty_dirs(dirs: set[Path], root: Path) -> None:
    """Remove folders the study emptied, up to (not including) its root."""
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        while d != root and root in d.parents:
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent


def upload_many(
    *,
    settings: Settings,
    plan: Plan | Sequence[StudyJob],
    options: ManyOptions | None = None,
    state_dir: Path | None = None,
    events: Events | None = None,
    cancel: threading.Event | None = None,
    executor: ExecutorFactory | None = None,
    clock: Clock = time.time,
    client: XnatClient | None = None,
) -> ManyResult:
    """Send every study of ``plan`` that the ledger in ``state_dir`` does not hold verified.

    ``plan``: a :class:`xnatio.many.plan.Plan` (``build_plan`` or ``read_plan``) or a sequence
    of :class:`StudyJob`. ``events`` receives a :class:`ManyEvent` per study event, from worker
    threads. ``cancel``: setting it stops the studies in flight. ``executor(workers)`` makes the
    pools (studies, and each study's batches): ``xnatio.coordinator.SerialExecutor`` replays a
    run serially. ``clock``: wall-clock time for the ledger and the retry backoff. ``client``:
    an open :class:`~xnatio.xnat.client.XnatClient` to share (its pool size is then the cap).

    Raises :class:`~xnatio.errors.XnatioError` subclasses for what stops the whole run (another
    run holds the lock, credentials, an unreachable server, configuration); per-study failures
    are in the result and the ledger.
    """
    jobs = jobs_of(plan)
    with ManyRun(
        settings=settings,
        options=options or ManyOptions(),
        state_dir=state_dir,
        events=events,
        cancel=cancel,
        executor=executor,
        clock=clock,
        client=client,
    ) as run:
        return run.run(jobs)


def jobs_of(plan: Plan | Sequence[StudyJob], *, settle: float = 0.0) -> list[StudyJob]:
    """The runner's view of a plan: :class:`xnatio.many.plan.Plan` rows with their studies'
    files (``Study.manifests()``), or StudyJobs as they are. ``settle``: the plan's settle time,
    to say when a settling study will be ready."""
    if not isinstance(plan, Plan):
        return list(plan)
    return [_job_of_row(row, plan.study(row), settle) for row in plan.rows]


def _job_of_row(row: StudyPlan, study: Study | None, settle: float) -> StudyJob:
    status = row.status.value
    manifests = tuple(study.manifests()) if study is not None else ()
    reason = row.reason
    if status == READY and not manifests:
        status, reason = ERROR, reason or "no files of this study were found"
    return StudyJob(
        study_uid=row.study_uid,
        project=row.project,
        subject=row.subject,
        session=row.session,
        status=status,
        reason=reason,
        manifests=manifests,
        patient_id=row.patient_id,
        study_date=row.study_date,
        folders=tuple(str(f) for f in row.folders),
        warnings=tuple(row.warnings),
        settles_at=row.newest_mtime + settle if status == SETTLING else 0.0,
    )


__all__ = [
    "ManyEvent",
    "ManyOptions",
    "ManyResult",
    "ManyRun",
    "StudyJob",
    "StudyOutcome",
    "decide",
    "my_studies",
    "upload_many",
]
