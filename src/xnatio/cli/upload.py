"""`xio upload-dicom`: options → Settings → one library call → summary / JSON / report.

The command is a thin edge over :func:`xnatio.pipeline.upload`, which ``xio demo`` and the
Python API (:mod:`xnatio.uploaders`) call too; every default comes from :mod:`xnatio.defaults`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

from xnatio import defaults
from xnatio.cli.options import (
    DicomArgs,
    OutputArgs,
    SectionedCommand,
    ServerArgs,
    dicom_options,
    exit_codes_epilog,
    output_options,
    report_option,
    resolve_cli_settings,
    server_options,
    start_command,
    stop_in_two_steps,
)
from xnatio.errors import OutputError, UsageError, XnatioError
from xnatio.models import Phase, ProgressCallback, ProgressEvent, UploadResult
from xnatio.pipeline import (
    UploadOptions,
    check_ready,
    describe_dry_run,
    discover_for_upload,
    dry_run_preflight,
    upload,
)
from xnatio.progress import choose_display
from xnatio.redact import printable
from xnatio.report import (
    check_report_path,
    error_to_dict,
    exit_code_of,
    summary_text,
    write_report,
    write_result_json,
)


def render_result(result: UploadResult, output: OutputArgs, report: Path | None) -> int:
    """Print the summary (or JSON) on stdout, then write the report; return the exit code.

    The summary comes first: a report that cannot be written (a full disk, a folder removed
    meanwhile) is one more line and exit 2, after the user has seen what the upload did.
    """
    report_error: OutputError | None = None
    if output.json and report is not None:
        # The JSON document is the run's record: write the report first, so that a report that
        # cannot be written is in it (status "error", exit code 2), not only on stderr.
        try:
            write_report(result, report)
        except OutputError as exc:
            report_error = exc
            result.output_error = str(exc)
            result.errors.append(str(exc))
        report = None
    code = exit_code_of(result)
    if output.json:
        # Streamed record by record: memory does not grow with the number of files.
        # sys.stdout, not click.get_text_stream (deprecated as of Click 8.5); CliRunner swaps it.
        stdout = sys.stdout
        write_result_json(result, stdout)
        stdout.write("\n")
        stdout.flush()
    elif not output.quiet:
        click.echo(summary_text(result))
    elif code:
        # -q: nothing on success, but a failure still says what failed (on stderr).
        click.echo(summary_text(result), err=True)
    if report_error is not None:
        raise report_error
    if report is not None:
        write_report(result, report)  # OutputError (exit 2) if it cannot be written
    return code


EXAMPLES = """
\b
Examples:
  export XNAT_SERVER=https://xnat.example.org XNAT_USERNAME=me
  read -rs XNAT_PASSWORD && export XNAT_PASSWORD
  xio upload-dicom MYPROJ SUBJ01 SUBJ01_MR1 /data/outbox/SUBJ01
  xio upload-dicom MYPROJ SUBJ01 SUBJ01_MR1 ./dicom --dry-run
  xio upload-dicom MYPROJ SUBJ01 SUBJ01_MR1 exam.zip --json --report outcome.csv
  xio upload-dicom MYPROJ SUBJ01 SUBJ01_MR1 ./dicom --transport dicom-store \\
      --dicom-host xnat.example.org --dicom-called-aet XNAT
"""

BRIEF_EXAMPLES = """
\b
Examples:
  export XNAT_SERVER=https://xnat.example.org XNAT_USERNAME=me
  read -rs XNAT_PASSWORD && export XNAT_PASSWORD
  xio upload-dicom MYPROJ SUBJ01 SUBJ01_MR1 /data/outbox/SUBJ01 --dry-run
  xio upload-dicom MYPROJ SUBJ01 SUBJ01_MR1 exam.zip --report outcome.csv
"""


# --help-all lists the options under these headings (an option no section names, e.g. one added
# later, is listed under "Other options": add its name here).
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Target and source",
        ("transport", "overwrite", "direct_archive", "archive_wait", "allow_multiple_studies"),
    ),
    (
        "Batching",
        (
            "num_batches",
            "upload_workers",
            "archive_workers",
            "archive_format",
            "compress",
            "timeout",
            "retries",
            "retry_budget",
        ),
    ),
    ("Verification and resume", ("verify", "restart", "journal_path", "wait", "dry_run")),
    (
        "Server and credentials",
        ("server", "user", "password", "verify_tls", "ca_bundle", "profile", "env_file"),
    ),
    (
        "DICOM C-STORE (--transport dicom-store)",
        (
            "dicom_host",
            "dicom_port",
            "dicom_called_aet",
            "dicom_calling_aet",
            "max_pdu",
            "acse_timeout",
            "dimse_timeout",
            "network_timeout",
            "no_routing",
        ),
    ),
    ("Output", ("json_output", "report", "quiet", "verbose", "log_interval", "help", "help_all")),
)

# What --help shows (--help-all shows every option): what most uploads need.
COMMON = frozenset(
    {
        "transport",
        "overwrite",
        "dry_run",
        "verify",
        "restart",
        "wait",
        "server",
        "user",
        "password",
        "profile",
        "ca_bundle",
        "json_output",
        "report",
        "quiet",
        "verbose",
        "help",
        "help_all",
    }
)


@click.command(
    "upload-dicom",
    cls=SectionedCommand,
    sections=SECTIONS,
    common=COMMON,
    brief_epilog=BRIEF_EXAMPLES + exit_codes_epilog(),
    epilog=EXAMPLES + exit_codes_epilog(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)
@click.argument("project")
@click.argument("subject")
@click.argument("session")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--transport",
    type=click.Choice(["rest", "dicom-store"]),
    default="rest",
    show_default=True,
    help="rest: archives to XNAT's import service; dicom-store: C-STORE to its DICOM receiver.",
)
@click.option(
    "--num-batches",
    type=click.IntRange(min=1),
    default=None,
    help="Batches to split the session into.  [default: "
    f"{defaults.REST_BATCHES} for rest, {defaults.DICOM_STORE_BATCHES} for dicom-store]",
)
@click.option(
    "--upload-workers",
    type=click.IntRange(min=1),
    default=defaults.UPLOAD_WORKERS,
    show_default=True,
    help="Batches sent at the same time (rest).",
)
@click.option(
    "--archive-workers",
    type=click.IntRange(min=1),
    default=defaults.ARCHIVE_WORKERS,
    show_default=True,
    help="Batches packed ahead of sending (rest).",
)
@click.option(
    "--archive-format",
    type=click.Choice(["tar", "zip", "zip-deflated", "tgz"]),
    default=defaults.ARCHIVE_FORMAT,
    show_default=True,
    help="Archive sent per batch (rest), streamed with no temp files: tar and zip (stored) with "
    "an exact length; zip-deflated compressed and sent chunked, which XNAT accepts for zip only "
    "(facts 1.1). tgz is kept for older scripts and sends zip-deflated.",
)
@click.option(
    "--compress",
    type=click.Choice(["auto", "always", "never"]),
    default=defaults.COMPRESS,
    show_default=True,
    help="Deflate what is sent (rest, with the default tar format): always = a streamed zip of "
    "deflated entries, the one compressed upload XNAT takes (facts 1.1); never = the tar; auto = "
    "a streamed zip whose entries are deflated while the link measured in this run is slower "
    "than this machine deflates and its cores have the CPU to spare; a trial of deflating is "
    "kept only if it delivers the files faster. A server on this machine (no proxy) gets the "
    "tar, as never (through an ssh -L tunnel, use always).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=defaults.REQUEST_TIMEOUT,
    show_default=True,
    help="Seconds to wait for one request's answer (rest).",
)
@click.option(
    "--overwrite",
    type=click.Choice(["none", "append", "delete"]),
    default=defaults.OVERWRITE,
    show_default=True,
    help="For an instance the session holds already: none refuses it, append overwrites it, "
    "delete replaces every file (facts 1.5). "
    "An existing session of this label is always read first, and only the instances it "
    "lacks are sent, then merged into it (XNAT merges into an existing session, facts 1.5). "
    "none: commit as XNAT does, which refuses (409) an instance the session holds already. "
    "append: archive with overwrite=append, which overwrites such clashing files. delete: send "
    "every file, also those on the server, and archive with overwrite=delete, replacing their "
    "copies. No value merges another study into the label: XNAT refuses it (rest).",
)
@click.option(
    "--direct-archive/--prearchive",
    default=False,
    show_default=True,
    help="Direct-Archive (XNAT >= 1.8.3): files go straight to the archive, and XNAT creates "
    "the experiment once the session has been idle for its interval (5 min, facts 1.6); xio "
    "waits for it (--archive-wait). An existing session is added to through the prearchive "
    "(Direct-Archive never merges). Default: prearchive, committed once at the end (rest).",
)
@click.option(
    "--archive-wait",
    type=click.FloatRange(min=0),
    default=defaults.ARCHIVE_WAIT,
    show_default=True,
    metavar="SECONDS",
    help="With --direct-archive: how long to wait for XNAT to archive the session. When it "
    "has not by then, the run ends 'sent, not yet archived' (exit 1, --json status "
    '"pending"); check later with `xio verify ... --wait-for N` (rest).',
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=defaults.RETRIES,
    show_default=True,
    help="Most retries per batch, request or lost association on transient errors (a cap; "
    "--retry-budget usually ends retrying first). Backoff with jitter, up to 30 s apart.",
)
@click.option(
    "--retry-budget",
    type=click.FloatRange(min=0),
    default=defaults.RETRY_BUDGET,
    show_default=True,
    metavar="SECONDS",
    help="Keep retrying a failed request for this long after its first failure: longer than "
    "an XNAT (Tomcat) restart, which takes a minute or more, so a restart mid-upload costs a "
    "wait, not a failed run.",
)
@click.option(
    "--allow-multiple-studies",
    is_flag=True,
    help="Send PATH even if it holds several StudyInstanceUIDs. XNAT makes one session per "
    "study; over rest the largest is archived as SESSION, the others as SESSION_2, "
    "SESSION_3, ... (by decreasing file count), all committed, verified and listed in the "
    "report; over dicom-store every study is routed to SESSION.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan and run the read-only checks; send nothing. The plan goes to stdout "
    "(also with -q); the labels are checked and, when the server and credentials are known, "
    "the pre-flight checks run.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Read the committed session back and check that every instance is there. "
    "Each instance is looked up by the name xio "
    "sent it as (XNAT keeps it, facts 1.2), counted per series; MD5s are compared only where "
    "XNAT stores our bytes (it re-encodes, and its site script anonymizes, facts 1.7). A missing "
    "instance exits 1 (rest).",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Forget what earlier runs of this upload sent (the journal) and send everything.",
)
@click.option(
    "--journal",
    "journal_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="The resume journal (SQLite).  [env: XNATIO_JOURNAL; default: "
    "$XDG_STATE_HOME/xnatio/journal.sqlite]",
)
@click.option(
    "--wait",
    is_flag=True,
    help="If another xio run is uploading to the same session, wait for it instead of exiting.",
)
@report_option
@output_options
@click.option(
    "--log-interval",
    type=click.FloatRange(min=0.1),
    default=defaults.LOG_INTERVAL,
    show_default=True,
    metavar="SECONDS",
    help="When stderr is not a terminal (cron, pipes, CI): seconds between progress lines, "
    "besides one at each phase change. Every such line starts with the local time.",
)
@server_options
@dicom_options
@click.option(
    "--max-pdu",
    type=click.IntRange(min=0),
    default=defaults.MAX_PDU,
    show_default=True,
    help="Largest PDU we accept, bytes; 0 = no limit (dicom-store).",
)
@click.option(
    "--acse-timeout",
    type=click.FloatRange(min=0),
    default=defaults.ACSE_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Association set-up and release timeout, 0 = none (dicom-store).",
)
@click.option(
    "--dimse-timeout",
    type=click.FloatRange(min=0),
    default=defaults.DIMSE_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Wait for each C-STORE response, 0 = none (dicom-store).",
)
@click.option(
    "--network-timeout",
    type=click.FloatRange(min=0),
    default=defaults.NETWORK_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Connect and other reads, 0 = none (dicom-store).",
)
@click.option(
    "--no-routing",
    is_flag=True,
    help="Do not add Project/Subject/Session routing to Patient Comments (dicom-store).",
)
@click.pass_context
def upload_dicom(
    ctx: click.Context,
    *,
    project: str,
    subject: str,
    session: str,
    path: Path,
    transport: str,
    num_batches: int | None,
    upload_workers: int,
    archive_workers: int,
    archive_format: str,
    compress: str,
    timeout: float,
    overwrite: str,
    direct_archive: bool,
    archive_wait: float,
    retries: int,
    retry_budget: float,
    allow_multiple_studies: bool,
    dry_run: bool,
    verify: bool,
    restart: bool,
    journal_path: Path | None,
    wait: bool,
    report: Path | None,
    output: OutputArgs,
    log_interval: float,
    server: ServerArgs,
    dicom: DicomArgs,
    max_pdu: int,
    acse_timeout: float,
    dimse_timeout: float,
    network_timeout: float,
    no_routing: bool,
) -> None:
    """Upload the DICOM session under PATH into XNAT as PROJECT / SUBJECT / SESSION.

    Each file once, resumable (run the same command again after a failure), and read back.

    PATH is a folder, searched recursively, or a .zip/.tar/.tar.gz archive (its DICOM members
    re-packed while sent, never extracted). DICOM files are recognised by content, not by name;
    every other file is skipped and listed with the reason. Each instance is sent as
    {SOP Instance UID}.dcm, a name XNAT keeps. If the session exists, only the instances it
    lacks are sent ("already on the server"). The session is split into series-aligned batches
    that are sent in parallel to the prearchive and committed once at the end.

    Before any DICOM byte is sent, the destination is checked (pre-flight, exit 2 with one line
    when it is not ready): labels XNAT would change when archiving (it replaces spaces and most
    punctuation with _), a server that is not XNAT, a missing or unreadable project (XNAT would
    file the upload in Unassigned), missing rights to create subjects and sessions, and an
    existing session label that holds another study (XNAT refuses to merge it). What XNAT does
    and the source it rests on: docs/reliability.md, "Pre-flight".

    Progress goes to stderr (a live display on a terminal, plain lines otherwise); the summary,
    or the --json result, goes to stdout. Credentials come from --user/--password, XNAT_USERNAME
    / XNAT_PASSWORD, --env-file (or ./.env), --profile, or ~/.netrc; `xio config show` says which.
    """
    start_command(ctx, output)
    opts = UploadOptions(
        project=project,
        subject=subject,
        session=session,
        path=path,
        transport=transport,
        num_batches=num_batches,
        upload_workers=upload_workers,
        archive_workers=archive_workers,
        archive_format=archive_format,
        compress=compress,
        timeout=timeout,
        overwrite=overwrite,
        direct_archive=direct_archive,
        archive_wait=archive_wait,
        retries=retries,
        retry_budget=retry_budget,
        allow_multiple_studies=allow_multiple_studies,
        dry_run=dry_run,
        verify=verify,
        restart=restart,
        journal=journal_path,
        wait=wait,
        routing=not no_routing,
        max_pdu=max_pdu,
        acse_timeout=acse_timeout,
        dimse_timeout=dimse_timeout,
        network_timeout=network_timeout,
    )
    # At most this many batches are out at once: REST's requests, C-STORE's associations.
    rest = transport == "rest"
    in_flight = InFlight(
        opts.upload_workers if rest else opts.batches, "request" if rest else "association"
    )
    with json_errors(output), stop_in_two_steps(in_flight.describe):
        code = _upload(opts, server, dicom, output, report, in_flight, log_interval)
    ctx.exit(code)


class InFlight:
    """Watches the progress events so that the first Ctrl-C can say at once what it waits for:
    the batches being sent (at most ``workers`` at a time), or the one request of a commit or
    read-back.

    Once stopping, later events are not shown: workers winding down after the cancel would
    otherwise print progress ("120/120 files … done") after the resume hint.
    """

    def __init__(self, workers: int, unit: str = "request") -> None:
        self.workers, self.unit = workers, unit
        self.last: ProgressEvent | None = None
        self.display: ProgressCallback | None = None
        self.stopping = False
        self.live_stop = False  # the display drew the stopping line itself

    def __call__(self, event: ProgressEvent) -> None:
        self.last = event
        # A live display that showed the stopping line still counts the files confirmed while
        # stopping (the final message's count); it draws no other progress.
        if self.display is not None and (not self.stopping or self.live_stop):
            self.display(event)

    def describe(self) -> str | None:
        """What the first Ctrl-C finishes (called by the CLI's signal handler, once); None when
        the live display shows it, with the files confirmed and in flight (xnatio.progress)."""
        self.stopping = True
        what = self._what()
        stopping = getattr(self.display, "stopping", None)
        self.live_stop = bool(stopping is not None and stopping(what))
        return None if self.live_stop else what

    def _what(self) -> str:
        event = self.last
        if event is None or event.phase in (Phase.DISCOVER, Phase.PLAN, Phase.DONE):
            return ""
        if event.phase is Phase.UPLOAD and event.batches_total:
            n = min(self.workers, max(0, event.batches_total - event.batches_done))
            return f"finishing {n} {self.unit}{'s' if n != 1 else ''} in flight"
        return f"finishing the {event.phase.value} request in flight"


def _upload(
    opts: UploadOptions,
    server: ServerArgs,
    dicom: DicomArgs,
    output: OutputArgs,
    report: Path | None,
    in_flight: InFlight | None = None,
    log_interval: float = defaults.LOG_INTERVAL,
) -> int:
    # Cheap checks first: a typo in PATH or a missing password should not wait for discovery.
    if not os.path.lexists(opts.path):
        raise UsageError(f"{opts.path} does not exist.")
    if report is not None:
        check_report_path(report)
    settings = resolve_cli_settings(server, dicom, output=output)
    check_ready(opts, settings)

    with contextlib.ExitStack() as stack:
        display = stack.enter_context(choose_display(quiet=output.quiet, log_interval=log_interval))
        if opts.dry_run:
            manifest = discover_for_upload(opts, display)
            text, data = describe_dry_run(opts, manifest, display)
            checked, data["preflight"] = dry_run_preflight(opts, settings, manifest)
            text = f"{text}\n{checked}"
        else:
            progress: ProgressCallback = display
            if in_flight is not None:
                in_flight.display, progress = display, in_flight
            # The library logs in and takes the run lock before discovering (which may read
            # 50,000 headers): a wrong password, a server that is down or another run on the
            # same session is reported at once (xnatio.pipeline.upload).
            result = upload(settings=settings, options=opts, progress=progress, notify=display.note)
    if opts.dry_run:
        # The plan is what a dry run is for, so it is printed even with -q (which silences only
        # progress and logs on stderr).
        if output.json:
            click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            click.echo(printable(text))
        return 0
    return render_result(result, output, report)


@contextlib.contextmanager
def json_errors(output: OutputArgs) -> Iterator[None]:
    """With --json, an error (exit 2/3/4) still gives scripts a result on stdout.

    The one-line message on stderr and the exit code come from the CLI edge as always.
    """
    try:
        yield
    except XnatioError as exc:
        if output.json and not isinstance(exc, OutputError):
            click.echo(json.dumps(error_to_dict(exc), indent=2, ensure_ascii=False))
        raise
