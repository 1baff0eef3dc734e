"""The ``xio`` / ``xnatio`` Click group and the one place errors become exit codes.

Every command raises :class:`xnatio.errors.XnatioError` subclasses for expected failures; this
module prints them as one line on stderr and exits with the error's code. A traceback is shown only
with ``-v`` (or ``XNATIO_DEBUG=1``).

Standard output is the other edge: while a command runs, ``sys.stdout`` is a :class:`GuardedStdout`
that turns a failed write into an error of its own. A reader that went away (``xio … | head``,
EPIPE) ends the command quietly with exit 141, as a Unix tool stopped by SIGPIPE; a closed stdout
(``>&-``) or a full device (``>/dev/full``) is one line and exit 2. Either way file descriptor 1
is then pointed at ``/dev/null``, so the interpreter's last flush at exit cannot print
"Exception ignored … BrokenPipeError" either.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from typing import IO, Any, TextIO, cast

import click

from xnatio import __version__, redact
from xnatio.cli.options import exit_codes_epilog
from xnatio.errors import EXIT_INTERRUPTED, BrokenPipe, OutputError, XnatioError
from xnatio.progress import CliLogHandler, TimestampedStream, cli_logging, stderr_is_a_log

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


DEBUG_KEY = "xnatio.debug"
HANDLER_KEY = "xnatio.log_handler"


def set_debug(ctx: click.Context, verbose: int) -> None:
    """Commands call this with their ``-v`` count; ``-v`` shows tracebacks of errors.

    ``-v`` prints xnatio's INFO records, ``-vv`` its DEBUG records (only xnatio's: the level of
    the ``xnatio`` logger and of the CLI's handler, both restored when the command ends).
    """
    if verbose:
        ctx.meta[DEBUG_KEY] = True
        level = logging.INFO if verbose == 1 else logging.DEBUG
        logging.getLogger("xnatio").setLevel(level)
        handler = ctx.meta.get(HANDLER_KEY)
        if isinstance(handler, CliLogHandler):
            handler.threshold = level


class GuardedStdout:
    """``sys.stdout`` while a command runs: writes go to the real stream; a write that fails
    raises :class:`BrokenPipe` (EPIPE) or :class:`OutputError` (anything else, or no stdout at
    all) instead of an ``OSError`` (or ``AttributeError`` on ``None``) from deep in a command.

    Text holding a local file name's bytes that are not UTF-8 (lone surrogates) is written with
    those bytes as ``\\xNN`` (:func:`xnatio.redact.printable`) rather than raising
    ``UnicodeEncodeError``: the safety net behind the reports, which escape such names where
    they build them (JSON stays valid there)."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        # Sticky: once stdout failed, every later write fails the same way (Click probes a
        # stream with empty writes and swallows what they raise).
        self._error: OutputError | None = None

    def _fail(self, exc: OSError | None) -> OutputError:
        if self._error is None:
            _silence_stdout(self._stream)
            if exc is not None and exc.errno == errno.EPIPE:
                self._error = BrokenPipe("standard output was closed by its reader")
            else:
                why = "it is closed" if exc is None else (exc.strerror or str(exc))
                self._error = OutputError(
                    f"cannot write to standard output ({why}); the command's work is done but "
                    "its result was not shown: run it again with stdout open, or pass "
                    "--report FILE"
                )
        return self._error

    def write(self, text: str) -> int:
        if self._error is not None:
            raise self._error
        if isinstance(text, str) and not text:
            return 0  # nothing to write: no system call that could fail
        if self._stream is None:
            raise self._fail(None)
        try:
            return self._stream.write(redact.printable(text) if isinstance(text, str) else text)
        except OSError as exc:
            raise self._fail(exc) from None

    def flush(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            raise self._fail(exc) from None

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, buffer, ...
        if self._stream is None:
            raise AttributeError(name)
        return getattr(self._stream, name)


def _silence_stdout(stream: IO[str] | None) -> None:
    """Point fd 1 at /dev/null (real streams only; ``CliRunner``'s has no descriptor)."""
    try:
        fd = stream.fileno() if stream is not None else -1
    except (OSError, ValueError, AttributeError):
        return
    if fd < 0:
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(null, fd)
    except OSError:
        pass
    finally:
        os.close(null)


class XioGroup(click.Group):
    """Lists commands in the order added; turns expected errors into one line and an exit code.

    Doing it here (not only in ``main``) means ``CliRunner`` tests see exactly what users see.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        # xnatio's log records go to stderr through the CLI's scrubbing handler, for this command
        # only (so ``CliRunner`` and an embedding program get their logging back untouched).
        with cli_logging() as handler:
            ctx.meta[HANDLER_KEY] = handler
            real_stderr = sys.stderr
            if not stderr_is_a_log(real_stderr):
                return self._invoke(ctx)
            # stderr is a file or a pipe (cron, CI, `2>log`): every line it gets is timestamped,
            # whoever writes it (progress, log records, warnings, the error line).
            stamped = cast(TextIO, TimestampedStream(real_stderr))
            sys.stderr = stamped
            rerouted = handler.stream is real_stderr
            if rerouted:
                handler.setStream(stamped)
            try:
                return self._invoke(ctx)
            finally:
                sys.stderr.flush()
                if rerouted:
                    handler.setStream(real_stderr)
                sys.stderr = real_stderr

    def _invoke(self, ctx: click.Context) -> Any:
        real_stdout = sys.stdout
        sys.stdout = GuardedStdout(real_stdout)
        try:
            return self._run(ctx)
        finally:
            if isinstance(sys.stdout, GuardedStdout):
                sys.stdout = real_stdout

    def _run(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipe as exc:
            ctx.exit(exc.exit_code)  # quiet, as `head` expects of a Unix tool
        except XnatioError as exc:
            # Messages are redacted where they are built; scrubbing the line (and the -v
            # traceback, whose chained exceptions xnatio did not word) is the safety net.
            if ctx.meta.get(DEBUG_KEY) or os.environ.get("XNATIO_DEBUG"):
                click.echo(redact.scrub(traceback.format_exc()).rstrip("\n"), err=True)
            click.echo(f"error: {redact.printable(redact.scrub(str(exc)))}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(
    cls=XioGroup,
    context_settings=CONTEXT_SETTINGS,
    epilog=exit_codes_epilog("Exit codes (shared by every command)"),
)
@click.version_option(__version__, "--version", prog_name="xio")
def cli() -> None:
    """xio: move DICOM imaging sessions into XNAT, fast, resumably, and verified.

    Run `xio demo` to see an upload against a local XNAT-compatible server,
    or `xio COMMAND --help` for the options and examples of one command.
    """


def _register() -> None:
    # One module per command; imported here so `xio --help` lists them all.
    from xnatio.cli import demo, sandbox, upload

    cli.add_command(upload.upload_dicom)
    from xnatio.cli import status, upload_many

    cli.add_command(upload_many.upload_many_command)
    cli.add_command(status.status)
    cli.add_command(demo.demo)
    cli.add_command(sandbox.sandbox)
    cli.add_command(sandbox.synth)

    from xnatio.cli import verify as verify_command

    cli.add_command(verify_command.verify)

    from xnatio.cli import config as config_commands
    from xnatio.cli import resource

    cli.add_command(resource.upload_resource_command)
    cli.add_command(config_commands.login)
    cli.add_command(config_commands.config)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    The console script owns its process, so its scrubbing handler goes on the root logger: other
    libraries' warnings are printed like xnatio's and scrubbed too. ``XioGroup`` reuses it; run
    any other way (``CliRunner``, an embedding program) a command puts it on the ``xnatio``
    logger only.
    """
    with cli_logging(logger_name=""):
        try:
            cli.main(args=argv, prog_name="xio")
        except KeyboardInterrupt:  # outside any command (e.g. while Click parses)
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
