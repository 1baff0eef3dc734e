"""Click options shared by every command that talks to XNAT, and the one way they become Settings.

Each decorator adds a group of options and hands the command ONE typed object instead of a
handful of loose keyword arguments, so a command reads::

    @click.command()
    @server_options
    @output_options
    @click.pass_context
    def verify(ctx, *, server: ServerArgs, output: OutputArgs, ...) -> None:
        start_command(ctx, output)
        settings = resolve_cli_settings(server)

Every command that talks to a server takes :func:`server_options`, so ``--profile`` and
``--env-file`` come with ``--server`` and settings resolve one way everywhere. Adding a credential
source (a token, ...) is one edit here: a new option in :data:`_SERVER_OPTIONS`, a field in
:class:`ServerArgs`, and the call in :func:`resolve_cli_settings`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from xnatio.errors import (
    EXIT_AUTH,
    EXIT_BROKEN_PIPE,
    EXIT_CODES,
    EXIT_FILES_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from xnatio.progress import TimestampedStream, local_timestamp
from xnatio.settings import Settings, resolve_settings

F = TypeVar("F", bound=Callable[..., Any])

PASSWORD_FLAG_WARNING = (
    "warning: --password is visible to other users in process listings; "
    "prefer the XNAT_PASSWORD environment variable"
)


@dataclass(frozen=True)
class ServerArgs:
    """The XNAT server and credentials as given on the command line (None: not given),
    with the config-file profile and env file to read the rest from."""

    server: str | None = None
    user: str | None = None
    password: str | None = None
    verify_tls: bool | None = None
    ca_bundle: str | None = None
    profile: str | None = None
    env_file: Path | None = None

    def __repr__(self) -> str:  # never show the password, even in a -v traceback
        return (
            f"ServerArgs(server={self.server!r}, user={self.user!r}, "
            f"password={'<hidden>' if self.password else None}, "
            f"verify_tls={self.verify_tls!r}, ca_bundle={self.ca_bundle!r}, "
            f"profile={self.profile!r}, env_file={self.env_file!r})"
        )


@dataclass(frozen=True)
class DicomArgs:
    """The DICOM C-STORE receiver as given on the command line (None: not given)."""

    host: str | None = None
    port: int | None = None
    called_aet: str | None = None
    calling_aet: str | None = None


@dataclass(frozen=True)
class OutputArgs:
    """How a command talks to the user: results on stdout, progress and logs on stderr."""

    json: bool = False
    quiet: bool = False
    verbose: int = 0


_SERVER_OPTIONS = [
    click.option(
        "--server",
        metavar="URL",
        help="XNAT base URL with its context path if any, e.g. https://xnat.example.org or "
        "https://host/xnat  [env: XNAT_SERVER]",
    ),
    click.option("--user", metavar="NAME", help="XNAT user name.  [env: XNAT_USERNAME]"),
    click.option(
        "--password",
        metavar="SECRET",
        help="XNAT password. Visible in process listings: prefer XNAT_PASSWORD.  "
        "[env: XNAT_PASSWORD]",
    ),
    click.option(
        "--verify-tls/--no-verify-tls",
        "verify_tls",
        default=None,
        help="Check the server's TLS certificate (default: check).  [env: XNAT_VERIFY_TLS]",
    ),
    click.option(
        "--ca-bundle",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="CA certificates (PEM) to trust for the server, e.g. a site's own CA.  "
        "[env: XNAT_CA_BUNDLE]",
    ),
    click.option(
        "--profile",
        metavar="NAME",
        help="Profile of the config file to use (default: 'default').  [env: XNATIO_PROFILE]",
    ),
    click.option(
        "--env-file",
        type=click.Path(dir_okay=False, path_type=Path),
        metavar="FILE",
        help="Read XNAT_* settings from FILE (default: ./.env when present).",
    ),
]

_DICOM_OPTIONS = [
    click.option(
        "--dicom-host",
        metavar="HOST",
        help="Host of XNAT's DICOM receiver (default: the --server host).  [env: XNAT_DICOM_HOST]",
    ),
    click.option(
        "--dicom-port",
        type=click.IntRange(1, 65535),
        metavar="PORT",
        help="Port of XNAT's DICOM receiver (default: 8104).  [env: XNAT_DICOM_PORT]",
    ),
    click.option(
        "--dicom-called-aet",
        metavar="AET",
        help="AE title of XNAT's DICOM receiver (default: XNAT).  [env: XNAT_DICOM_CALLED_AET]",
    ),
    click.option(
        "--dicom-calling-aet",
        metavar="AET",
        help="Our own AE title (default: XNATIO).  [env: XNAT_DICOM_CALLING_AET]",
    ),
]

_OUTPUT_OPTIONS = [
    click.option(
        "--json",
        "json_output",
        is_flag=True,
        help="Print the result as JSON on stdout (progress still goes to stderr).",
    ),
    click.option(
        "-q", "--quiet", is_flag=True, help="Print nothing but errors (and --json output)."
    ),
    click.option(
        "-v",
        "--verbose",
        count=True,
        help="More detail on stderr; -v also shows tracebacks of errors, -vv debug logs.",
    ),
]


def _apply(options: list[Callable[[Any], Any]], f: Callable[..., Any]) -> Any:
    # Applied in reverse so --help lists them in the order written above.
    for option in reversed(options):
        f = option(f)
    return f


def server_options(f: F) -> F:
    """Add --server/--user/--password/--verify-tls/--ca-bundle/--profile/--env-file; pass
    ``server: ServerArgs``."""

    @functools.wraps(f)
    def wrapper(
        *args: Any,
        server: str | None,
        user: str | None,
        password: str | None,
        verify_tls: bool | None,
        ca_bundle: str | None,
        profile: str | None,
        env_file: Path | None,
        **kwargs: Any,
    ) -> Any:
        args_obj = ServerArgs(server, user, password, verify_tls, ca_bundle, profile, env_file)
        return f(*args, server=args_obj, **kwargs)

    return cast(F, _apply(_SERVER_OPTIONS, wrapper))


def dicom_options(f: F) -> F:
    """Add the --dicom-* receiver options; pass ``dicom: DicomArgs``."""

    @functools.wraps(f)
    def wrapper(
        *args: Any,
        dicom_host: str | None,
        dicom_port: int | None,
        dicom_called_aet: str | None,
        dicom_calling_aet: str | None,
        **kwargs: Any,
    ) -> Any:
        args_obj = DicomArgs(dicom_host, dicom_port, dicom_called_aet, dicom_calling_aet)
        return f(*args, dicom=args_obj, **kwargs)

    return cast(F, _apply(_DICOM_OPTIONS, wrapper))


def output_options(f: F) -> F:
    """Add --json, -q/--quiet and -v/--verbose; pass ``output: OutputArgs``."""

    @functools.wraps(f)
    def wrapper(*args: Any, json_output: bool, quiet: bool, verbose: int, **kwargs: Any) -> Any:
        return f(*args, output=OutputArgs(json_output, quiet, verbose), **kwargs)

    return cast(F, _apply(_OUTPUT_OPTIONS, wrapper))


def report_option(f: F) -> F:
    """Add ``--report FILE`` (per-file outcomes; .csv or .json); pass ``report: Path | None``."""
    return click.option(
        "--report",
        type=click.Path(dir_okay=False, writable=True, path_type=Path),
        metavar="FILE",
        help="Write every file's outcome to FILE (.csv, or JSON for any other name). Mode "
        "0600, atomically (a temporary file, then renamed), never through a symbolic link.",
    )(f)


# What every command that is not an upload means by its codes: no "resume" for them.
COMMAND_EXIT_CODES: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_USAGE: EXIT_CODES[EXIT_USAGE],
    EXIT_AUTH: EXIT_CODES[EXIT_AUTH],
    EXIT_UNREACHABLE: EXIT_CODES[EXIT_UNREACHABLE],
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_BROKEN_PIPE: EXIT_CODES[EXIT_BROKEN_PIPE],
}


def exit_codes_epilog(title: str = "Exit codes", codes: dict[int, str] | None = None) -> str:
    """The exit codes as a help epilog block: ``codes`` (what one command means by each), by
    default the upload's (:data:`xnatio.errors.EXIT_CODES`, which the group shows too)."""
    table = EXIT_CODES if codes is None else codes
    lines = "\n".join(f"  {code:>3}  {text}" for code, text in sorted(table.items()))
    return f"\n\b\n{title}:\n{lines}\n"


def command_exit_codes(**meanings: str) -> dict[int, str]:
    """:data:`COMMAND_EXIT_CODES` with a command's own words: ``ok=``, ``failed=`` (exit 1,
    left out when not given), ``usage=``, ``auth=``, ``unreachable=``; an empty text leaves
    that code out (a command that never contacts a server has no exit 3 or 4)."""
    keys = {
        "ok": EXIT_OK,
        "failed": EXIT_FILES_FAILED,
        "usage": EXIT_USAGE,
        "auth": EXIT_AUTH,
        "unreachable": EXIT_UNREACHABLE,
    }
    codes = dict(COMMAND_EXIT_CODES)
    for key, text in meanings.items():
        if text:
            codes[keys[key]] = text
        else:
            codes.pop(keys[key], None)
    return codes


HELP_ALL = "xnatio.help_all"
_ENV_TAG = re.compile(r"\s*\[env: [^\]]*\]")
_SENTENCE_END = re.compile(r"(?<=\.)\s+(?=[A-Z(])")


def brief_help(text: str) -> str:
    """An option's help cut to its first sentence for the short ``--help``; the ``[env: …]`` tag
    is kept, so every option that reads an environment variable still shows it."""
    env = _ENV_TAG.search(text)
    first = _SENTENCE_END.split(_ENV_TAG.sub("", text).strip(), maxsplit=1)[0]
    return first + (f"  {env.group().strip()}" if env else "")


def _show_all_help(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    ctx.meta[HELP_ALL] = True
    click.echo(ctx.get_help(), color=ctx.color)
    ctx.exit()


class SectionedCommand(click.Command):
    """A command whose ``--help`` lists its options under headings, the common ones only.

    ``sections`` is ``((title, (param name, ...)), ...)``; names that the command does not have
    are passed over (so a section may name an option another branch adds), and options no
    section names are listed last, under "Other options", so none is ever left out.

    ``common`` (param names): what ``--help`` shows, in one list, each option's help cut to its
    first sentence (its environment variable and default kept), with the first
    ``brief_paragraphs`` paragraphs of the command's text and ``brief_epilog`` (if given) for the
    epilog. ``--help-all`` (added here) shows every option under its heading with its whole text,
    and the whole epilog. Without ``common``, ``--help`` shows everything.
    """

    def __init__(
        self,
        *args: Any,
        sections: tuple[tuple[str, tuple[str, ...]], ...] = (),
        common: frozenset[str] | None = None,
        brief_paragraphs: int = 2,
        brief_epilog: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sections = sections
        self.common = common
        self.brief_paragraphs = brief_paragraphs
        self.brief_epilog = brief_epilog
        if common is not None:
            self.params.append(
                click.Option(
                    ["--help-all"],
                    is_flag=True,
                    expose_value=False,
                    is_eager=True,
                    callback=_show_all_help,
                    help="Show every option, under its heading, with its whole help text.",
                )
            )

    def _full(self, ctx: click.Context) -> bool:
        return self.common is None or bool(ctx.meta.get(HELP_ALL))

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self._full(ctx) or not self.help:
            super().format_help_text(ctx, formatter)
            return
        paragraphs = inspect.cleandoc(self.help).split("\n\n")
        text = "\n\n".join(paragraphs[: self.brief_paragraphs])
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(text)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        full = self._full(ctx)
        records: dict[str, tuple[str, str]] = {}
        help_option = self.get_help_option(ctx)
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):
                continue  # arguments are in the usage line and the text
            record = param.get_help_record(ctx)
            if record is None or param.name is None:
                continue
            name = "help" if param is help_option else param.name
            if not full and self.common is not None:
                if name not in self.common:
                    continue
                text = param.help or ""
                extras = record[1][len(text) :] if record[1].startswith(text) else ""
                record = (record[0], brief_help(text) + extras)
            records[name] = record
        placed: set[str] = set()
        sections: list[tuple[str, list[tuple[str, str]]]] = []
        for title, names in self.sections:
            rows = [records[n] for n in names if n in records and n not in placed]
            placed.update(names)
            if rows:
                sections.append((title, rows))
        rest = [record for name, record in records.items() if name not in placed]
        if rest:
            sections.append(("Other options", rest))
        if not full:
            # One short list, in the sections' order; the headings come with --help-all.
            shown = len(records)
            every = sum(1 for p in self.get_params(ctx) if isinstance(p, click.Option))
            title = f"Common options ({shown} of {every}; --help-all shows every one, in full)"
            sections = [(title, [row for _, rows in sections for row in rows])]
        for title, rows in sections:
            with formatter.section(title):
                formatter.write_dl(rows)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self._full(ctx) or self.brief_epilog is None:
            super().format_epilog(ctx, formatter)
            return
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(inspect.cleandoc(self.brief_epilog))


def finish_command(
    ctx: click.Context,
    output: OutputArgs,
    *,
    ok: bool,
    doc: Callable[[], Any],
    text: Callable[[], str],
) -> None:
    """Print a command's result and exit 0 (ok) or 1: ``doc()`` as JSON with --json, else
    ``text()`` on stdout, success or failure, like the upload's summary; with -q nothing when
    ok, and a failure still says what failed, on stderr (as ``upload-dicom -q`` does)."""
    if output.json:
        click.echo(json.dumps(doc(), indent=2))
    elif not output.quiet:
        click.echo(text())
    elif not ok:
        click.echo(text(), err=True)
    ctx.exit(EXIT_OK if ok else EXIT_FILES_FAILED)


def start_command(ctx: click.Context, output: OutputArgs) -> None:
    """Apply -v/-q before the command does anything else."""
    # Imported here: cli.main imports every command module, which import this one.
    from xnatio.cli.main import set_debug

    logger = logging.getLogger("xnatio")
    level = logger.level
    # The level is the process's, so give it back when the command ends: commands also run
    # in-process (tests, scripts calling ``cli.main(standalone_mode=False)``).
    ctx.call_on_close(lambda: logger.setLevel(level))
    set_debug(ctx, output.verbose)
    if output.quiet and not output.verbose:
        logger.setLevel(logging.ERROR)


def resolve_cli_settings(
    server: ServerArgs,
    dicom: DicomArgs | None = None,
    *,
    output: OutputArgs | None = None,
    need_credentials: bool = False,
    profile_may_be_missing: bool = False,
) -> Settings:
    """Options → :class:`Settings`, the same way for every command.

    Precedence (see :func:`xnatio.settings.resolve_settings`): flags > environment > env file >
    profile > netrc. The ``--password`` warning goes to stderr unless -q.
    """
    if server.password is not None and not (output and output.quiet):
        click.echo(PASSWORD_FLAG_WARNING, err=True)
    d = dicom or DicomArgs()
    settings = resolve_settings(
        server=server.server,
        username=server.user,
        password=server.password,
        verify_tls=server.verify_tls,
        ca_bundle=server.ca_bundle,
        dicom_host=d.host,
        dicom_port=d.port,
        dicom_called_aet=d.called_aet,
        dicom_calling_aet=d.calling_aet,
        profile=server.profile,
        env_file=server.env_file,
        need_credentials=need_credentials,
        profile_may_be_missing=profile_may_be_missing,
    )
    if not settings.verify_tls:
        _one_tls_warning(settings.sources.get("verify_tls", "--no-verify-tls"), output)
    return settings


def _one_tls_warning(source: str, output: OutputArgs | None) -> None:
    """``--no-verify-tls``: one line for the command, not urllib3's InsecureRequestWarning for
    every connection (urllib3 sets it to "always"). The filter is put back when the command
    ends (commands also run in-process: tests, scripts)."""
    from urllib3.exceptions import InsecureRequestWarning

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.meta.get("xnatio.tls_warned"):
        return
    ctx.meta["xnatio.tls_warned"] = True
    ctx.with_resource(warnings.catch_warnings())
    warnings.simplefilter("ignore", InsecureRequestWarning)
    if not (output and output.quiet):
        click.echo(
            f"warning: TLS certificate checking is off ({source}): the server's identity is "
            "not checked",
            err=True,
        )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager stopping us, a cron timeout) stops like Ctrl-C: in-flight
    requests cancelled, the journal consistent, the resume hint printed, exit 130.

    A process-wide handler, so the CLI installs it, never the library; the previous handler is
    put back on the way out. Main thread only (``signal.signal`` refuses any other).
    """
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


ABORT_LINE = (
    "error: aborted at once; what was confirmed is in the journal: run the same command again "
    "to send the rest\n"
)


@contextlib.contextmanager
def stop_in_two_steps(describe_stop: Callable[[], str] | None = None) -> Iterator[None]:
    """Ctrl-C (and SIGTERM) during an upload, the way a user expects it:

    1. the first one prints one line at once on stderr, ``stopping: finishing N requests in
       flight… (Ctrl-C again to abort now)`` (``describe_stop()`` says what is being finished),
       and raises ``KeyboardInterrupt`` in the main thread: the pipeline cancels, the journal
       stays consistent, and the CLI edge prints the resume hint, exit 130;
    2. a second one aborts now: one line and ``os._exit(130)``. Nothing is lost by that: every
       journal write is one SQLite transaction (a killed process leaves the last one out, and
       those files are sent again) and the kernel drops the run lock with the process.

    Once interrupted, the abort handler stays in place until the process ends, so a Ctrl-C while
    the interpreter waits for worker threads at exit is an abort too, never the interpreter's
    "Exception ignored … KeyboardInterrupt". Without an interrupt both handlers are put back.
    Main thread only (``signal.signal`` refuses any other); a process-wide change, so the CLI
    makes it, never the library.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = False

    # On a terminal the live progress line has no newline yet: start ours on a line of its own.
    lead = "\n" if _isatty(2) else ""

    def stamp() -> str:
        # stderr is a log (the CLI timestamps its lines): this line, written past it, too.
        return local_timestamp() + " " if isinstance(sys.stderr, TimestampedStream) else ""

    def abort(signum: int, frame: object) -> None:
        os.write(2, (lead + stamp() + ABORT_LINE).encode())
        os._exit(EXIT_INTERRUPTED)

    def stop(signum: int, frame: object) -> None:
        nonlocal interrupted
        if interrupted:
            abort(signum, frame)
        interrupted = True
        signal.signal(signal.SIGINT, abort)
        what = ""
        if describe_stop is not None:
            try:
                what = describe_stop()
            except Exception:  # a progress detail must never stand in the way of stopping
                what = ""
        line = (
            f"{lead}{stamp()}stopping{': ' + what if what else ''}… (Ctrl-C again to abort now)\n"
        )
        os.write(2, line.encode("utf-8", "backslashreplace"))
        raise KeyboardInterrupt

    previous_int = signal.signal(signal.SIGINT, stop)
    previous_term = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if not interrupted:
            signal.signal(signal.SIGINT, previous_int)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
