"""Request bodies: Content-Length and chunked framing, the bandwidth cap, mid-body resets,
streaming to disk, and a streaming multipart/form-data parser (one part at a time, files to disk).

Nothing here holds a whole body in memory: archives go to temporary files under the data dir.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from xnatio.sandbox.pages import HttpError

CHUNK = 1 << 16
# The connection's read buffer (``Handler.rbufsize``): io's default 8 KB made every 64 KiB chunk
# of a body two or three ``recv`` calls, each letting go of the GIL and taking it back among the
# request threads; one buffer this size takes what the socket holds in one call.
RECV_BUFFER = 1 << 18
# Bytes of an unread body swallowed after the answer is known (so the connection can be kept),
# before the connection is closed instead; the server's and an import worker's alike.
DRAIN_LIMIT = 256 * 1024 * 1024


class ConnectionAborted(Exception):
    """The handler dropped the connection on purpose (reset/hang knobs) or the client went away."""


class BodyReader:
    """Reads a request body once, whatever its framing, honouring the server's knobs.

    ``throttle(n)`` sleeps to respect the bandwidth cap; ``reset_at`` (bytes) makes the reader
    call ``on_reset`` once that many bytes were read, which resets the connection.
    """

    def __init__(
        self,
        rfile: BinaryIO,
        *,
        length: int | None,
        chunked: bool,
        throttle: Callable[[int], None],
        reset_at: int | None = None,
        on_reset: Callable[[], None] | None = None,
    ) -> None:
        self._rfile = rfile
        self.length = length if not chunked else None  # (the framing, for an import worker)
        self._left = self.length
        self._chunked = chunked
        self._chunk_left = 0
        self._done = (length or 0) == 0 and not chunked
        self._throttle = throttle
        self._reset_at = reset_at
        self._on_reset = on_reset
        self.bytes_read = 0
        self._cut = False  # read elsewhere, not to its end: the connection must close

    @property
    def chunked(self) -> bool:
        return self._chunked

    @property
    def untouched(self) -> bool:
        """Nothing of the body was read yet, not even chunk framing."""
        return self.bytes_read == 0 and self._chunk_left == 0 and not self._done

    def read_elsewhere(self, n: int, *, complete: bool) -> None:
        """An import worker read the body (``workers.py``): ``n`` bytes, and to its end if
        ``complete``. Nothing is left to read here; an incomplete body closes the connection."""
        self.bytes_read = n
        self._done = True
        self._cut = not complete

    @property
    def will_be_cut(self) -> bool:
        """The reset_next knob will reset the connection part-way through this body."""
        return self._reset_at is not None

    @property
    def has_body(self) -> bool:
        return self._chunked or (self._left or 0) > 0

    def _raw(self, n: int) -> bytes:
        if self._done:
            return b""
        if not self._chunked:
            assert self._left is not None
            data = self._rfile.read(min(n, self._left))
            if not data:
                raise ConnectionAborted("client closed the connection mid-body")
            self._left -= len(data)
            self._done = self._left == 0
            return data
        if self._chunk_left == 0:
            line = self._rfile.readline(1024)
            if not line:
                raise ConnectionAborted("client closed the connection mid-body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError(400, "Malformed chunked request body") from None
            if size == 0:
                while True:  # trailers, up to the blank line
                    t = self._rfile.readline(1024)
                    if t in (b"\r\n", b"\n", b""):
                        break
                self._done = True
                return b""
            self._chunk_left = size
        data = self._rfile.read(min(n, self._chunk_left))
        if not data:
            raise ConnectionAborted("client closed the connection mid-body")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._rfile.readline(8)  # the CRLF that ends a chunk
        return data

    def read(self, n: int = CHUNK) -> bytes:
        data = self._raw(n)
        if data:
            self.bytes_read += len(data)
            self._throttle(len(data))
            if self._reset_at is not None and self.bytes_read >= self._reset_at:
                self._reset_at = None
                if self._on_reset is not None:
                    self._on_reset()
                raise ConnectionAborted("connection reset by the reset_next knob")
        return data

    def drain(self, limit: int | None = None) -> bool:
        """Read and discard the rest of the body; False if more than ``limit`` bytes remained."""
        if self._cut:
            return False
        seen = 0
        while True:
            data = self.read(CHUNK)
            if not data:
                return True
            seen += len(data)
            if limit is not None and seen > limit:
                return False

    def to_file(self, path: Path) -> int:
        size = 0
        with path.open("wb") as out:
            while True:
                data = self.read(CHUNK)
                if not data:
                    return size
                out.write(data)
                size += len(data)


@dataclass
class FilePart:
    field: str
    filename: str
    content_type: str
    path: Path


@dataclass
class Multipart:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)


_DISPOSITION = re.compile(r'(\w+)\*?=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def boundary_of(content_type: str) -> bytes | None:
    m = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    return m.group(1).encode("latin-1") if m else None


def parse_multipart(reader: BodyReader, boundary: bytes, tmp_dir: Path) -> Multipart:
    """Stream a multipart/form-data body: form fields into memory, file parts into temp files."""
    delim = b"--" + boundary
    sep = b"\r\n" + delim
    buf = b""
    eof = False
    result = Multipart()

    def fill() -> None:
        nonlocal buf, eof
        chunk = reader.read(CHUNK)
        if not chunk:
            eof = True
        buf += chunk

    def malformed() -> HttpError:
        # commons-fileupload's MalformedStreamException, a client error for XNAT.
        return HttpError(400, "Stream ended unexpectedly")

    while (i := buf.find(delim)) < 0:
        if eof:
            raise malformed()
        buf = buf[-len(delim) :]
        fill()
    buf = buf[i + len(delim) :]
    while True:
        while len(buf) < 2 and not eof:
            fill()
        if buf.startswith(b"--") or (eof and not buf.strip()):
            reader.drain()
            return result
        while (j := buf.find(b"\r\n\r\n")) < 0:
            if eof or len(buf) > CHUNK:
                raise malformed()
            fill()
        headers: dict[str, str] = {}
        for line in buf[:j].decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if value:
                headers[name.strip().lower()] = value.strip()
        buf = buf[j + 4 :]
        params = {
            m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
            for m in _DISPOSITION.finditer(headers.get("content-disposition", ""))
        }
        filename = params.get("filename")
        if filename is not None:
            path = tmp_dir / f"part-{uuid.uuid4().hex}"
            sink: BinaryIO = path.open("wb")
            result.files.append(
                FilePart(
                    params.get("name", ""),
                    filename,
                    headers.get("content-type", "application/octet-stream"),
                    path,
                )
            )
        else:
            path = None
            value_parts: list[bytes] = []
        try:
            while True:
                k = buf.find(sep)
                if k >= 0:
                    data, buf = buf[:k], buf[k + len(sep) :]
                    if path is not None:
                        sink.write(data)
                    else:
                        value_parts.append(data)
                    break
                keep = len(sep) - 1
                if len(buf) > keep:
                    data, buf = buf[:-keep], buf[-keep:]
                    if path is not None:
                        sink.write(data)
                    else:
                        value_parts.append(data)
                        if sum(map(len, value_parts)) > 1 << 20:
                            raise HttpError(400, "Form field too large")
                if eof:
                    raise malformed()
                fill()
        finally:
            if path is not None:
                sink.close()
        if path is None:
            result.fields[params.get("name", "")] = b"".join(value_parts).decode("utf-8", "replace")
