"""Progress subscribers: callables that receive :class:`xnatio.models.ProgressEvent`.

The pipeline only ever calls ``callback(event)``, from any thread; what the user sees is up to
the subscriber:

- :class:`RichDisplay` — a live display on a terminal (stderr): phase, files done/total, bytes,
  MB/s, ETA, batches done/failed, and while uploading a line of the files XNAT confirmed, those
  in flight and the wire rate. The verify phase (reading back and hashing) shows files, bytes,
  MB/s and ETA like the upload phase.
- :class:`LogDisplay` — plain lines for cron and pipes: one per phase change, one when a phase
  completes, and one every ``interval`` seconds in between (default 30 s, ``--log-interval``),
  so a log grows with the run's duration, never with its size. No ANSI codes.
- :class:`TimestampedStream` — what the CLI puts in front of stderr when it is a file or a pipe:
  every line starts with the local time, ISO 8601 with its offset.
- :class:`SilentDisplay` — ``-q``: nothing (errors are printed by the CLI edge).
- :func:`tqdm_progress` — for Python API users and notebooks, built on ``tqdm.auto``.

:func:`cli_logging` is the CLI's log set-up: one handler on the ``xnatio`` logger (never the root
logger), with a :class:`xnatio.redact.SecretFilter`, for the duration of one command.

Progress may go backwards after a retry (a batch's bytes are counted again); every subscriber
shows the latest numbers rather than accumulating deltas.

Bytes are what the server has received (:mod:`xnatio.transports.rest.wire`): uncompressed
payload bytes, with the wire rate beside them when the body is compressed. The rate shown while
a phase runs, and the ETA, are those of the last :data:`xnatio.defaults.RATE_WINDOW` seconds
(:class:`SlidingRate`); a finished phase shows its average, the rate of the summary.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, cast

from rich.console import Console, RenderableType
from rich.file_proxy import FileProxy
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Column
from rich.text import Text

from xnatio import defaults
from xnatio.models import Phase, ProgressEvent
from xnatio.redact import SecretFilter

__all__ = [
    "Display",
    "LogDisplay",
    "RichDisplay",
    "SilentDisplay",
    "TimestampedStream",
    "TqdmProgress",
    "choose_display",
    "cli_logging",
    "format_event",
    "tqdm_progress",
]


# Phases whose events count bytes (upload: sent; verify: hashed and compared) and files.
BYTE_PHASES = (Phase.UPLOAD, Phase.VERIFY)
FILE_PHASES = (Phase.SYNTH, Phase.DISCOVER, *BYTE_PHASES)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - loop always returns


def _fmt_byte_pair(done: float, total: float) -> str:
    """``45.2/132.1 MB``: both in the unit of the total, written once."""
    scale, unit = 1.0, "B"
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "B")):  # noqa: B007
        if total >= scale:
            break
    if unit == "B":
        return f"{done:.0f}/{total:.0f} B"
    return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# With -v: which logger said it. Without: ``warning: …`` / ``error: …``, the CLI's one format.
VERBOSE_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class CliFormatter(logging.Formatter):
    """``warning: …`` / ``error: …`` like every other line the CLI prints; with ``-v`` (the
    handler's threshold below WARNING) the level and logger name, for who said it."""

    def __init__(self, handler: CliLogHandler) -> None:
        super().__init__(VERBOSE_LOG_FORMAT)
        self._handler = handler

    def format(self, record: logging.LogRecord) -> str:
        if self._handler.threshold < logging.WARNING:
            return super().format(record)
        # No traceback without -v: one line that says what happened.
        return f"{record.levelname.lower()}: {record.getMessage()}"


def local_timestamp(clock: Callable[[], datetime] | None = None) -> str:
    """Local time, ISO 8601 with its UTC offset, to the second: ``2026-11-30T05:01:02+01:00``."""
    now = clock() if clock is not None else datetime.now()
    return now.astimezone().isoformat(timespec="seconds")


class TimestampedStream:
    """A text stream that starts every line written through it with :func:`local_timestamp`.

    The CLI puts it in front of stderr when stderr is a file or a pipe (cron, CI, ``2>log``), so
    every line of a log says when it was written: progress, warnings, errors, the summary of
    ``-q``. Thread-safe: a line is stamped once, however it is split across writes.
    """

    def __init__(self, stream: IO[str], clock: Callable[[], datetime] | None = None) -> None:
        self._stream = stream
        self._clock = clock
        self._lock = threading.Lock()
        self._at_line_start = True

    def write(self, text: str) -> int:
        # Text only: Click probes a stream with ``write(b"")`` and, were bytes accepted, would
        # wrap it as a binary stream.
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self._lock:
            out: list[str] = []
            for piece in text.splitlines(keepends=True):
                if self._at_line_start:
                    out.append(local_timestamp(self._clock) + " ")
                out.append(piece)
                self._at_line_start = piece.endswith(("\n", "\r"))
            self._stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._stream.fileno()

    # No ``buffer``: a writer that found it would go around the timestamps.
    @property
    def encoding(self) -> str:
        return str(getattr(self._stream, "encoding", None) or "utf-8")

    @property
    def errors(self) -> str | None:
        return cast("str | None", getattr(self._stream, "errors", None))

    def writable(self) -> bool:
        return True


def stderr_is_a_log(stream: IO[str] | None) -> bool:
    """True when ``stream`` is a real file or pipe (has a descriptor) that is not a terminal,
    and ``XNATIO_LOG_TIMESTAMPS`` is not ``0`` (for a log collector that stamps lines itself,
    such as the systemd journal)."""
    if os.environ.get("XNATIO_LOG_TIMESTAMPS", "").strip().lower() in ("0", "no", "false", "off"):
        return False
    if stream is None or isinstance(stream, TimestampedStream):
        return False
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # an in-memory stream (CliRunner, an embedding program's buffer)
    try:
        return not os.isatty(fd)
    except OSError:
        return False


if TYPE_CHECKING:
    _TextStreamHandler = logging.StreamHandler[IO[str]]
else:  # logging.StreamHandler is subscriptable at run time only from Python 3.11
    _TextStreamHandler = logging.StreamHandler


class CliLogHandler(_TextStreamHandler):
    """The CLI's handler on the ``xnatio`` logger: scrubs every record, prints ``threshold`` and up.

    The threshold is a filter after the :class:`SecretFilter`, not the handler's level: a
    handler's level skips its filters too, and records it lets through unscrubbed would reach
    the handlers of parent loggers (an embedding application's, pytest's ``caplog``).
    """

    def __init__(self, stream: IO[str], threshold: int = logging.WARNING) -> None:
        super().__init__(stream)
        self.threshold = threshold
        self.setFormatter(CliFormatter(self))
        self.addFilter(SecretFilter())
        self.addFilter(lambda record: record.levelno >= self.threshold)


def _cli_handlers() -> list[CliLogHandler]:
    """The CLI's handlers on the ``xnatio`` logger and its ancestors (where its records go)."""
    found: list[CliLogHandler] = []
    logger: logging.Logger | None = logging.getLogger("xnatio")
    while logger is not None:
        found += [h for h in logger.handlers if isinstance(h, CliLogHandler)]
        logger = logger.parent if logger.propagate else None
    return found


@contextmanager
def cli_logging(
    stream: IO[str] | None = None, *, logger_name: str = "xnatio"
) -> Iterator[CliLogHandler]:
    """Print xnatio's warnings on ``stream`` (stderr), scrubbed, until the block ends.

    A command (``XioGroup``) puts one :class:`CliLogHandler` on the ``xnatio`` logger, and gives
    the logger its level back at the end. Only the console script, which owns its process, passes
    ``logger_name=""`` to put it on the root logger, so other libraries' warnings are printed in
    the same form and scrubbed too. When a CLI handler already receives xnatio's records, it is
    reused. The library itself never calls this: it leaves logging to the application.
    """
    own = logging.getLogger("xnatio")
    level = own.level
    existing = _cli_handlers()
    if existing:
        try:
            yield existing[0]
        finally:
            own.setLevel(level)
        return
    logger = logging.getLogger(logger_name or None)
    handler = CliLogHandler(stream if stream is not None else sys.stderr)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        handler.flush()
        logger.removeHandler(handler)
        own.setLevel(level)


class Display:
    """Base subscriber: a context manager that is also the progress callback.

    ``note(text)`` prints a line without garbling a live display (used for warnings).
    """

    def __call__(self, event: ProgressEvent) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop any live output; idempotent."""

    def stopping(self, what: str = "") -> bool:
        """Ctrl-C was pressed: ``what`` is being finished. True when the display shows the
        stopping line itself (a live display, which a line written past it would garble).
        Called from a signal handler: must not block."""
        return False

    def __enter__(self) -> Display:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SilentDisplay(Display):
    """``-q``: shows nothing."""

    def __call__(self, event: ProgressEvent) -> None:
        return None

    def note(self, text: str) -> None:
        return None


class SlidingRate:
    """Bytes per second over the last ``window`` seconds (payload, and wire beside it).

    ``add`` takes the latest totals; the rate is read at any time (a display's refresh), so a
    stall shows as a falling rate, not the last one frozen. Totals that go back (a retried body
    took back its bytes) start the window again. ``average`` is over the whole phase.
    """

    def __init__(
        self, window: float = defaults.RATE_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int, int]] = deque()
        self._start = clock()

    def restart(self) -> None:
        with self._lock:
            self._samples.clear()
            self._start = self._clock()

    def elapsed(self) -> float:
        return max(0.0, self._clock() - self._start)

    def add(self, done: int, wire: int = 0) -> None:
        now = self._clock()
        with self._lock:
            samples = self._samples
            if samples and (done < samples[-1][1] or wire < samples[-1][2]):
                samples.clear()  # taken back: the old samples would understate the rate
            samples.append((now, done, wire))
            # Keep one sample at or before the window's start, to measure over all of it.
            while len(samples) > 2 and samples[1][0] <= now - self._window:
                samples.popleft()

    def _rates(self) -> tuple[float, float]:
        now = self._clock()
        with self._lock:
            if not self._samples:
                return 0.0, 0.0
            t0, d0, w0 = self._samples[0]
            _, d1, w1 = self._samples[-1]
        span = now - t0
        if span < min(1.0, self._window):
            return 0.0, 0.0  # too soon to say
        return max(0, d1 - d0) / span, max(0, w1 - w0) / span

    def per_second(self) -> float:
        """Payload bytes per second, recently."""
        return self._rates()[0]

    def wire_per_second(self) -> float:
        """Wire bytes per second, recently."""
        return self._rates()[1]

    def average(self, done: int) -> float:
        """Payload bytes per second since the phase started."""
        el = self.elapsed()
        return done / el if el > 0 else 0.0


def _fmt_rate(rate: float) -> str:
    mb = rate / 1e6
    return f"{mb:.0f} MB/s" if mb >= 10 else f"{mb:.1f} MB/s"


def _wire_shown(event: ProgressEvent) -> bool:
    """The wire rate is worth a place when compression shrinks what goes on the wire."""
    return 0 < event.wire_bytes < 0.9 * event.bytes_done


def format_event(event: ProgressEvent, *, rate: float = 0.0, wire_rate: float = 0.0) -> str:
    """One plain line for an event, e.g. ``upload: 120/300 files (40%), 6.1/15.7 MB, …``.

    Files are shown for discovery, upload and verify (with those in flight while uploading);
    bytes, speed and ETA for upload and verify, and the wire rate when it is not the payload's
    (compressed); batches for upload; the short phases in between (plan, connect, commit, done)
    are described by their message.
    """
    parts: list[str] = []
    by_bytes = event.phase in BYTE_PHASES and event.bytes_total > 0
    if event.phase in FILE_PHASES:
        # The percentage follows bytes while uploading (files count only once their batch is
        # confirmed, so they lag behind what has been sent) and while verifying (files differ
        # in size, bytes are what hashing takes time for).
        if event.total and not by_bytes:
            pct = 100.0 * event.current / event.total
            parts.append(f"{event.current}/{event.total} files ({pct:.0f}%)")
        elif event.total:
            parts.append(f"{event.current}/{event.total} files")
            if event.files_in_flight:
                parts[-1] += f" ({event.files_in_flight} in flight)"
        elif event.current:
            parts.append(f"{event.current} files")
    if event.phase in BYTE_PHASES:
        if by_bytes:
            pct = 100.0 * event.bytes_done / event.bytes_total
            parts.append(
                f"{_fmt_bytes(event.bytes_done)}/{_fmt_bytes(event.bytes_total)} ({pct:.0f}%)"
            )
            if rate > 0:
                parts.append(f"{rate / 1e6:.1f} MB/s")
                if wire_rate > 0 and _wire_shown(event):
                    parts[-1] += f" (wire {wire_rate / 1e6:.1f} MB/s)"
                left = event.bytes_total - event.bytes_done
                if left > 0:
                    parts.append(f"ETA {_fmt_duration(left / rate)}")
        if event.batches_total:
            parts.append(
                f"batches {event.batches_done}/{event.batches_total} done, "
                f"{event.batches_failed} failed"
            )
    if event.message:
        parts.append(event.message)
    return f"{event.phase.value}: " + (", ".join(parts) if parts else "…")


class LogDisplay(Display):
    """Plain periodic lines on a stream, for when stderr is not a terminal (cron, pipes, CI).

    A line is written on every phase change, when ``interval`` seconds have passed since the
    last line (and something changed), and once when a phase completes: a log's length follows
    the run's duration (about duration / interval + 2 per phase), never the session's size.
    ``step`` (a fraction of the phase's total, off by default) adds a line at each such step.
    With ``heartbeat`` (the CLI's), a timer writes the latest numbers once an interval has passed
    with no line, so a stalled phase (a server still importing, a wait) still shows in the log
    at the steady interval. Never any ANSI codes.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        interval: float = defaults.LOG_INTERVAL,
        step: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: bool = False,
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._step = step
        self._clock = clock
        self._lock = threading.Lock()
        self._phase: Phase | None = None
        self._last_time = 0.0
        self._last_fraction = 0.0
        self._last_line = ""
        self._completed: Phase | None = None
        self._rate = SlidingRate(clock=clock)
        self._latest: ProgressEvent | None = None
        self._heartbeat = heartbeat and interval > 0
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def _beat(self) -> None:
        """The heartbeat thread: the latest event's line, when an interval passed without one."""
        while not self._stop.wait(self._interval / 4):
            with self._lock:
                event = self._latest
                if event is None or self._clock() - self._last_time < self._interval:
                    continue
                line = self._line(event)
                self._last_time, self._last_line = self._clock(), line
                self._write(line)

    def _line(self, event: ProgressEvent, *, complete: bool = False) -> str:
        """The event's line: the recent rate while the phase runs, its average once complete
        (the summary's)."""
        if complete or (event.bytes_total and event.bytes_done >= event.bytes_total):
            return format_event(event, rate=self._rate.average(event.bytes_done))
        rate = self._rate
        return format_event(event, rate=rate.per_second(), wire_rate=rate.wire_per_second())

    def close(self) -> None:
        self._stop.set()
        timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.join()

    def _write(self, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        print(line, file=stream, flush=True)

    def __call__(self, event: ProgressEvent) -> None:
        if event.phase is Phase.DONE:
            with self._lock:
                self._latest = None  # the summary follows: no heartbeat after it
            return
        with self._lock:
            self._latest = event
            if self._heartbeat and self._timer is None and not self._stop.is_set():
                self._timer = threading.Thread(
                    target=self._beat, daemon=True, name="xnatio-log-heartbeat"
                )
                self._timer.start()
            now = self._clock()
            fraction = event.current / event.total if event.total else 0.0
            if event.bytes_total:
                fraction = event.bytes_done / event.bytes_total
            complete = event.total > 0 and event.current >= event.total
            if event.phase is not self._phase:
                self._phase = event.phase
                self._rate.restart()
                due = True
            else:
                due = (
                    now - self._last_time >= self._interval
                    or (
                        self._step is not None
                        and fraction - self._last_fraction >= self._step - 1e-9
                    )
                    or (complete and self._completed is not event.phase)
                )
            self._rate.add(event.bytes_done, event.wire_bytes)
            if complete:
                self._completed = event.phase
            if not due:
                return
            line = self._line(event, complete=complete)
            if line == self._last_line:
                return
            self._last_time, self._last_fraction, self._last_line = now, fraction, line
            self._write(line)

    def note(self, text: str) -> None:
        with self._lock:
            self._write(text)


# "1200/1200 files 158.4/158.4 MB" fits; longer (50,000 files) is cut with an ellipsis.
AMOUNT_WIDTH = 30


class _AmountColumn(ProgressColumn):
    """``120/300 files · 6.1/15.7 MB``; for a phase with nothing to count (connect, commit),
    its message when the last column is narrower than this one (80 columns)."""

    def __init__(self, *, messages: bool, table_column: Column) -> None:
        super().__init__(table_column=table_column)
        self.messages = messages

    def render(self, task: Task) -> Text:
        if not task.fields.get("show_files"):
            return Text(task.fields.get("message", "") if self.messages else "")
        files, files_total = task.fields.get("files", 0), task.fields.get("files_total", 0)
        text = f"{files}/{files_total} files" if files_total else f"{files} files"
        if task.fields.get("bytes_mode"):
            text += " " + _fmt_byte_pair(task.completed, task.total or 0)
        return Text(text)


def _task_rate(task: Task) -> float:
    """The task's payload rate: recent while it runs, its phase's average once it is done."""
    rate: SlidingRate | None = task.fields.get("rate")
    if rate is None:
        return 0.0
    if task.finished or task.fields.get("ended"):
        return rate.average(int(task.completed))
    return rate.per_second()


class _SpeedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = _task_rate(task)
        if not task.fields.get("bytes_mode") or not speed:
            return Text("")
        return Text(_fmt_rate(speed))


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = _task_rate(task)
        if not task.fields.get("bytes_mode") or not speed or task.finished:
            return Text("")
        left = max(0.0, (task.total or 0) - task.completed) / speed
        return Text(f"ETA {_fmt_duration(left)}", style="cyan")


class _Progress(Progress):
    """rich's Progress with a status line under the phases: while uploading, the files XNAT
    confirmed and those in flight, and the wire rate when compressed; once Ctrl-C was pressed,
    what stopping waits for."""

    status: Callable[[], str] = staticmethod(lambda: "")

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        line = self.status()
        if line:
            yield Text(line, no_wrap=True, overflow="ellipsis", end="")


class _BatchColumn(ProgressColumn):
    def __init__(self, *, messages: bool, table_column: Column) -> None:
        super().__init__(table_column=table_column)
        self.messages = messages  # False: a phase with nothing to count has it in the amount's

    def render(self, task: Task) -> Text:
        total = task.fields.get("batches_total", 0)
        if not total:
            if not self.messages and not task.fields.get("show_files"):
                return Text("")
            return Text(task.fields.get("message", ""))
        failed = task.fields.get("batches_failed", 0)
        text = Text(f"{task.fields.get('batches_done', 0)}/{total} batches")
        if failed:
            text.append(f", {failed} failed", style="red")
        return text


class RichDisplay(Display):
    """A live display on a terminal, one line per phase, on stderr by default.

    Colours follow ``NO_COLOR`` (rich honours it); the display is redrawn in place, so it is only
    used when the console is a terminal (see :func:`choose_display`).
    """

    def __init__(
        self, console: Console | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console = console or Console(stderr=True)
        self._clock = clock
        # One line per phase, in fixed columns whatever the numbers beside it say: the bar keeps
        # its width (10 characters at 80 columns, up to 30 on wider terminals) and its place,
        # the figures have their own widths, and the last column (batches, or the phase's
        # message) gets what is left, cut with an ellipsis: text is truncated, never the bar.
        width = self.console.width
        bar_width = max(10, min(30, width - 70))

        last = max(8, width - (8 + bar_width + AMOUNT_WIDTH + 8 + 11 + 5))
        narrow = last < AMOUNT_WIDTH  # a message ("logging in to …") reads better in 30

        def fixed(n: int) -> Column:
            return Column(no_wrap=True, min_width=n, max_width=n, overflow="ellipsis")

        self._progress = _Progress(
            TextColumn("{task.description:<8}", table_column=fixed(8)),
            BarColumn(bar_width=bar_width, table_column=fixed(bar_width)),
            _AmountColumn(messages=narrow, table_column=fixed(AMOUNT_WIDTH)),
            _SpeedColumn(table_column=fixed(8)),
            _EtaColumn(table_column=fixed(11)),
            _BatchColumn(
                messages=not narrow,
                table_column=Column(no_wrap=True, overflow="ellipsis", max_width=last),
            ),
            console=self.console,
            transient=False,
            refresh_per_second=8,
        )
        self._narrow = narrow
        self._progress.status = self._status_line
        self._lock = threading.Lock()
        self._task: TaskID | None = None
        self._phase: Phase | None = None
        self._rate = SlidingRate(clock=clock)
        self._upload: ProgressEvent | None = None  # the latest upload event, for the status line
        self._stopping: str | None = None  # after Ctrl-C: what is being finished
        self._cut = (0, 0)  # (files in flight, files confirmed) at Ctrl-C
        self._started = False
        self._closed = False

    def _status_line(self) -> str:
        """Under the phases (read by the refresh thread): the upload's files, confirmed and in
        flight, and the wire rate when compressed; after Ctrl-C, the stopping line and the
        files confirmed (the count the final message repeats) and cut."""
        event = self._upload
        if self._stopping is not None:
            what = self._stopping
            line = f"stopping{': ' + what if what else ''}… (Ctrl-C again to abort now)"
            if event is not None:
                line += "\n" + " " * 9 + f"{event.current} of {event.total} files confirmed"
                # In flight at Ctrl-C, less those confirmed since (their answer came first).
                cut = max(0, self._cut[0] - (event.current - self._cut[1]))
                if cut:
                    line += f"; {cut} in flight, not confirmed"
            return line
        if event is None or self._phase is not Phase.UPLOAD:
            return ""
        line = " " * 9 + f"{event.current} of {event.total} files confirmed, "
        line += f"{event.files_in_flight} in flight"
        wire = self._rate.wire_per_second()
        if wire and _wire_shown(event):
            line += f", {_fmt_rate(wire)} on the wire"
        if self._narrow and event.batches_total:  # the batches column is cut at 80 columns
            line += f"; batches {event.batches_done}/{event.batches_total}"
            if event.batches_failed:
                line += f", {event.batches_failed} failed"
        return line

    def stopping(self, what: str = "") -> bool:
        """Ctrl-C was pressed: the status line says so, with what is confirmed and what is cut
        (kept up to date while stopping), and the display shows no other progress. Called from
        a signal handler, so it takes no lock: the refresh thread draws it at its next refresh
        (1/8 s). False (the caller writes the line) when the display is not live."""
        if not self._started or self._closed:
            return False
        event = self._upload
        if event is not None:  # (in flight, confirmed) now: the requests are cut right after
            self._cut = (event.files_in_flight, event.current)
        self._stopping = what
        return True

    def _ensure_started(self) -> None:
        if not self._started:
            self._progress.start()
            self._route_logging()
            self._started = True

    def _route_logging(self) -> None:
        """Log records written to the terminal go above the live display, not through it.

        Rich redirects ``sys.stderr`` while live, but logging handlers keep the stream they were
        created with (:func:`cli_logging`), so the CLI's handler is pointed at a proxy of the
        console until the display closes. Only the CLI's own handler: the handlers of an
        embedding application are theirs.
        """
        self._rerouted: list[tuple[logging.StreamHandler[Any], IO[str]]] = []
        console_file = self.console.file
        for h in _cli_handlers():
            if h.stream in (console_file, sys.stderr):
                old = h.setStream(cast(IO[str], FileProxy(self.console, h.stream)))
                if old is not None:
                    self._rerouted.append((h, old))

    def _restore_logging(self) -> None:
        for handler, stream in getattr(self, "_rerouted", []):
            handler.flush()
            handler.setStream(stream)
        self._rerouted = []

    def __call__(self, event: ProgressEvent) -> None:
        if event.phase is Phase.DONE:
            return  # the summary follows
        with self._lock:
            if self._closed:
                return
            if self._stopping is not None:
                if event.phase is Phase.UPLOAD:  # the stopping line's counts, nothing else
                    self._upload = event
                return
            self._ensure_started()
            bytes_mode = event.phase in BYTE_PHASES and event.bytes_total > 0
            if event.phase is not self._phase or self._task is None:
                if self._task is not None:
                    self._finish_current()
                self._phase = event.phase
                self._rate = SlidingRate(clock=self._clock)
                self._task = self._progress.add_task(event.phase.value, total=None)
            if event.phase is Phase.UPLOAD:
                self._upload = event
            total: float | None = event.bytes_total if bytes_mode else (event.total or None)
            completed = event.bytes_done if bytes_mode else event.current
            if bytes_mode:
                self._rate.add(event.bytes_done, event.wire_bytes)
            self._progress.update(
                self._task,
                rate=self._rate,
                total=total,
                completed=completed,
                files=event.current,
                files_total=event.total,
                show_files=event.phase in FILE_PHASES,
                bytes_mode=bytes_mode,
                batches_done=event.batches_done,
                batches_failed=event.batches_failed,
                # batches are shown while uploading; the other phases show their message
                batches_total=event.batches_total if event.phase is Phase.UPLOAD else 0,
                message=event.message,
            )

    def _finish_current(self) -> None:
        task_id = self._task
        assert task_id is not None
        task = next(t for t in self._progress.tasks if t.id == task_id)
        if task.total is None:
            # A phase with no known total (discovery, commit) ends complete, not pulsing.
            done = max(task.completed, 1)
            self._progress.update(task_id, total=done, completed=done)
        self._progress.update(task_id, ended=True)  # its rate: the phase's average
        self._progress.stop_task(task_id)

    def note(self, text: str) -> None:
        with self._lock:
            self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._task is not None:
                self._finish_current()
            if self._started:
                self._restore_logging()
                self._progress.stop()


def choose_display(
    *, quiet: bool, stream: IO[str] | None = None, log_interval: float = defaults.LOG_INTERVAL
) -> Display:
    """``-q`` → silent; a terminal on stderr → rich; otherwise plain log lines.

    ``TERM=dumb`` also gets plain lines: a live display would print escape codes it cannot draw.
    """
    if quiet:
        return SilentDisplay()
    stream = stream if stream is not None else sys.stderr
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    if is_tty and os.environ.get("TERM") != "dumb":
        return RichDisplay(Console(file=stream))
    return LogDisplay(stream, interval=log_interval, heartbeat=True)


class TqdmProgress:
    """A progress callback on ``tqdm.auto`` (a widget in Jupyter, a text bar in a terminal).

    One bar per phase; the upload and verify bars count bytes, the others files or steps.
    Use as a context manager, or call :meth:`close` at the end.
    """

    def __init__(self, **tqdm_kwargs: Any) -> None:
        self._kwargs = tqdm_kwargs
        self._lock = threading.Lock()
        self._bar: Any = None
        self._phase: Phase | None = None

    def __call__(self, event: ProgressEvent) -> None:
        # tqdm ships no type information; loaded lazily so importing this module stays cheap.
        tqdm = importlib.import_module("tqdm.auto").tqdm

        with self._lock:
            bytes_mode = event.phase in BYTE_PHASES and event.bytes_total > 0
            if event.phase is not self._phase or self._bar is None:
                self._close_bar()
                self._phase = event.phase
                kwargs: dict[str, Any] = {"desc": event.phase.value, "leave": True}
                if bytes_mode:
                    kwargs.update(unit="B", unit_scale=True, unit_divisor=1000)
                else:
                    kwargs.update(unit="file")
                kwargs.update(self._kwargs)
                self._bar = tqdm(total=None, **kwargs)
            bar = self._bar
            total = event.bytes_total if bytes_mode else (event.total or None)
            if bar.total != total:
                bar.total = total
            # Set, not add: progress may go backwards after a retry.
            bar.n = event.bytes_done if bytes_mode else event.current
            postfix: dict[str, Any] = {}
            if bytes_mode and event.total:
                postfix["files"] = f"{event.current}/{event.total}"
            if event.batches_total:
                postfix["batches"] = f"{event.batches_done}/{event.batches_total}"
                if event.batches_failed:
                    postfix["failed"] = event.batches_failed
            if postfix:
                bar.set_postfix(postfix, refresh=False)
            bar.refresh()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        with self._lock:
            self._close_bar()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tqdm_progress(**tqdm_kwargs: Any) -> TqdmProgress:
    """A ready ``progress_callback`` for the Python API, e.g. in a notebook::

        from xnatio.progress import tqdm_progress
        from xnatio.uploaders import upload_dicom_parallel_rest

        with tqdm_progress() as progress:
            result = upload_dicom_parallel_rest(..., progress_callback=progress)

    Keyword arguments are passed to every ``tqdm`` bar (e.g. ``file=``, ``disable=``).
    """
    return TqdmProgress(**tqdm_kwargs)
