"""The backoff policy: full jitter within a capped exponential ceiling, Retry-After honoured."""

from __future__ import annotations

import threading

import pytest

from xnatio.retry import RetryPolicy, parse_retry_after


def test_backoff_ceiling_doubles_then_caps() -> None:
    top = RetryPolicy(base=0.5, cap=4.0, rng=lambda: 1.0)
    assert [top.backoff(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_full_jitter_scales_the_ceiling_by_a_uniform_draw() -> None:
    draws = iter([0.0, 0.25, 0.999])
    policy = RetryPolicy(base=1.0, cap=100.0, rng=lambda: next(draws))
    assert policy.backoff(3) == 0.0
    assert policy.backoff(3) == 2.0
    assert policy.backoff(3) == pytest.approx(7.992)


def test_retry_after_wins_over_backoff_and_is_capped() -> None:
    policy = RetryPolicy(base=1.0, cap=30.0, max_retry_after=60.0, rng=lambda: 1.0)
    assert policy.backoff(0, retry_after=7.0) == 7.0
    assert policy.backoff(5, retry_after=0.0) == 0.0
    assert policy.backoff(0, retry_after=3600.0) == 60.0


def test_attempts_counts_the_first_try() -> None:
    assert RetryPolicy(retries=5).attempts == 6
    assert RetryPolicy(retries=0).attempts == 1


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("nan", None),
        # HTTP-date, 30 s after the "now" passed in below.
        ("Sun, 06 Nov 1994 08:49:37 GMT", 30.0),
        # A date in the past means "now".
        ("Sun, 06 Nov 1994 08:40:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    now = 784111747.0  # 1994-11-06 08:49:07 UTC
    assert parse_retry_after(header, now=now) == seconds


def test_wait_uses_injected_sleep_and_reports_cancel() -> None:
    slept: list[float] = []
    cancel = threading.Event()
    policy = RetryPolicy(base=2.0, rng=lambda: 0.5)
    assert policy.wait(1, sleep=slept.append, cancel=cancel) is True
    cancel.set()
    assert policy.wait(0, retry_after=9.0, sleep=slept.append, cancel=cancel) is False
    assert slept == [2.0, 9.0]


def test_wait_is_cut_short_by_cancel() -> None:
    cancel = threading.Event()
    cancel.set()
    # Without an injected sleep the wait is on the event itself: returns at once, False.
    assert RetryPolicy(base=1000.0, rng=lambda: 1.0).wait(0, cancel=cancel) is False


class FakeClock:
    """Monotonic seconds that move only when the policy sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_retrying_stops_once_the_budget_since_the_first_failure_is_spent() -> None:
    """Time-based: a server down for longer than the budget is given up on after about the
    budget, whatever the cap on attempts; the last wait ends with the budget."""
    clock = FakeClock()
    policy = RetryPolicy(
        retries=1000, budget=180.0, base=0.5, cap=30.0, rng=lambda: 1.0, clock=clock
    )
    since = clock()
    n = 0
    while policy.wait(n, since=since, sleep=clock.sleep):
        n += 1
    assert sum(clock.slept) == pytest.approx(180.0)
    assert clock.slept[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0] and max(clock.slept) == 30.0
    assert clock.slept[-1] < 30.0  # cut to end with the budget: one more attempt at its end
    assert policy.left(since) <= 0


def test_the_default_budget_outlasts_a_server_restart() -> None:
    """A Tomcat restart takes a minute or more: the defaults keep retrying for three minutes,
    and the attempt cap does not end it sooner on average (full jitter draws half the
    ceiling on average)."""
    policy = RetryPolicy()
    assert policy.budget >= 120.0
    ceilings = sum(RetryPolicy(rng=lambda: 1.0).backoff(n) for n in range(policy.retries))
    assert ceilings / 2 >= policy.budget


def test_the_attempt_cap_still_binds_when_reached_first() -> None:
    clock = FakeClock()
    policy = RetryPolicy(retries=3, budget=1e9, rng=lambda: 0.0, clock=clock)
    since = clock()
    allowed = [n for n in range(10) if n < policy.retries and policy.wait(n, since=since)]
    assert allowed == [0, 1, 2]


def test_a_wait_on_a_broken_connection_ends_when_another_request_is_answered() -> None:
    """A server back from a restart: every request backing off from a broken connection retries
    at once (the first answer to any of them wakes the rest), not at the end of its own backoff.
    Backoffs without ``reach`` (the server answered 503 or a race) are not cut short."""
    import threading

    from xnatio.retry import Reachability

    reach = Reachability()
    policy = RetryPolicy(retries=5, base=60.0, cap=60.0, rng=lambda: 1.0)  # a 60 s backoff
    woke = threading.Event()

    def waiter() -> None:
        assert policy.wait(0, reach=reach)
        woke.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert not woke.wait(0.3)  # still backing off
    reach.answered()  # another request reached the server
    assert woke.wait(10)
    t.join(10)
    # A wait that began after the answer is not woken by it, and a cancel still ends it.
    cancel = threading.Event()
    done = threading.Event()

    def cancelled() -> None:
        assert not policy.wait(0, cancel=cancel, reach=reach)
        done.set()

    t = threading.Thread(target=cancelled, daemon=True)
    t.start()
    assert not done.wait(0.3)
    cancel.set()
    assert done.wait(10)
    t.join(10)


def test_while_requests_wait_one_of_them_probes_the_server_and_an_answer_wakes_all() -> None:
    """Every request may be deep in its backoff when the server comes back: one waiter probes
    (a cheap request) every PROBE_EVERY seconds, and the probe's answer wakes them all."""
    import threading

    from xnatio.retry import Reachability

    probes: list[int] = []
    reach = Reachability()

    def probe() -> None:
        probes.append(len(probes))
        if len(probes) == 2:  # the server is back at the second probe
            reach.answered()

    reach.probe = probe
    reach.PROBE_EVERY = 0.05
    policy = RetryPolicy(retries=5, base=60.0, cap=60.0, rng=lambda: 1.0)
    woken = []
    threads = [
        threading.Thread(target=lambda: woken.append(policy.wait(0, reach=reach)), daemon=True)
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert woken == [True, True, True]
    assert len(probes) == 2  # one prober at a time, not one per waiter
