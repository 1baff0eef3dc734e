"""`xio upload-many`: every study under ROOT(s), each into its own session, once.

Options → Settings → :func:`xnatio.many.group.find_studies` → :func:`xnatio.many.plan.build_plan`
(or ``read_plan`` of a reviewed PLAN.csv) → :func:`xnatio.many.runner.upload_many` (or, with
``--watch``, :func:`xnatio.many.watch.watch`) → live display / timestamped lines / JSON lines →
summary table. The upload knobs are ``xio upload-dicom``'s own options, reused (not copied).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import click
from click.core import ParameterSource

from xnatio import defaults
from xnatio.cli.options import (
    DicomArgs,
    OutputArgs,
    SectionedCommand,
    ServerArgs,
    dicom_options,
    exit_codes_epilog,
    output_options,
    resolve_cli_settings,
    server_options,
    start_command,
)
from xnatio.cli.status import state_dir_option, when
from xnatio.cli.upload import json_errors, upload_dicom
from xnatio.errors import UsageError
from xnatio.many import ledger as states
from xnatio.many.ledger import default_state_dir
from xnatio.many.plan import Plan, format_duration
from xnatio.many.runner import (
    PROGRESS,
    ManyEvent,
    ManyOptions,
    ManyResult,
    ManyRun,
    StudyJob,
    jobs_of,
)
from xnatio.many.shard import is_shard_spec, parse_shard, select
from xnatio.many.templates import TEMPLATE_HELP
from xnatio.models import Phase, ProgressCallback, ProgressEvent
from xnatio.progress import LogDisplay
from xnatio.settings import Settings

# `xio upload-dicom`'s options that mean the same for each study of upload-many.
REUSED = (
    "transport",
    "num_batches",
    "upload_workers",
    "archive_workers",
    "archive_format",
    "compress",
    "timeout",
    "overwrite",
    "direct_archive",
    "archive_wait",
    "retries",
    "retry_budget",
    "verify",
    "journal_path",
    "log_interval",
)


def reused_options(f: Any) -> Any:
    """Put ``xio upload-dicom``'s own Option objects on this command (same flags, same help)."""
    by_name = {p.name: p for p in upload_dicom.params}
    for name in reversed(REUSED):
        f = _attach(f, by_name[name])
    return f


def _attach(f: Any, param: click.Parameter) -> Any:
    click.decorators._param_memo(f, param)
    return f


def _wrapped(text: str, width: int = 96) -> str:
    return "\n".join(textwrap.wrap(text, width)) + "\n"


def _after(value: str) -> tuple[str, Path | None]:
    if value in ("keep", "delete"):
        return value, None
    if value.startswith("move:") and len(value) > len("move:"):
        return "move", Path(value[len("move:") :]).expanduser()
    raise click.BadParameter("use keep, delete or move:DIR", param_hint="--after")


EXAMPLES = """
\b
Examples:
  xio upload-many /data/outbox --project MYPROJ --dry-run
  xio upload-many /data/outbox --project MYPROJ --plan-out plan.csv   # review, edit, then:
  xio upload-many plan.csv
  xio upload-many /data/outbox --project MYPROJ --settle 15m --after move:/data/sent
  xio upload-many /data/outbox --project MYPROJ --watch --interval 60
  xio status
"""

BRIEF_EXAMPLES = """
\b
Examples (the label templates: --help-all):
  xio upload-many /data/outbox --project MYPROJ --dry-run
  xio upload-many /data/outbox --project MYPROJ --settle 15m --after move:/data/sent
  xio status
"""

# --help-all lists the options under these headings; --help only the COMMON ones.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Studies and labels",
        ("project", "subject", "session", "settle", "dry_run", "plan_out"),
    ),
    (
        "State, retries and scheduling",
        (
            "state_dir",
            "max_attempts",
            "retry_quarantined",
            "after",
            "watch",
            "interval",
            "shard",
        ),
    ),
    ("Load on the server", ("parallel_studies", "max_requests")),
    ("Each study's upload (as xio upload-dicom)", REUSED[:-1]),
    (
        "Server and credentials",
        ("server", "user", "password", "verify_tls", "ca_bundle", "profile", "env_file"),
    ),
    (
        "DICOM C-STORE (--transport dicom-store)",
        ("dicom_host", "dicom_port", "dicom_called_aet", "dicom_calling_aet"),
    ),
    ("Output", ("json_output", "quiet", "verbose", "log_interval", "help", "help_all")),
)
COMMON = frozenset(
    {
        "project",
        "subject",
        "session",
        "settle",
        "dry_run",
        "state_dir",
        "after",
        "watch",
        "parallel_studies",
        "server",
        "user",
        "password",
        "profile",
        "json_output",
        "quiet",
        "verbose",
        "help",
        "help_all",
    }
)


@click.command(
    "upload-many",
    cls=SectionedCommand,
    sections=SECTIONS,
    common=COMMON,
    brief_paragraphs=1,
    brief_epilog=BRIEF_EXAMPLES + exit_codes_epilog(),
    epilog=EXAMPLES + "\n\b\n" + _wrapped(TEMPLATE_HELP) + exit_codes_epilog(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)
@click.argument("roots", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--project",
    metavar="TEMPLATE",
    help="XNAT project of every session; a label template too (e.g. a site that routes by "
    "{StudyDescription~^(\\w+)}). Required unless a PLAN file is given.",
)
@click.option(
    "--subject",
    metavar="TEMPLATE",
    default=defaults.MANY_SUBJECT_TEMPLATE,
    show_default=True,
    help="Subject label template (see Label templates at the end of --help-all).",
)
@click.option(
    "--session",
    metavar="TEMPLATE",
    default=defaults.MANY_SESSION_TEMPLATE,
    show_default=True,
    help="Session label template: patient, date and modality, so follow-ups and a same-day "
    "PET and MR get distinct sessions.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan and send nothing. One row per study: labels, patient, date, series, "
    "files, bytes, folders, warnings, and whether the server holds the session already (one "
    "listing per project).",
)
@click.option(
    "--plan-out",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the plan to FILE (CSV, or JSON lines for *.jsonl; 0600, it names patients). "
    "Edit it, then `xio upload-many FILE` runs it: labels changed in the file win.",
)
@click.option(
    "--settle",
    metavar="DURATION",
    default=format_duration(defaults.MANY_SETTLE),
    show_default=True,
    help="Leave a study whose files changed less than DURATION ago (90s, 10m, 1h) for the "
    "next run, so an export still being written is never sent half.",
)
@state_dir_option
@click.option(
    "--parallel-studies",
    type=click.IntRange(min=1),
    default=defaults.MANY_PARALLEL_STUDIES,
    show_default=True,
    help="Studies sent at the same time.",
)
@click.option(
    "--max-requests",
    type=click.IntRange(min=1),
    default=defaults.MANY_MAX_REQUESTS,
    show_default=True,
    help="The most REST requests in flight to the server at once, over all studies (one "
    "connection pool that blocks when full). Given explicitly, the run also adapts below N: "
    "one more request in flight while answers are fast and clean, half as many on 429, 503, "
    "timeouts or a rising latency, none before a Retry-After has passed.",
)
@click.option(
    "--shard",
    metavar="I/N|auto|auto/N",
    help="Send only the I-th of N disjoint parts of the plan (0-based), decided by "
    "StudyInstanceUID alone: the same on every node, and new studies never move old ones. "
    "auto: the index of a Slurm job array (SLURM_ARRAY_TASK_ID and its count), or of a "
    "Kubernetes Indexed Job (JOB_COMPLETION_INDEX, with N from auto/N). See "
    "docs/scale-out.md.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=defaults.MANY_MAX_ATTEMPTS,
    show_default=True,
    help="Failed runs after which a study is quarantined (left out until --retry-quarantined "
    "or its labels are edited in the plan). A failed study is retried by later runs after "
    f"a backoff ({format_duration(defaults.MANY_RETRY_BACKOFF)}, doubling per failed run).",
)
@click.option(
    "--retry-quarantined",
    is_flag=True,
    help="Try the quarantined studies again (their count of failed runs starts over).",
)
@click.option(
    "--after",
    default=defaults.MANY_AFTER,
    show_default=True,
    metavar="keep|delete|move:DIR",
    help="What to do with a study's source files once the server holds them and read-back "
    "found every one: keep them, delete them, or move them to DIR/PROJECT/SUBJECT/SESSION/. "
    "Files inside archives are always kept.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Keep running, and send each study once it has settled. The roots are rescanned "
    "every --interval seconds (sooner when the file system reports a change); a heartbeat line "
    "every interval. SIGTERM lets the studies in flight finish, then exits 0.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=1),
    default=defaults.MANY_WATCH_INTERVAL,
    show_default=True,
    metavar="SECONDS",
    help="With --watch: seconds between two rescans (the rescan is the truth; file system "
    "events only wake it early).",
)
@reused_options
@output_options
@server_options
@dicom_options
@click.pass_context
def upload_many_command(
    ctx: click.Context,
    /,
    *,
    roots: tuple[Path, ...],
    project: str | None,
    subject: str,
    session: str,
    dry_run: bool,
    plan_out: Path | None,
    settle: str,
    state_dir: Path | None,
    parallel_studies: int,
    max_requests: int,
    shard: str | None,
    max_attempts: int,
    retry_quarantined: bool,
    after: str,
    watch: bool,
    interval: float,
    output: OutputArgs,
    server: ServerArgs,
    dicom: DicomArgs,
    **knobs: Any,
) -> None:
    """Upload every DICOM study under ROOT... into XNAT, each into its own session, once.

    Files are found by content in every ROOT (folders or .zip/.tar archives) and grouped by
    StudyInstanceUID: a study spread over several folders is one session, a folder holding
    several studies is several sessions. Labels come from templates over each study's DICOM
    attributes (--subject, --session, and --project too) and are cleaned as XNAT cleans them.
    A single ROOT that is a .csv or .jsonl file is a plan written by --plan-out and reviewed.

    Each study is one upload as `xio upload-dicom` does it (pre-flight, resume journal, commit,
    read-back). The state folder (--state-dir) records every study; a rerun sends only new or
    unfinished studies, and new files of a study already archived go to the same session
    (XNAT merges them, facts 1.5). A study that fails is retried by later runs; after
    --max-attempts failed runs it is quarantined. `xio status` shows the state folder.

    Output: a live display on a terminal, timestamped lines otherwise (cron, logs), or with
    --json one JSON object per line per event (planned, started, verified, failed,
    quarantined, waiting, skipped) and a final summary; a summary table at the end. Exit 0 when
    every study ended verified or deliberately waiting, 1 when any failed.
    """
    start_command(ctx, output)
    after_action, after_dir = _after(after)
    opts = ManyOptions(
        transport=knobs["transport"],
        num_batches=knobs["num_batches"],
        upload_workers=knobs["upload_workers"],
        archive_workers=knobs["archive_workers"],
        archive_format=knobs["archive_format"],
        compress=knobs["compress"],
        timeout=knobs["timeout"],
        overwrite=knobs["overwrite"],
        direct_archive=knobs["direct_archive"],
        archive_wait=knobs["archive_wait"],
        retries=knobs["retries"],
        retry_budget=knobs["retry_budget"],
        verify=knobs["verify"],
        journal=knobs["journal_path"],
        parallel_studies=parallel_studies,
        max_requests=max_requests,
        adaptive=ctx.get_parameter_source("max_requests") is not ParameterSource.DEFAULT,
        # --shard auto is resolved here, before the tree is scanned: a bad one fails at once.
        shard=str(parse_shard(shard, os.environ)) if shard else "all",
        max_attempts=max_attempts,
        retry_quarantined=retry_quarantined,
        after=after_action,
        after_dir=after_dir,
    )
    request = PlanRequest(
        roots=roots, project=project, subject=subject, session=session, settle=settle
    )
    with json_errors(output):
        code = _upload_many(
            request,
            opts,
            server,
            dicom,
            output,
            state_dir,
            dry_run,
            plan_out,
            watch,
            interval,
            knobs["log_interval"],
        )
    ctx.exit(code)


class PlanRequest:
    """What the plan is made from: roots and templates, or one reviewed plan file."""

    def __init__(
        self,
        *,
        roots: tuple[Path, ...],
        project: str | None,
        subject: str | None,
        session: str | None,
        settle: str | None,
    ) -> None:
        self.roots, self.project, self.subject, self.session = roots, project, subject, session
        self.settle_text = settle
        self.plan_file = roots[0] if len(roots) == 1 and _is_plan_file(roots[0]) else None
        if self.plan_file is None:
            for root in roots:
                if not root.exists():
                    raise UsageError(f"{root} does not exist.")
            if not project:
                raise UsageError("--project is required (or give a PLAN.csv written by --plan-out)")
        self.settle = self._settle()

    def _settle(self) -> float:
        from xnatio.many.plan import parse_duration

        if self.settle_text is None:
            return float(defaults.MANY_SETTLE)
        return float(parse_duration(self.settle_text))

    def make(self, progress: ProgressCallback | None = None) -> Plan:
        """The plan, now: roots rescanned (or the plan file read and its files re-found)."""
        from xnatio.many.group import find_studies
        from xnatio.many.plan import build_plan, read_plan

        if self.plan_file is not None:
            return read_plan(self.plan_file, settle=self.settle, progress=progress)
        studies = find_studies(list(self.roots), progress=progress)
        return build_plan(
            studies,
            project=self.project or "",
            subject=self.subject or defaults.MANY_SUBJECT_TEMPLATE,
            session=self.session or defaults.MANY_SESSION_TEMPLATE,
            settle=self.settle,
            now=time.time(),
        )


def _is_plan_file(path: Path) -> bool:
    from xnatio.many.plan import is_plan_file

    return is_plan_file(path) and path.is_file()


def _upload_many(
    request: PlanRequest,
    opts: ManyOptions,
    server: ServerArgs,
    dicom: DicomArgs,
    output: OutputArgs,
    state_dir: Path | None,
    dry_run: bool,
    plan_out: Path | None,
    watch: bool,
    interval: float,
    log_interval: float = defaults.LOG_INTERVAL,
) -> int:
    opts.check()
    settings = resolve_cli_settings(server, dicom, output=output)
    if not dry_run and opts.transport == "rest":
        settings.require_server()
        settings.require_credentials()
    if dry_run:
        plan = _make_plan(request, plan_out, output)
        if is_shard_spec(opts.shard):  # this shard's rows only (--plan-out keeps them all)
            shard = parse_shard(opts.shard, {})
            plan = dataclasses.replace(plan, rows=tuple(select(plan.rows, shard)))
        return _dry_run(plan, settings, output, request.settle)
    display = ManyDisplay.choose(output, log_interval=log_interval)
    state = state_dir or default_state_dir()
    with display, drain_on_sigterm() as drain:
        run = ManyRun(settings=settings, options=opts, state_dir=state, events=display)
        run.drain = drain
        with run:  # the run lock of the state folder: another run is refused before the walk
            if not watch:
                # The server and the credentials too, before reading every header under the
                # roots (a login, facts 2). A watch logs in on its first pass instead: a server
                # that is down then does not end it (docs/upload-many.md, Watching).
                run.client()
            plan = _make_plan(request, plan_out, output)
            if watch:
                from xnatio.many.watch import watch as watch_loop

                result = watch_loop(
                    run,
                    lambda: jobs_of(request.make(), settle=request.settle),
                    roots=request.roots,
                    interval=interval,
                    say=display.line,
                )
            else:
                result = run.run(jobs_of(plan, settle=request.settle))
    display.finish(result)
    if watch and result.interrupted:
        return 0  # SIGTERM ends a watch: a normal stop
    return result.exit_code


def _make_plan(request: PlanRequest, plan_out: Path | None, output: OutputArgs) -> Plan:
    """The walk (or the reviewed plan file), written to ``--plan-out`` if asked."""
    plan = request.make()
    if plan_out is not None:
        from xnatio.many.plan import write_plan

        write_plan(plan, plan_out)
        if not output.quiet:
            click.echo(f"plan written to {plan_out}", err=True)
    return plan


@contextlib.contextmanager
def drain_on_sigterm() -> Iterator[threading.Event]:
    """SIGTERM (systemd stopping the unit, a scheduler's timeout): start no new study, let the
    ones in flight finish, then stop. A second SIGTERM stops at once like Ctrl-C (exit 130; the
    journal and the ledger are consistent either way)."""
    drain = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield drain
        return

    def on_term(signum: int, frame: object) -> None:
        if drain.is_set():
            raise KeyboardInterrupt
        drain.set()
        click.echo("SIGTERM: finishing the studies in flight, starting no new one", err=True)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield drain
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- the dry run ---------------------------------------------------------------------------------


def _dry_run(plan: Plan, settings: Settings, output: OutputArgs, settle: float) -> int:
    jobs = jobs_of(plan, settle=settle)
    held = server_sessions(settings, {j.project for j in jobs})
    rows = [dry_run_row(j, held) for j in jobs]
    skipped = [f"{f.path}: {f.reason}" for f in plan.skipped]
    if output.json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        doc = {"plan": {"studies": len(rows), "notes": list(plan.notes), "not_sent": skipped}}
        click.echo(json.dumps(doc, ensure_ascii=False))
    else:
        click.echo(plan_table(rows))
        for note in plan.notes:
            click.echo(f"note: {note}")
        if skipped:
            click.echo(f"{len(skipped)} file(s) in no study, not sent:")
            for line in skipped[:20]:
                click.echo(f"  {line}")
            if len(skipped) > 20:
                click.echo(f"  ... and {len(skipped) - 20} more")
        if held is None:
            click.echo("(the server was not asked: no server or credentials)")
    return 0


def server_sessions(settings: Settings, projects: set[str]) -> dict[str, set[str]] | None:
    """Project -> session labels it holds: one listing query per project (facts 3.5: an
    experiment is found by its label). None when the server or credentials are not known."""
    from xnatio.errors import ServerError
    from xnatio.pipeline import UploadOptions, preflight_client
    from xnatio.xnat.client import quote

    base = UploadOptions(project="", subject="", session="", path=Path("."))
    client = preflight_client(base, settings)
    if client is None:
        return None
    out: dict[str, set[str]] = {}
    with client:
        for project in sorted(p for p in projects if p):
            try:
                data = client.get_json(f"/data/projects/{quote(project)}/experiments")
                rows = data["ResultSet"]["Result"]
            except (ServerError, KeyError, TypeError):
                out[project] = set()  # a missing project: the plan row says so below
                continue
            out[project] = {str(r.get("label", "")) for r in rows if isinstance(r, dict)}
    return out


def dry_run_row(job: StudyJob, held: dict[str, set[str]] | None) -> dict[str, Any]:
    if held is None:
        on_server = "not asked"
    elif job.session in held.get(job.project, set()):
        on_server = "session exists: new files merge into it (facts 1.5)"
    else:
        on_server = "new session"
    return {
        "status": job.status,
        "project": job.project,
        "subject": job.subject,
        "session": job.session,
        "patient_id": job.patient_id,
        "study_date": job.study_date,
        "series": job.series_count,
        "files": job.files,
        "bytes": job.bytes,
        "folders": list(job.folders),
        "warnings": list(job.warnings),
        "reason": job.reason,
        "on_server": on_server,
        "study_uid": job.study_uid,
    }


def plan_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("STATUS", "PROJECT/SUBJECT/SESSION", "PATIENT", "DATE", "SER", "FILES", "MB", "SERVER")
    table = [head]
    notes: list[str] = []
    for r in rows:
        table.append(
            (
                r["status"],
                f"{r['project']}/{r['subject']}/{r['session']}",
                r["patient_id"],
                r["study_date"],
                str(r["series"]),
                str(r["files"]),
                f"{r['bytes'] / 1e6:.1f}",
                r["on_server"].split(":")[0],
            )
        )
        label = f"{r['project']}/{r['subject']}/{r['session']}"
        for folder in r["folders"]:
            notes.append(f"  {label}: folder {folder}")
        for w in r["warnings"]:
            notes.append(f"  {label}: warning: {w}")
        if r["reason"]:
            notes.append(f"  {label}: {r['status']}: {r['reason']}")
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in table
    ]
    ready = sum(1 for r in rows if r["status"] == "ready")
    lines.append(f"{len(rows)} studies, {ready} ready to send")
    return "\n".join(lines + notes)


# -- what the user sees while it runs -------------------------------------------------------------


class ManyDisplay:
    """Subscriber of the runner's events: JSON lines, plain log lines, or a live display.

    This base class is the log (stderr not a terminal: cron, pipes, CI): one line per study
    event (started, verified, failed, ...), and the progress of the whole run as upload-dicom
    logs its own, through the same :class:`xnatio.progress.LogDisplay`: a line every
    ``log_interval`` seconds (``--log-interval``) while files move, a heartbeat line at that
    interval while nothing does (a server still importing), one when everything is sent. Lines
    are timestamped by the CLI's stderr (:class:`xnatio.progress.TimestampedStream`), as every
    command's are. Called from worker threads: one lock around everything it prints.
    """

    def __init__(
        self,
        output: OutputArgs,
        stream: IO[str] | None = None,
        *,
        log_interval: float = defaults.LOG_INTERVAL,
    ) -> None:
        self.output = output
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.done_files = 0
        self.done_bytes = 0
        self.counts: dict[str, int] = {}
        self.log = LogDisplay(self.stream, interval=log_interval, heartbeat=True)
        self.planned_files = 0
        self.planned_bytes = 0
        # Per study in flight: (files, bytes) confirmed so far.
        self.moving: dict[str, tuple[int, int]] = {}

    @classmethod
    def choose(
        cls, output: OutputArgs, *, log_interval: float = defaults.LOG_INTERVAL
    ) -> ManyDisplay:
        if output.json:
            return JsonDisplay(output, sys.stdout)
        # As upload-dicom decides (xnatio.progress.choose_display): TERM=dumb gets plain lines.
        if not output.quiet and sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
            return LiveDisplay(output)
        return cls(output, log_interval=log_interval)

    def __enter__(self) -> ManyDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()

    def __call__(self, event: ManyEvent) -> None:
        with self.lock:
            if event.kind != PROGRESS:
                self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
            if event.kind == states.VERIFIED:
                self.done_files += event.record.files
                self.done_bytes += event.record.bytes
            self.show(event)

    def show(self, event: ManyEvent) -> None:
        if self.output.quiet:
            return
        if event.kind != PROGRESS and not quiet_skip(event):
            self.line(describe(event))
        self._progress(event)

    def _progress(self, event: ManyEvent) -> None:
        """The run's totals as one upload's progress: files and bytes of the studies this run
        sends (each study's own lines say when it is verified)."""
        key = event.record.key
        if event.kind == "planned":
            self.planned_files += event.record.files
            self.planned_bytes += event.record.bytes
            return
        if event.kind in ("started", PROGRESS):
            self.moving[key] = (event.files_done, event.bytes_done)
        elif key in self.moving:
            del self.moving[key]
        else:
            return  # a study this run does not send (skipped, waiting): no progress to show
        files = self.done_files + sum(f for f, _ in self.moving.values())
        sent = self.done_bytes + sum(b for _, b in self.moving.values())
        self.log(
            ProgressEvent(
                Phase.UPLOAD,
                files,
                max(self.planned_files, files),
                bytes_done=sent,
                bytes_total=max(self.planned_bytes, sent),
            )
        )
        if not self.moving:
            # Nothing in flight (the pass is over, or a watch waits): no heartbeat until the
            # next study starts.
            self.log(ProgressEvent(Phase.DONE, 0, 0))

    def line(self, text: str) -> None:
        self.log.note(text)

    def finish(self, result: ManyResult) -> None:
        self.log.close()
        if self.output.quiet and result.ok:
            return
        text = summary_table(result)
        click.echo(text, err=not result.ok and self.output.quiet)


def describe(event: ManyEvent) -> str:
    r = event.record
    label = f"{r.project}/{r.subject}/{r.session}"
    size = f"{r.files} files, {r.bytes / 1e6:.1f} MB"
    text = {
        "planned": f"planned  {label} ({size})",
        "started": f"started  {label} ({size})",
        "verified": f"verified {label} ({size})",
        "failed": f"FAILED   {label}: {event.message}",
        "quarantined": f"QUARANTINED {label}: {event.message}",
        "waiting": f"waiting  {label}: {event.message}",
        "skipped": f"skipped  {label}: {event.message}",
    }.get(event.kind, f"{event.kind} {label} {event.message}")
    # A verified study's reason starts with "verified" (then what --after did): not twice.
    message = event.message
    if event.kind == "verified":
        message = message.removeprefix("verified").lstrip("; ")
    if event.kind in ("planned", "started", "verified") and message:
        text += f": {message}"
    return text


def event_doc(event: ManyEvent) -> dict[str, Any]:
    r = event.record
    return {
        "event": event.kind,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "study_uid": r.study_uid,
        "project": r.project,
        "subject": r.subject,
        "session": r.session,
        "state": r.state,
        "files": r.files,
        "bytes": r.bytes,
        "attempts": r.attempts,
        "message": event.message,
        "session_uri": r.session_uri,
    }


class JsonDisplay(ManyDisplay):
    """``--json``: one object per line per event on stdout, then the summary object."""

    def show(self, event: ManyEvent) -> None:
        if event.kind == PROGRESS:
            return
        self.stream.write(json.dumps(event_doc(event), ensure_ascii=False) + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        self.stream.write(json.dumps({"event": "note", "message": text}) + "\n")
        self.stream.flush()

    def finish(self, result: ManyResult) -> None:
        doc = {
            "event": "summary",
            "exit_code": result.exit_code,
            "duration": round(result.duration, 3),
            "totals": result.totals(),
            "studies": [
                {
                    "study_uid": s.record.study_uid,
                    "project": s.record.project,
                    "subject": s.record.subject,
                    "session": s.record.session,
                    "state": s.state,
                    "ran": s.ran,
                    "files_sent": s.sent_files,
                    "reason": s.record.last_error or s.record.reason,
                }
                for s in result.studies
            ],
        }
        self.stream.write(json.dumps(doc, ensure_ascii=False) + "\n")
        self.stream.flush()


class LiveDisplay(ManyDisplay):
    """A terminal: one line per study in flight (files, bytes) and a totals line (studies,
    files, bytes, rate, ETA), redrawn by rich; finished studies print one line above it."""

    def __init__(self, output: OutputArgs, console: Any = None) -> None:
        super().__init__(output)
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=5, transient=True)
        self.in_flight: dict[str, ManyEvent] = {}
        self.total_files = 0
        self.total_bytes = 0
        self.bytes_now: dict[str, int] = {}

    def __enter__(self) -> ManyDisplay:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()

    def show(self, event: ManyEvent) -> None:
        key = event.record.key
        if event.kind == "planned":
            self.total_files += event.record.files
            self.total_bytes += event.record.bytes
        elif event.kind in ("started", PROGRESS):
            self.in_flight[key] = event
            self.bytes_now[key] = event.bytes_done
        else:
            self.in_flight.pop(key, None)
            self.bytes_now.pop(key, None)
            if event.kind not in ("skipped",):
                self.console.print(describe(event), highlight=False)
        self.live.update(self._render())

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def _render(self) -> Any:
        from rich.text import Text

        lines = []
        for e in self.in_flight.values():
            r = e.record
            lines.append(
                f"  {r.project}/{r.subject}/{r.session}: {e.files_done}/{r.files} files, "
                f"{e.bytes_done / 1e6:.1f}/{r.bytes / 1e6:.1f} MB"
            )
        done = self.done_bytes + sum(self.bytes_now.values())
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        left = max(self.total_bytes - done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 and left else "-"
        studies = self.counts.get("verified", 0)
        planned = self.counts.get("planned", 0)
        lines.append(
            f"{studies}/{planned} studies, {done / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, "
            f"{rate / 1e6:.1f} MB/s, ETA {eta}"
        )
        return Text("\n".join(lines))


def quiet_skip(event: ManyEvent) -> bool:
    """A study verified by an earlier run and unchanged: no line (a cron log stays short)."""
    return event.kind == "skipped" and event.record.state == states.VERIFIED


def summary_table(result: ManyResult) -> str:
    """The totals, then a row per study this run sent or that is not verified; studies
    verified earlier and unchanged are only counted (`xio status` lists every study)."""
    t = result.totals()
    head = (
        f"{t['studies']} studies: {t['verified']} verified, {t['failed']} failed, "
        f"{t['quarantined']} quarantined, {t['waiting']} waiting"
        + (f", {t['planned']} not started" if t["planned"] else "")
        + f"; {t['ran']} sent this run ({t['files_sent']} files) in {result.duration:.1f}s"
    )
    listed = [s for s in result.studies if s.ran or s.state != states.VERIFIED]
    earlier = len(result.studies) - len(listed)
    if earlier:
        head += f"\n{earlier} verified by earlier runs, unchanged (not listed; see `xio status`)"
    if not listed:
        return head
    rows = [("STATE", "PROJECT/SUBJECT/SESSION", "FILES", "SENT", "WHEN", "REASON")]
    for s in listed:
        r = s.record
        rows.append(
            (
                r.state,
                f"{r.project}/{r.subject}/{r.session}",
                str(r.files),
                str(s.sent_files) if s.ran else "-",
                when(r.updated),
                (r.last_error if r.state in ("failed", "quarantined") else r.reason) or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join([c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]).rstrip()
        for row in rows
    ]
    return "\n".join([head, *lines])
