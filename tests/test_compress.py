"""``--compress auto|always|never`` (issue 16): the decision with a fake clock, the mixed zip it
produces, and a compressed upload received and stored by the sandbox over real HTTP."""

from __future__ import annotations

import dataclasses
import io
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from xnatio import defaults
from xnatio.archive import make_archive_stream
from xnatio.cli.upload import upload_dicom
from xnatio.compress import Compression
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


def decision(mode: str = "auto") -> tuple[Compression, FakeClock, FakeClock]:
    wall, cpu = FakeClock(), FakeClock()
    return Compression(mode, clock=wall, cpu_clock=cpu), wall, cpu


def feed_link(
    c: Compression, wall: FakeClock, rate: float, seconds: float, ratio: float = 1.0
) -> None:
    """The sockets took ``rate`` wire bytes/s for ``seconds`` (in 0.1 s steps), carrying
    ``ratio`` times as many uncompressed bytes."""
    for _ in range(round(seconds * 10)):
        wall.now += 0.1
        c.sent(int(rate / 10), int(rate * ratio / 10))
    wall.now += 0.01  # past the boundary whatever the float sums give


def after_sample(c: Compression) -> bool:
    """The decision for an entry that is not the compressor's periodic sample."""
    c._last_sample = c.clock()  # the sample of this interval is taken
    return c.should_deflate()


def test_slow_link_compresses() -> None:
    c, wall, _ = decision()
    c.deflated(10 * MB, 3 * MB, 0.1)  # 100 MB/s per CPU second, ratio 3.3
    feed_link(c, wall, 12.5 * MB, 4.2)  # 100 Mbit/s, stored
    assert c.wire_rate() == pytest.approx(12.5 * MB, rel=0.15)
    assert after_sample(c) is True  # the link is slower than the compressor: a trial
    feed_link(c, wall, 12.5 * MB, 4, ratio=3.3)  # the link carries 3.3× the payload deflated
    assert after_sample(c) is True  # kept: the payload rate went up
    feed_link(c, wall, 12.5 * MB, 4, ratio=3.3)
    assert after_sample(c) is True


def test_fast_link_does_not_compress() -> None:
    c, wall, _ = decision()
    c.deflated(10 * MB, 3 * MB, 0.1)  # 100 MB/s
    feed_link(c, wall, 300 * MB, 4)  # loopback
    assert after_sample(c) is False
    feed_link(c, wall, 300 * MB, 30)
    assert after_sample(c) is False


def test_link_near_the_compressor_stays_uncompressed() -> None:
    """Within the margin (link × 1.5 ≥ compressor): compressing could slow it, so not."""
    c, wall, _ = decision()
    c.deflated(10 * MB, 3 * MB, 0.1)  # 100 MB/s
    feed_link(c, wall, 80 * MB, 4)
    assert after_sample(c) is False


def test_a_trial_that_makes_the_run_slower_is_abandoned() -> None:
    """A slow link, but deflating costs CPU the receiver needed: the payload rate fell, so the
    upload goes back to stored entries, and tries again only after ``retry`` seconds."""
    c, wall, _ = decision()
    c.deflated(10 * MB, 3 * MB, 0.1)
    feed_link(c, wall, 30 * MB, 4.2)
    assert after_sample(c) is True  # trial
    feed_link(c, wall, 6 * MB, 4, ratio=3.0)  # 18 MB/s of payload < 30 stored
    assert after_sample(c) is False
    feed_link(c, wall, 30 * MB, defaults.COMPRESS_RETRY - 4)
    assert after_sample(c) is False  # not before the retry delay
    feed_link(c, wall, 30 * MB, 4)
    assert after_sample(c) is True  # tried again: the load may have changed


def test_a_trial_within_the_noise_is_not_kept() -> None:
    c, wall, _ = decision()
    c.deflated(10 * MB, 3 * MB, 0.1)
    feed_link(c, wall, 30 * MB, 4.2)
    assert after_sample(c) is True
    feed_link(c, wall, 11 * MB, 4, ratio=3.0)  # 33 MB/s: 1.1× the stored rate, below the gain
    assert after_sample(c) is False


def test_mixed_link_follows_the_measured_rate() -> None:
    c, wall, _ = decision()
    c.deflated(10 * MB, 3 * MB, 0.1)
    feed_link(c, wall, 300 * MB, 4)
    assert after_sample(c) is False
    feed_link(c, wall, 10 * MB, 4)  # the link slows down: the last window is what counts
    assert after_sample(c) is True
    feed_link(c, wall, 10 * MB, 4, ratio=3.0)
    assert after_sample(c) is True


def test_nothing_measured_yet_stores_except_the_sample() -> None:
    c, wall, _ = decision()
    assert c.should_deflate() is True  # the first entry measures the compressor
    assert c.should_deflate() is False  # no window of wire rate yet, nor a deflate rate
    c.sent(MB)
    wall.now += 0.5
    assert c.wire_rate() is None  # less than one window
    assert c.should_deflate() is False
    wall.now += defaults.COMPRESS_SAMPLE_INTERVAL
    assert c.should_deflate() is True  # the compressor is sampled again, under today's load


def test_incompressible_data_are_stored() -> None:
    c, wall, _ = decision()
    c.deflated(10 * MB, 9 * MB, 0.1)  # ratio 1.1 < COMPRESS_MIN_RATIO
    feed_link(c, wall, 1 * MB, 4)
    assert after_sample(c) is False


def test_always_and_never_do_not_measure() -> None:
    always, _, _ = decision("always")
    never, _, _ = decision("never")
    assert all(always.should_deflate() for _ in range(5))
    assert not any(never.should_deflate() for _ in range(5))
    with pytest.raises(ValueError, match="compress must be one of"):
        Compression("fast")


def test_deflate_rate_is_cpu_time_measured_in_the_archive(tmp_path: Path) -> None:
    """The archive reports each deflated entry's size and CPU time to the decision."""
    files = _files(tmp_path, 4)
    c, _, cpu = decision("always")
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


def _tee(chunks: Iterable[bytes], record: bytearray) -> Iterator[bytes]:
    for chunk in chunks:
        record += chunk
        yield chunk


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
        assert content_type == "application/zip" and length is None  # chunked zip (facts 1.1)
        with zipfile.ZipFile(io.BytesIO(bytes(body))) as zf:
            methods |= {i.compress_type for i in zf.infolist()}
    if mode == "always":
        assert methods == {zipfile.ZIP_DEFLATED}
    else:  # the first entry samples the compressor; loopback is too fast to deflate the rest
        assert zipfile.ZIP_STORED in methods
    sent = sum(f.size for f in discover(session.root).files)
    assert sent == sum(f.size for f in result.files)


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
