"""`xio upload-dicom`: options → Settings → discover once → send → summary / JSON / report.

The command is a thin edge over :func:`run_upload`, which ``xio demo`` calls too, so the demo
exercises exactly the code path users run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xnatio.cli.options import (
    DicomArgs,
    OutputArgs,
    ServerArgs,
    dicom_options,
    exit_codes_epilog,
    output_options,
    report_option,
    resolve_cli_settings,
    server_options,
    start_command,
)
from xnatio.errors import ConfigError, UsageError, XnatioError
from xnatio.models import Batch, Manifest, UploadResult
from xnatio.progress import Display, choose_display
from xnatio.report import (
    account_for_skipped,
    check_report_path,
    error_to_dict,
    exit_code_of,
    plan_to_dict,
    summary_text,
    write_report,
    write_result_json,
)
from xnatio.resume import ResumeOptions
from xnatio.settings import Settings

if TYPE_CHECKING:
    from xnatio.xnat.client import XnatClient

# Defaults per transport: the REST figure comes from the seed's measurements (42 parallel
# batches against a real server); C-STORE gets one association per batch, 45 of them.
DEFAULT_BATCHES = {"rest": 42, "dicom-store": 45}


@dataclass(frozen=True, kw_only=True)
class UploadOptions:
    """What one upload needs besides Settings; transport-neutral, built by the CLI or the demo."""

    project: str
    subject: str
    session: str
    path: Path
    transport: str = "rest"
    num_batches: int | None = None  # None: DEFAULT_BATCHES[transport]
    upload_workers: int = 42
    archive_workers: int = 5
    archive_format: str = "tar"
    timeout: float = 10800.0
    overwrite: str = "none"
    direct_archive: bool = False
    archive_wait: float = 900.0
    retries: int = 5
    allow_multiple_studies: bool = False
    dry_run: bool = False
    # C-STORE only
    routing: bool = True
    max_pdu: int = 0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    # Resume and read-back verification (xnatio.resume): verify after commit, ignore the
    # journal and start over, journal location, wait for another run on the same target.
    verify: bool = True
    restart: bool = False
    journal: Path | None = None
    wait: bool = False

    def resume_options(self) -> ResumeOptions:
        return ResumeOptions(
            journal=self.journal, restart=self.restart, wait=self.wait, verify=self.verify
        )

    @property
    def batches(self) -> int:
        return self.num_batches or DEFAULT_BATCHES[self.transport]


def discover_for_upload(opts: UploadOptions, display: Display) -> Manifest:
    """Discovery, once, with its own progress; refuses several studies unless allowed."""
    from xnatio.discover import check_single_study, discover

    manifest = discover(opts.path, progress=display)
    check_single_study(manifest, allow_multiple=opts.allow_multiple_studies)
    return manifest


def describe_dry_run(
    opts: UploadOptions, manifest: Manifest, display: Display
) -> tuple[str, dict[str, object]]:
    """The plan as text and as the ``--dry-run --json`` result; nothing is sent."""
    from xnatio.plan import describe_plan
    from xnatio.transports.dicom_store import plan_associations
    from xnatio.uploaders import plan_rest_upload

    if opts.transport == "rest":
        # The REST plan sends an archive PATH in one request (its members re-packed).
        batches = plan_rest_upload(
            opts.path,
            num_batches=opts.batches,
            allow_multiple_studies=opts.allow_multiple_studies,
            manifest=manifest,
            progress_callback=display,
        ).batches
    else:
        # C-STORE: one association per batch, at most 128 presentation contexts each.
        groups = plan_associations(manifest.files, opts.batches)
        batches = [Batch(index=i, files=tuple(g)) for i, g in enumerate(groups)]
    data = plan_to_dict(manifest, batches)
    data.update(transport=opts.transport, project=opts.project, subject=opts.subject)
    data["session"] = opts.session
    return describe_plan(manifest, batches), data


def run_upload(
    opts: UploadOptions, settings: Settings, manifest: Manifest, display: Display
) -> UploadResult:
    """Send ``manifest`` with the chosen transport; every file ends up accounted for."""
    if opts.transport == "rest":
        result = _send_rest(opts, settings, manifest, display)
    elif opts.transport == "dicom-store":
        result = _send_dicom_store(opts, settings, manifest, display)
    else:  # pragma: no cover - Click's Choice prevents it
        raise UsageError(f"unknown transport {opts.transport!r}")
    result.project = result.project or opts.project
    result.subject = result.subject or opts.subject
    result.session = result.session or opts.session
    return account_for_skipped(result, manifest)


def _send_rest(
    opts: UploadOptions, settings: Settings, manifest: Manifest, display: Display
) -> UploadResult:
    """Through the resume journal: only what the server has not confirmed is sent, then the
    session is committed and read back (see :mod:`xnatio.resume`)."""
    from xnatio.resume import resumable_rest_upload
    from xnatio.retry import RetryPolicy
    from xnatio.transports.rest import RestTarget
    from xnatio.xnat.client import XnatClient

    server = settings.require_server()
    username, password = settings.require_credentials()
    target = RestTarget(
        project=opts.project,
        subject=opts.subject,
        session=opts.session,
        num_batches=opts.batches,
        upload_workers=opts.upload_workers,
        archive_workers=opts.archive_workers,
        archive_format=opts.archive_format,
        overwrite=opts.overwrite,
        direct_archive=opts.direct_archive,
        archive_wait=opts.archive_wait,
    )
    retry = RetryPolicy(retries=max(0, opts.retries))
    with XnatClient(
        server,
        username=username,
        password=password,
        verify=settings.verify,
        timeout=opts.timeout,
        pool_size=opts.upload_workers,
        retry=retry,
    ) as client:
        return resumable_rest_upload(
            client,
            manifest,
            target,
            options=opts.resume_options(),
            retry=retry,
            progress_callback=display,
            notify=display.note,
        )


def _send_dicom_store(
    opts: UploadOptions, settings: Settings, manifest: Manifest, display: Display
) -> UploadResult:
    from xnatio.resume import resumable_dicom_store_upload

    if not settings.dicom_host:
        raise ConfigError(
            "no DICOM receiver given: pass --dicom-host (or --server) or set XNAT_DICOM_HOST"
        )
    # Pre-flight over REST where XNAT's address and credentials are known (facts 2, 3.5).
    client = preflight_client(opts, settings)
    with contextlib.ExitStack() as stack:
        if client is not None:
            stack.enter_context(client)
        return resumable_dicom_store_upload(
            manifest,
            settings.dicom_host,
            settings.dicom_port,
            settings.dicom_called_aet,
            calling_aet=settings.dicom_calling_aet,
            num_batches=opts.batches,
            progress_callback=display,
            project=opts.project,
            subject=opts.subject,
            session=opts.session,
            options=opts.resume_options(),
            notify=display.note,
            routing=opts.routing,
            max_pdu=opts.max_pdu,
            acse_timeout=opts.acse_timeout,
            dimse_timeout=opts.dimse_timeout,
            network_timeout=opts.network_timeout,
            retries=opts.retries,
            allow_multiple_studies=opts.allow_multiple_studies,
            client=client,
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
    elif not settings.dicom_host:
        raise ConfigError(
            "no DICOM receiver given: pass --dicom-host (or --server) or set XNAT_DICOM_HOST"
        )


def render_result(result: UploadResult, output: OutputArgs, report: Path | None) -> int:
    """Print the summary (or JSON) on stdout, write the report; return the exit code."""
    if report is not None:
        write_report(result, report)
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


@click.command(
    "upload-dicom",
    epilog=EXAMPLES + exit_codes_epilog(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
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
    help="Batches to split the session into.  [default: 42 for rest, 45 for dicom-store]",
)
@click.option(
    "--upload-workers",
    type=click.IntRange(min=1),
    default=42,
    show_default=True,
    help="Batches sent at the same time (rest).",
)
@click.option(
    "--archive-workers",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Batches packed ahead of sending (rest).",
)
@click.option(
    "--archive-format",
    type=click.Choice(["tar", "zip", "zip-deflated", "tgz"]),
    default="tar",
    show_default=True,
    help="Archive sent per batch (rest), streamed with no temp files: tar and zip (stored) with "
    "an exact length; zip-deflated compressed and sent chunked, which XNAT accepts for zip only "
    "(facts 1.1). tgz is kept for older scripts and sends zip-deflated.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=10800.0,
    show_default=True,
    help="Seconds to wait for one request's answer (rest).",
)
@click.option(
    "--overwrite",
    type=click.Choice(["none", "append", "delete"]),
    default="none",
    show_default=True,
    help="An existing session of this label is always read first, and only the instances it "
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
    default=900.0,
    show_default=True,
    metavar="SECONDS",
    help="With --direct-archive: how long to wait for XNAT to archive the session. When it "
    "has not by then, the run ends 'sent, not yet archived' (exit 1, --json status "
    '"pending"); check later with `xio verify ... --wait-for N` (rest).',
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Retries per batch on transient errors (backoff with jitter).",
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
    help="Discover and print the plan on stdout (also with -q); check the labels and, when the "
    "server and credentials are known, run the pre-flight checks (read-only); send nothing.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="After the commit, read the session back and find every instance by the name xio "
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
@server_options
@dicom_options
@click.option(
    "--max-pdu",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Largest PDU we accept, bytes; 0 = no limit (dicom-store).",
)
@click.option(
    "--acse-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Association set-up and release timeout, 0 = none (dicom-store).",
)
@click.option(
    "--dimse-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Wait for each C-STORE response, 0 = none (dicom-store).",
)
@click.option(
    "--network-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
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
    timeout: float,
    overwrite: str,
    direct_archive: bool,
    archive_wait: float,
    retries: int,
    allow_multiple_studies: bool,
    dry_run: bool,
    verify: bool,
    restart: bool,
    journal_path: Path | None,
    wait: bool,
    report: Path | None,
    output: OutputArgs,
    server: ServerArgs,
    dicom: DicomArgs,
    max_pdu: int,
    acse_timeout: float,
    dimse_timeout: float,
    network_timeout: float,
    no_routing: bool,
) -> None:
    """Upload the DICOM session under PATH into XNAT as PROJECT / SUBJECT / SESSION.

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
        timeout=timeout,
        overwrite=overwrite,
        direct_archive=direct_archive,
        archive_wait=archive_wait,
        retries=retries,
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
    with json_errors(output):
        code = _upload(opts, server, dicom, output, report)
    ctx.exit(code)


def _upload(
    opts: UploadOptions,
    server: ServerArgs,
    dicom: DicomArgs,
    output: OutputArgs,
    report: Path | None,
) -> int:
    # Cheap checks first: a typo in PATH or a missing password should not wait for discovery.
    if not os.path.lexists(opts.path):
        raise UsageError(f"{opts.path} does not exist.")
    if report is not None:
        check_report_path(report)
    settings = resolve_cli_settings(server, dicom, output=output)
    check_ready(opts, settings)

    with choose_display(quiet=output.quiet) as display:
        manifest = discover_for_upload(opts, display)
        if opts.dry_run:
            text, data = describe_dry_run(opts, manifest, display)
            checked, data["preflight"] = dry_run_preflight(opts, settings, manifest)
            text = f"{text}\n{checked}"
        else:
            result = run_upload(opts, settings, manifest, display)
    if opts.dry_run:
        # The plan is what a dry run is for, so it is printed even with -q (which silences only
        # progress and logs on stderr).
        if output.json:
            click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            click.echo(text)
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
        if output.json:
            click.echo(json.dumps(error_to_dict(exc), indent=2, ensure_ascii=False))
        raise
