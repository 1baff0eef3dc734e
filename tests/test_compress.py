"""``--compress auto|always|never`` (issue 16): the decision with a fake clock, the mixed zip it
produces, and a compressed upload received and stored by the sandbox over real HTTP."""

from __future__ import annotations

import dataclasses
import io
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from xnatio import defaults
from xnatio.archive import make_archive_stream
from xnatio.cli.upload import upload_dicom
from xnatio.compress import Compression, machine_idle_seconds
from xnatio.discover import discover
from xnatio.models import Outcome
from xnatio.pipeline import UploadOptions, upload
from xnatio.sandbox.server import SandboxServer
from xnatio.settings import Secret, Settings
from xnatio.synth import generate_session
from xnatio.transports.rest import RestTarget
from xnatio.xnat.client import XnatClient

MB = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeSocketCount:
    """What a body's pass tells of its socket: wire bytes the peer acknowledged."""

    def __init__(self) -> None:
        self.acked = 0
        self.calls = 0
        self.unsent: int | None = None  # the socket's unsent limit; None: never set

    def acknowledged(self) -> int:
        self.calls += 1
        return self.acked

    def limit_unsent(self, nbytes: int) -> bool:
        self.unsent = nbytes
        return True


class FakeIdle:
    """The machine's idle CPU seconds: ``cores`` idle cores as the fake wall clock moves."""

    def __init__(self, wall: FakeClock, cores: float) -> None:
        self.wall, self.cores = wall, cores
        self.total, self.last = 0.0, wall.now

    def __call__(self) -> float:
        self.total += (self.wall.now - self.last) * self.cores
        self.last = self.wall.now
        return self.total


def decision(
    mode: str = "auto", idle_cores: float = 1.5
) -> tuple[Compression, FakeClock, FakeSocketCount]:
    wall, cpu = FakeClock(), FakeClock()
    c = Compression(mode, clock=wall, cpu_clock=cpu, idle_clock=FakeIdle(wall, idle_cores))
    c.deflated(10 * MB, int(10 * MB / 2.9), 0.1)  # 100 MB/s per CPU second, ratio 2.9
    sock = FakeSocketCount()
    c.watch(sock)  # a body starts sending: the clock of the run starts
    return c, wall, sock


def ask(c: Compression) -> bool:
    """The decision for an entry that is not the compressor's periodic sample."""
    c._last_sample = c.clock()  # the sample of this interval is taken
    return c.should_deflate()


def run(
    c: Compression,
    wall: FakeClock,
    sock: FakeSocketCount,
    rate: float,
    seconds: float,
    ratio: float = 1.0,
) -> list[tuple[float, bool]]:
    """The link carries ``rate`` wire bytes/s for ``seconds`` (the peer acknowledges them), each
    carrying ``ratio`` bytes of the files; an entry is asked for every 10 ms, as 42 bodies do.
    Returns (seconds since the first entry, verdict) of each entry."""
    verdicts = []
    for _ in range(round(seconds * 100)):
        wall.now += 0.01
        sock.acked += int(rate / 100)
        c.delivered(int(rate / 100), int(rate * ratio / 100))
        verdicts.append((round(wall.now - 100.0, 2), ask(c)))
    return verdicts


def first_deflated(verdicts: list[tuple[float, bool]]) -> float | None:
    return next((t for t, v in verdicts if v), None)


def first_stored_after(verdicts: list[tuple[float, bool]]) -> float | None:
    return next((t for t, v in verdicts if not v), None)


def test_a_slow_link_is_deflated_within_the_first_second() -> None:
    """100 Mbit/s: decided from the first ``warmup + probe`` seconds (0.75 s), not 2 + 4 s."""
    c, wall, sock = decision()
    verdicts = run(c, wall, sock, 12.5 * MB, 1.0)
    start = first_deflated(verdicts)
    assert start is not None and start <= 1.0
    assert start >= defaults.COMPRESS_WARMUP + defaults.COMPRESS_PROBE - 0.01
    assert not any(v for t, v in verdicts if t < start)  # stored while it measured
    # The trial: the link carries 2.9x the files' bytes deflated: kept.
    assert all(v for _, v in run(c, wall, sock, 12.5 * MB, 6, ratio=2.9))


def test_the_link_is_what_the_peer_acknowledged_not_what_the_bodies_reported() -> None:
    """The sockets' own counts are read at each review; a body reports only between chunks
    (here: never), which would make any link look idle."""
    c, wall, sock = decision()
    for _ in range(100):
        wall.now += 0.01
        sock.acked += int(12.5 * MB / 100)
        ask(c)
    assert c.link_rate() == pytest.approx(12.5 * MB, rel=0.05)
    assert ask(c) is True
    sock.acked = 0
    c2, wall2, sock2 = decision()
    for _ in range(100):  # the bodies report 300 MB/s, the sockets say the link took 12.5
        wall2.now += 0.01
        sock2.acked += int(12.5 * MB / 100)
        c2.delivered(3 * MB, 3 * MB)
        ask(c2)
    assert ask(c2) is True


def test_the_start_up_is_not_measured() -> None:
    """Connections opening (nothing acknowledged for the first 0.25 s) do not make a link that
    is as fast as the compressor look slow."""
    c, wall, sock = decision()
    assert not any(v for _, v in run(c, wall, sock, 0, defaults.COMPRESS_WARMUP))
    assert not any(v for _, v in run(c, wall, sock, 100 * MB, 3))  # 100 × 1.5 > 100 MB/s


def test_a_fast_link_is_stored() -> None:
    c, wall, sock = decision()
    assert not any(v for _, v in run(c, wall, sock, 300 * MB, 30))  # loopback
    assert c.link_rate() == pytest.approx(300 * MB, rel=0.05)


def test_a_link_near_the_compressor_is_stored() -> None:
    """Within the margin (link × 1.5 ≥ compressor): compressing could slow it, so not."""
    c, wall, sock = decision()
    assert not any(v for _, v in run(c, wall, sock, 80 * MB, 10))


def test_a_trial_that_makes_the_run_slower_is_abandoned_and_retried_later() -> None:
    """A slow link, but deflating costs CPU the receiver needed: the payload rate fell, so the
    upload goes back to stored entries, and tries again only after ``retry`` seconds."""
    c, wall, sock = decision()
    assert run(c, wall, sock, 30 * MB, 1)[-1][1] is True  # a trial
    trial = run(c, wall, sock, 6 * MB, defaults.COMPRESS_TRIAL, ratio=3.0)  # 18 MB/s < 30
    assert trial[-1][1] is False
    lost = next(t for t, v in trial if not v)
    later = run(c, wall, sock, 30 * MB, defaults.COMPRESS_RETRY + defaults.COMPRESS_TRIAL)
    again = first_deflated(later)
    assert again is not None and again - lost >= defaults.COMPRESS_RETRY - 0.02


def test_a_draining_upload_keeps_deflating() -> None:
    """The last bodies end: the files' rate falls below the stored rate because fewer bodies
    send, not because deflating lost. The choice is kept while bodies end without others taking
    their place; the same fall with every body still sending goes back to stored."""
    for draining in (True, False):
        c, wall, sock = decision()
        others = [FakeSocketCount() for _ in range(5)]
        for other in others:
            c.watch(other)
        assert run(c, wall, sock, 30 * MB, 1)[-1][1] is True  # a trial
        run(c, wall, sock, 30 * MB, defaults.COMPRESS_TRIAL, ratio=3.0)  # 90 > 30 × 1.15: kept
        if draining:
            for other in others:
                c.unwatch(other)  # their batches are done
        tail = run(c, wall, sock, 6 * MB, defaults.COMPRESS_TRIAL + 0.05, ratio=3.0)
        assert tail[-1][1] is draining  # 18 MB/s of the files < 30 × 1.15


def test_a_trial_within_the_noise_is_not_kept() -> None:
    c, wall, sock = decision()
    assert run(c, wall, sock, 30 * MB, 1)[-1][1] is True
    # 33 MB/s of the files: 1.1× the stored rate, below the gain
    assert run(c, wall, sock, 11 * MB, defaults.COMPRESS_TRIAL, ratio=3.0)[-1][1] is False


def test_a_first_period_that_underestimated_the_link_is_measured_again() -> None:
    """The first period saw 6 MB/s; deflated, the wire carried 30: the link is faster than
    measured, so stored is measured again (and, the link being that fast, kept)."""
    c, wall, sock = decision()
    assert run(c, wall, sock, 6 * MB, 1)[-1][1] is True  # deflating from 0.75 s
    # the trial ends at 2.75 s (the last entry of this run): measured stored again from there
    assert run(c, wall, sock, 30 * MB, defaults.COMPRESS_TRIAL - 0.25, ratio=2.0)[-1][1] is False
    assert not any(v for _, v in run(c, wall, sock, 90 * MB, 4))  # 90 × 1.5 > 100: stored


def test_an_underestimated_link_is_measured_stored_again_for_a_probe_only() -> None:
    """100 Mbit/s on a loaded machine: the first period saw 8 MB/s, deflated the wire carries
    12.5 (more than 1.5 × 8). Stored is measured again for ``probe`` seconds, not a trial's 2 s
    (measured at 100 Mbit/s under load: 1.7 s of stored bytes, 13 MB more on the wire), then,
    the link being that slow, deflated to the end."""
    c, wall, sock = decision()
    assert run(c, wall, sock, 8 * MB, 1)[-1][1] is True
    verdicts = run(c, wall, sock, 12.5 * MB, 20, ratio=2.9)
    stored = [t for t, v in verdicts if not v]
    assert stored  # measured again
    assert max(stored) - min(stored) <= defaults.COMPRESS_PROBE + 0.02
    assert all(v for t, v in verdicts if t > max(stored))


def test_only_one_thread_reviews_at_a_time() -> None:
    """42 bodies ask at once: one reviews (reads the sockets), the others go on with the
    current choice instead of each taking (and undoing) decisions."""
    import threading

    c, wall, sock = decision()
    run(c, wall, sock, 12.5 * MB, 0.5)
    inside, release = threading.Event(), threading.Event()
    reading = FakeSocketCount()

    def slow_read() -> int:
        reading.calls += 1
        inside.set()
        release.wait(5)
        return sock.acked

    reading.acknowledged = slow_read  # type: ignore[method-assign]
    c.watch(reading)
    wall.now += 1.0
    reviewer = threading.Thread(target=ask, args=(c,))
    reviewer.start()
    assert inside.wait(5)
    assert ask(c) is False  # not blocked behind the review, and no second review
    assert reading.calls == 1
    release.set()
    reviewer.join(5)
    assert ask(c) is True


def test_a_link_that_slows_down_is_followed() -> None:
    c, wall, sock = decision()
    assert not any(v for _, v in run(c, wall, sock, 300 * MB, 4))
    slower = run(c, wall, sock, 10 * MB, 3)  # the last period is what counts
    assert slower[-1][1] is True
    assert all(v for _, v in run(c, wall, sock, 10 * MB, 4, ratio=3.0))


def test_no_trial_when_the_cpu_deflating_needs_is_not_idle() -> None:
    """60 MB/s stored, one core deflates 100 MB/s: deflating to beat storing by the gain needs
    0.69 cores. With 0.3 idle (a receiver on the same cores) it stays stored; with enough idle,
    or the idle CPU unknown (not Linux), it is tried as before."""
    c, wall, sock = decision(idle_cores=0.3)
    assert not any(v for _, v in run(c, wall, sock, 60 * MB, 20))
    c, wall, sock = decision(idle_cores=0.8)
    assert run(c, wall, sock, 60 * MB, 1)[-1][1] is True
    wall2, cpu2 = FakeClock(), FakeClock()
    unknown = Compression("auto", clock=wall2, cpu_clock=cpu2, idle_clock=lambda: None)
    unknown.deflated(10 * MB, int(10 * MB / 2.9), 0.1)
    sock2 = FakeSocketCount()
    unknown.watch(sock2)
    assert run(unknown, wall2, sock2, 60 * MB, 1)[-1][1] is True


def test_deflating_on_saturated_cores_goes_back_to_stored() -> None:
    """Loopback: the start-up measured 30 MB/s stored, a trial deflated the files at 90 MB/s
    (far more than 30 × 1.15), but the cores were saturated meanwhile (0.1 idle while
    deflating used 0.9): stored again, and no trial while the cores stay that busy (before this
    rule, a 15,000-file upload deflated to the end: 1.24x the time of --compress never)."""
    c, wall, sock = decision(idle_cores=1.5)
    assert run(c, wall, sock, 30 * MB, 1)[-1][1] is True  # a trial from 0.75 s
    idle = c.idle_clock
    assert isinstance(idle, FakeIdle)
    idle.cores = 0.1
    trial = run(c, wall, sock, 30 * MB, defaults.COMPRESS_TRIAL, ratio=3.0)
    assert trial[-1][1] is False
    # Ended a probe's length in, not at the trial's end: 1.5 s less deflating on loopback.
    ended = first_stored_after(trial)
    assert ended is not None
    assert ended - trial[0][0] < defaults.COMPRESS_PROBE + 0.05
    assert not any(v for _, v in run(c, wall, sock, 30 * MB, 20))
    idle.cores = 1.5  # the cores free again (the other work ended): tried again
    assert any(v for _, v in run(c, wall, sock, 30 * MB, defaults.COMPRESS_TRIAL + 0.5))


def test_a_trial_on_idle_cores_is_not_ended_before_its_length() -> None:
    """The look a probe's length into a trial against the start-up judges only the cores: with
    cores idle, the trial runs its whole length even when its first half-second was slow."""
    c, wall, sock = decision(idle_cores=1.5)
    assert run(c, wall, sock, 30 * MB, 1)[-1][1] is True  # a trial against the start-up's 30
    # Half a second of deflated bytes slower than stored (in flight stored bytes ahead of them)
    assert all(v for _, v in run(c, wall, sock, 10 * MB, defaults.COMPRESS_PROBE + 0.1))
    trial = run(c, wall, sock, 30 * MB, defaults.COMPRESS_TRIAL, ratio=3.0)
    assert all(v for _, v in trial)  # 90 MB/s of the files > 30 × 1.15: kept


def test_sockets_queue_few_unsent_bytes_only_while_the_link_is_measured() -> None:
    """A socket's unsent queue is kept short while auto measures a link that deflating might
    beat (TCP_NOTSENT_LOWAT); once the link is faster than deflating could beat, every body's
    limit is lifted (0: the system's default), and set again for a trial on a link that slowed.
    On loopback the limit cost 3-5 s of the client's system CPU in a 15 s upload."""
    c, wall, sock = decision()
    assert sock.unsent == defaults.COMPRESS_UNSENT  # watched: limited from the first byte
    run(c, wall, sock, 300 * MB, defaults.COMPRESS_WARMUP + defaults.COMPRESS_PROBE + 0.05)
    assert sock.unsent == 0 and not c.limiting  # 300 × 1.5 ≥ 100 MB/s per core: lifted
    later = FakeSocketCount()
    c.watch(later)  # a body that starts now is not limited
    assert later.unsent is None
    verdicts = run(c, wall, sock, 12.5 * MB, 2 * defaults.COMPRESS_TRIAL + 0.1)
    assert first_deflated(verdicts) is not None  # the link slowed: a trial
    assert sock.unsent == defaults.COMPRESS_UNSENT and later.unsent == defaults.COMPRESS_UNSENT
    never = Compression("never")
    other = FakeSocketCount()
    never.watch(other)
    assert other.unsent is None and not never.limiting


def test_cores_too_busy_to_deflate_lift_the_limit_too() -> None:
    """60 MB/s stored, deflating would need 0.69 cores, 0.3 idle: stored, and the link need not
    be measured closely for a trial."""
    c, wall, sock = decision(idle_cores=0.3)
    assert not any(v for _, v in run(c, wall, sock, 60 * MB, 3))
    assert sock.unsent == 0


def test_saturated_cores_end_only_a_trial_against_the_start_up() -> None:
    """400 Mbit/s: deflating saturates the cores too, but a trial that beat a stored rate
    measured after the start-up (47 MB/s stored, 120 deflated) is kept to the end."""
    c, wall, sock = decision(idle_cores=1.5)
    assert run(c, wall, sock, 30 * MB, 1)[-1][1] is True  # a trial, against the start-up's 30
    idle = c.idle_clock
    assert isinstance(idle, FakeIdle)
    idle.cores = 0.1
    assert run(c, wall, sock, 40 * MB, defaults.COMPRESS_TRIAL, ratio=3.0)[-1][1] is False
    idle.cores = 1.5
    stored = run(c, wall, sock, 47 * MB, defaults.COMPRESS_TRIAL)  # measured stored again
    assert stored[-1][1] is True  # and tried again: 47 × 1.5 < 100, idle enough
    idle.cores = 0.1
    assert all(v for _, v in run(c, wall, sock, 40 * MB, 20, ratio=3.0))


def test_a_slow_link_that_leaves_the_cores_idle_is_deflated_to_the_end() -> None:
    c, wall, sock = decision(idle_cores=1.2)
    run(c, wall, sock, 12.5 * MB, 1)
    assert all(v for _, v in run(c, wall, sock, 12.5 * MB, 30, ratio=2.9))


def test_machine_idle_seconds_reads_proc_stat(tmp_path: Path) -> None:
    import os

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 20 0 7 0 0 0\ncpu0 50 0 25 500 10 0 3 0 0 0\n")
    assert machine_idle_seconds(str(stat)) == pytest.approx(1020 / os.sysconf("SC_CLK_TCK"))
    assert machine_idle_seconds(str(tmp_path / "missing")) is None
    stat.write_text("cpu  garbage\n")
    assert machine_idle_seconds(str(stat)) is None
    if Path("/proc/stat").exists():
        first = machine_idle_seconds()
        assert first is not None and first > 0


def test_nothing_measured_yet_stores_except_the_sample() -> None:
    wall, cpu = FakeClock(), FakeClock()
    c = Compression("auto", clock=wall, cpu_clock=cpu, idle_clock=lambda: None)
    assert c.should_deflate() is True  # the first entry measures the compressor
    assert c.should_deflate() is False  # nothing measured yet
    wall.now += 5
    assert c.link_rate() is None  # nothing acknowledged
    assert c.should_deflate() is True  # the compressor is sampled again, under today's load
    assert c.should_deflate() is False  # no deflate rate, no link rate: stored


def test_incompressible_data_are_stored() -> None:
    wall, cpu = FakeClock(), FakeClock()
    c = Compression("auto", clock=wall, cpu_clock=cpu)
    c.deflated(10 * MB, 9 * MB, 0.1)  # ratio 1.1 < COMPRESS_MIN_RATIO
    sock = FakeSocketCount()
    c.watch(sock)
    assert not any(v for _, v in run(c, wall, sock, 1 * MB, 4))


def test_always_and_never_do_not_measure() -> None:
    always, _, _ = decision("always")
    never, _, _ = decision("never")
    assert all(always.should_deflate() for _ in range(5))
    assert not any(never.should_deflate() for _ in range(5))
    assert not never.limiting and not always.limiting
    with pytest.raises(ValueError, match="compress must be one of"):
        Compression("fast")


def test_deflate_rate_is_cpu_time_measured_in_the_archive(tmp_path: Path) -> None:
    """The archive reports each deflated entry's size and CPU time to the decision."""
    files = _files(tmp_path, 4)
    cpu = FakeClock()
    c = Compression("always", clock=FakeClock(), cpu_clock=cpu)
    real_cpu = c.cpu_clock

    def ticking() -> float:
        cpu.now += 0.001
        return real_cpu()

    c.cpu_clock = ticking
    data = b"".join(make_archive_stream(files, "zip-deflated", root=tmp_path, compression=c))
    size = sum(f.size for f in files)
    assert c.deflate_rate() is not None and c.deflate_rate() == pytest.approx(size / 0.008)
    ratio = c.ratio()
    assert ratio is not None and ratio > 2
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}


def test_auto_zip_mixes_stored_and_deflated_entries(tmp_path: Path) -> None:
    files = _files(tmp_path, 6)
    answers = iter([True, False, True, False, False, True])

    class Alternating(Compression):
        def should_deflate(self) -> bool:
            return next(answers)

    c = Alternating("auto")
    stream = make_archive_stream(files, "zip-auto", root=tmp_path, compression=c)
    assert stream.size is None and stream.content_type == "application/zip"
    data = b"".join(stream)
    assert stream.raw_sent == sum(f.size for f in files)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        methods = [i.compress_type for i in zf.infolist()]
        assert methods == [8, 0, 8, 0, 0, 8]
        for f, info in zip(files, zf.infolist(), strict=True):
            assert zf.read(info) == f.path.read_bytes()


def test_target_wire_format_and_defaults() -> None:
    base: dict[str, Any] = {"project": "P", "subject": "S", "session": "E"}
    assert RestTarget(**base).wire_format == "zip-auto"
    assert RestTarget(**base, compress="always").wire_format == "zip-deflated"
    assert RestTarget(**base, compress="never").wire_format == "tar"
    assert RestTarget(**base, archive_format="zip").wire_format == "zip"  # asked for by name
    options = {f.name: f.default for f in dataclasses.fields(UploadOptions)}
    target = {f.name: f.default for f in dataclasses.fields(RestTarget)}
    [cli] = [p for p in upload_dicom.params if p.name == "compress"]
    assert options["compress"] == target["compress"] == cli.default == defaults.COMPRESS


# -- against the sandbox, over real HTTP --------------------------------------------------------


class Recording(requests.Session):
    """Keeps the Content-Type, Content-Length and body of every import request sent."""

    def __init__(self) -> None:
        super().__init__()
        self.imports: list[tuple[str, str | None, bytearray]] = []

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        data = kwargs.get("data")
        if "/data/services/import" in str(url) and data is not None and not isinstance(data, bytes):
            record = bytearray()
            headers = kwargs.get("headers") or {}
            length = str(len(data)) if hasattr(data, "__len__") else None
            self.imports.append((headers.get("Content-Type", ""), length, record))
            kwargs["data"] = _tee(data, record)
        return super().request(method, url, *args, **kwargs)


class _Tee:
    """The body as sent, kept in ``record``; sized when the body is (an exact Content-Length)."""

    def __init__(self, chunks: Iterable[bytes], record: bytearray) -> None:
        self.chunks, self.record = chunks, record

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.record += chunk
            yield chunk


class _SizedTee(_Tee):
    def __len__(self) -> int:
        return len(self.chunks)  # type: ignore[arg-type]


def _tee(chunks: Iterable[bytes], record: bytearray) -> _Tee:
    return _SizedTee(chunks, record) if hasattr(chunks, "__len__") else _Tee(chunks, record)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["always", "auto"])
def test_compressed_upload_lands_every_instance(
    xnat_server: SandboxServer, tmp_path: Path, mode: str
) -> None:
    session = generate_session(tmp_path / "MR", series=3, instances=12, image_size=(64, 64))
    recording = Recording()
    client = XnatClient(
        xnat_server.url,
        username=xnat_server.username,
        password=xnat_server.password,
        session=recording,
    )
    settings = Settings(
        server=xnat_server.url,
        username=xnat_server.username,
        password=Secret(xnat_server.password),
    )
    options = UploadOptions(
        project="PROJ",
        subject="SUBJ01",
        session="SUBJ01_MR1",
        path=session.root,
        upload_workers=2,
        archive_workers=1,
        compress=mode,
    )
    result = upload(settings=settings, options=options, client=client)
    assert result.success, result.errors
    assert len(result.files) == len(session.instances)
    assert {f.outcome for f in result.files} == {Outcome.VERIFIED}  # read back, by identity
    assert recording.imports  # one request: a small session goes whole (the single-request rule)
    methods = set()
    for content_type, length, body in recording.imports:
        if mode == "auto":  # the sandbox is on this machine: no link to gain on, the tar
            assert content_type == "application/x-tar" and length == str(len(body))
            continue
        assert content_type == "application/zip" and length is None  # chunked zip (facts 1.1)
        with zipfile.ZipFile(io.BytesIO(bytes(body))) as zf:
            methods |= {i.compress_type for i in zf.infolist()}
    if mode == "always":
        assert methods == {zipfile.ZIP_DEFLATED}
    sent = sum(f.size for f in discover(session.root).files)
    assert sent == sum(f.size for f in result.files)


def test_a_server_on_this_machine_is_sent_stored_by_auto() -> None:
    from xnatio.compress import for_server

    assert for_server("auto", True) == "never"
    assert for_server("auto", False) == "auto"
    assert for_server("always", True) == "always" and for_server("never", False) == "never"


def test_on_this_machine_is_the_kernels_answer() -> None:
    import socket

    from xnatio.xnat.client import on_this_machine

    for host in ("127.0.0.1", "localhost", "127.0.0.9", "[::1]"):
        assert on_this_machine(host), host
    # TEST-NET-2 (RFC 5737) and a name that cannot resolve: not this machine.
    assert not on_this_machine("198.51.100.7")
    assert not on_this_machine("no-such-host.invalid")
    assert not on_this_machine("")
    try:  # this machine's address on the interface of its default route, where it has one
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("198.51.100.7", 9))
            own = probe.getsockname()[0]
    except OSError:
        return
    assert on_this_machine(own)


def test_a_proxy_puts_the_server_beyond_a_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests a proxy takes cross whatever link is behind it: not on this machine."""
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    client = XnatClient("http://127.0.0.1:8080", username="u", password="p")
    assert client.on_this_machine()
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.org:3128")
    assert not client.on_this_machine()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert client.on_this_machine()
    client.session.proxies["http"] = "http://proxy.example.org:3128"
    assert not client.on_this_machine()
    assert not XnatClient("https://198.51.100.7/xnat", username="u", password="p").on_this_machine()


def _files(tmp_path: Path, n: int) -> list[Any]:
    session = generate_session(tmp_path / "src", series=1, instances=n, image_size=(64, 64))
    return list(discover(session.root).files)


def test_progress_of_a_compressed_body_counts_uncompressed_bytes(tmp_path: Path) -> None:
    """A chunked (deflated) body reports the files' bytes as their entries are produced, not
    only at its end, and never the (smaller) wire bytes."""
    import threading

    from xnatio.events import ProgressCounter
    from xnatio.transports.rest.bodies import StreamBody
    from xnatio.transports.rest.send import _raw_sent

    session = generate_session(tmp_path / "big", series=1, instances=16, image_size=(256, 256))
    files = list(discover(session.root).files)
    payload = sum(f.size for f in files)
    stream = make_archive_stream(files, "zip-deflated", root=tmp_path, compression=Compression())
    progress = ProgressCounter(None, files_total=len(files), bytes_total=payload, batches_total=1)
    body = StreamBody(stream, payload, progress, threading.Event(), raw_sent=_raw_sent(stream))
    seen = []
    wire = 0
    for chunk in body:
        wire += len(chunk)
        seen.append(progress.bytes_done)
    assert progress.bytes_done == payload > wire  # uncompressed, all of it
    # counted while streaming (as each chunk is taken), not only at the end
    assert any(0 < n < payload for n in seen)


# -- what the bodies tell the decision, over real sockets ---------------------------------------


def _loopback_pair() -> tuple[Any, Any]:
    """A loopback TCP connection whose receiver holds little and does not read."""
    import socket

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited on accept
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    listener.close()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)  # room for megabytes
    return sender, receiver


def _fill(sock: Any) -> int:
    """Hand ``sock`` what it takes without blocking; how much it took."""
    sock.setblocking(False)
    taken = 0
    for _ in range(1000):
        try:
            taken += sock.send(b"x" * 65536)
        except BlockingIOError:
            break
    return taken


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_NOTSENT_LOWAT, SIOCOUTQ")
def test_limit_unsent_keeps_stored_bytes_out_of_the_send_buffer() -> None:
    """Without the limit the socket takes megabytes ahead of a peer that does not read (all of
    them stored bytes before ``auto`` decides); with it, about the limit."""
    from xnatio.transports.rest.wire import limit_unsent, unacknowledged

    taken = {}
    for limit in (None, defaults.COMPRESS_UNSENT):
        sender, receiver = _loopback_pair()
        try:
            if limit is not None:
                assert limit_unsent(sender, limit)
            taken[limit] = _fill(sender)
            queued = unacknowledged(sender)
            assert queued is not None
            if limit is not None:
                assert queued <= 4 * limit  # the limit, and the one send() that crossed it
        finally:
            sender.close()
            receiver.close()
    assert taken[None] > 1_000_000 > 4 * taken[defaults.COMPRESS_UNSENT]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIOCOUTQ is Linux's")
def test_a_bound_count_is_read_from_another_thread() -> None:
    """The request's socket is this thread's (``sending_socket``); ``auto`` reads every body's
    count from whichever thread reviews, so a pass keeps its socket once it starts."""
    import threading

    from xnatio.transports.rest.wire import AckedBytes

    sender, receiver = _loopback_pair()
    owner = threading.get_ident()
    try:
        acked = AckedBytes(socket_of=lambda: sender if threading.get_ident() == owner else None)
        acked.bind()
        acked.was_handed(_fill(sender))
        seen: list[int] = []
        reader = threading.Thread(target=lambda: seen.append(acked.acknowledged()))
        reader.start()
        reader.join(5)
        assert seen and 0 < seen[0] < acked.handed  # the peer's count, not what was handed
    finally:
        sender.close()
        receiver.close()


def test_a_body_tells_the_decision_what_each_pass_delivered(tmp_path: Path) -> None:
    """Each pass of a body is watched while it sends (the socket's count is read at reviews)
    and reports what was acknowledged: wire bytes and the files' bytes they carry."""
    import threading

    from xnatio.events import ProgressCounter
    from xnatio.transports.rest.bodies import StreamBody
    from xnatio.transports.rest.send import _raw_sent

    files = _files(tmp_path, 8)
    payload = sum(f.size for f in files)

    class Recorder:
        def __init__(self) -> None:
            self.watching: list[Any] = []
            self.passes = 0
            self.wire = self.payload = 0

        def watch(self, meter: Any) -> None:
            self.watching.append(meter)
            self.passes += 1

        def unwatch(self, meter: Any) -> None:
            self.watching.remove(meter)

        def delivered(self, wire: int, payload: int) -> None:
            self.wire += wire
            self.payload += payload

    link = Recorder()
    stream = make_archive_stream(files, "zip-deflated", root=tmp_path, compression=Compression())
    progress = ProgressCounter(None, files_total=len(files), bytes_total=payload, batches_total=1)
    body = StreamBody(
        stream, payload, progress, threading.Event(), raw_sent=_raw_sent(stream), link=link
    )
    for _ in range(2):  # a first pass and a retry
        wire = 0
        for chunk in body:
            wire += len(chunk)
            assert len(link.watching) == 1  # watched while it sends
        assert link.watching == []  # and no longer once the pass ended
    assert link.passes == 2
    # No socket here: acknowledged = handed. Both passes were delivered.
    assert link.wire == 2 * wire and link.payload == 2 * payload


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_NOTSENT_LOWAT")
def test_a_body_that_measures_limits_its_sockets_unsent_bytes(tmp_path: Path) -> None:
    """A body watched by auto has its real socket's unsent queue limited as its pass starts;
    lifting the limit from another thread (the one that reviews) gives the socket back the
    system's default, the value it had before."""
    import socket
    import threading

    from xnatio.events import ProgressCounter
    from xnatio.transports.rest.bodies import StreamBody
    from xnatio.transports.rest.wire import AckedBytes

    files = _files(tmp_path, 2)
    payload = sum(f.size for f in files)
    sender, receiver = _loopback_pair()
    option = socket.TCP_NOTSENT_LOWAT  # type: ignore[attr-defined]
    try:
        before = sender.getsockopt(socket.IPPROTO_TCP, option)
        for mode in ("never", "auto"):
            link = Compression(mode, unsent=100_000)
            stream = make_archive_stream(files, "zip", root=tmp_path)
            progress = ProgressCounter(None, files_total=2, bytes_total=payload, batches_total=1)
            body = StreamBody(
                stream,
                payload,
                progress,
                threading.Event(),
                size=stream.size,
                acked=lambda: AckedBytes(socket_of=lambda: sender),  # the request's socket
                link=link,
            )
            sending = iter(body)
            next(sending)  # the pass has started (and goes on while `sending` is referenced)
            expected = before if mode == "never" else 100_000
            assert sender.getsockopt(socket.IPPROTO_TCP, option) == expected
        lifter = threading.Thread(target=link._limit, args=(False,))
        lifter.start()
        lifter.join()
        assert sender.getsockopt(socket.IPPROTO_TCP, option) == before
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("library", ["isal", "zlib"])
def test_either_deflater_writes_what_any_inflater_reads(library: str, tmp_path: Path) -> None:
    """ISA-L's deflate (where installed) and zlib's both write standard raw deflate streams: a
    zip reader (java.util.zip in XNAT, facts 1.1; zlib here) inflates them to the same bytes."""
    import zlib

    from xnatio.archive import DEFLATE_LIBRARY, deflater

    if library == "isal" and DEFLATE_LIBRARY != "isal":
        pytest.skip("python-isal is not installed here")
    data = b"".join(f.path.read_bytes() for f in _files(tmp_path, 3))
    z = deflater(defaults.COMPRESS_LEVEL, library)
    packed = b"".join(z.compress(data[i : i + 65536]) for i in range(0, len(data), 65536))
    packed += z.flush()
    assert zlib.decompressobj(-15).decompress(packed) == data
    assert len(packed) * 2 < len(data)
    assert type(z).__module__ == {"isal": "isal_zlib", "zlib": "zlib"}[library]


def test_isal_is_the_deflater_where_it_is_installed() -> None:
    from xnatio.archive import DEFLATE_LIBRARY

    try:
        import isal  # noqa: F401
    except ImportError:
        assert DEFLATE_LIBRARY == "zlib"
    else:
        assert DEFLATE_LIBRARY == "isal"


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_NOTSENT_LOWAT")
def test_auto_measures_every_body_of_a_real_upload(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    """Over real HTTP: each body's pass is watched while it sends, on a socket whose unsent
    queue is limited, and what the server acknowledged reaches the decision, all of it."""
    import socket

    from xnatio.plan import plan_batches
    from xnatio.transports.rest import BatchSender, RestUploader

    session = generate_session(tmp_path / "MR", series=2, instances=6, image_size=(64, 64))
    seen: dict[str, Any] = {"watched": 0, "live": 0, "lowat": set(), "payload": 0}

    class Watching(Compression):
        def watch(self, meter: Any) -> None:
            seen["watched"] += 1
            seen["live"] += 1
            super().watch(meter)  # limits the socket's unsent queue
            sock = meter._socket()
            option = socket.TCP_NOTSENT_LOWAT  # type: ignore[attr-defined]
            seen["lowat"].add(sock.getsockopt(socket.IPPROTO_TCP, option))

        def unwatch(self, meter: Any) -> None:
            seen["live"] -= 1
            super().unwatch(meter)

        def delivered(self, wire: int, payload: int) -> None:
            seen["payload"] += payload
            super().delivered(wire, payload)

    class Sender(BatchSender):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs, compression=Watching("auto"))

    class Uploader(RestUploader):
        sender_class = Sender

    manifest = discover(session.root)
    batches = plan_batches(manifest, 3, single_max_files=1, single_max_bytes=0)
    target = RestTarget(project="PROJ", subject="SUBJ01", session="SUBJ01_MR1", upload_workers=2)
    with XnatClient(
        xnat_server.url, username=xnat_server.username, password=xnat_server.password
    ) as client:
        result = Uploader(client, target).upload(manifest, batches)
    assert result.success, result.errors
    assert seen["watched"] == len(batches) == 3 and seen["live"] == 0
    assert seen["lowat"] == {defaults.COMPRESS_UNSENT}
    assert seen["payload"] == sum(f.size for f in manifest.files)
