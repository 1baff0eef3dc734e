"""Progress subscribers, driven by hand-made events (no network)."""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import pytest
from rich.console import Console

from xnatio.models import Phase, ProgressEvent
from xnatio.progress import (
    LogDisplay,
    RichDisplay,
    SilentDisplay,
    choose_display,
    cli_logging,
    format_event,
    tqdm_progress,
)

ANSI = re.compile(r"\x1b\[")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _upload(current: int, total: int = 100, mb: int = 1_000_000, **kw: int) -> ProgressEvent:
    return ProgressEvent(
        Phase.UPLOAD,
        current,
        total,
        bytes_done=current * mb // total,
        bytes_total=mb,
        batches_total=kw.get("bt", 10),
        batches_done=kw.get("bd", current // 10),
        batches_failed=kw.get("bf", 0),
    )


def test_format_event_has_files_bytes_rate_eta_batches() -> None:
    line = format_event(_upload(40, bf=1), rate=200_000)
    assert line.startswith("upload: 40/100 files, 400.0 kB/1.0 MB (40%)")
    assert "0.2 MB/s" in line
    assert "ETA 0:03" in line
    assert "batches 4/10 done, 1 failed" in line


def test_log_display_writes_on_phase_change_every_step_and_interval() -> None:
    out, clock = io.StringIO(), FakeClock()
    d = LogDisplay(out, interval=5.0, step=0.10, clock=clock)
    d(ProgressEvent(Phase.DISCOVER, 0, 0, "reading headers"))
    d(ProgressEvent(Phase.DISCOVER, 100, 100))
    for i in range(0, 101):  # 101 events, 1 % apart, no time passing
        d(_upload(i))
    clock.now += 6  # the interval passes: one more line, if anything changed
    d(_upload(100, bf=1))
    lines = out.getvalue().splitlines()
    assert lines[0] == "discover: reading headers"
    assert lines[1].startswith("discover: 100/100 files")
    upload = [ln for ln in lines if ln.startswith("upload:")]
    # first event of the phase, each 10 % step (10..100), then the one after the interval
    assert len(upload) == 12
    assert upload[-2].startswith("upload: 100/100 files, 1.0 MB/1.0 MB (100%)")
    assert upload[-1].endswith("1 failed")
    assert not ANSI.search(out.getvalue())


def test_log_display_progress_may_go_backwards() -> None:
    out, clock = io.StringIO(), FakeClock()
    d = LogDisplay(out, interval=5.0, clock=clock)
    d(_upload(50))
    clock.now += 10
    d(_upload(30))  # a batch failed and is resent
    assert out.getvalue().splitlines()[-1].startswith("upload: 30/100 files, 300.0 kB/")


def test_silent_display_prints_nothing(capsys: object) -> None:
    d = SilentDisplay()
    d(_upload(5))
    d.note("hello")
    d.close()
    assert capsys.readouterr() == ("", "")  # type: ignore[attr-defined]


def test_choose_display() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(choose_display(quiet=True, stream=Tty()), SilentDisplay)
    assert isinstance(choose_display(quiet=False, stream=io.StringIO()), LogDisplay)
    assert isinstance(choose_display(quiet=False, stream=Tty()), RichDisplay)


def test_rich_display_renders_phases_and_numbers() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, no_color=True)
    with RichDisplay(console) as d:
        d(ProgressEvent(Phase.DISCOVER, 10, 10))
        for i in range(0, 101, 25):
            d(_upload(i, bf=1))
        d(ProgressEvent(Phase.COMMIT, 0, 0, "archiving"))
    text = out.getvalue()
    assert "discover" in text and "upload" in text and "commit" in text
    assert "100/100 files" in text
    assert "10/10 batches, 1 failed" in text


def test_rich_display_respects_no_color(monkeypatch: object) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140)  # NO_COLOR=1 set by conftest
    with RichDisplay(console) as d:
        d(_upload(50, bf=2))
    assert "\x1b[31m" not in out.getvalue()  # no red for failed batches


def test_tqdm_progress_counts_bytes_in_upload_and_files_elsewhere() -> None:
    out = io.StringIO()
    with tqdm_progress(file=out, mininterval=0) as cb:
        cb(ProgressEvent(Phase.DISCOVER, 5, 10))
        cb(_upload(50))
        cb(_upload(20))  # backwards after a retry: shown, not accumulated
        cb(_upload(100, bd=10))
    text = out.getvalue()
    assert "discover" in text and "5/10" in text
    assert "upload" in text
    assert "1.00M/1.00M" in text
    assert "batches=10/10" in text


def test_rich_display_prints_log_records_above_the_live_lines() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, no_color=True)
    log = logging.getLogger("xnatio.transports")
    with cli_logging(out) as handler:  # the CLI's handler on the xnatio logger
        with RichDisplay(console) as d:
            d(_upload(10))
            assert handler.stream is not out  # routed through the console while live
            log.warning("batch 3: retrying after HTTP 503")
            d(_upload(20))
        assert handler.stream is out  # and given back afterwards
    assert "batch 3: retrying after HTTP 503" in out.getvalue()


def _verify(current: int, total: int = 100, size: int = 1_000_000, msg: str = "") -> ProgressEvent:
    return ProgressEvent(
        Phase.VERIFY, current, total, msg, bytes_done=current * size // total, bytes_total=size
    )


def test_log_display_shows_verify_like_upload() -> None:
    # The read-back after an upload (or `xio verify`): files and bytes hashed, speed, ETA.
    out, clock = io.StringIO(), FakeClock()
    d = LogDisplay(out, interval=60.0, step=0.10, clock=clock)
    d(_verify(0, msg="reading P/S/E back"))
    for i in range(1, 101):  # one file hashed every 0.1 s
        clock.now += 0.1
        d(_verify(i))
    lines = out.getvalue().splitlines()
    assert lines[0] == "verify: 0/100 files, 0 B/1.0 MB (0%), reading P/S/E back"
    assert len(lines) == 11  # the first event, then every 10 %
    assert lines[5] == "verify: 50/100 files, 500.0 kB/1.0 MB (50%), 0.1 MB/s, ETA 0:05"
    assert lines[-1] == "verify: 100/100 files, 1.0 MB/1.0 MB (100%), 0.1 MB/s"
    assert not ANSI.search(out.getvalue())


def test_rich_display_renders_verify_files_and_bytes() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, no_color=True)
    with RichDisplay(console) as d:
        d(_upload(100))
        d(_verify(0, total=50, msg="reading P/S/E back"))
        for i in range(1, 51, 7):
            d(_verify(i, total=50))
        d(_verify(50, total=50))
    text = out.getvalue()
    assert "verify" in text and "50/50 files 1.0/1.0 MB" in text


def test_tqdm_progress_counts_bytes_while_verifying() -> None:
    out = io.StringIO()
    with tqdm_progress(file=out, mininterval=0) as cb:
        cb(_verify(0, total=4, size=2_000_000, msg="reading P/S/E back"))
        cb(_verify(4, total=4, size=2_000_000))
    text = out.getvalue()
    assert "verify" in text and "2.00M/2.00M" in text


# -- the one counter both transports feed (xnatio.events) ------------------------------------------


def test_the_counter_throttles_bytes_but_tells_every_file_batch_and_message() -> None:
    from xnatio.events import ProgressCounter

    clock = FakeClock()
    events: list[ProgressEvent] = []
    counter = ProgressCounter(
        events.append, files_total=3, bytes_total=300, batches_total=2, clock=clock
    )
    counter.update(nbytes=100)  # told: the first in a while
    counter.update(nbytes=50)  # not told: bytes only, within 0.1 s
    clock.now += 0.2
    counter.update(nbytes=-50)  # told: a retried body took its bytes back
    counter.update(files=1, nbytes=0)  # files are always told
    counter.update(batch_done=True, failed=True)
    counter.update(message="2 association(s)")
    counter.phase(Phase.DONE, 1, 3, "done")
    assert [
        (e.phase, e.current, e.bytes_done, e.batches_done, e.batches_failed) for e in events
    ] == [
        (Phase.UPLOAD, 0, 100, 0, 0),
        (Phase.UPLOAD, 0, 100, 0, 0),
        (Phase.UPLOAD, 1, 100, 0, 0),
        (Phase.UPLOAD, 1, 100, 1, 1),
        (Phase.UPLOAD, 1, 100, 1, 1),
        (Phase.DONE, 1, 100, 1, 1),
    ]
    assert events[4].message == "2 association(s)"
    assert {(e.total, e.bytes_total, e.batches_total) for e in events[:-1]} == {(3, 300, 2)}


# --- issue 17: honest rates, files confirmed and in flight, the stopping line -----------------


def test_sliding_rate_is_the_recent_rate_and_average_the_phase() -> None:
    from xnatio.progress import SlidingRate

    clock = FakeClock()
    rate = SlidingRate(window=10.0, clock=clock)
    rate.add(0)
    clock.now += 0.5
    rate.add(1_000_000)
    assert rate.per_second() == 0.0  # under a second: too soon to say
    for _ in range(20):  # 1 MB/s for 20 s ...
        clock.now += 1
        rate.add(rate_done(rate) + 1_000_000, 0)
    for _ in range(10):  # ... then 4 MB/s (wire 1 MB/s) for 10 s
        clock.now += 1
        rate.add(rate_done(rate) + 4_000_000, rate_wire(rate) + 1_000_000)
    assert rate.per_second() == pytest.approx(4e6, rel=0.05)  # the last 10 s only
    assert rate.wire_per_second() == pytest.approx(1e6, rel=0.05)
    assert rate.average(rate_done(rate)) == pytest.approx(61e6 / 30.5, rel=0.01)
    clock.now += 10  # a stall shows as a falling rate, not the last one frozen
    assert rate.per_second() < 2.1e6
    rate.add(0)  # a retry took its bytes back: the window starts again
    assert rate.per_second() == 0.0


def rate_done(rate: Any) -> int:
    return int(rate._samples[-1][1])


def rate_wire(rate: Any) -> int:
    return int(rate._samples[-1][2])


def test_format_event_shows_files_in_flight_and_the_wire_rate_when_compressed() -> None:
    event = ProgressEvent(
        Phase.UPLOAD,
        58,
        1200,
        bytes_done=50_000_000,
        bytes_total=150_000_000,
        files_in_flight=120,
        wire_bytes=17_000_000,
    )
    line = format_event(event, rate=12e6, wire_rate=4.1e6)
    assert line.startswith("upload: 58/1200 files (120 in flight), 50.0 MB/150.0 MB (33%)")
    assert "12.0 MB/s (wire 4.1 MB/s), ETA 0:08" in line
    uncompressed = ProgressEvent(
        Phase.UPLOAD, 1, 2, bytes_done=100, bytes_total=200, wire_bytes=101
    )
    assert "wire" not in format_event(uncompressed, rate=12e6, wire_rate=12e6)


def _rich(width: int = 100) -> tuple[io.StringIO, Console]:
    out = io.StringIO()
    return out, Console(file=out, force_terminal=True, width=width, no_color=True)


def _plain(out: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())


def test_rich_display_shows_confirmed_and_in_flight_and_its_rate_is_recent() -> None:
    out, console = _rich()
    clock = FakeClock()
    d = RichDisplay(console, clock=clock)
    total = 150_000_000
    for second in range(31):  # 1 MB/s for 20 s, then 5 MB/s for 10 s
        clock.now = 100.0 + second
        done = second * 1_000_000 if second <= 20 else 20_000_000 + (second - 20) * 5_000_000
        d(
            ProgressEvent(
                Phase.UPLOAD,
                58,
                1200,
                bytes_done=done,
                bytes_total=total,
                files_in_flight=120,
                wire_bytes=done // 3,
                batches_total=42,
                batches_done=2,
            )
        )
    d._progress.refresh()
    live = _plain(out)
    d.close()
    text = _plain(out)
    assert "58 of 1200 files confirmed, 120 in flight" in text
    assert "; batches 2/42" in live  # its column is cut at this width
    upload = [ln for ln in re.split(r"[\r\n]", live) if ln.startswith("upload ")][-1]
    assert " 5.0 MB/s ETA 0:16 " in upload, upload  # the last 10 s: 50 MB / 10 s
    final = [ln for ln in re.split(r"[\r\n]", text) if ln.startswith("upload ")][-1]
    assert " 2.3 MB/s " in final, final  # once finished: the phase's average, 70 MB / 30 s
    assert "1.7 MB/s on the wire" in live


def test_rich_display_draws_the_stopping_line_itself_and_then_shows_no_progress() -> None:
    out, console = _rich()
    d = RichDisplay(console)
    assert d.stopping("") is False  # not live yet: the caller writes the line
    event = ProgressEvent(Phase.UPLOAD, 58, 1200, bytes_done=5, bytes_total=10, files_in_flight=120)
    d(event)
    assert d.stopping("finishing 3 requests in flight") is True
    d._progress.refresh()
    # Winding down: a batch of 42 confirmed before its request was cut, the others cut.
    d(ProgressEvent(Phase.UPLOAD, 100, 1200, bytes_done=10, bytes_total=10, files_in_flight=0))
    d._progress.refresh()
    d.close()
    text = _plain(out)
    assert "stopping: finishing 3 requests in flight… (Ctrl-C again to abort now)" in text
    assert "58 of 1200 files confirmed; 120 in flight, not confirmed" in text
    # the final message's count, and what was in flight and is not confirmed
    assert text.rstrip().endswith("100 of 1200 files confirmed; 78 in flight, not confirmed")
    assert "100/1200" not in text  # no other progress drawn
    assert LogDisplay(io.StringIO()).stopping("x") is False  # a log: the CLI writes the line


def test_at_80_columns_a_phase_with_nothing_to_count_shows_its_message_in_full() -> None:
    out, console = _rich(80)
    with RichDisplay(console) as d:
        d(ProgressEvent(Phase.CONNECT, 0, 1, "logging in to https://xnat.example.org"))
    connect = [ln for ln in re.split(r"[\r\n]", _plain(out)) if ln.startswith("connect ")][-1]
    assert "logging in to https://xnat.ex" in connect, connect
    assert len(connect.rstrip()) <= 80
