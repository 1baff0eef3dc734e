"""sandbox/tarstream.py reads a tar body as tarfile's stream mode does: the same members, the same
bytes, the same errors at the same place (the importer used tarfile's stream reader before)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from typing import IO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnatio.sandbox import tarstream
from xnatio.sandbox.importer import TAR_BLOCK, FullReader


class Trickle:
    """A body that arrives in pieces of ``step`` bytes (a socket's short reads)."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def read(self, n: int = -1) -> bytes:
        return self._data.read(self._step if n < 0 else min(n, self._step))


def _by_tarfile(raw: FullReader) -> Iterator[tuple[str, IO[bytes]]]:
    """What the importer did before: tarfile's stream mode over the body."""
    with tarfile.open(fileobj=raw, mode="r|", bufsize=TAR_BLOCK) as tf:  # type: ignore[call-overload]
        for member in tf:
            if member.isfile():
                stream = tf.extractfile(member)
                assert stream is not None
                with stream:
                    yield member.name, stream


def _read(
    reader: Callable[[FullReader], Iterator[tuple[str, IO[bytes]]]],
    body: bytes,
    step: int,
    stop_early: bool = False,
) -> tuple[list[tuple[str, bytes]], str | None]:
    """(name, bytes) of every member as the importer reads them (the head, then 1 MiB reads),
    and the error that ended the reading (type and message), if any."""
    got: list[tuple[str, bytes]] = []
    try:
        for name, stream in reader(FullReader(Trickle(body, step))):
            head = stream.read(1 << 16)
            if stop_early:  # the consumer stops: the rest is passed over
                got.append((name, head[:10]))
                continue
            parts = [head]
            while block := stream.read(1 << 20):
                parts.append(block)
            got.append((name, b"".join(parts)))
    except tarfile.TarError as exc:
        return got, f"{type(exc).__name__}: {exc}"
    return got, None


def _tar(build: Callable[[tarfile.TarFile], None], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        build(tf)
    return out.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "a.dcm"
    tf.addfile(info, io.BytesIO(data) if info.size else None)


def _files(tf: tarfile.TarFile) -> None:
    _add(tf, "S1/a.dcm", b"a" * 70_000)
    _add(tf, "S1", b"", tarfile.DIRTYPE)
    _add(tf, "S1/empty.dcm", b"")
    _add(tf, "S1/link", b"", tarfile.SYMTYPE)
    _add(tf, "S1/b.dcm", bytes(range(256)) * 5)
    _add(tf, "S2/" + "x" * 60 + "/" + "y" * 60 + ".dcm", b"ustar prefix" * 9)
    _add(tf, "S2/old.dcm", b"V7 regular", tarfile.AREGTYPE)


PLAIN = _tar(_files, tarfile.USTAR_FORMAT)
GNU_LONG = _tar(lambda tf: (_files(tf), _add(tf, "L/" + "n" * 150 + ".dcm", b"long" * 300)))
PAX = _tar(
    lambda tf: (_add(tf, "first.dcm", b"1" * 600), _add(tf, "é/" + "p" * 120, b"pax" * 50)),
    tarfile.PAX_FORMAT,
)
PAX_FIRST = _tar(lambda tf: (_add(tf, "p" * 120, b"pax" * 50), _files(tf)), tarfile.PAX_FORMAT)
_END = PLAIN.rstrip(b"\0")
_END += b"\0" * (-len(_END) % 512)  # the last member's padding, no end-of-archive blocks

CASES = {
    "plain ustar": PLAIN,
    "gnu long name after plain members": GNU_LONG,
    "pax member after a plain one": PAX,
    "pax first": PAX_FIRST,
    "no end-of-archive blocks": _END,
    "garbage after the members": _END + b"not a header" * 100,
    "a truncated header after the members": _END + PLAIN[:300],
    "cut inside a member's data": PLAIN[: 512 + 30_000],
    "cut inside a member's padding": PLAIN[: 512 + 70_000 + 100],
    "cut right after a member's data and padding": PLAIN[: 512 + 70_144],
    "not a tar": b"PK\x03\x04 a zip, not a tar" * 40,
    "empty body": b"",
    "zeros only": b"\0" * 2048,
    "a short first block": PLAIN[:200],
}


@pytest.mark.parametrize("step", [1 << 16, 7_000, 511])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_same_members_bytes_and_errors_as_tarfile(case: str, step: int) -> None:
    body = CASES[case]
    expected = _read(_by_tarfile, body, step)
    got = _read(lambda raw: tarstream.iter_tar_stream(raw, TAR_BLOCK), body, step)
    assert got == expected
    if case == "plain ustar":  # the fixture means what it says
        assert [n for n, _ in got[0]] == [
            "S1/a.dcm",
            "S1/empty.dcm",
            "S1/b.dcm",
            "S2/" + "x" * 60 + "/" + "y" * 60 + ".dcm",
            "S2/old.dcm",
        ]
        assert expected[1] is None


@pytest.mark.parametrize("case", ["plain ustar", "cut inside a member's padding", "pax first"])
def test_a_member_read_in_part_is_passed_over_as_tarfile_does(case: str) -> None:
    body = CASES[case]
    expected = _read(_by_tarfile, body, 4096, stop_early=True)
    got = _read(lambda raw: tarstream.iter_tar_stream(raw), body, 4096, stop_early=True)
    assert got == expected


def test_plain_members_are_read_without_tarfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path is taken for plain members (tarfile only from a special header on)."""
    calls: list[int] = []
    real = tarstream._by_tarfile

    def spy(head: bytes, src: tarstream._Source, bufsize: int) -> Iterator[tuple[str, IO[bytes]]]:
        calls.append(1)
        return real(head, src, bufsize)

    monkeypatch.setattr(tarstream, "_by_tarfile", spy)
    names = [n for n, s in tarstream.iter_tar_stream(FullReader(io.BytesIO(PLAIN))) if s.read()]
    assert len(names) == 4 and calls == []  # (the empty member reads b"")
    got = _read(lambda raw: tarstream.iter_tar_stream(raw), GNU_LONG, 1 << 16)
    assert calls == [1] and got == _read(_by_tarfile, GNU_LONG, 1 << 16)


def test_the_importer_reads_a_plain_tar_body_with_tarstream(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """iter_entries takes tarstream for a tar request body; a body the reset_next knob will cut
    is still read by tarfile in its 10 KB records (the cut falls where it did)."""
    from pathlib import Path

    from xnatio.sandbox import importer

    opened: list[int] = []
    real_open = tarfile.open

    def counting_open(*args: object, **kwargs: object) -> tarfile.TarFile:
        opened.append(int(kwargs.get("bufsize", 0)))  # type: ignore[call-overload]
        return real_open(*args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(tarfile, "open", counting_open)
    body = FullReader(io.BytesIO(PLAIN))
    names = [n for n, s in importer.iter_entries(body, "tar", Path(str(tmp_path))) if s.read()]
    assert names[0] == "S1/a.dcm" and opened == []

    class Cut(io.BytesIO):
        will_be_cut = True

    cut = [n for n, s in importer.iter_entries(FullReader(Cut(PLAIN)), "tar", Path(str(tmp_path)))]
    assert cut and opened == [tarfile.RECORDSIZE]


def _headers(body: bytes) -> list[bytes]:
    """The header blocks tarfile reads in ``body``."""
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tf:
        return [body[m.offset : m.offset + 512] for m in tf.getmembers()]


def _with_checksum(block: bytes, signed: bool = False) -> bytes:
    """``block`` with its checksum field rewritten to match (unsigned, or the signed sum some
    old tars write)."""
    b = bytearray(block)
    b[148:156] = b" " * 8
    total = sum((x - 256 if signed and x > 127 else x) for x in b)
    b[148:156] = b"%06o\0 " % (total & 0o777777)
    return bytes(b)


_REAL_HEADERS = [h for body in (PLAIN, GNU_LONG, PAX) for h in _headers(body)]


def _frombuf(block: bytes) -> tuple[str, int] | str:
    try:
        info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as exc:
        return type(exc).__name__
    return (info.name, info.size) if info.type in tarstream._FILES else f"type {info.type!r}"


def test_the_plain_header_reading_takes_ordinary_headers() -> None:
    """Every regular member of the fixtures is read by _plain_header, as frombuf reads it."""
    plain = [h for h in _REAL_HEADERS if h[156:157] in tarstream._FILES]
    assert len(plain) >= 8
    for block in plain:
        fast = tarstream._plain_header(block)
        assert fast is not None and fast == _frombuf(block)


def _edit(block: bytes, at: int, value: bytes) -> bytes:
    return block[:at] + value + block[at + len(value) :]


_ODD = {
    "base-256 size": lambda b: _with_checksum(_edit(b, 124, b"\x80" + b"\0" * 7 + b"\0\0\1\0")),
    "negative base-256 mtime": lambda b: _with_checksum(_edit(b, 136, b"\xff" * 12)),
    "signed checksum": lambda b: _with_checksum(_edit(b, 0, b"\xe9t\xe9.dcm\0"), signed=True),
    "bad checksum": lambda b: _edit(b, 148, b"0000000\0"),
    "size with spaces": lambda b: _with_checksum(_edit(b, 124, b"  1750     \0")),
    "size with an underscore": lambda b: _with_checksum(_edit(b, 124, b"00000001_0\0\0")),
    "size not octal": lambda b: _with_checksum(_edit(b, 124, b"00000000009\0")),
    "mode not ascii": lambda b: _with_checksum(_edit(b, 100, b"\xc3\xa9000644")),
    "devminor not octal": lambda b: _with_checksum(_edit(b, 337, b"x" * 8)),
    "V7 directory": lambda b: _with_checksum(_edit(_edit(b, 156, b"\0"), 0, b"dir/\0")),
    "directory type": lambda b: _with_checksum(_edit(b, 156, b"5")),
    "pax type": lambda b: _with_checksum(_edit(b, 156, b"x")),
    "utf-8 name": lambda b: _with_checksum(_edit(b, 0, "é/ü.dcm\0".encode())),
    "undecodable name": lambda b: _with_checksum(_edit(b, 0, b"\xff\xfe.dcm\0")),
    "ustar prefix": lambda b: _with_checksum(_edit(b, 345, b"pre/fix\0")),
    "prefix filling its field": lambda b: _with_checksum(_edit(b, 345, b"p" * 155)),
    "name filling its field": lambda b: _with_checksum(_edit(b, 0, b"n" * 100)),
    "contiguous type": lambda b: _with_checksum(_edit(b, 156, b"7")),
    "all zeros": lambda b: b"\0" * 512,
    "short": lambda b: b[:511],
}


@pytest.mark.parametrize("case", sorted(_ODD))
def test_the_plain_header_reading_agrees_with_frombuf_or_declines(case: str) -> None:
    """Where _plain_header answers it gives frombuf's (name, size) of a regular member; every
    other header is left to frombuf (None)."""
    block = _ODD[case](next(h for h in _REAL_HEADERS if h[156:157] == tarfile.REGTYPE))
    fast = tarstream._plain_header(block)
    if fast is not None:
        assert fast == _frombuf(block)
    else:
        assert case not in {"size with spaces", "utf-8 name", "ustar prefix", "contiguous type"}


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, len(_REAL_HEADERS) - 1),
    at=st.integers(0, 511),
    value=st.binary(min_size=1, max_size=12),
    fix=st.booleans(),
)
def test_a_damaged_header_is_read_as_frombuf_reads_it(
    index: int, at: int, value: bytes, fix: bool
) -> None:
    block = _edit(_REAL_HEADERS[index], at, value)[:512]
    if fix:
        block = _with_checksum(block)
    fast = tarstream._plain_header(block)
    if fast is not None:
        assert fast == _frombuf(block)
