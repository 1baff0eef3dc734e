"""Whether the next archive entry is deflated: ``--compress auto|always|never`` (issue 16).

XNAT accepts a streamed (chunked) compressed upload only as ``application/zip`` (facts 1.1), so
compression means a zip whose entries are DEFLATED, streamed with data descriptors
(:mod:`xnatio.archive`, format ``zip-deflated``). A zip may mix STORED and DEFLATED entries, so
``auto`` sends one streamed zip per batch (format ``zip-auto``) and asks :class:`Compression`
before each entry.

``auto`` compresses when the link is slower than the compressor can feed it, from what the run
measures, never from a guess:

* the **wire rate**: bytes handed to the sockets by every body of the upload, over the last
  ``window`` seconds (a socket takes bytes only as fast as the link drains them, once its buffer
  is full; until ``window`` seconds of sending have been seen, the rate is unknown and entries go
  stored);
* the **compressor's rate**: uncompressed bytes deflated per CPU second of the thread that
  deflates (``cpu_clock``, :func:`time.thread_time`), from the entries deflated in this run; one
  entry is deflated every ``sample_interval`` seconds even when ``auto`` stores, so the rate is
  measured on this machine, under its current load; and the ratio (uncompressed / deflated) of
  those entries.

Sending N bytes stored costs N / link; deflated it costs max(N / compressor, N / (ratio × link)):
deflating pays when the compressor is faster than the link and the data shrink. The rule is
conservative (``margin``): deflate when ``wire rate × margin < compressor rate (one core)`` and
``ratio ≥ min_ratio``; a link fast enough to be near what one core deflates (loopback) stays
uncompressed, so ``auto`` never makes a fast link slower. The decision is re-taken for every
entry, so a run whose link slows down (or speeds up) follows it; all batches of an upload share
one object (thread-safe).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from xnatio import defaults

COMPRESS_MODES = ("auto", "always", "never")
Clock = Callable[[], float]


class Compression:
    """The per-entry deflate decision of one upload, fed with what the run measures."""

    def __init__(
        self,
        mode: str = defaults.COMPRESS,
        *,
        clock: Clock = time.monotonic,
        cpu_clock: Clock = time.thread_time,
        margin: float = defaults.COMPRESS_MARGIN,
        window: float = defaults.COMPRESS_WINDOW,
        sample_interval: float = defaults.COMPRESS_SAMPLE_INTERVAL,
        min_ratio: float = defaults.COMPRESS_MIN_RATIO,
    ) -> None:
        if mode not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)}, not {mode!r}")
        self.mode = mode
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.margin = margin
        self.window = window
        self.sample_interval = sample_interval
        self.min_ratio = min_ratio
        self._lock = threading.Lock()
        self._sent: deque[tuple[float, int]] = deque()  # (when, wire bytes) within the window
        self._in_window = 0
        self._first_sent: float | None = None
        self._raw = 0  # uncompressed bytes deflated
        self._packed = 0  # their deflated size
        self._cpu = 0.0  # CPU seconds spent deflating them
        self._last_sample: float | None = None
        self.entries = {True: 0, False: 0}  # entries deflated / stored, for the report

    # -- what the run measures ---------------------------------------------------------------

    def sent(self, nbytes: int) -> None:
        """``nbytes`` of some body were handed to its socket (wire bytes, compressed or not)."""
        now = self.clock()
        with self._lock:
            if self._first_sent is None:
                self._first_sent = now
            self._sent.append((now, nbytes))
            self._in_window += nbytes
            self._trim(now)

    def deflated(self, raw: int, packed: int, cpu_seconds: float) -> None:
        """One entry of ``raw`` bytes was deflated to ``packed`` in ``cpu_seconds`` of CPU."""
        with self._lock:
            self._raw += raw
            self._packed += packed
            self._cpu += max(cpu_seconds, 0.0)

    def _trim(self, now: float) -> None:
        while self._sent and self._sent[0][0] < now - self.window:
            self._in_window -= self._sent.popleft()[1]

    def wire_rate(self) -> float | None:
        """Bytes per second handed to the sockets over the last window; None before one window."""
        now = self.clock()
        with self._lock:
            if self._first_sent is None or now - self._first_sent < self.window:
                return None
            self._trim(now)
            return self._in_window / self.window

    def deflate_rate(self) -> float | None:
        """Uncompressed bytes deflated per CPU second (one core); None before a measurement."""
        with self._lock:
            if self._raw == 0 or self._cpu <= 0:
                return None
            return self._raw / self._cpu

    def ratio(self) -> float | None:
        """Uncompressed / deflated size of the entries deflated so far."""
        with self._lock:
            return self._raw / self._packed if self._packed else None

    # -- the decision ------------------------------------------------------------------------

    def should_deflate(self) -> bool:
        """Deflate the next entry? (``auto``: see the module docstring.)"""
        verdict = self._decide()
        with self._lock:
            self.entries[verdict] += 1
        return verdict

    def _decide(self) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        now = self.clock()
        with self._lock:
            due = self._last_sample is None or now - self._last_sample >= self.sample_interval
            if due:  # keep the compressor's rate measured, on this machine, under today's load
                self._last_sample = now
        if due:
            return True
        wire, deflate, ratio = self.wire_rate(), self.deflate_rate(), self.ratio()
        if wire is None or deflate is None or ratio is None:
            return False
        return ratio >= self.min_ratio and wire * self.margin < deflate
