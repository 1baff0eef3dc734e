"""When to try again, and how long to wait first: one backoff policy for every transport.

Retrying one request (a batch, a commit, a login, an association) is bounded in time: it stops
``budget`` seconds after the request first failed (180 s by default, longer than a Tomcat
restart), or after ``retries`` further attempts, whichever comes first. A caller notes when the
first failure happened (``since = policy.clock()``) and passes it to :meth:`RetryPolicy.wait`,
which returns False once the budget is spent; the last wait is cut to end with the budget, so
one more attempt is made at its end.

Exponential backoff with *full jitter* (the delay before retry ``n`` is uniform in
``[0, min(cap, base * 2**n)]``), which spreads many workers that failed together (a 503 from an
overloaded XNAT hits all 42 batches at once) instead of having them come back in lock-step. A
server's ``Retry-After`` wins over the computed delay, up to ``max_retry_after``.

The policy is plain data; the caller decides what is transient (``xnatio.xnat.errors`` for HTTP,
DIMSE statuses for C-STORE) and sleeps through :meth:`RetryPolicy.wait`, which a cancel event cuts
short so Ctrl-C never waits out a backoff.

A request backing off from a *broken connection* (a server that is down or restarting) may also
pass a :class:`Reachability`, the count of answers its client has had from the server: the wait
ends as soon as another request reaches the server again. So when XNAT comes back from a restart,
every batch resumes at once instead of each at the end of its own backoff (up to ``cap``, 30 s,
measured: the batches of a 20 s outage came back over 18 s). Backoffs from an answer (503, a
race) are not cut short: the server is up and asked to be left alone.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xnatio import defaults

Sleep = Callable[[float], None]


class Reachability:
    """How many answers (of any status) a client has had from its server; waits for the next.

    ``answered`` is called by the client for every answer; :meth:`wait` sleeps until the count
    moves past the one seen when the wait began, or ``delay`` passes, or ``cancel`` is set.
    ``probe``: a cheap request the client makes to its server; while requests wait, one of them
    makes it every ``PROBE_EVERY`` seconds, so that the first answer after an outage wakes them
    all even when every one of them is in a long backoff.
    """

    POLL = 0.25  # seconds between looks at ``cancel``, which cannot wake the condition
    PROBE_EVERY = 1.0

    def __init__(self, probe: Callable[[], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._answers = 0
        self._waiting = 0
        self._probing = False
        self.probe = probe

    def answered(self) -> None:
        with self._cond:
            self._answers += 1
            if self._waiting:
                self._cond.notify_all()

    def wait(self, delay: float, cancel: threading.Event | None = None) -> bool:
        """Sleep up to ``delay`` seconds; True when woken by an answer to another request."""
        deadline = time.monotonic() + delay
        next_probe = time.monotonic() + self.PROBE_EVERY
        prober = False
        with self._cond:
            mark = self._answers
            self._waiting += 1
            try:
                while self._answers == mark:
                    now = time.monotonic()
                    left = deadline - now
                    if left <= 0 or (cancel is not None and cancel.is_set()):
                        return False
                    if self.probe is not None and not self._probing:
                        self._probing = prober = True
                    if prober and self.probe is not None and now >= next_probe:
                        next_probe = now + self.PROBE_EVERY
                        self._cond.release()  # the probe is a request: not under the lock
                        try:
                            self.probe()
                        finally:
                            self._cond.acquire()
                        continue
                    self._cond.wait(min(left, self.POLL))
                return True
            finally:
                self._waiting -= 1
                if prober:
                    self._probing = False


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """``retries`` further attempts after the first, with jittered exponential backoff.

    ``budget``: seconds after a request's first failure during which it is retried (see the
    module docstring); ``base``: first backoff ceiling in seconds; ``cap``: largest backoff
    ceiling; ``max_retry_after``: longest ``Retry-After`` honoured (a misconfigured proxy asking
    for an hour should not stall an upload for an hour); ``clock``: monotonic seconds (tests
    pass their own).
    """

    retries: int = defaults.RETRIES
    budget: float = defaults.RETRY_BUDGET
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 300.0
    rng: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)

    def left(self, since: float | None) -> float:
        """Seconds of the budget left for a request that first failed at ``since``."""
        if since is None:
            return self.budget
        return self.budget - (self.clock() - since)

    @property
    def attempts(self) -> int:
        """Total tries allowed (first one included)."""
        return max(0, self.retries) + 1

    def backoff(self, retry_number: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``retry_number`` (0 for the first retry)."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after)
        ceiling = min(self.cap, self.base * 2.0 ** max(0, retry_number))
        return ceiling * self.rng()

    def wait(
        self,
        retry_number: int,
        retry_after: float | None = None,
        *,
        cancel: threading.Event | None = None,
        sleep: Sleep | None = None,
        since: float | None = None,
        reach: Reachability | None = None,
    ) -> bool:
        """Sleep before a retry; False (do not retry) when the budget of a request that first
        failed at ``since`` is spent, or when ``cancel`` was set meanwhile. ``reach``: the
        request's connection broke; the wait ends early once another request is answered."""
        left = self.left(since)
        if left <= 0:
            return False
        delay = min(self.backoff(retry_number, retry_after), left)
        if sleep is not None:
            sleep(delay)
            return not (cancel is not None and cancel.is_set())
        if reach is not None:
            reach.wait(delay, cancel)
            return not (cancel is not None and cancel.is_set())
        if cancel is not None:
            return not cancel.wait(delay)
        time.sleep(delay)
        return True


NO_RETRY = RetryPolicy(retries=0)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date (RFC 9110 10.2.3).

    Unparseable or missing values give None (fall back to backoff); dates in the past give 0.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN -> None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
