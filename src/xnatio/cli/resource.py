"""`xio upload-resource PROJECT SUBJECT SESSION RESOURCE PATH`: non-DICOM files into a resource.

A file is sent as is; a directory is streamed as one tar archive that XNAT unpacks
(:mod:`xnatio.resources`). Exit 1 when files with other content already exist in the resource
and ``--overwrite`` was not given, listing them; identical files already there are fine.
"""

from __future__ import annotations

from pathlib import Path

import click

from xnatio.cli.options import (
    OutputArgs,
    ServerArgs,
    command_exit_codes,
    exit_codes_epilog,
    finish_command,
    output_options,
    resolve_cli_settings,
    server_options,
    start_command,
)
from xnatio.models import Outcome
from xnatio.progress import choose_display
from xnatio.resources import ResourceResult, upload_resource

SHOWN = 20

EPILOG = (
    "\b\nExamples:\n"
    "  xio upload-resource MYPROJ SUBJ01 SESS01 NOTES report.pdf\n"
    "  xio upload-resource MYPROJ SUBJ01 SESS01 PHYSIO ./physio/ --overwrite\n"
    "  xio upload-resource MYPROJ SUBJ01 SESS01 NIFTI ./nifti/ --scan 3 --json\n"
    "\b\nA directory is sent as ONE tar archive built while it is sent (no temporary copy)\n"
    "and unpacked by XNAT (extract=true); its sub-folders are kept inside the resource.\n"
) + exit_codes_epilog(
    codes=command_exit_codes(ok="every file uploaded", failed="some files failed")
)


@click.command("upload-resource", epilog=EPILOG)
@click.argument("project")
@click.argument("subject")
@click.argument("session")
@click.argument("resource")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--scan", metavar="ID", help="Put the files in a resource of scan ID instead.")
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in RESOURCE.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Read the resource back and check every file's size (and MD5 where XNAT keeps one).",
)
@server_options
@output_options
@click.pass_context
def upload_resource_command(
    ctx: click.Context,
    *,
    project: str,
    subject: str,
    session: str,
    resource: str,
    path: Path,
    scan: str | None,
    overwrite: bool,
    verify: bool,
    server: ServerArgs,
    output: OutputArgs,
) -> None:
    """Upload a file or a directory (non-DICOM: reports, physio, NIfTI...) into RESOURCE of
    session PROJECT/SUBJECT/SESSION (or of one of its scans with --scan)."""
    start_command(ctx, output)
    settings = resolve_cli_settings(server, output=output)
    url = settings.require_server()
    username, password = settings.require_credentials()
    from xnatio.xnat.client import XnatClient

    with (
        choose_display(quiet=output.quiet) as display,
        XnatClient(url, username=username, password=password, verify=settings.verify) as client,
    ):
        result = upload_resource(
            client,
            project,
            subject,
            session,
            resource,
            path,
            scan=scan,
            overwrite=overwrite,
            progress_callback=display,
            verify=verify,
        )
    finish_command(ctx, output, ok=result.success, doc=result.to_dict, text=lambda: render(result))


def render(result: ResourceResult) -> str:
    where = f"{result.project}/{result.subject}/{result.session}"
    if result.scan is not None:
        where += f" scan {result.scan}"
    stored = [f for f in result.files if f.outcome in (Outcome.UPLOADED, Outcome.VERIFIED)]
    failed = [f for f in result.files if f.outcome is Outcome.FAILED]
    skipped = [f for f in result.files if f.outcome is Outcome.SKIPPED]
    how = " as one tar archive unpacked by XNAT" if result.archive else ""
    checked = ", read back and checked" if result.verified else ""
    lines: list[str] = []
    if stored:
        mb = sum(f.size for f in stored) / 1e6
        lines.append(
            f"Uploaded {len(stored)} file(s) ({mb:.1f} MB) to {where} resource "
            f"{result.resource}{how}{checked} in {result.duration:.1f} s."
        )
    identical = len(result.duplicates) - len(result.conflicts)
    if identical:
        lines.append(f"{identical} of them were already there with the same content.")
    if result.conflicts:
        lines.append(
            f"error: {len(result.conflicts)} file(s) already exist in {where} resource "
            f"{result.resource} with other content and were not replaced "
            "(use --overwrite to replace them):"
        )
        lines += [f"  {d}" for d in result.conflicts[:SHOWN]]
        if len(result.conflicts) > SHOWN:
            lines.append(f"  ... and {len(result.conflicts) - SHOWN} more (see --json)")
    other = [f for f in failed if "already in the resource" not in f.reason]
    if other:
        lines.append(f"error: {len(other)} file(s) did not land intact:")
        lines += [f"  {f.path}: {f.reason}" for f in other[:SHOWN]]
    if skipped:
        lines.append(f"Skipped {len(skipped)} entr(ies):")
        lines += [f"  {f.path}: {f.reason}" for f in skipped[:SHOWN]]
    return "\n".join(lines)
