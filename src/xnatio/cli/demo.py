"""`xio demo`: the main job end to end on this machine, with nothing to configure.

Synthesise a session → start the local XNAT-compatible server (with the latency of a real one)
→ upload it through exactly the code path of ``xio upload-dicom`` → read the session back over
REST and check that every instance landed → summary. Exit 0 only if all of it did.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from xnatio.archive import instance_file_name
from xnatio.cli.options import (
    OutputArgs,
    exit_codes_epilog,
    output_options,
    sigterm_as_interrupt,
    start_command,
)
from xnatio.errors import EXIT_FILES_FAILED, EXIT_OK, UsageError
from xnatio.models import Manifest, Phase, ProgressEvent, UploadResult
from xnatio.pipeline import UploadOptions, discover_for_upload, upload
from xnatio.progress import Display, choose_display
from xnatio.report import exit_code_of, result_to_dict, summary_text
from xnatio.settings import Secret, Settings

if TYPE_CHECKING:
    from xnatio.sandbox import SandboxServer

DEMO_PROJECT, DEMO_SUBJECT, DEMO_SESSION = "DEMO", "DEMO01", "DEMO01_MR1"
DEMO_USER = "demo"


@dataclass
class ReadBack:
    """What the server's own index holds after the upload, instance by instance.

    The upload has already read the session back over REST (``xnatio.verify``); this second check
    does not repeat that work: it asks the local server directly, by SOP Instance UID, so it does
    not depend on the client's read-back code it is checking.
    """

    found: bool
    scans: int = 0
    files_on_server: int = 0
    expected: int = 0
    verified: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.found and self.verified == self.expected and not self.problems

    def text(self) -> str:
        if not self.found:
            return "Server check: the session is not on the server."
        head = (
            f"Server check: {self.files_on_server} files in {self.scans} scans on the server; "
            f"{self.verified} of {self.expected} instances there in their series under the "
            "name xio sent "
            "(by SOP Instance UID, from the server's own index)"
        )
        lines = [head + ("." if self.ok else " — MISMATCH:")]
        lines += [f"  {p}" for p in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  … and {len(self.problems) - 20} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "found": self.found,
            "scans": self.scans,
            "files_on_server": self.files_on_server,
            "expected": self.expected,
            "verified": self.verified,
            "problems": self.problems,
        }


def read_back(server: SandboxServer, manifest: Manifest) -> ReadBack:
    """Every SOP instance of ``manifest`` must be archived on ``server``, in its series, under
    the name xio sent it as (XNAT keeps it, facts 1.2). Not by size or MD5: XNAT stores its own
    re-encoded, site-anonymized copy (facts 1.7)."""
    stored = server.archived_files(DEMO_PROJECT, DEMO_SUBJECT, DEMO_SESSION)
    problems: list[str] = []
    verified = 0
    for f in manifest.files:
        record = stored.get(f.sop_instance_uid)
        if record is None:
            problems.append(f"{f.path}: not on the server")
        elif f.series_number is not None and record.series_number != str(f.series_number):
            problems.append(f"{f.path}: in series {record.series_number or '?'} on the server")
        elif record.name != instance_file_name(f.sop_instance_uid):
            problems.append(f"{f.path}: on the server as {record.name}")
        else:
            verified += 1
    return ReadBack(
        found=bool(stored),
        scans=len({r.scan_id for r in stored.values()}),
        files_on_server=len(stored),
        expected=len(manifest.files),
        verified=verified,
        problems=problems,
    )


def _run_demo(
    *,
    workdir: Path,
    series: int,
    per_series: int,
    latency_ms: float,
    per_file_ms: float,
    display: Display,
) -> tuple[UploadResult, ReadBack]:
    from xnatio.sandbox import Knobs, SandboxServer
    from xnatio.synth import generate_session

    data = workdir / "session"
    t0 = time.monotonic()
    # Never a blank screen while the files are written (seconds for the default 600).
    what = "writing synthetic MR instances"
    display(ProgressEvent(Phase.SYNTH, 0, series * per_series, what))

    def written(done: int, total: int, nbytes: int) -> None:
        display(ProgressEvent(Phase.SYNTH, done, total, what))

    try:
        synth = generate_session(
            data, series=series, instances=per_series, modality="MR", on_file=written
        )
    except OSError as exc:  # typically a full temporary disk
        raise UsageError(
            f"cannot write the demo session under {workdir}: {exc.strerror or exc}; "
            "set TMPDIR to a folder with more space, or use fewer --files"
        ) from None
    display.note(
        f"synthesised {synth.file_count} MR instances ({synth.total_bytes / 1e6:.1f} MB) in "
        f"{series} series under {data} ({time.monotonic() - t0:.1f} s)"
    )
    password = secrets.token_urlsafe(16)  # a throwaway account on a throwaway server
    server = SandboxServer(
        workdir / "server",
        users={DEMO_USER: password},
        projects=[DEMO_PROJECT],  # a project exists on XNAT only once created (facts 1.2)
        knobs=Knobs(latency_ms=latency_ms, per_file_ms=per_file_ms),
    )
    try:
        server.start()
    except OSError as exc:
        raise UsageError(f"cannot start the local server: {exc.strerror or exc}") from None
    try:
        display.note(
            f"local XNAT-compatible server at {server.url} "
            f"({latency_ms:g} ms per request, {per_file_ms:g} ms per file)"
        )
        settings = Settings(server=server.url, username=DEMO_USER, password=Secret(password))
        # The resume journal lives with the demo's data, not in the user's state folder.
        opts = UploadOptions(
            project=DEMO_PROJECT,
            subject=DEMO_SUBJECT,
            session=DEMO_SESSION,
            path=data,
            journal=workdir / "journal.sqlite",
            lock_dir=workdir / "locks",  # its own server: no lock in the user's state folder
        )
        manifest = discover_for_upload(opts, display)
        result = upload(
            settings=settings,
            options=opts,
            manifest=manifest,
            progress=display,
            notify=display.note,
        )
        check = read_back(server, manifest)
    finally:
        server.stop()
    return result, check


@click.command(
    "demo",
    epilog="""
\b
Examples:
  xio demo                       # 6 series x 200 MR images, 40 ms per request
  xio demo --files 3000 --series 12 --latency-ms 80
  xio demo --files 60            # one small request instead of batches
  xio demo --json --keep         # machine-readable result; keep the data to look at
"""
    + exit_codes_epilog(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--files",
    type=click.IntRange(min=1),
    default=1200,
    show_default=True,
    help="Instances to synthesise in all (spread evenly over the series). The default, "
    "158 MB of MR images, is above the size the plan sends in one request, so it shows "
    "parallel batches.",
)
@click.option(
    "--series",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="Series to spread the instances over.",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=40.0,
    show_default=True,
    help="Delay the server adds to every request.",
)
@click.option(
    "--per-file-ms",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Processing time the server spends per imported file.",
)
@click.option("--keep", is_flag=True, help="Keep the synthetic data and server folder.")
@output_options
@click.pass_context
def demo(
    ctx: click.Context,
    *,
    files: int,
    series: int,
    latency_ms: float,
    per_file_ms: float,
    keep: bool,
    output: OutputArgs,
) -> None:
    """Upload a synthetic session to a local XNAT-compatible server and check that it landed.

    Synthesises an MR session in a temporary folder, starts the local server on a free port
    of 127.0.0.1, uploads the session exactly as `xio upload-dicom` does (same discovery,
    batching, parallel streaming, single commit, read-back verification and display), then
    asks the server's own index that every instance is there in its series under its name, and
    prints the    summary. Needs no network and
    no configuration; everything is removed afterwards unless --keep.

    The server adds a delay to each request and per imported file because on loopback every
    request is nearly free, which would hide what parallel batches buy against a real XNAT
    (tens of milliseconds per round trip, and per-file parsing on the server).
    """
    start_command(ctx, output)
    per_series = -(-files // series)  # ceil: at least --files instances
    try:
        workdir = Path(tempfile.mkdtemp(prefix="xnatio-demo-"))
    except OSError as exc:
        raise UsageError(
            f"cannot create a temporary folder in {tempfile.gettempdir()}: "
            f"{exc.strerror or exc}; set TMPDIR to a writable folder"
        ) from None
    try:
        with sigterm_as_interrupt(), choose_display(quiet=output.quiet) as display:
            result, check = _run_demo(
                workdir=workdir,
                series=series,
                per_series=per_series,
                latency_ms=latency_ms,
                per_file_ms=per_file_ms,
                display=display,
            )
    finally:
        if keep:
            click.echo(f"kept {workdir} (session/ and server/)", err=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    code = EXIT_OK if exit_code_of(result) == EXIT_OK and check.ok else EXIT_FILES_FAILED
    if output.json:
        data = result_to_dict(result)
        data["read_back"] = check.to_dict()
        data["exit_code"] = code
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    elif not output.quiet or code:
        click.echo(summary_text(result) + "\n" + check.text(), err=output.quiet)
    ctx.exit(code)
