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
uncompressed.

That rule cannot see the CPU the receiver or other processes need (a server on the same cores,
a loaded machine: measured in docs/performance.md, "Compression"), so it only opens a **trial**:
the upload deflates for ``trial`` seconds and compares the uncompressed bytes per second it
achieves (the payload rate, what the user waits for, over the last ``window`` seconds of the
trial) with the rate of the ``trial`` seconds stored before. Deflating goes on only while it is
``gain`` times faster (a margin over the noise of a shared machine); if it is not, entries go
stored again and the next trial waits ``retry`` seconds. So ``auto`` never stays on a path
that made the run slower. Entries follow the decision as it changes (one decision for all
batches of an upload, thread-safe), so a run whose link slows down (or speeds up) follows it.
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
        trial: float = defaults.COMPRESS_TRIAL,
        retry: float = defaults.COMPRESS_RETRY,
        gain: float = defaults.COMPRESS_GAIN,
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
        self.trial = trial
        self.retry = retry
        self.gain = gain
        self._lock = threading.Lock()
        self._sent: deque[tuple[float, int, int]] = deque()  # (when, wire, raw) within the window
        self._in_window = 0
        self._raw_in_window = 0
        self._deflating = False  # auto: the current choice
        self._since: float | None = None  # when it was taken (None: nothing sent yet)
        self._payload_rate: dict[bool, float] = {}  # payload bytes/s of the last period of each
        self._not_before = 0.0  # the next trial of deflating, after one that lost
        self._first_sent: float | None = None
        self._raw = 0  # uncompressed bytes deflated
        self._packed = 0  # their deflated size
        self._cpu = 0.0  # CPU seconds spent deflating them
        self._last_sample: float | None = None
        self.entries = {True: 0, False: 0}  # entries deflated / stored, for the report

    # -- what the run measures ---------------------------------------------------------------

    def sent(self, nbytes: int, raw: int | None = None) -> None:
        """``nbytes`` of some body were handed to its socket (wire bytes, compressed or not),
        carrying ``raw`` uncompressed bytes of the files (default: ``nbytes``)."""
        now = self.clock()
        raw = nbytes if raw is None else raw
        with self._lock:
            if self._first_sent is None:
                self._first_sent = self._since = now
            self._sent.append((now, nbytes, raw))
            self._in_window += nbytes
            self._raw_in_window += raw
            self._trim(now)

    def deflated(self, raw: int, packed: int, cpu_seconds: float) -> None:
        """One entry of ``raw`` bytes was deflated to ``packed`` in ``cpu_seconds`` of CPU."""
        with self._lock:
            self._raw += raw
            self._packed += packed
            self._cpu += max(cpu_seconds, 0.0)

    def _trim(self, now: float) -> None:
        while self._sent and self._sent[0][0] < now - self.window:
            _, wire, raw = self._sent.popleft()
            self._in_window -= wire
            self._raw_in_window -= raw

    def wire_rate(self) -> float | None:
        """Bytes per second handed to the sockets over the last window; None before one window."""
        now = self.clock()
        with self._lock:
            if self._first_sent is None or now - self._first_sent < self.window:
                return None
            self._trim(now)
            return self._in_window / self.window

    def payload_rate(self) -> float | None:
        """Uncompressed bytes per second sent over the last window; None before one window."""
        now = self.clock()
        with self._lock:
            if self._first_sent is None or now - self._first_sent < self.window:
                return None
            self._trim(now)
            return self._raw_in_window / self.window

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
        self._review(now)
        return self._deflating

    def _review(self, now: float) -> None:
        """Every ``trial`` seconds: keep or change the choice, from the payload rate it gave."""
        with self._lock:
            since = self._since
        if since is None or now - since < self.trial:
            return
        payload = self.payload_rate()
        if payload is None:
            return
        with self._lock:
            deflating = self._deflating
            self._payload_rate[deflating] = payload
            other = self._payload_rate.get(not deflating)
            self._since = now
        if deflating:
            if other is not None and payload < other * self.gain:  # not clearly faster: store
                self._switch(False, now, not_before=now + self.retry)
            return
        if now < self._not_before:
            return
        wire, deflate, ratio = self.wire_rate(), self.deflate_rate(), self.ratio()
        if wire is None or deflate is None or ratio is None:
            return
        if ratio >= self.min_ratio and wire * self.margin < deflate:
            self._switch(True, now)  # a trial: kept only if the payload rate goes up

    def _switch(self, deflating: bool, now: float, not_before: float | None = None) -> None:
        with self._lock:
            self._deflating = deflating
            self._since = now
            if not_before is not None:
                self._not_before = not_before
