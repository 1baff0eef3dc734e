"""Encoded data sets for C-STORE, read from disk without decoding pixel data where possible.

The fast path streams the file's own bytes after its File Meta Information (PS3.10 7.1), and for
routing splices one Patient Comments (0010,4000) element into the top-level byte stream: the rest
of the file, pixel data included, leaves byte for byte. Both steps walk the elements with
discovery's walker (:func:`xnatio.dicomheader.walk_elements`). pydicom is used only when the
encoding must change (the peer refused the file's own transfer syntax) or the header cannot be
walked.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from xnatio.dicomheader import Buffer, NeedFallback, Truncated, walk_elements

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE)

PATIENT_COMMENTS = 0x00104000
_PATIENT_GROUP_LENGTH = 0x00100000
# Bytes read from disk at a time. Each association thread holds about three of these at once
# (the chunk, its PDU copies, the joined write): 45 threads stay near 35 MB whatever the file size.
READ_CHUNK = 256 * 1024
_HEAD = 64 * 1024
# Word size of the OB/OW-like VRs whose bytes pydicom keeps raw, for big -> little endian.
_WORD = {"OW": "H", "OF": "I", "OL": "I", "OD": "Q", "OV": "Q"}


class EncodeError(Exception):
    """This file cannot be sent in the agreed encoding; ``str()`` says why in one sentence."""


def ts_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def _dataset_start(b: Buffer) -> int:
    """Where the data set starts: after the preamble and group 0002, if the file has them.

    File Meta Information is always Explicit VR Little Endian (PS3.10 7.1).
    """
    try:
        b.ensure(132)
        pos = 132 if b.buf[128:132] == b"DICM" else 0
    except Truncated:
        pos = 0
    try:
        b.ensure(pos + 2)
    except Truncated:
        return pos
    if b.buf[pos : pos + 2] != b"\x02\x00":
        return pos
    return walk_elements(b, pos, explicit=True, stop=0x0002FFFF)


def dataset_offset(buf: bytes) -> int:
    """Where the data set in ``buf`` (a whole DICOM file) starts."""
    return _dataset_start(Buffer(buf, limit=None))


def routing_element(route: str, implicit: bool, little: bool) -> bytes:
    value = route.encode("ascii")
    if len(value) % 2:
        value += b" "  # LT values are padded to even length with a space (PS3.5 6.2)
    e = "<" if little else ">"
    if implicit:
        return struct.pack(e + "HHI", 0x0010, 0x4000, len(value)) + value
    return struct.pack(e + "HH2sH", 0x0010, 0x4000, b"LT", len(value)) + value


def splice_route(b: Buffer, start: int, route: str, implicit: bool, little: bool) -> bytes:
    """The data set in ``b`` from ``start`` (as far as read) with Patient Comments set to
    ``route``; reads on until the place of (0010,4000) is known.

    A retired group length (0010,0000), if present, is corrected by the size change. Raises
    NeedFallback or Truncated when the header cannot be walked (see ``walk_elements``).
    """
    found: dict[int, tuple[int, int]] = {}
    wanted = frozenset({_PATIENT_GROUP_LENGTH})
    explicit = not implicit
    pos = walk_elements(
        b,
        start,
        explicit=explicit,
        little=little,
        stop=PATIENT_COMMENTS - 1,
        wanted=wanted,
        found=found,
    )
    end = pos
    if not b.at_end(pos):
        b.ensure(pos + 4)
        group, elem = struct.unpack_from("<HH" if little else ">HH", b.buf, pos)
        if group << 16 | elem == PATIENT_COMMENTS:
            end = walk_elements(b, pos, explicit=explicit, little=little, stop=PATIENT_COMMENTS)
    buf = b.buf
    element = routing_element(route, implicit, little)
    out = bytearray(buf[start:pos])
    if _PATIENT_GROUP_LENGTH in found:
        at = found[_PATIENT_GROUP_LENGTH][0]
        e = "<" if little else ">"
        old = struct.unpack_from(e + "I", buf, at)[0]
        struct.pack_into(e + "I", out, at - start, old + len(element) - (end - pos))
    out += element
    out += buf[end:]
    return bytes(out)


Source = Path | IO[bytes]


def _opened(source: Source) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A path is opened (and closed) here; an open stream is the caller's to close."""
    return source.open("rb") if isinstance(source, Path) else contextlib.nullcontext(source)


def read_as_is(source: Source, transfer_syntax: str, route: str | None) -> Iterator[bytes]:
    """The file's data set in its own transfer syntax, in pieces of about READ_CHUNK bytes.

    Without a route the bytes after the File Meta Information go out untouched. With one, only
    the header changes; pixel data and everything else are the file's own bytes. The source is
    read once, front to back (an archive member streams too).
    """
    with _opened(source) as fh:
        b = Buffer(fh.read(_HEAD), fh.read, limit=None)
        try:
            start = _dataset_start(b)
        except (NeedFallback, Truncated):
            # Not a File Meta group it can step over: pydicom reads and re-encodes the file.
            b.buf += fh.read()
            yield transcode(io.BytesIO(b.buf), transfer_syntax, transfer_syntax, route)
            return
        sent = len(b.buf) - start
        if transfer_syntax == DEFLATED_LE:
            if route is not None:
                # One raw deflate stream (PS3.5 A.5): inflate, splice, deflate again.
                body = zlib.decompress(b.buf[start:] + fh.read(), -zlib.MAX_WBITS)
                yield _deflate(splice_route(Buffer(body, limit=None), 0, route, False, True))
                return
            yield b.buf[start:]
        elif route is not None:
            implicit = transfer_syntax == IMPLICIT_LE
            little = transfer_syntax != EXPLICIT_BE
            try:
                spliced = splice_route(b, start, route, implicit, little)
            except (NeedFallback, Truncated):
                # The header could not be walked: let pydicom parse and re-encode the file in
                # its own syntax (pixel data bytes still kept as they are).
                whole = b.buf + fh.read()
                yield transcode(io.BytesIO(whole), transfer_syntax, transfer_syntax, route)
                return
            yield spliced
        else:
            yield b.buf[start:]
        while chunk := fh.read(READ_CHUNK):
            sent += len(chunk)
            yield chunk
        if transfer_syntax == DEFLATED_LE and sent % 2:
            yield b"\0"  # PS3.5 A.5: an odd deflated stream is padded with one NUL byte


def inflated(source: Source, route: str | None) -> bytes:
    """A Deflated Explicit VR Little Endian file as plain Explicit VR Little Endian."""
    with _opened(source) as fh:
        buf = fh.read()
    start = dataset_offset(buf)
    body = zlib.decompress(buf[start:], -zlib.MAX_WBITS)
    if route is None:
        return body
    return splice_route(Buffer(body, limit=None), 0, route, False, True)


def _swap_to_little(ds: Dataset) -> None:
    """pydicom re-encodes decoded values but keeps OW/OF/OD/OL/OV bytes raw: swap them."""
    for elem in ds.iterall():
        code = _WORD.get(elem.VR)
        if code and isinstance(elem.value, bytes) and len(elem.value) % array(code).itemsize == 0:
            words = array(code, elem.value)
            words.byteswap()
            elem.value = words.tobytes()


def decoder_missing(transfer_syntax: str) -> str | None:
    """None if pydicom can decompress this syntax here, else a hint of what to install."""
    from pydicom.pixels.decoders.base import get_decoder

    try:
        decoder = get_decoder(UID(transfer_syntax))
    except (NotImplementedError, ValueError):
        return "pydicom has no decoder for it"
    if decoder.is_available:
        return None
    # missing_dependencies reads like "pillow - requires pillow>=10.0": keep the plugin names.
    names = ", ".join(dict.fromkeys(d.split(" ")[0] for d in decoder.missing_dependencies))
    return f"no decoder is installed (install one of: {names})" if names else "no decoder works"


def transcode(source: Source, source_ts: str, target_ts: str, route: str | None) -> bytes:
    """The data set re-encoded by pydicom in ``target_ts`` (decompressing when needed)."""
    with _opened(source) as fh:
        ds = dcmread(fh, force=True)
    if route is not None:
        ds.PatientComments = route
    src = UID(source_ts)
    target = UID(target_ts)
    if src.is_compressed and not target.is_compressed and src != DEFLATED_LE:
        missing = decoder_missing(source_ts)
        if missing:
            raise EncodeError(
                f"the peer accepts only uncompressed syntaxes for {ts_name(source_ts)} "
                f"and {missing}"
            )
        try:
            # Keep the SOP Instance UID: this is the same instance, only re-encoded.
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # a decoder can fail on a corrupt or unusual stream
            raise EncodeError(f"decompressing {ts_name(source_ts)} failed: {exc}") from exc
    elif src == EXPLICIT_BE and target != EXPLICIT_BE:
        _swap_to_little(ds)
    fp = DicomBytesIO()
    fp.is_little_endian = target != EXPLICIT_BE
    fp.is_implicit_VR = target == IMPLICIT_LE
    write_dataset(fp, ds)
    data = fp.getvalue()
    return _deflate(data) if target == DEFLATED_LE else bytes(data)


def _deflate(data: bytes) -> bytes:
    """Raw deflate (PS3.5 A.5), padded to even length: PDV fragments must be even (PS3.8)."""
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = comp.compress(data) + comp.flush()
    return out + b"\0" if len(out) % 2 else out
