"""One load limit per run that adapts to the server: AIMD over the requests in flight.

XNAT is the bottleneck of every fleet of uploaders; a fixed number of connections per run is
either too timid for an idle server or too much for a busy one. :class:`AdaptiveLimit` keeps a
*limit* on the requests this run has in flight and moves it the way TCP moves its window:

* **additive increase**: each answer that is clean (not 429/502/503/504, no timeout) and fast
  (not markedly slower than the fastest answers of its kind) adds ``increase / limit``, so the
  limit grows by about ``increase`` per round of ``limit`` answers; only while the limit is
  actually used (it was full at some moment while the request was in flight), never above
  ``cap``;
* **multiplicative decrease**: a 429, 502, 503 or 504 answer, a timeout or a dropped connection,
  or a latency that rose to ``latency_factor`` times the kind's baseline, multiplies the limit by
  ``decrease`` (not below ``minimum``). One congestion event lowers it once: answers to
  requests sent before the last decrease (they were already in flight) do not lower it again,
  and a latency that was answered becomes the kind's new baseline (a server that stays slower
  is not cut again and again; only a further rise is);
* **Retry-After** on a 429/503 (delta-seconds or an HTTP-date, :func:`xnatio.retry.
  parse_retry_after`) holds every new request of the run until then (capped at
  ``max_retry_after``).

Side effects are injectable (``clock`` for durations and deadlines, ``wallclock`` for HTTP
dates), and the decisions live in :meth:`AdaptiveLimit.try_acquire` and
:meth:`AdaptiveLimit.release`, which never sleep: the blocking :meth:`AdaptiveLimit.acquire` is a
thin loop over them, so tests replay any sequence of answers on a fake clock.

The cap on the whole fleet is the scheduler's (``sbatch --array=0-999%8`` × ``--max-requests``;
``docs/scale-out.md``); this limit makes each run back off when the server says it is full.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

import requests

from xnatio.retry import parse_retry_after

Clock = Callable[[], float]

# Answers that say "the server (or a proxy in front of it) is overloaded".
OVERLOAD_STATUSES = frozenset({429, 502, 503, 504})


class Signal(Enum):
    """How one answer counts for the limit."""

    OK = "ok"  # an answer (any status not in OVERLOAD_STATUSES): latency decides
    OVERLOAD = "overload"  # 429 / 502 / 503 / 504
    TIMEOUT = "timeout"  # no answer in time, or the connection dropped mid-request
    NEUTRAL = "neutral"  # nothing learnt (the request was cancelled, failed locally)


@dataclass
class Ticket:
    """One request in flight: when it started, under which limit epoch, and of what kind."""

    started: float
    epoch: int
    kind: str
    full_marks: int = 0  # how often the limit had been full when this request started
    settled: bool = False


@dataclass
class _Latency:
    baseline: float  # the fastest answers of this kind (a slowly forgetting minimum)
    recent: float  # exponentially weighted recent latency
    samples: int = 0


@dataclass
class LimitStats:
    """What the limit did, for logs, summaries and measurements."""

    limit: float
    in_flight: int
    peak_in_flight: int
    increases: int
    decreases: int
    retry_after_waits: int
    lowest_limit: float
    highest_limit: float


@dataclass
class AdaptiveLimit:
    """An AIMD limit on requests in flight, between ``minimum`` and ``cap`` (see module doc).

    ``initial``: the starting limit (default ``min(cap, 4)``; additive increase finds the rest).
    ``latency_factor``: a kind's recent latency this many times its baseline, and at least
    ``min_latency_rise`` seconds above it, counts as congestion; ``latency_samples`` answers of a
    kind are seen before its latency is judged. ``kind`` (given per request) separates requests
    whose latencies are not comparable (a 2 ms GET and a 30 s upload of a batch).
    """

    cap: int
    initial: int | None = None
    minimum: int = 1
    increase: float = 1.0
    decrease: float = 0.5
    latency_factor: float = 3.0
    min_latency_rise: float = 0.05
    latency_samples: int = 5
    max_retry_after: float = 300.0
    clock: Clock = time.monotonic
    wallclock: Clock = time.time
    _limit: float = field(init=False)
    _in_flight: int = field(init=False, default=0)
    _epoch: int = field(init=False, default=0)
    _full_marks: int = field(init=False, default=0)
    _hold_until: float = field(init=False, default=-math.inf)
    _latency: dict[str, _Latency] = field(init=False, default_factory=dict)
    _stats: LimitStats = field(init=False)
    _cond: threading.Condition = field(init=False, default_factory=threading.Condition)

    def __post_init__(self) -> None:
        if self.cap < 1 or not 1 <= self.minimum <= self.cap:
            raise ValueError(f"need 1 <= minimum ({self.minimum}) <= cap ({self.cap})")
        if not 0 < self.decrease < 1 or self.increase <= 0:
            raise ValueError("need 0 < decrease < 1 and increase > 0")
        start = min(self.cap, 4) if self.initial is None else self.initial
        self._limit = float(max(self.minimum, min(self.cap, start)))
        self._stats = LimitStats(self._limit, 0, 0, 0, 0, 0, self._limit, self._limit)

    # -- the decisions (never block) -------------------------------------------------------
    @property
    def limit(self) -> int:
        """Requests that may be in flight now (the integer part of the AIMD window)."""
        with self._cond:
            return max(self.minimum, int(self._limit))

    def try_acquire(self, kind: str = "") -> Ticket | float:
        """A ticket if a request may start now, else the seconds to wait before trying again
        (``math.inf``: until a request in flight ends)."""
        with self._cond:
            now = self.clock()
            if now < self._hold_until:
                return self._hold_until - now
            if self._in_flight >= max(self.minimum, int(self._limit)):
                return math.inf
            self._in_flight += 1
            if self._in_flight > self._stats.peak_in_flight:
                self._stats.peak_in_flight = self._in_flight
            ticket = Ticket(now, self._epoch, kind, self._full_marks)
            if self._in_flight >= max(self.minimum, int(self._limit)):
                self._full_marks += 1
            return ticket

    def release(
        self,
        ticket: Ticket,
        signal: Signal,
        *,
        retry_after: str | None = None,
    ) -> None:
        """The request of ``ticket`` ended with ``signal``; ``retry_after``: the answer's header."""
        with self._cond:
            if ticket.settled:
                return
            ticket.settled = True
            now = self.clock()
            # Grow only a limit that is used: it was full at some moment of this request's life.
            busy = self._full_marks > ticket.full_marks
            self._in_flight -= 1
            if signal is Signal.OVERLOAD or signal is Signal.TIMEOUT:
                self._decrease(ticket)
                if signal is Signal.OVERLOAD:
                    self._hold(retry_after, now)
            elif signal is Signal.OK:
                if self._slow(ticket.kind, now - ticket.started) and self._decrease(ticket):
                    # Answered once: this latency is the new reference, so that a server that
                    # stays this slow is not cut again and again; only a further rise is.
                    lat = self._latency[ticket.kind]
                    lat.baseline = lat.recent
                elif busy:
                    self._grow()
            self._cond.notify_all()

    def _hold(self, retry_after: str | None, now: float) -> None:
        delay = parse_retry_after(retry_after, now=self.wallclock())
        if delay is None or delay <= 0:
            return
        until = now + min(delay, self.max_retry_after)
        if until > self._hold_until:
            self._hold_until = until
            self._stats.retry_after_waits += 1

    def _decrease(self, ticket: Ticket) -> bool:
        if ticket.epoch != self._epoch:
            return False  # sent before the last decrease: that congestion was already answered
        self._limit = max(float(self.minimum), self._limit * self.decrease)
        self._epoch += 1
        self._stats.decreases += 1
        self._stats.lowest_limit = min(self._stats.lowest_limit, self._limit)
        return True

    def _grow(self) -> None:
        if self._limit >= self.cap:
            return
        self._limit = min(float(self.cap), self._limit + self.increase / self._limit)
        self._stats.increases += 1
        self._stats.highest_limit = max(self._stats.highest_limit, self._limit)

    def _slow(self, kind: str, seconds: float) -> bool:
        """Record a latency; True when the kind's recent latency rose well above its baseline."""
        lat = self._latency.get(kind)
        if lat is None:
            self._latency[kind] = _Latency(baseline=seconds, recent=seconds, samples=1)
            return False
        lat.samples += 1
        lat.recent += 0.3 * (seconds - lat.recent)
        # The baseline follows new minima at once and forgets old ones slowly (a server that
        # became slower for good is learnt again after some tens of answers).
        lat.baseline = min(seconds, lat.baseline + 0.02 * (seconds - lat.baseline))
        if lat.samples < self.latency_samples:
            return False
        rose = lat.recent > self.latency_factor * lat.baseline
        return rose and lat.recent - lat.baseline >= self.min_latency_rise

    # -- blocking use ------------------------------------------------------------------------
    def acquire(
        self, kind: str = "", *, cancelled: Callable[[], bool] | None = None, poll: float = 0.5
    ) -> Ticket | None:
        """Wait for a slot; None when ``cancelled()`` turned true while waiting."""
        while True:
            got = self.try_acquire(kind)
            if isinstance(got, Ticket):
                return got
            if cancelled is not None and cancelled():
                return None
            with self._cond:
                self._cond.wait(timeout=min(got, poll))

    @contextmanager
    def slot(self, kind: str = "") -> Iterator[Slot]:
        """``with limit.slot("POST import") as s: resp = …; s.answered(resp.status_code,
        resp.headers.get("Retry-After"))``. An exception out of the block counts as
        :data:`Signal.TIMEOUT` when it is a timeout or connection error, else NEUTRAL."""
        ticket = self.acquire(kind)
        assert ticket is not None
        slot = Slot()
        try:
            yield slot
        except BaseException as exc:
            self.release(ticket, signal_of_exception(exc))
            raise
        self.release(ticket, slot.signal, retry_after=slot.retry_after)

    def stats(self) -> LimitStats:
        with self._cond:
            s = self._stats
            return LimitStats(
                limit=self._limit,
                in_flight=self._in_flight,
                peak_in_flight=s.peak_in_flight,
                increases=s.increases,
                decreases=s.decreases,
                retry_after_waits=s.retry_after_waits,
                lowest_limit=s.lowest_limit,
                highest_limit=s.highest_limit,
            )


@dataclass
class Slot:
    """What the body of :meth:`AdaptiveLimit.slot` learnt about its answer."""

    signal: Signal = Signal.NEUTRAL
    retry_after: str | None = None

    def answered(self, status: int, retry_after: str | None = None) -> None:
        self.signal = signal_of_status(status)
        self.retry_after = retry_after


def signal_of_status(status: int) -> Signal:
    return Signal.OVERLOAD if status in OVERLOAD_STATUSES else Signal.OK


def signal_of_exception(exc: BaseException) -> Signal:
    """Timeouts and dropped connections are the server's load speaking; anything else is not."""
    timeouts = (requests.Timeout, requests.ConnectionError, TimeoutError, ConnectionError)
    return Signal.TIMEOUT if isinstance(exc, timeouts) else Signal.NEUTRAL


__all__ = [
    "OVERLOAD_STATUSES",
    "AdaptiveLimit",
    "LimitStats",
    "Signal",
    "Slot",
    "Ticket",
    "signal_of_exception",
    "signal_of_status",
]
