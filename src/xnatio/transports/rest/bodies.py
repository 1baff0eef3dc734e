"""Streamed request bodies: counted into the progress counter, stopped by a cancel.

A body wraps a re-iterable archive (``xnatio.archive``, or an archive PATH's members re-packed).
Requests sends it with an exact ``Content-Length`` when it has a ``len()`` (tar, zip, an archive
PATH) and chunked when not (zip-deflated). Each iteration starts the archive again, so one body
object serves a retry or a resend after a 401, and checks the upload's cancel event between
chunks, so Ctrl-C stops a request in the middle of its body.
"""

from __future__ import annotations

import hashlib
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

from xnatio.archive import EntryNames, SourceChangedError, tar_header, zip_entries
from xnatio.errors import XnatioError
from xnatio.events import ProgressCounter
from xnatio.models import DicomFile
from xnatio.transports.rest.wire import AckedBytes

CHUNK = 64 * 1024  # request body write size: small header/file pieces are coalesced to this


class LinkMeter(Protocol):
    """What measures the link from the bodies (:class:`xnatio.compress.Compression`)."""

    def watch(self, meter: AckedBytes) -> None: ...

    def unwatch(self, meter: AckedBytes) -> None: ...

    def delivered(self, wire: int, payload: int) -> None: ...


class UploadCancelled(XnatioError):
    """The upload was cancelled (Ctrl-C or a fatal error elsewhere) while a body was streaming."""


class StreamBody:
    """A streamed request body over a re-iterable archive: counts bytes, stops on cancel.

    Progress is reported in payload bytes (the files' own sizes, what ``bytes_total`` counts)
    that the server has received: a chunk counts once the peer's TCP acknowledged it
    (:class:`xnatio.transports.rest.wire.AckedBytes`), not when it is handed to the socket, which
    takes megabytes ahead of a slow link. Wire bytes map to payload bytes by ``payload / size``
    for a sized archive; for a compressed zip, whose size is unknown, by the uncompressed bytes
    of the entries produced with each chunk (``raw_sent``). After its last chunk a body waits
    while the rest is acknowledged, so the count reaches 100 % as the server reads; the
    acknowledged wire bytes are counted too (the wire rate beside the payload rate). ``link``
    (``--compress auto``'s :class:`xnatio.compress.Compression`) is told what each pass has
    acknowledged, to measure the link, and watches the pass (which may limit the bytes its
    socket queues unsent, :func:`xnatio.transports.rest.wire.limit_unsent`). Each
    ``iter()`` starts the archive again (a retry, or a resend after a 401) and takes back what
    the previous pass reported. An exception raised by the archive (a source file vanished) is
    kept in ``error``, because urllib3 may wrap it into a connection error on its way out.
    """

    def __init__(
        self,
        chunks: Iterable[bytes],
        payload: int,
        progress: ProgressCounter,
        cancel: threading.Event,
        size: int | None = None,
        raw_sent: Callable[[], int] | None = None,
        acked: Callable[[], AckedBytes] = AckedBytes,
        link: LinkMeter | None = None,
    ) -> None:
        self._chunks = chunks
        self._link = link
        self._raw_sent = raw_sent
        self._payload = payload
        self._scale = payload / size if size else 0.0
        self._progress = progress
        self._cancel = cancel
        self._new_pass = acked
        self._acked = acked()
        self._sent = 0
        self._reported = 0
        self._reported_wire = 0
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[bytes]:
        self.take_back()
        self.error = None
        self._acked = acked = self._new_pass()
        acked.bind()
        if self._link is not None:
            self._link.watch(acked)
        pending: list[bytes] = []
        size = 0
        try:
            for chunk in self._chunks:
                if self._cancel.is_set():
                    raise UploadCancelled("upload cancelled")
                pending.append(chunk)
                size += len(chunk)
                if size >= CHUNK:
                    data = self._flush(pending, size)
                    yield data
                    # Resumed: the socket took the chunk (sendall returned).
                    acked.was_handed(len(data))
                    self._count()
                    pending, size = [], 0
            if pending:
                data = self._flush(pending, size)
                acked.end(self._payload)
                yield data
                acked.was_handed(len(data))
            acked.end(self._payload)
            acked.drain(self._count, self._cancel)
            if self._cancel.is_set():
                raise UploadCancelled("upload cancelled")
            self._count(force=True)  # shown now: nothing else is until the server answers
        except Exception as exc:
            self.error = exc
            raise
        finally:
            if self._link is not None:
                self._link.unwatch(acked)

    def _flush(self, pending: list[bytes], size: int) -> bytes:
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        self._sent += size
        if self._scale:
            payload_end = min(self._payload, int(self._sent * self._scale))
        elif self._raw_sent is not None:
            payload_end = min(self._payload, self._raw_sent())
        else:
            payload_end = 0  # counted when the server has it all
        self._acked.produced(len(data), payload_end)
        return data

    def _count(self, force: bool = False) -> None:
        """Report what the peer has acknowledged so far."""
        wire = self._acked.acknowledged()
        self._report(self._acked.payload_at(wire), wire, force)

    def received(self) -> None:
        """The server answered the request: it has read the whole body."""
        self._report(self._payload, self._acked.handed, force=True)

    def _report(self, reported: int, wire: int, force: bool = False) -> None:
        if reported != self._reported or wire != self._reported_wire:
            nbytes, wire_bytes = reported - self._reported, wire - self._reported_wire
            self._progress.update(nbytes=nbytes, wire=wire_bytes, force=force)
            self._reported, self._reported_wire = reported, wire
            if self._link is not None and (nbytes > 0 or wire_bytes > 0):
                self._link.delivered(wire_bytes, nbytes)

    def failure(self, exc: BaseException) -> BaseException:
        """After a failed send: forget this pass's bytes and return the real cause."""
        self.take_back()
        return self.error if self.error is not None else exc

    def take_back(self) -> None:
        """Forget the bytes of a failed pass (progress may go backwards after a retry)."""
        self._sent = 0
        self._report(0, 0)


class SizedBody(StreamBody):
    """A body of known size: ``len()`` makes requests send an exact Content-Length (no chunking)."""

    def __init__(
        self,
        chunks: Iterable[bytes],
        payload: int,
        progress: ProgressCounter,
        cancel: threading.Event,
        size: int | None = None,
    ) -> None:
        super().__init__(chunks, payload, progress, cancel, size)
        self._size = size or 0

    def __len__(self) -> int:
        return self._size


class ArchiveMembers:
    """The DICOM members of an archive PATH, re-packed into a plain tar while it is sent.

    Only the DICOM members are sent (XNAT would stop at the first DICOMDIR or side file, "unable
    to read DICOM object", facts 1.1), read from the archive one by one (never extracted to
    disk), with an exact size: tar headers follow from the names and sizes alone. Each goes under
    ``names`` (default: the member's own path), which the REST transport sets to
    ``{series}/{SOP Instance UID}.dcm`` so that read-back finds every instance by name.
    ``on_digest`` is told each member's MD5 as sent (:class:`xnatio.verify.SentDigests`).
    """

    content_type = "application/x-tar"

    def __init__(
        self,
        archive: Path,
        files: Sequence[DicomFile],
        names: Sequence[str] | None = None,
        on_digest: Callable[[DicomFile, bytes], None] | None = None,
    ) -> None:
        self.archive = archive
        self.on_digest = on_digest
        self.files = [f for f in files if f.member is not None]
        sent = list(names) if names is not None else [f.member or "" for f in self.files]
        # (name sent, file): what XNAT names in an error about one entry
        self.members: list[tuple[str, DicomFile]] = list(zip(sent, self.files, strict=True))
        self._headers = {f.member or "": _tar_header(f, name) for name, f in self.members}
        self.size: int = 2 * 512 + sum(
            len(self._headers[f.member or ""]) + f.size + (-f.size % 512) for _, f in self.members
        )

    def __iter__(self) -> Iterator[bytes]:
        if zipfile.is_zipfile(self.archive):
            with zipfile.ZipFile(self.archive) as zf:
                entries = zip_entries(zf)  # by unique name: each entry its own bytes
                for f in self.files:
                    with zf.open(entries[f.member or ""]) as src:
                        yield from self._entry(f, src)
        else:
            wanted: dict[str, DicomFile] = {f.member or "": f for f in self.files}
            entry_name = EntryNames()
            with tarfile.open(self.archive, "r|*") as tf:
                for info in tf:
                    found: DicomFile | None = wanted.pop(entry_name(info.name), None)
                    if found is None:
                        continue  # a skipped entry, or a second copy of a duplicate
                    data = tf.extractfile(info)
                    if data is None:
                        raise SourceChangedError(found, "no longer a regular file in the archive")
                    yield from self._entry(found, data)
            if wanted:
                raise SourceChangedError(next(iter(wanted.values())), "no longer in the archive")
        yield b"\0" * 1024

    def _entry(self, f: DicomFile, src: IO[bytes]) -> Iterator[bytes]:
        yield self._headers[f.member or ""]
        digest = hashlib.md5(usedforsecurity=False) if self.on_digest is not None else None
        left = f.size
        while left > 0:
            data = src.read(min(CHUNK, left))
            if not data:
                raise SourceChangedError(f, "archive member shrank since discovery")
            left -= len(data)
            if digest is not None:
                digest.update(data)
            yield data
        if src.read(1):
            raise SourceChangedError(f, "archive member grew since discovery")
        if digest is not None and self.on_digest is not None:
            self.on_digest(f, digest.digest())
        if f.size % 512:
            yield b"\0" * (512 - f.size % 512)


def _tar_header(f: DicomFile, name: str) -> bytes:
    # Relative, no "..": the name is only used inside XNAT's temporary extraction folder, but an
    # uploader never sends a path that could climb out of it.
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return tar_header("/".join(parts) or f.sop_instance_uid, f)
