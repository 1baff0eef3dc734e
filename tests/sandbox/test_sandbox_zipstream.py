"""The sandbox's ZipInputStream-like reader (``sandbox/zipstream.py``) with each inflater it may
use: ISA-L (the default where python-isal is installed) and zlib read the same streams, give the
same bytes and fail the same way."""

from __future__ import annotations

import io
import platform
import random
import zipfile
import zlib

import pytest
from sandbox_helpers import Unseekable

from xnatio.sandbox import zipstream
from xnatio.sandbox.zipstream import ZipStreamError, iter_zip_stream

try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - no wheels on this platform
    isal_zlib = None  # type: ignore[assignment]

LIBS = [zlib] + ([isal_zlib] if isal_zlib is not None else [])


def _contents() -> dict[str, bytes]:
    rnd = random.Random(7)
    out = {"empty.dcm": b"", "one.dcm": b"x"}
    for i in range(6):  # compressible (like pixel data) and not, small and past 1 MB
        size = rnd.choice([100, 70_000, 1_300_000])
        noisy = bytes(rnd.getrandbits(8) for _ in range(min(size, 5000)))
        out[f"s{i}/f{i}.dcm"] = (noisy + bytes(size))[:size] if i % 2 else noisy * (size // 5000)
    return out


def _zip(contents: dict[str, bytes], *, stream: bool) -> bytes:
    sink: io.RawIOBase | io.BytesIO = Unseekable() if stream else io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("dir/", b"")  # a directory entry: skipped
        for name, data in contents.items():
            zf.writestr(name, data)
    return (sink.buf if isinstance(sink, Unseekable) else sink).getvalue()


class _Trickle(io.RawIOBase):
    """A body that arrives in short, uneven reads, like a socket's."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.rnd = random.Random(3)

    def read(self, n: int = -1, /) -> bytes:
        n = min(n if n >= 0 else 1 << 20, self.rnd.randint(1, 9000))
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += len(out)
        return out


@pytest.fixture(params=LIBS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.setattr(zipstream, "_inflate_lib", request.param)
    return request.param


@pytest.mark.parametrize("stream", [True, False], ids=["descriptors", "sizes-in-header"])
def test_every_entry_read_whole_with_either_inflater(inflater: object, stream: bool) -> None:
    contents = _contents()
    got: dict[str, bytes] = {}
    rnd = random.Random(5)
    for name, entry in iter_zip_stream(_Trickle(_zip(contents, stream=stream))):
        parts = []
        while block := entry.read(rnd.randint(1, 80_000)):  # uneven reads
            parts.append(block)
        got[name] = b"".join(parts)
    assert got == contents


def test_an_entry_read_in_part_is_skipped_and_checked(inflater: object) -> None:
    contents = _contents()
    names = []
    for name, entry in iter_zip_stream(_Trickle(_zip(contents, stream=True))):
        entry.read(10)  # the importer reads a header, a filter may drop the rest
        names.append(name)
    assert names == list(contents)


def test_corrupt_deflate_data_is_a_zip_error(inflater: object) -> None:
    body = bytearray(_zip({"a.dcm": bytes(range(256)) * 4000}, stream=True))
    start = 30 + len("a.dcm")
    body[start : start + 8] = b"\xff" * 8  # not a valid deflate block
    with pytest.raises(ZipStreamError, match="invalid deflate data"):
        for _, entry in iter_zip_stream(io.BytesIO(bytes(body))):
            entry.finish()


def test_a_wrong_crc_is_found_by_either_inflater(inflater: object) -> None:
    body = bytearray(_zip({"a.dcm": b"abc" * 50_000}, stream=False))
    body[14] ^= 0xFF  # the local header's CRC-32
    with pytest.raises(ZipStreamError, match="invalid entry CRC"):
        for _, entry in iter_zip_stream(io.BytesIO(bytes(body))):
            entry.finish()


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"),
    reason="python-isal has wheels for these machines only",
)
def test_isal_inflates_where_it_is_installed() -> None:
    # The faster inflater is a dependency on these machines (pyproject): the server uses it.
    assert zipstream.INFLATE_LIBRARY == "isal"
