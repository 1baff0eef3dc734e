"""Reading a zip the way ``java.util.zip.ZipInputStream`` does, since XNAT's DICOM-zip importer
(and its resource extraction) read uploads with it.

Front to back through the local headers, never the central directory, so a request body is
imported as it arrives. What ZipInputStream does, this does too:

- a stream that does not start with a local header simply has no entries (no error);
- a STORED entry with a data descriptor (flag bit 3) is refused: "only DEFLATED entries can have
  EXT descriptor" — the trap a streaming zip writer falls into;
- encrypted entries and compression methods other than STORED/DEFLATED are refused;
- each entry's CRC-32 and size are checked when it ends ("invalid entry CRC …").
"""

from __future__ import annotations

import struct
import types
import zlib
from collections.abc import Iterator
from typing import Protocol

# Inflate and CRC-32 with ISA-L (python-isal, a dependency where it has wheels) when it is
# installed, else zlib: both read the same raw deflate streams and give the same CRC. Measured on
# the benchmark's entries (3,000 x 167 KB deflated at level 1, one thread): inflate 0.39 ms per
# entry with zlib, 0.18 with ISA-L; CRC-32 0.06 against 0.01 ms. Both let go of the GIL.
_inflate_lib: types.ModuleType
try:
    from isal import isal_zlib as _inflate_lib
except ImportError:  # pragma: no cover - a platform without python-isal's wheels
    _inflate_lib = zlib

INFLATE_LIBRARY = "isal" if _inflate_lib is not zlib else "zlib"

LOC_SIG = b"PK\x03\x04"
EXT_SIG = b"PK\x07\x08"
_LOC = struct.Struct("<4sHHHHHIIIHH")  # local file header, 30 bytes
_MAGIC32 = 0xFFFFFFFF
_CHUNK = 1 << 16


class ZipStreamError(Exception):
    """What ZipInputStream would throw (its message)."""


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Source:
    """The raw stream with a push-back buffer (inflate reads past an entry's end)."""

    def __init__(self, raw: Readable) -> None:
        self.raw = raw
        self.buf = b""

    def read_some(self, n: int) -> bytes:
        if self.buf:
            data, self.buf = self.buf[:n], self.buf[n:]
            return data
        return self.raw.read(n)

    def read_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = self.read_some(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        self.buf = data + self.buf


class ZipEntryStream:
    """One entry's uncompressed bytes; ``finish()`` skips the rest and runs the checks."""

    def __init__(
        self, src: _Source, name: str, *, method: int, flag: int, crc: int, csize: int,
        usize: int, zip64: bool,
    ) -> None:  # fmt: skip
        self.src = src
        self.name = name
        self.method = method
        self.flag = flag
        self.crc_expected = crc
        self.size_expected = usize
        self.left = csize  # STORED: bytes still to read
        self.zip64 = zip64
        self.inflater = _inflate_lib.decompressobj(-15) if method == 8 else None
        self.crc = 0
        self.size = 0
        self.done = False
        self.pushed_back = False

    def read(self, n: int = -1, /) -> bytes:
        if self.done:
            return b""
        want = _CHUNK * 16 if n < 0 else n
        if self.inflater is None:
            data = self.src.read_some(min(want, self.left)) if self.left else b""
            if self.left and not data:
                raise ZipStreamError("Unexpected end of ZLIB input stream")
            self.left -= len(data)
        else:
            data = b""
            while not data and not self.inflater.eof:
                feed = self.inflater.unconsumed_tail or self.src.read_some(_CHUNK)
                if not feed:
                    raise ZipStreamError("Unexpected end of ZLIB input stream")
                try:
                    data = self.inflater.decompress(feed, want)
                except (zlib.error, _inflate_lib.error) as exc:
                    raise ZipStreamError(f"invalid deflate data: {exc}") from None
            if self.inflater.eof and self.inflater.unused_data and not self.pushed_back:
                self.src.unread(self.inflater.unused_data)  # the next header (or descriptor)
                self.pushed_back = True
        if data:
            self.crc = _inflate_lib.crc32(data, self.crc)
            self.size += len(data)
        if (self.inflater is None and self.left == 0) or (
            self.inflater is not None and self.inflater.eof
        ):
            self._end()
        return data

    def _end(self) -> None:
        self.done = True
        crc, size = self.crc_expected, self.size_expected
        if self.flag & 8:
            sig = self.src.read_exact(4)
            if sig != EXT_SIG:
                self.src.unread(sig)  # the descriptor signature is optional
            fmt = "<IQQ" if self.zip64 else "<III"
            raw = self.src.read_exact(struct.calcsize(fmt))
            if len(raw) < struct.calcsize(fmt):
                raise ZipStreamError("Unexpected end of ZLIB input stream")
            crc, _, size = struct.unpack(fmt, raw)
        if size != self.size:
            raise ZipStreamError(f"invalid entry size (expected {size} but got {self.size} bytes)")
        if crc != self.crc:
            raise ZipStreamError(f"invalid entry CRC (expected 0x{crc:x} but got 0x{self.crc:x})")

    def finish(self) -> None:
        while not self.done:
            self.read(_CHUNK * 16)


def _zip64_sizes(extra: bytes, usize: int, csize: int) -> tuple[int, int, bool]:
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if tag == 0x0001:
            values = [struct.unpack_from("<Q", body, i)[0] for i in range(0, len(body) - 7, 8)]
            if usize == _MAGIC32 and values:
                usize = values.pop(0)
            if csize == _MAGIC32 and values:
                csize = values.pop(0)
            return usize, csize, True
        pos += 4 + length
    return usize, csize, False


def iter_zip_stream(raw: Readable) -> Iterator[tuple[str, ZipEntryStream]]:
    """(name, stream) for each file entry, in order; directory entries are skipped.

    The consumer may stop reading an entry early: the rest is skipped (and checked) before the
    next header is read.
    """
    src = _Source(raw)
    while True:
        sig = src.read_exact(4)
        if sig != LOC_SIG:
            return  # the central directory, the end, or not a zip at all: no more entries
        header = sig + src.read_exact(_LOC.size - 4)
        if len(header) < _LOC.size:
            raise ZipStreamError("Unexpected end of ZLIB input stream")
        _, _, flag, method, _, _, crc, csize, usize, nlen, xlen = _LOC.unpack(header)
        raw_name = src.read_exact(nlen)
        extra = src.read_exact(xlen)
        name = raw_name.decode("utf-8" if flag & 0x800 else "cp437", "replace")
        if flag & 1:
            raise ZipStreamError("encrypted ZIP entry not supported")
        zip64 = False
        if _MAGIC32 in (csize, usize):
            usize, csize, zip64 = _zip64_sizes(extra, usize, csize)
        if method == 0:
            if flag & 8:
                raise ZipStreamError("only DEFLATED entries can have EXT descriptor")
        elif method != 8:
            raise ZipStreamError("invalid compression method")
        entry = ZipEntryStream(
            src, name, method=method, flag=flag, crc=crc, csize=csize, usize=usize, zip64=zip64
        )
        if not name.endswith("/"):
            yield name, entry
        entry.finish()
