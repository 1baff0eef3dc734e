"""Whether the next archive entry is deflated: ``--compress auto|always|never`` (issue 16).

XNAT accepts a streamed (chunked) compressed upload only as ``application/zip`` (facts 1.1), so
compression means a zip whose entries are DEFLATED, streamed with data descriptors
(:mod:`xnatio.archive`, format ``zip-deflated``). A zip may mix STORED and DEFLATED entries, so
``auto`` sends one streamed zip per batch (format ``zip-auto``) and asks :class:`Compression`
before each entry.

``auto`` compresses when the link is slower than the compressor can feed it, from what the run
measures, never from a guess:

* the **link rate**: wire bytes the server's side acknowledged, by every body of the upload,
  over the period since the choice was last reviewed: each body's pass is watched while it
  sends (:meth:`Compression.watch`), and its socket's count (bytes handed minus ``SIOCOUTQ``,
  :class:`xnatio.transports.rest.wire.AckedBytes`; bytes handed where the platform cannot say)
  is read at each review, from whichever thread reviews. Bytes handed to a socket are not bytes
  the link carried: 42 sockets whose send buffers grow to megabytes take hundreds of MB at
  memory speed, which made a 100 Mbit/s link look fast. While ``auto`` measures, the bodies
  also keep the bytes queued unsent per socket small (``TCP_NOTSENT_LOWAT``,
  :func:`xnatio.transports.rest.wire.limit_unsent`), so stored bytes do not pile up in socket
  buffers before the decision; once a stored period finds the link faster than deflating could
  beat (or the CPU deflating needs not idle), the limit is lifted from every body's socket, and
  set again for a trial. The files' bytes acknowledged (the payload rate) come from the
  bodies' reports (:meth:`Compression.delivered`), over the last ``window`` seconds;
* the **compressor's rate**: uncompressed bytes deflated per CPU second of the thread that
  deflates (``cpu_clock``, :func:`time.thread_time`), from the entries deflated in this run; the
  first entry, and one entry every ``sample_interval`` seconds even when ``auto`` stores, is
  deflated so that the rate is measured on this machine, under its current load; and the ratio
  (uncompressed / deflated) of those entries.

Sending N bytes stored costs N / link; deflated it costs max(N / compressor, N / (ratio × link)):
deflating pays when the compressor is faster than the link and the data shrink. The rule is
conservative (``margin``): deflate when ``link rate × margin < compressor rate (one core)`` and
``ratio ≥ min_ratio``; a link fast enough to be near what one core deflates (loopback) stays
uncompressed. The first ``warmup`` seconds of sending are not measured (connections opening,
TCP slow start); the first decision is taken from the ``probe`` seconds after them, within the
first second (entries go stored until then, but for the compressor's sample). Two ways of
sending fewer stored bytes before it were tried and dropped (docs/performance.md, "wan"):
deflating the warm-up's entries (on loopback the sockets hold megabytes in flight, so the
server spent the probe inflating them and the stored link measured 26 MB/s instead of
105-156), and a verdict after 0.15 s of the probe for links far below the compressor (on a
loaded loopback those 0.15 s measured 20 MB/s). Either way the trial then compared deflating
with a stored rate far too low, and the upload deflated to the end.

That rule cannot see the CPU the receiver or other processes need (a server on the same cores,
a loaded machine: measured in docs/performance.md, "Compression"), so deflating is a **trial**:
after ``trial`` seconds, the uncompressed bytes per second the server acknowledged while
deflating (the payload rate, what the user waits for, over the last ``window`` seconds of the
trial) is compared with the payload rate of the last period stored. Deflating goes on only while
it is ``gain`` times faster (a margin over the noise of a shared machine); if it is not, entries
go stored again and the next trial waits ``retry`` seconds (but not while the upload drains:
bodies ended and none took their place, so its last bodies carry less than the link could, and
the choice is kept). A first stored period that
underestimated the link (deflated, the wire carried more than ``margin`` times as much) is
measured again, stored, for ``probe`` seconds (as long as the first measurement, not a
trial's length: each stored byte costs a slow link about three deflated ones).

Deflating takes CPU, and pays only where the link, not the CPU, limits the upload. Where the
machine's idle CPU is known (Linux, ``/proc/stat``: :func:`machine_idle_seconds`):

* no trial is made when, while it stored, fewer cores were idle than deflating needs to beat
  storing by ``gain`` (``gain × link / compressor``);
* a trial that beat only the start-up's stored rate ends, stored for a trial's length, when,
  while it deflated, fewer cores were idle than deflating was using (``payload /
  compressor``): the CPU was saturated, so deflating may have taken it from the upload itself
  rather than beaten the link. A trial against the rate measured then is judged as any other
  (at 400 Mbit/s deflating saturates the cores too, and wins against the stored rate).

A trial against the start-up's rate is looked at once after ``probe`` seconds already, for
that rule alone (saturated cores): on a fast link with the receiver on the same cores it ended
deflating 1.5 s sooner; with idle cores the trial runs its length.

That CPU would otherwise come from a receiver on the same cores (loopback: the first stored
period, start-up included, measured half the steady rate, a trial beat it, and a 15,000-file
upload deflated to the end, 1.24× the time of ``--compress never``) or from other work; on a
slow link deflating leaves the cores mostly idle and these checks do not apply. One thread
reviews at a time; the others go on with the choice. So ``auto`` never stays on a path that
made the run slower. Entries follow the decision as it changes (one decision for all batches of
an upload, thread-safe), so a run whose link slows down (or speeds up) follows it.

A server on this machine (loopback, or one of its own addresses, and no proxy) is reached over
no link at all: ``auto`` is ``never`` there (:func:`for_server`), the tar, without measuring.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from xnatio import defaults

log = logging.getLogger(__name__)

COMPRESS_MODES = ("auto", "always", "never")
Clock = Callable[[], float]
IdleClock = Callable[[], "float | None"]
_PROC_STAT = "/proc/stat"


def machine_idle_seconds(path: str = _PROC_STAT) -> float | None:
    """CPU seconds the machine's cores have been idle (idle + iowait, all cores together) since
    boot, from Linux's ``/proc/stat``; None where it cannot be read (other systems)."""
    try:
        with open(path, "rb") as f:
            fields = f.readline().split()
        ticks = int(fields[4]) + int(fields[5])  # "cpu user nice system idle iowait ..."
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def for_server(mode: str, on_this_machine: bool) -> str:
    """The mode an upload runs with: ``auto`` to a server on this machine (loopback, or this
    machine's own address, no proxy: :meth:`xnatio.xnat.client.XnatClient.on_this_machine`)
    is ``never``. Nothing crosses a link there, so deflating cannot make the upload faster, and
    it takes CPU from the receiver, which runs on the same cores; and no measurement tells a
    local server's start-up (42 connections opening: 12-33 MB/s over the first 0.75 s) from a
    slow link, so a measured ``auto`` began every such upload with a trial of deflating
    (docs/performance.md, "loop"). A server reached through a tunnel that listens
    here (``ssh -L``) is on this machine as far as a socket can tell: ``--compress always``
    deflates for the link behind it."""
    if mode == "auto" and on_this_machine:
        log.debug("compress auto: the server is on this machine: no link to gain on, stored")
        return "never"
    return mode


class Meter(Protocol):
    """What one body's pass says of its socket (:class:`xnatio.transports.rest.wire.AckedBytes`)."""

    def acknowledged(self) -> int: ...

    def limit_unsent(self, nbytes: int) -> bool: ...


class Compression:
    """The per-entry deflate decision of one upload, fed with what the run measures."""

    def __init__(
        self,
        mode: str = defaults.COMPRESS,
        *,
        clock: Clock = time.monotonic,
        cpu_clock: Clock = time.thread_time,
        idle_clock: IdleClock = machine_idle_seconds,
        margin: float = defaults.COMPRESS_MARGIN,
        window: float = defaults.COMPRESS_WINDOW,
        warmup: float = defaults.COMPRESS_WARMUP,
        probe: float = defaults.COMPRESS_PROBE,
        sample_interval: float = defaults.COMPRESS_SAMPLE_INTERVAL,
        min_ratio: float = defaults.COMPRESS_MIN_RATIO,
        trial: float = defaults.COMPRESS_TRIAL,
        retry: float = defaults.COMPRESS_RETRY,
        gain: float = defaults.COMPRESS_GAIN,
        unsent: int = defaults.COMPRESS_UNSENT,
    ) -> None:
        if mode not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)}, not {mode!r}")
        self.mode = mode
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.idle_clock = idle_clock
        self.margin = margin
        self.window = window
        self.warmup = warmup
        self.probe = probe
        self.sample_interval = sample_interval
        self.min_ratio = min_ratio
        self.trial = trial
        self.retry = retry
        self.gain = gain
        self.unsent = unsent
        self._lock = threading.Lock()
        # The bodies' sockets keep at most ``unsent`` bytes unsent while this is True (auto,
        # until the link is known to be faster than deflating could beat: _review_period).
        self._limiting = mode == "auto"
        # (when, wire, payload) acknowledged within the last window
        self._delivered: deque[tuple[float, int, int]] = deque()
        self._live: list[Meter] = []  # the bodies sending now
        self._most_live = 0  # the most bodies sending at once since the period began
        self._watched = False  # a body was ever watched (else its reports are the count)
        self._retired = 0  # wire bytes acknowledged of the bodies that ended
        self._reported_wire = 0  # wire bytes the bodies reported (when none is watched)
        self._mark = 0  # acknowledged() when the current period began
        self._idle_mark: float | None = None  # idle_clock() then
        self._last_link: float | None = None  # wire bytes/s of the last period reviewed
        self._link_stored: float | None = None  # wire bytes/s of the last period stored
        self._from_probe = False  # that period was the first one (start-up included)
        self._start: float | None = None  # the first entry asked for: sending begins
        self._deflating = False  # auto: the current choice
        self._decided = False  # the first decision (``probe`` seconds in) was taken
        self._remeasuring = False  # stored again for a probe's length (an underestimated link)
        self._looked = False  # the current trial was looked at after a probe's length
        self._reviewing = False  # a thread is reviewing the choice
        self._warm = False  # the warm-up is over: the first period is measured
        self._since = 0.0  # when the current choice was taken (or last reviewed)
        self._payload_rate: dict[bool, float] = {}  # payload bytes/s of the last period of each
        self._not_before = 0.0  # the next trial of deflating, after one that lost
        self._raw = 0  # uncompressed bytes deflated
        self._packed = 0  # their deflated size
        self._cpu = 0.0  # CPU seconds spent deflating them
        self._last_sample: float | None = None
        self.entries = {True: 0, False: 0}  # entries deflated / stored, for the report

    @property
    def limiting(self) -> bool:
        """Whether the sockets of the bodies watched now keep their unsent queues short."""
        with self._lock:
            return self._limiting

    # -- what the run measures ---------------------------------------------------------------

    def watch(self, meter: Meter) -> None:
        """A body starts sending: ``meter.acknowledged()`` counts its wire bytes the peer has
        acknowledged (:class:`xnatio.transports.rest.wire.AckedBytes`), read at each review."""
        if self.mode != "auto":
            return
        now = self.clock()
        with self._lock:
            self._begin(now)
            self._live.append(meter)
            self._most_live = max(self._most_live, len(self._live))
            self._watched = True
            if self._limiting:  # under the lock: a body never misses a change of the limit
                meter.limit_unsent(self.unsent)

    def _limit(self, on: bool) -> None:
        """Limit (or stop limiting) the unsent queue of every body watched now and later."""
        with self._lock:
            if self._limiting == on:
                return
            self._limiting = on
            for meter in self._live:
                meter.limit_unsent(self.unsent if on else 0)
        log.debug("compress auto: unsent bytes per socket %s", "limited" if on else "not limited")

    def unwatch(self, meter: Meter) -> None:
        """The body's pass ended (sent, failed or cancelled): its count is kept."""
        if self.mode != "auto":
            return
        acknowledged = meter.acknowledged()
        with self._lock:
            for i, live in enumerate(self._live):
                if live is meter:
                    del self._live[i]
                    self._retired += acknowledged
                    break

    def delivered(self, wire: int, payload: int) -> None:
        """The server's side acknowledged ``wire`` more bytes of some body (compressed or not),
        carrying ``payload`` bytes of the files."""
        if self.mode != "auto" or (wire <= 0 and payload <= 0):
            return
        now = self.clock()
        with self._lock:
            self._begin(now)
            self._reported_wire += max(wire, 0)
            self._delivered.append((now, max(wire, 0), max(payload, 0)))
            while self._delivered and self._delivered[0][0] < now - self.window:
                self._delivered.popleft()

    def _begin(self, now: float) -> None:
        if self._start is None:  # (under the lock)
            self._start = self._since = now

    def acknowledged(self) -> int:
        """Wire bytes of all bodies the peer acknowledged so far: the watched bodies, read now;
        the bodies' own reports when none was ever watched."""
        with self._lock:
            live, retired, watched = list(self._live), self._retired, self._watched
            if not live and not retired and not watched:
                return self._reported_wire
        return retired + sum(m.acknowledged() for m in live)

    def deflated(self, raw: int, packed: int, cpu_seconds: float) -> None:
        """One entry of ``raw`` bytes was deflated to ``packed`` in ``cpu_seconds`` of CPU."""
        with self._lock:
            self._raw += raw
            self._packed += packed
            self._cpu += max(cpu_seconds, 0.0)

    def _payload_rate_over(self, now: float, span: float) -> float | None:
        """Uncompressed bytes per second the bodies reported acknowledged over the last
        ``span`` seconds; None when nothing was in that span."""
        span = min(span, self.window)
        if span <= 0:
            return None
        payload = 0
        with self._lock:
            for when, _, p in reversed(self._delivered):
                if when <= now - span:
                    break
                payload += p
        return payload / span if payload > 0 else None

    def link_rate(self) -> float | None:
        """Wire bytes per second the peer acknowledged in the last period reviewed (None
        before the first): what the link carried, deflated or not."""
        with self._lock:
            return self._last_link

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
            if self._start is None:
                self._start = self._since = now
            due = self._last_sample is None or now - self._last_sample >= self.sample_interval
            if due:  # keep the compressor's rate measured, on this machine, under today's load
                self._last_sample = now
        if due:
            return True
        self._review(now)
        return self._deflating

    def _review(self, now: float) -> None:
        """``probe`` seconds in, then every ``trial`` seconds: take, keep or change the choice,
        from what was measured since it was last taken."""
        with self._lock:
            if not self._warm:
                if self._start is None or now - self._start < self.warmup or self._reviewing:
                    return
                self._reviewing = True
        if not self._warm:  # the connections are open: the first period starts now
            acknowledged, idle = self.acknowledged(), self.idle_clock()
            with self._lock:
                self._since, self._mark, self._warm = now, acknowledged, True
                self._idle_mark = idle
                self._reviewing = False
            return
        with self._lock:
            since, deflating, mark = self._since, self._deflating, self._mark
            idle_mark = self._idle_mark
            period = self.trial if self._decided and not self._remeasuring else self.probe
            # A trial against the start-up's stored rate is looked at once after a probe's
            # length already: saturated cores end it then (see _review_period).
            early = deflating and self._from_probe and not self._looked
            if early:
                period = self.probe
            if now - since < period or self._reviewing:
                return
            self._reviewing = True  # one thread reviews; the others go on with the choice
        try:
            self._review_period(now, since, deflating, mark, idle_mark, early)
        finally:
            with self._lock:
                self._reviewing = False

    def _review_period(
        self,
        now: float,
        since: float,
        deflating: bool,
        mark: int,
        idle_mark: float | None,
        early: bool = False,
    ) -> None:
        acknowledged, idle_now = self.acknowledged(), self.idle_clock()
        wire = (acknowledged - mark) / (now - since)
        if wire <= 0:
            return  # nothing acknowledged yet: no decision from nothing
        if deflating:  # what the files gained: the bodies' reports over the trial's last window
            payload = self._payload_rate_over(now, now - since)
            if payload is None:
                return
        else:
            payload = wire  # stored: the files' own bytes (but the compressor's samples)
        idle = (
            (idle_now - idle_mark) / (now - since)
            if idle_now is not None and idle_mark is not None
            else None
        )
        deflate, ratio = self.deflate_rate(), self.ratio()
        if early:
            # A probe's length into a trial that beat the start-up's rate: only saturated cores
            # (below) end it this soon, a payload rate over so short a trial is not judged. On
            # loopback that ended deflating 1.5 s sooner; otherwise the trial runs its length.
            using = payload / deflate if deflate else 0.0
            if idle is None or idle >= using:
                with self._lock:
                    self._looked = True
                return
        log.debug(
            "compress auto: %.2f s in, %s: link %.1f MB/s, payload %.1f MB/s",
            now - (self._start or now),
            "deflating" if deflating else "stored",
            wire / 1e6,
            payload / 1e6,
        )
        with self._lock:
            first = not self._decided
            self._decided = True
            self._last_link = wire
            self._payload_rate[deflating] = payload
            stored = self._payload_rate.get(False)
            link_stored, from_probe = self._link_stored, self._from_probe
            if not deflating:
                self._link_stored, self._from_probe = wire, first
                self._remeasuring = False  # measured: stored periods last a trial again
            self._since, self._mark, self._idle_mark = now, acknowledged, idle_now
            live, most_live = len(self._live), self._most_live
            self._most_live = live
        if deflating:
            assert stored is not None and link_stored is not None  # a trial follows a stored period
            using = payload / deflate if deflate else 0.0  # cores deflating took
            if from_probe and idle is not None and idle < using:
                # The cores were saturated, and the stored rate this trial beat was the
                # start-up's: deflating may have taken its CPU from the upload itself (a
                # receiver on the same cores) rather than beaten the link. Stored, for a
                # trial's length (0.5 s right after deflating measured the receiver still
                # inflating); the idle CPU then says whether to try again, and a trial is
                # judged against that rate.
                log.debug(
                    "compress auto: storing (deflating used %.2f cores, %.2f were idle)",
                    using,
                    idle,
                )
                self._switch(False, now)
            elif payload < stored * self.gain and live < most_live:
                # Bodies ended and none took their place: the upload is draining, its last
                # bodies carry less than the link could (at 400 Mbit/s the last period measured
                # 24 MB/s of the files deflated against 48 stored, and the tail went stored:
                # 2-3 s lost). Not a verdict on deflating: the choice is kept.
                log.debug(
                    "compress auto: draining (%d of %d bodies sending): choice kept",
                    live,
                    most_live,
                )
            elif payload < stored * self.gain:  # not clearly faster: store
                log.debug(
                    "compress auto: storing again (payload %.1f MB/s deflated, %.1f MB/s stored)",
                    payload / 1e6,
                    stored / 1e6,
                )
                self._switch(False, now, not_before=now + self.retry)
            elif from_probe and wire > link_stored * self.margin:
                # The wire carried more deflated than stored: the first period (connections
                # opening, the server starting) did not measure the link. Measure it stored,
                # for a probe's length, not a trial's: at 100 Mbit/s under load a 2 s re-measure
                # stored 1.7 s of bytes (13 MB more on the wire) for a verdict the probe's
                # 0.5 s gives as well (docs/performance.md, "wan").
                log.debug(
                    "compress auto: measuring stored again (link %.1f MB/s deflated, %.1f stored)",
                    wire / 1e6,
                    link_stored / 1e6,
                )
                self._switch(False, now, remeasure=True)
            return
        if now < self._not_before:
            return
        if deflate is None or ratio is None:
            return
        if ratio < self.min_ratio or wire * self.margin >= deflate:
            self._limit(False)  # deflating cannot beat this link: no need to measure it closely
            return
        # Deflating must take CPU: to beat storing by the gain, gain × link / deflate-rate
        # cores. If the machine had fewer idle while it stored, that CPU would be taken from
        # the upload itself (a receiver on the same cores, as on loopback) or what shares
        # the machine: the link is not what limits this upload, so it stays stored.
        need = self.gain * wire / deflate
        if idle is not None and idle < need:
            log.debug(
                "compress auto: storing (deflating would need %.2f cores, %.2f were idle)",
                need,
                idle,
            )
            self._limit(False)
            return
        log.debug(
            "compress auto: deflating (link %.1f MB/s, deflate %.1f MB/s per core, ratio %.2f)",
            wire / 1e6,
            deflate / 1e6,
            ratio,
        )
        self._limit(True)
        self._switch(True, now)  # a trial: kept only if the payload rate goes up

    def _switch(
        self,
        deflating: bool,
        now: float,
        not_before: float | None = None,
        remeasure: bool = False,
    ) -> None:
        with self._lock:
            self._deflating = deflating
            self._remeasuring = remeasure
            self._looked = self._looked and not deflating  # a new trial is looked at anew
            self._since = now  # _mark was taken with it, in _review
            if not_before is not None:
                self._not_before = not_before
