"""The adaptive (AIMD) load limit, on a fake clock: xnatio.adaptive."""

from __future__ import annotations

import email.utils
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from xnatio.adaptive import (
    AdaptiveLimit,
    Signal,
    Ticket,
    signal_of_exception,
    signal_of_status,
)

if TYPE_CHECKING:
    from xnatio.sandbox import SandboxServer


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: FakeClock, **kw: object) -> AdaptiveLimit:
    return AdaptiveLimit(clock=clock, wallclock=lambda: 1_700_000_000.0, **kw)  # type: ignore[arg-type]


def take(lim: AdaptiveLimit, kind: str = "") -> Ticket:
    got = lim.try_acquire(kind)
    assert isinstance(got, Ticket), got
    return got


def fill(lim: AdaptiveLimit) -> list[Ticket]:
    """Acquire until the limit refuses (math.inf: wait for a request to end)."""
    tickets = []
    while isinstance(got := lim.try_acquire(), Ticket):
        tickets.append(got)
    assert got == math.inf
    return tickets


def round_trip(lim: AdaptiveLimit, clock: FakeClock, seconds: float, signal: Signal) -> int:
    """One round: fill the limit, answer every request after ``seconds``; the limit before."""
    before = lim.limit
    tickets = fill(lim)
    assert len(tickets) == before
    clock.advance(seconds)
    for t in tickets:
        lim.release(t, signal)
    return before


def test_additive_increase_about_one_per_round_up_to_the_cap() -> None:
    clock = FakeClock()
    lim = limiter(clock, cap=10, initial=2)
    seen = [round_trip(lim, clock, 0.05, Signal.OK) for _ in range(20)]
    assert seen == sorted(seen)  # never down while answers are fast and clean
    assert seen[2] == 3  # about +1 per round of `limit` answers (1/limit per answer)
    rounds_to_cap = seen.index(10)
    assert 8 <= rounds_to_cap <= 16, seen
    assert max(seen) == 10 and lim.limit == 10
    assert lim.stats().peak_in_flight == 10


def test_an_unused_limit_does_not_grow() -> None:
    clock = FakeClock()
    lim = limiter(clock, cap=10, initial=4)
    for _ in range(50):  # one request at a time: the run never needs more
        t = take(lim)
        clock.advance(0.05)
        lim.release(t, Signal.OK)
    assert lim.limit == 4


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_overload_halves_the_limit_once_per_event(status: int) -> None:
    clock = FakeClock()
    lim = limiter(clock, cap=16, initial=16)
    tickets = fill(lim)
    clock.advance(0.05)
    for t in tickets:  # every request of the same round answers 503: one congestion event
        lim.release(t, signal_of_status(status))
    assert lim.limit == 8
    round_trip(lim, clock, 0.05, signal_of_status(status))  # a new round: a new event
    assert lim.limit == 4
    assert lim.stats().decreases == 2


def test_timeouts_decrease_and_the_limit_never_goes_below_minimum() -> None:
    clock = FakeClock()
    lim = limiter(clock, cap=8, initial=8, minimum=2)
    for _ in range(6):
        round_trip(lim, clock, 30, Signal.TIMEOUT)
    assert lim.limit == 2
    assert signal_of_exception(requests.ReadTimeout()) is Signal.TIMEOUT
    assert signal_of_exception(requests.ConnectionError()) is Signal.TIMEOUT
    assert signal_of_exception(ValueError()) is Signal.NEUTRAL
    assert signal_of_status(404) is Signal.OK and signal_of_status(500) is Signal.OK


def test_neutral_answers_change_nothing() -> None:
    clock = FakeClock()
    lim = limiter(clock, cap=8, initial=3)
    round_trip(lim, clock, 0.05, Signal.NEUTRAL)
    assert lim.limit == 3


def test_retry_after_seconds_hold_every_new_request() -> None:
    clock = FakeClock()
    lim = limiter(clock, cap=4, initial=4)
    a, b = take(lim), take(lim)
    lim.release(a, Signal.OVERLOAD, retry_after="7")
    assert lim.try_acquire() == pytest.approx(7)
    clock.advance(6.5)
    assert lim.try_acquire() == pytest.approx(0.5)
    clock.advance(0.5)
    assert isinstance(lim.try_acquire(), Ticket)
    lim.release(b, Signal.OK)
    assert lim.stats().retry_after_waits == 1


def test_retry_after_http_date_and_its_cap() -> None:
    clock = FakeClock()
    wall = 1_700_000_000.0
    lim = AdaptiveLimit(cap=4, clock=clock, wallclock=lambda: wall, max_retry_after=60)
    first, second = take(lim), take(lim)
    date = email.utils.formatdate(wall + 20, usegmt=True)
    lim.release(first, Signal.OVERLOAD, retry_after=date)
    assert lim.try_acquire() == pytest.approx(20)
    far = email.utils.formatdate(wall + 3600, usegmt=True)
    lim.release(second, Signal.OVERLOAD, retry_after=far)
    assert lim.try_acquire() == pytest.approx(60)  # capped by max_retry_after
    clock.advance(60)
    lim.release(take(lim), Signal.OVERLOAD, retry_after="not a date")
    assert isinstance(lim.try_acquire(), Ticket)  # an unreadable header holds nothing


def test_rising_latency_decreases_and_steady_latency_grows() -> None:
    clock = FakeClock()
    lim = limiter(clock, cap=32, initial=8)
    for _ in range(6):
        round_trip(lim, clock, 0.05, Signal.OK)
    grown = lim.limit
    assert grown > 8
    for _ in range(3):  # the server slows down tenfold
        round_trip(lim, clock, 0.5, Signal.OK)
    assert lim.stats().decreases == 1  # once for the rise, not at every slow answer
    assert lim.stats().lowest_limit <= lim.stats().highest_limit / 2
    for _ in range(2):  # ten times slower again: one more cut
        round_trip(lim, clock, 5, Signal.OK)
    assert lim.stats().decreases == 2
    # A different kind of request has its own baseline: a slow upload is not congestion.
    slow = limiter(clock, cap=32, initial=8)
    for _ in range(6):
        round_trip(slow, clock, 0.05, Signal.OK)
    before = slow.limit
    t = take(slow, "POST import")
    clock.advance(30)
    slow.release(t, Signal.OK)
    assert slow.limit >= before


def test_a_slower_server_is_learnt_again() -> None:
    """Latency that stays high becomes the new baseline: the limit grows again."""
    clock = FakeClock()
    lim = limiter(clock, cap=16, initial=8)
    for _ in range(5):
        round_trip(lim, clock, 0.05, Signal.OK)
    lows = [round_trip(lim, clock, 0.5, Signal.OK) for _ in range(20)]
    assert min(lows) <= lows[0] / 2 + 1  # it fell...
    assert lim.limit == 16  # ...and grew back to the cap once 0.5 s was the new normal


def test_release_twice_counts_once() -> None:
    clock = FakeClock()
    lim = limiter(clock, cap=4, initial=4)
    t = take(lim)
    lim.release(t, Signal.OVERLOAD)
    lim.release(t, Signal.OVERLOAD)
    assert lim.limit == 2 and lim.stats().in_flight == 0


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimit(cap=0)
    with pytest.raises(ValueError):
        AdaptiveLimit(cap=4, minimum=5)
    with pytest.raises(ValueError):
        AdaptiveLimit(cap=4, decrease=1.0)


events = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release"]),
        st.sampled_from(list(Signal)),
        st.floats(min_value=0, max_value=5),
        st.one_of(st.none(), st.sampled_from(["0", "1", "2.5", "bogus", "-3"])),
    ),
    max_size=200,
)


@settings(max_examples=200)
@given(st.integers(1, 20), st.integers(1, 20), events)
def test_invariants_under_any_sequence(cap: int, initial: int, script: list) -> None:  # type: ignore[type-arg]
    """Whatever the server answers: minimum <= limit <= cap, no request is granted past the
    limit, the peak never exceeds the cap, and in-flight counts balance."""
    clock = FakeClock()
    lim = limiter(clock, cap=cap, initial=initial)
    held: list[Ticket] = []
    for op, signal, dt, retry_after in script:
        clock.advance(dt)
        if op == "acquire":
            before = lim.stats()
            got = lim.try_acquire()
            if isinstance(got, Ticket):
                held.append(got)
                assert before.in_flight < max(1, int(before.limit))  # granted within the limit
            else:
                assert got > 0
        elif held:
            lim.release(held.pop(0), signal, retry_after=retry_after)
        stats = lim.stats()
        assert 1 <= lim.limit <= cap
        assert 1 <= stats.limit <= cap
        assert stats.in_flight == len(held)
        assert stats.peak_in_flight <= cap


def test_threads_never_exceed_the_limit() -> None:
    """Real threads through the blocking slot(): at most cap in flight at once."""
    lim = AdaptiveLimit(cap=3, initial=3)
    lock = threading.Lock()
    now = peak = 0

    def work(i: int) -> None:
        nonlocal now, peak
        with lim.slot() as s:
            with lock:
                now += 1
                peak = max(peak, now)
            time.sleep(0.005)
            with lock:
                now -= 1
            s.answered(503 if i == 7 else 200, None)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak <= 3
    assert lim.stats().in_flight == 0
    assert lim.stats().decreases >= 1


def test_acquire_gives_up_when_cancelled() -> None:
    lim = AdaptiveLimit(cap=1)
    held = lim.acquire()
    assert held is not None
    assert lim.acquire(cancelled=lambda: True, poll=0.01) is None


# -- against the sandbox over real HTTP --------------------------------------------------------
def _hammer(url: str, workers: int, requests_each: int, limit: AdaptiveLimit | None) -> list[int]:
    """``workers`` threads, each sending GETs; through ``limit`` when given. Returns statuses."""
    statuses: list[int] = []
    lock = threading.Lock()

    def one(session: requests.Session) -> None:
        if limit is None:
            status = session.get(url, timeout=30).status_code
        else:
            with limit.slot("GET") as slot:
                resp = session.get(url, timeout=30)
                status = resp.status_code
                slot.answered(status, resp.headers.get("Retry-After"))
        with lock:
            statuses.append(status)

    def worker() -> None:
        with requests.Session() as session:
            for _ in range(requests_each):
                one(session)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


@pytest.mark.integration
def test_sandbox_counts_its_peak_concurrency(xnat_server: SandboxServer) -> None:
    url = xnat_server.url + "/xapi/siteConfig/buildInfo"
    xnat_server.set_knobs(latency_ms=40)
    _hammer(url, workers=6, requests_each=3, limit=None)
    stats = requests.get(xnat_server.url + "/_sandbox/stats", timeout=10).json()
    assert stats["inflight"] == 0
    assert 3 <= stats["inflight_peak"] <= 6  # six threads at once (not all need overlap)
    # A POST starts a new measurement; a capped client never shows more than its cap.
    reset = requests.post(xnat_server.url + "/_sandbox/stats", timeout=10).json()
    assert reset["inflight_peak"] == 0
    _hammer(url, workers=6, requests_each=3, limit=AdaptiveLimit(cap=2, initial=2))
    assert xnat_server.stats()["inflight_peak"] <= 2


@pytest.mark.integration
def test_sandbox_overload_knob_and_the_limit_backing_off(xnat_server: SandboxServer) -> None:
    """A server that holds 3 requests answers 503 beyond them; an adaptive client that started at
    a cap of 8 comes down, and the server then sees few 503s."""
    url = xnat_server.url + "/xapi/siteConfig/buildInfo"
    xnat_server.set_knobs(latency_ms=30, overload_inflight=3)
    blind = _hammer(url, workers=8, requests_each=4, limit=None)
    assert blind.count(503) > 0
    requests.post(xnat_server.url + "/_sandbox/stats", timeout=10)
    limit = AdaptiveLimit(cap=8, initial=8)
    statuses = _hammer(url, workers=8, requests_each=6, limit=limit)
    stats = limit.stats()
    assert stats.decreases >= 1
    assert stats.lowest_limit <= 4
    assert statuses.count(503) < blind.count(503)
    assert xnat_server.stats()["inflight_peak"] <= 8


# -- wired into the HTTP client and upload-many ---------------------------------------------------
@pytest.mark.integration
def test_client_requests_go_through_the_limit(xnat_server: SandboxServer) -> None:
    """XnatClient(limiter=...): a server full beyond 2 requests answers 503; the client's
    limit comes down from 6, every request still succeeds (retried), and the server never
    sees more than the cap."""
    from xnatio.retry import RetryPolicy
    from xnatio.xnat.client import XnatClient

    limit = AdaptiveLimit(cap=6, initial=6)
    client = XnatClient(
        xnat_server.url,
        username=xnat_server.username,
        password=xnat_server.password,
        pool_size=6,
        retry=RetryPolicy(retries=8, base=0.01, cap=0.05),
        limiter=limit,
    )
    with client:
        client.login()
        xnat_server.set_knobs(latency_ms=30, overload_inflight=2)
        requests.post(xnat_server.url + "/_sandbox/stats", timeout=10)
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                for _ in range(5):
                    client.get_json("/data/projects", {"format": "json"})
            except BaseException as exc:  # collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    stats = limit.stats()
    assert stats.decreases >= 1 and stats.lowest_limit <= 3
    assert stats.in_flight == 0
    assert xnat_server.stats()["inflight_peak"] <= 6
    assert xnat_server.stats().get("status.503", 0) >= 1


def test_upload_many_adapts_only_when_max_requests_is_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from xnatio.cli import upload_many as command
    from xnatio.cli.main import cli

    seen = []
    monkeypatch.setattr(command, "_upload_many", lambda req, opts, *a: seen.append(opts) or 0)
    base = ["upload-many", str(tmp_path), "--project", "P"]
    for extra, adaptive, cap in (([], False, 42), (["--max-requests", "8"], True, 8)):
        result = CliRunner().invoke(cli, [*base, *extra])
        assert result.exit_code == 0, result.output
        assert seen[-1].adaptive is adaptive and seen[-1].max_requests == cap


@pytest.mark.integration
def test_upload_many_run_puts_the_limit_on_its_shared_client(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    from xnatio.many.runner import ManyOptions, ManyRun
    from xnatio.settings import Secret, Settings

    settings = Settings(
        server=xnat_server.url,
        username=xnat_server.username,
        password=Secret(xnat_server.password),
    )
    for adaptive in (True, False):
        options = ManyOptions(max_requests=5, adaptive=adaptive)
        with ManyRun(settings=settings, options=options, state_dir=tmp_path / "state") as run:
            client = run.client()
            assert client is not None
            if adaptive:
                assert isinstance(client.limiter, AdaptiveLimit) and client.limiter.cap == 5
            else:
                assert client.limiter is None
