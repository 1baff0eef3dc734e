"""`xio sandbox` (the local XNAT-compatible server) and the hidden `xio synth` generator."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from xnatio.errors import UsageError
from xnatio.synth import EXTRAS, generate_session


@click.command(
    epilog="""\b
Example:
  xio sandbox --data-dir /tmp/xnat --port 8080 --user admin --password secret --project P
  xio sandbox --data-dir /tmp/xnat --project P --add-user alice:pw  # alice: no access yet
  xio sandbox --data-dir /tmp/xnat --latency-ms 40 --bandwidth-mbps 200 --auto-archive DEMO

\b
Knobs can be changed while it runs (JSON, no login needed, loopback test server):
  curl -X POST localhost:8080/_sandbox/knobs -d '{"fail_next": 2, "fail_status": 503}'
  curl localhost:8080/_sandbox/stats
"""
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Where uploads and the SQLite index are kept (reused across restarts; one server"
    " at a time: a second one on a folder in use stops with a one-line error).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, help="Port (0 picks a free one).")
@click.option("--user", default="admin", show_default=True, help="Login accepted by the server.")
@click.option(
    "--password", default="admin", show_default=True, help="Password of --user (a test server)."
)
@click.option(
    "--latency-ms", type=float, default=0.0, show_default=True, help="Delay added to every request."
)
@click.option(
    "--per-file-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="Processing time per DICOM file.",
)
@click.option(
    "--bandwidth-mbps",
    type=float,
    default=0.0,
    show_default=True,
    help="Upload bandwidth cap in Mbit/s (0: none).",
)
@click.option(
    "--session-timeout",
    type=float,
    default=900.0,
    show_default=True,
    help="JSESSION idle timeout in seconds.",
)
@click.option(
    "--context-path",
    default="",
    metavar="PATH",
    help="Serve XNAT under this path (e.g. /xnat, as Tomcat deployments do); anything outside "
    "it answers 404.",
)
@click.option(
    "--idle-seconds",
    type=float,
    default=300.0,
    show_default=True,
    help="XNAT's session idle interval: a prearchive session untouched this long is built (and "
    "auto-archived); the builder runs every N/5 s, as XNAT's 60 s for 300 (facts 3.2).",
)
@click.option(
    "--import-workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    metavar="N",
    help="Read raw import bodies (zip, tar) in N worker processes, so imports use more than one "
    "core; 0: every body in its request's thread. Same answers and stored files either way.",
)
@click.option(
    "--no-site-anon",
    "no_site_anon",
    is_flag=True,
    help="Start with the site-wide anonymization script disabled (XNAT creates it enabled; "
    "facts 1.7, 5).",
)
@click.option(
    "--project",
    "projects",
    multiple=True,
    metavar="ID",
    help="Create this project at start, owned by --user (repeatable). Projects are kept in "
    "--data-dir; more can be created with PUT /data/projects/ID as a site admin.",
)
@click.option(
    "--add-user",
    "add_users",
    multiple=True,
    metavar="NAME:PASSWORD",
    help="Add an ordinary user with no project access (repeatable); give a role with "
    "PUT /data/projects/P/users/{Owners|Members|Collaborators}/NAME. --user is a site admin.",
)
@click.option(
    "--auto-archive",
    "auto_archive",
    multiple=True,
    metavar="PROJECT",
    help="Create this project (if missing) with prearchive code 4, auto-archive (facts 3.5; "
    "repeatable).",
)
def sandbox(
    *,
    data_dir: Path,
    host: str,
    port: int,
    user: str,
    password: str,
    latency_ms: float,
    per_file_ms: float,
    bandwidth_mbps: float,
    session_timeout: float,
    context_path: str,
    idle_seconds: float,
    import_workers: int,
    no_site_anon: bool,
    projects: tuple[str, ...],
    add_users: tuple[str, ...],
    auto_archive: tuple[str, ...],
) -> None:
    """Run a local XNAT-compatible server (for tests, demos and benchmarks).

    It speaks XNAT's REST API for uploads (import service, prearchive, archive, read-back,
    resources, JSESSION and alias tokens) and stores what it receives under --data-dir.
    Stop it with Ctrl-C.
    """
    from xnatio.sandbox import Knobs, SandboxServer

    users = {user: password}
    for entry in add_users:
        name, sep, secret = entry.partition(":")
        if not sep or not name or not secret:
            raise UsageError(f"--add-user wants NAME:PASSWORD, got {name or entry!r}")
        if name in users:
            raise UsageError(f"--add-user {name}: that user is given twice")
        users[name] = secret
    knobs = Knobs(
        latency_ms=latency_ms,
        per_file_ms=per_file_ms,
        bandwidth_mbps=bandwidth_mbps,
        auto_archive_projects=list(auto_archive),
    )
    try:
        server = SandboxServer(
            data_dir,
            host=host,
            port=port,
            users=users,
            projects=projects,
            knobs=knobs,
            session_timeout=session_timeout,
            context_path=context_path,
            site_anon=not no_site_anon,
            idle_seconds=idle_seconds,
            import_workers=import_workers,
        )
    except ValueError as exc:  # an invalid context path
        raise UsageError(str(exc)) from None
    try:
        server.start()
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except ValueError as exc:  # an invalid project ID or user name
        server.stop()
        raise UsageError(str(exc)) from None
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    click.echo(f"XNAT sandbox listening on {server.url}", err=True)
    click.echo(
        f"  login: --server {server.url} --user {user} (password as given to --password)",
        err=True,
    )
    click.echo(f"  data:  {data_dir}", err=True)
    click.echo("  Ctrl-C stops it.", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopping the sandbox.", err=True)
    finally:
        server.stop()


@click.command(hidden=True)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--series", default=3, show_default=True, help="Number of series.")
@click.option("--instances", default=20, show_default=True, help="Instances per series.")
@click.option("--modality", type=click.Choice(["MR", "CT"]), default="MR", show_default=True)
@click.option("--patient-id", default="SYNTH001", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed: same seed, same UIDs.")
@click.option(
    "--extra",
    "extras",
    multiple=True,
    type=click.Choice(sorted(EXTRAS)),
    help="Add an odd file (repeatable).",
)
def synth(
    out_dir: Path,
    series: int,
    instances: int,
    modality: str,
    patient_id: str,
    seed: int,
    extras: tuple[str, ...],
) -> None:
    """Write a synthetic DICOM session into OUT_DIR (for tests, demos and benchmarks)."""
    s = generate_session(
        out_dir,
        series=series,
        instances=instances,
        modality=modality,
        patient_id=patient_id,
        seed=seed,
        extras=extras,
    )
    # Every file written: the session's instances and each extra (one file apiece).
    written = s.file_count + len(s.extras)
    text = (
        f"wrote {written} files to {s.root}: {s.file_count} DICOM instances "
        f"({s.total_bytes / 1e6:.1f} MB) of study {s.study_uid} in {len(s.series)} series"
    )
    if s.extras:
        text += f", and {len(s.extras)} extra ({', '.join(sorted(s.extras))})"
    click.echo(text)
