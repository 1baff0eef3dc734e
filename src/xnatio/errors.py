"""One exception hierarchy; the CLI edge turns each into a one-line message and an exit code.

Exit codes are shared by every command and documented in README and ``xio --help``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FILES_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool stopped by `| head`

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "everything uploaded (and verified)",
    EXIT_FILES_FAILED: "some files failed or verification found a mismatch",
    EXIT_USAGE: "usage or configuration error (also: the result could not be written)",
    EXIT_AUTH: "authentication failed or no credentials available",
    EXIT_UNREACHABLE: "server unreachable",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); run the same command again to resume",
    EXIT_BROKEN_PIPE: "standard output was closed by its reader (e.g. `| head`); nothing printed",
}


class XnatioError(Exception):
    """Base of every error xnatio expects; ``str(err)`` is one sentence for the user."""

    exit_code: int = EXIT_FILES_FAILED


class UsageError(XnatioError):
    """Bad arguments or input the user can fix (missing path, several studies, ...)."""

    exit_code = EXIT_USAGE


class ConfigError(XnatioError):
    """Settings could not be resolved (no server given, bad config file, ...)."""

    exit_code = EXIT_USAGE


class AuthError(XnatioError):
    """The server refused the credentials, or none could be found."""

    exit_code = EXIT_AUTH


class UnreachableError(XnatioError):
    """The server (or DICOM peer) could not be reached at all."""

    exit_code = EXIT_UNREACHABLE


class ServerError(XnatioError):
    """The server answered with an error that is final for this operation.

    ``status`` is the HTTP status (or DIMSE status for C-STORE), ``message`` XNAT's own text.
    """

    exit_code = EXIT_FILES_FAILED

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OutputError(UsageError):
    """Standard output, or a result file, could not be written (closed, full device, ...).

    The work itself may have been done: the message says what could not be written.
    """

    exit_code = EXIT_USAGE


class BrokenPipe(OutputError):
    """The reader of standard output went away (``xio ... | head``): exit quietly, as Unix
    tools do, with the code a shell gives a process stopped by SIGPIPE."""

    exit_code = EXIT_BROKEN_PIPE
