"""`xio verify PROJECT SUBJECT SESSION DIR`: does XNAT hold every DICOM file under DIR?

Reads the session back and compares it series by series with what discovery finds in DIR (the
matching rule is in :mod:`xnatio.verify`): each instance by the name xio uploads it under, which
XNAT keeps (facts 1.2); bytes by MD5 only where XNAT stores ours (it re-encodes files and its site
anonymization rewrites headers, facts 1.7). Exit 0 when every file is there, 1 with a per-series
table of what is missing or different.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from xnatio.cli.options import (
    OutputArgs,
    ServerArgs,
    command_exit_codes,
    exit_codes_epilog,
    finish_command,
    output_options,
    report_option,
    resolve_cli_settings,
    server_options,
    start_command,
)
from xnatio.models import FileOutcome, Outcome, UploadResult
from xnatio.progress import choose_display
from xnatio.report import account_for_skipped, check_report_path, write_report
from xnatio.verify import VerifyReport, verify_session

PROBLEMS_SHOWN = 20
POLL_SECONDS = 5.0  # between read-backs with --wait-for
EPILOG = "\n\b\nExample:\n  xio verify MYPROJ SUBJ01 SESS01 /data/SESS01\n" + exit_codes_epilog(
    codes=command_exit_codes(
        ok="every file is in the session (and matches where compared)",
        failed="some files are missing or differ, or the session was not found",
    )
)


@click.command(
    "verify",
    epilog=EPILOG,
)
@click.argument("project")
@click.argument("subject")
@click.argument("session")
@click.argument("path", metavar="DIR", type=click.Path(exists=True, path_type=Path))
@server_options
@output_options
@report_option
@click.option(
    "--wait-for",
    "wait_for",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Keep reading the session back until every file is there or SECONDS have passed "
    "(XNAT builds sessions received over C-STORE, and archives Direct-Archive uploads, only "
    "after the session has been idle for 5 minutes, facts 1.6 and 3.2).",
)
@click.pass_context
def verify(
    ctx: click.Context,
    *,
    project: str,
    subject: str,
    session: str,
    path: Path,
    server: ServerArgs,
    output: OutputArgs,
    report: Path | None,
    wait_for: float,
) -> None:
    """Check that session PROJECT/SUBJECT/SESSION in XNAT holds every DICOM file under DIR.

    Finds each instance by the file name xio uploads it under ({SOP Instance UID}.dcm, which
    XNAT keeps) and compares counts per series. MD5s are compared only where the server stores
    our bytes: XNAT re-encodes each file and, unless prevent_anon, its site anonymization script
    rewrites Patient Name/ID and Study Description (facts 1.7), which is not a failure. A
    session uploaded by another tool or over C-STORE is checked by instance count per series.
    A session holding another study is reported as such. After a C-STORE or Direct-Archive
    upload, --wait-for gives XNAT time to build and archive the session.
    """
    start_command(ctx, output)
    settings = resolve_cli_settings(server, output=output)
    if report is not None:
        check_report_path(report)
    from xnatio.discover import discover
    from xnatio.xnat.client import XnatClient

    started = time.monotonic()
    manifest = discover(path)
    username, password = settings.require_credentials()
    with (
        XnatClient(
            settings.require_server(), username=username, password=password, verify=settings.verify
        ) as client,
        choose_display(quiet=output.quiet) as display,
    ):
        # Progress (files and bytes read back and hashed) on stderr, as during an upload.
        result = verify_session(client, project, subject, session, manifest.files, progress=display)
        deadline = time.monotonic() + wait_for
        while not result.ok and time.monotonic() < deadline:
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            result = verify_session(
                client, project, subject, session, manifest.files, progress=display
            )
    if report is not None:
        as_result = _as_upload_result(result, time.monotonic() - started)
        write_report(account_for_skipped(as_result, manifest), report)
    finish_command(ctx, output, ok=result.ok, doc=result.to_dict, text=lambda: render(result))


def render(result: VerifyReport) -> str:
    """The human answer: one line when all is well (and the warning, if the server rewrote the
    files), else the table and the first problems."""
    where = f"{result.project}/{result.subject}/{result.session}"
    if not result.found:
        return f"verify: session {where} not found on the server"
    if result.other_study:
        return (
            f"verify: {where} holds another study (StudyInstanceUID {result.other_study}), "
            "not the one under DIR"
        )
    n = len(result.verified)
    if result.ok:
        lines = [f"verify: {where} holds all {n} files ({len(result.series)} series)"]
        if result.extra:
            lines[0] += f", and {result.extra} more that match no local file"
    else:
        problems = result.problems
        lines = [f"verify: {where}: {len(problems)} file(s) missing or different", result.table()]
    if result.warning:
        lines.append(result.warning)
    if result.extra_note:
        lines.append(f"note: {result.extra_note}")
    if result.rewritten_note:
        lines.append(f"note: {result.rewritten_note}")
    if result.ok:
        return "\n".join(lines)
    if result.note:
        lines.append(f"note: {result.note}")
    for f, why in problems[:PROBLEMS_SHOWN]:
        lines.append(f"  {f.path}: {why}")
    if len(problems) > PROBLEMS_SHOWN:
        lines.append(f"  ... and {len(problems) - PROBLEMS_SHOWN} more (see --report FILE)")
    return "\n".join(lines)


def _as_upload_result(result: VerifyReport, duration: float) -> UploadResult:
    files: list[FileOutcome] = result.outcomes()
    return UploadResult(
        success=result.ok,
        total_files=len(files),
        duration=duration,
        total_size_mb=sum(f.size for f in files) / 1e6,
        files=files,
        project=result.project,
        subject=result.subject,
        session=result.session,
        verified=result.ok,
        errors=[f"{f.path}: {f.reason}" for f in files if f.outcome is Outcome.FAILED][:20],
        warnings=[result.warning] if result.warning else [],
        notes=[n for n in (result.extra_note, result.rewritten_note) if n],
    )
