"""A small, fast reader for the few DICOM header fields an upload needs.

``pydicom.dcmread`` costs about a millisecond per file even with ``stop_before_pixels``; a
15,000-file session would spend most of its discovery time there. The fields an uploader needs
(SOP Class/Instance UID, Study/Series Instance UID, Series Number, Transfer Syntax, Patient ID)
all sit near the start of the file, in tag order, before (0020,0011) Series Number. This module
reads the first few KB and walks the elements up to that tag (PS3.5 section 7: tags ascend within
a data set), skipping every value it does not need, including undefined-length sequences.

It handles the encodings nearly every file uses: a Part 10 file (128-byte preamble, "DICM", an
explicit VR little endian File Meta group, PS3.10 section 7.1) followed by an explicit or implicit
VR little endian data set, and raw data sets without a preamble. Anything unusual (big endian,
deflated, non-ASCII values, malformed or very long headers) raises :class:`NeedFallback` inside
and is re-read with pydicom (``specific_tags`` and ``stop_before_pixels``), so the answer is
always the one pydicom would give, only faster in the common case.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
import warnings
from collections.abc import Callable
from typing import IO, NamedTuple

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
# PS3.4 Annex F: the Media Storage Directory (DICOMDIR) SOP class.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# The first read of a file: the header up to the Series Number is 0.7 KB in the benchmark's
# files and 0.5-2 KB in most of pydicom's test files (one in 50 needs 4 KB, a few more). A
# bigger read costs more than its bytes (8 KB took ~1 us more a file than 2 KB: issue 16 item
# 4); a longer header is read on to SECOND_READ and parsed again in one pass.
FIRST_READ = 4096
SECOND_READ = 16384
# Headers longer than this (a huge private element before the Series Number) go to pydicom.
MAX_HEADER = 4 * 2**20
_MAX_DEPTH = 16

_TS = 0x00020010
_MEDIA_SOP_CLASS = 0x00020002
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_PATIENT_ID = 0x00100020
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_SERIES_NUMBER = 0x00200011
_WANTED = frozenset(
    {_TS, _MEDIA_SOP_CLASS, _SOP_CLASS, _SOP_INSTANCE, _PATIENT_ID, _STUDY_UID, _SERIES_UID}
    | {_SERIES_NUMBER}
)
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

# PS3.5 table 7.1-1: these VRs have a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN"}
    | {b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_ALL_VRS = _LONG_VRS | _SHORT_VRS

_u16x2 = struct.Struct("<HH")
_u16 = struct.Struct("<H")
_u32 = struct.Struct("<L")
# An explicit VR little endian element's head (tag halves, VR, 16-bit length), the VR read as
# a number (the fast reader's one unpack per element), and the VRs as such numbers.
_ELEMENT = struct.Struct("<HH2H")
_LONG_VR_CODES = frozenset(_u16.unpack(vr)[0] for vr in _LONG_VRS)
_SHORT_VR_CODES = frozenset(_u16.unpack(vr)[0] for vr in _SHORT_VRS)
# (tag halves, 16-bit length, 32-bit length) readers by byte order.
_LITTLE = (_u16x2, _u16, _u32)
_BIG = (struct.Struct(">HH"), struct.Struct(">H"), struct.Struct(">L"))


class HeaderFields(NamedTuple):
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    series_number: int | None
    transfer_syntax_uid: str
    patient_id: str
    media_sop_class_uid: str


# A HeaderFields from a tuple of its fields in order, without the keyword-taking __new__.
_new_fields = functools.partial(tuple.__new__, HeaderFields)


class NotDicom(Exception):
    """The bytes are not a DICOM object this tool can send; ``str()`` says why in one sentence."""


class NeedFallback(Exception):
    """The fast reader met something unusual; pydicom must read this file."""


class Truncated(Exception):
    """The data ends inside an element."""


_Truncated = Truncated


def _no_more(n: int) -> bytes:
    return b""


class Buffer:
    """The growing prefix of one file or stream, read on demand (``read(n)`` gives more bytes,
    b"" at the end). Reading past ``limit`` bytes raises NeedFallback (None: no limit)."""

    __slots__ = ("buf", "eof", "limit", "read")

    def __init__(
        self,
        first: bytes,
        read: Callable[[int], bytes] = _no_more,
        limit: int | None = MAX_HEADER,
    ) -> None:
        self.buf = first
        self.read = read
        self.eof = False
        self.limit = limit

    def ensure(self, end: int) -> None:
        """Make ``buf[:end]`` available or raise Truncated at end of data."""
        while len(self.buf) < end:
            if self.eof:
                raise _Truncated
            if self.limit is not None and end > self.limit:
                raise NeedFallback("header longer than the read limit")
            chunk = self.read(max(end - len(self.buf), len(self.buf)))
            if not chunk:
                self.eof = True
                raise _Truncated
            self.buf += chunk

    def at_end(self, pos: int) -> bool:
        if pos < len(self.buf):
            return False
        if not self.eof:
            try:
                self.ensure(pos + 1)
                return False
            except _Truncated:
                pass
        if pos > len(self.buf):
            raise _Truncated  # the data ends inside the last element's value
        return True


Found = dict[int, tuple[int, int]]
"""Tag -> (offset of its value in the buffer, value length), for the wanted top-level tags."""


def walk_elements(
    b: Buffer,
    pos: int,
    *,
    explicit: bool,
    stop: int,
    little: bool = True,
    wanted: frozenset[int] = frozenset(),
    found: Found | None = None,
) -> int:
    """The one DICOM element walker (discovery's header reader and the C-STORE encoder's
    routing splice and meta stripping both use it): steps over the data set's top-level
    elements from ``pos`` without decoding any value, undefined-length sequences included
    (PS3.5 7.1 and 7.5), and returns the position of the first element whose tag is above
    ``stop`` (tags ascend within a data set, PS3.5 7.1), or of the end of the data.

    Where ``wanted`` tags are met their value's place is put in ``found`` (the value read into
    the buffer). Anything it cannot step over for certain (an unknown VR, an undefined length on
    a value, sequences nested deeper than 16) raises NeedFallback; data that ends inside an
    element raises Truncated. The caller then lets pydicom read the file.
    """
    return _walk(b, pos, explicit, stop, {} if found is None else found, 0, wanted, little)


def _walk(
    b: Buffer,
    pos: int,
    explicit: bool,
    stop: int,
    found: Found,
    depth: int,
    wanted: frozenset[int] = _WANTED,
    little: bool = True,
) -> int:
    """Walk elements from ``pos``; return the position after the last one read.

    At the top level (``stop`` < _ITEM) the walk ends at the first tag above ``stop``, at an
    item delimiter inside an undefined-length item, or at the end of the data.
    """
    if depth > _MAX_DEPTH:
        raise NeedFallback("sequences nested too deep")
    _u16x2, _u16, _u32 = _LITTLE if little else _BIG
    while True:
        if depth == 0 and b.at_end(pos):
            return pos
        b.ensure(pos + 8)
        buf = b.buf
        group, elem = _u16x2.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        if tag > stop:
            return pos
        if explicit:
            vr = buf[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                b.ensure(pos + 12)
                (length,) = _u32.unpack_from(b.buf, pos + 8)
                pos += 12
            elif vr in _SHORT_VRS:
                (length,) = _u16.unpack_from(buf, pos + 6)
                pos += 8
            else:
                raise NeedFallback(f"unknown VR {vr!r}")
        else:
            vr = b""
            (length,) = _u32.unpack_from(buf, pos + 4)
            pos += 8
        if length == _UNDEFINED:
            if not explicit or vr == b"SQ":
                pos = _skip_sequence(b, pos, explicit, depth + 1, little)
            elif vr == b"UN":
                # PS3.5 6.2.2: UN of undefined length holds a sequence in implicit VR LE.
                pos = _skip_sequence(b, pos, False, depth + 1, True)
            else:
                raise NeedFallback("undefined length on a non-sequence element")
            continue
        if depth == 0 and tag in wanted:
            b.ensure(pos + length)
            found[tag] = (pos, length)
        pos += length


def _skip_sequence(b: Buffer, pos: int, explicit: bool, depth: int, little: bool) -> int:
    """Skip an undefined-length sequence's items up to and including its delimiter."""
    _u16x2, _u16, _u32 = _LITTLE if little else _BIG
    while True:
        b.ensure(pos + 8)
        group, elem = _u16x2.unpack_from(b.buf, pos)
        tag = group << 16 | elem
        (length,) = _u32.unpack_from(b.buf, pos + 4)
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise NeedFallback("unexpected tag inside a sequence")
        if length == _UNDEFINED:
            pos = _walk(b, pos, explicit, 0xFFFFFFFF, {}, depth, _WANTED, little)
        else:
            pos += length


def _uid(raw: bytes | None) -> str:
    if not raw:
        return ""
    try:
        return raw.rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
    except UnicodeDecodeError:
        raise NeedFallback("non-ASCII UID") from None


def _text(raw: bytes | None) -> str:
    if not raw:
        return ""
    try:
        return raw.decode("ascii").strip(" \x00")
    except UnicodeDecodeError:
        raise NeedFallback("non-ASCII text (character set decoding needed)") from None


def parse_int_string(raw: bytes | str | None) -> int | None:
    """An IS value as an int; None when empty, multi-valued or not a whole number."""
    if raw is None:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    text = text.strip(" \x00")
    if not text or "\\" in text:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        return int(value) if value.is_integer() else None


def _value(b: Buffer, places: Found, tag: int) -> bytes | None:
    place = places.get(tag)
    return None if place is None else b.buf[place[0] : place[0] + place[1]]


_element_at = _ELEMENT.unpack_from  # tag halves, VR as a number, 16-bit length: one call
_implicit_at = struct.Struct("<HHL").unpack_from  # tag halves and 32-bit length
_u32_at = _u32.unpack_from


def _walk_prefix(buf: bytes, pos: int, explicit: bool, stop: int, places: Found) -> int | None:
    """:func:`_walk` at the top level for the common case, on ``buf`` alone: the position of the
    first element whose tag is above ``stop``, the wanted places put in ``places``; None where
    the general walker must decide (an undefined length, an unknown VR, an item delimiter, or
    anything at or past the end of ``buf``: the general walker then reads on). Where it answers,
    the answer is the general walker's (tests/test_discover.py compares the two). One loop per
    encoding, so that an element costs one unpack, two comparisons and two set lookups (most
    of a worker's time per file is here: issue 16 item 4)."""
    last = len(buf) - 12  # an element starting after this one is the general walker's
    wanted = _WANTED
    if not explicit:
        implicit_at = _implicit_at
        while pos <= last:
            group, elem, length = implicit_at(buf, pos)
            tag = group << 16 | elem
            if tag > stop:
                return None if tag == _ITEM_END else pos
            pos += 8
            if tag in wanted:
                places[tag] = (pos, length)
            # An undefined length, or a value that ends past ``buf``, ends the loop: None.
            pos += length
        return None
    element_at = _element_at
    u32_at = _u32_at
    short_vrs = _SHORT_VR_CODES
    long_vrs = _LONG_VR_CODES
    while pos <= last:
        group, elem, vr, length = element_at(buf, pos)
        tag = group << 16 | elem
        if tag > stop:
            return None if tag == _ITEM_END else pos
        if vr in short_vrs:
            pos += 8
        elif vr in long_vrs:
            length = u32_at(buf, pos + 8)[0]
            pos += 12
        else:
            return None
        if tag in wanted:
            places[tag] = (pos, length)
        pos += length
    return None


def _parse_whole(buf: bytes) -> HeaderFields | None:
    """The header fields of a Part 10 file whose header lies within ``buf``, read in one pass
    without the :class:`Buffer` machinery (most of discovery's time per file was that); None
    where :func:`parse_prefix`'s general path must read it (and then decides alone). Equal to
    the general path wherever it answers: the same walk, and the same values read from it
    (what :func:`_fields` does, written out: this runs once per file)."""
    if buf[128:134] != b"DICM\x02\x00" or buf[136:138] not in _ALL_VRS:
        return None
    places: Found = {}
    pos = _walk_prefix(buf, 132, True, 0x0002FFFF, places)
    if pos is None:
        return None
    place = places.get(_TS)
    ts = _uid(buf[place[0] : place[0] + place[1]]) if place is not None else ""
    if ts == IMPLICIT_VR_LE:
        explicit = False
    elif ts in ("", EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR_LE):
        return None
    else:
        explicit = True
    if pos + 6 > len(buf) or (buf[pos + 4 : pos + 6] in _ALL_VRS) != explicit:
        return None
    if _walk_prefix(buf, pos, explicit, _SERIES_NUMBER, places) is None:
        return None
    get = places.get
    empty = (0, 0)
    at, n = get(_SERIES_NUMBER, empty)
    raw = buf[at : at + n]
    try:  # int() takes ASCII digits with white space around (parse_int_string's common case)
        number = int(raw) if raw else None
    except ValueError:
        number = parse_int_string(raw)
    # A missing element reads as b"" (as _uid and _text read None); a value that is not ASCII
    # is the general path's to refuse (NeedFallback there, as in _uid and _text).
    try:
        at, n = get(_SOP_CLASS, empty)
        sop_class = buf[at : at + n].rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
        at, n = get(_SOP_INSTANCE, empty)
        sop_instance = buf[at : at + n].rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
        at, n = get(_STUDY_UID, empty)
        study = buf[at : at + n].rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
        at, n = get(_SERIES_UID, empty)
        series = buf[at : at + n].rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
        at, n = get(_PATIENT_ID, empty)
        patient = buf[at : at + n].decode("ascii").strip(" \x00")
        at, n = get(_MEDIA_SOP_CLASS, empty)
        media = buf[at : at + n].rstrip(b"\x00 ").lstrip(b" ").decode("ascii")
    except UnicodeDecodeError:
        return None
    return _new_fields((sop_class, sop_instance, study, series, number, ts, patient, media))


def _place_value(buf: bytes, places: Found, tag: int) -> bytes | None:
    place = places.get(tag)
    return None if place is None else buf[place[0] : place[0] + place[1]]


def _fields(buf: bytes, places: Found, ts: str, has_preamble: bool) -> HeaderFields:
    """The fields from the places the walk found in ``buf`` (both paths of parse_prefix).
    Each value is sliced only when asked for, and the record built by position (half the time
    of a dict of every value and keyword arguments: this runs once per file)."""
    get = places.get

    def value(tag: int) -> bytes | None:
        place = get(tag)
        return None if place is None else buf[place[0] : place[0] + place[1]]

    sop_instance = value(_SOP_INSTANCE)
    if not has_preamble and not sop_instance:
        raise NeedFallback("raw data set without a SOP Instance UID")
    return HeaderFields(  # in the order of its fields
        _uid(value(_SOP_CLASS)),
        _uid(sop_instance),
        _uid(value(_STUDY_UID)),
        _uid(value(_SERIES_UID)),
        parse_int_string(value(_SERIES_NUMBER)),
        ts,
        _text(value(_PATIENT_ID)),
        _uid(value(_MEDIA_SOP_CLASS)),
    )


def parse_prefix(first: bytes, read: Callable[[int], bytes]) -> HeaderFields:
    """Read the header fields from ``first`` (the opening bytes) plus ``read`` for more.

    Raises NotDicom with a reason, or NeedFallback when pydicom must decide.
    """
    fields = _parse_whole(first)
    return fields if fields is not None else parse_general(first, read)


def parse_general(first: bytes, read: Callable[[int], bytes]) -> HeaderFields:
    """:func:`parse_prefix` through a :class:`Buffer` that reads on as the walk needs (every
    encoding the fast reader knows, any header length up to :data:`MAX_HEADER`)."""
    b = Buffer(first, read)
    places: Found = {}
    try:
        b.ensure(132)
        has_preamble = b.buf[128:132] == b"DICM"
    except _Truncated:
        has_preamble = False
    pos = 132 if has_preamble else 0
    if not has_preamble:
        if len(b.buf) < 8:
            raise NotDicom("not a DICOM file (too short)")
        group = _u16.unpack_from(b.buf, 0)[0]
        # A raw data set (no preamble) starts with the meta group or group 0008 (PS3.5 7.1);
        # 0x0200/0x0800 are those groups written big endian (pydicom reads those).
        if group not in (0x0002, 0x0008):
            if group in (0x0200, 0x0800):
                raise NeedFallback("raw big endian data set")
            raise NotDicom("not a DICOM file (no DICM marker and no DICOM data set)")
    try:
        b.ensure(pos + 6)
        has_meta = _u16.unpack_from(b.buf, pos)[0] == 0x0002
        if has_meta:
            if b.buf[pos + 4 : pos + 6] not in _ALL_VRS:
                raise NeedFallback("File Meta group not in explicit VR")
            pos = _walk(b, pos, True, 0x0002FFFF, places, 0)
            ts = _uid(_value(b, places, _TS))
        elif has_preamble:
            raise NeedFallback("no File Meta group")
        else:
            # A raw data set says nothing of its encoding: the first element shows it.
            ts = EXPLICIT_VR_LE if b.buf[pos + 4 : pos + 6] in _ALL_VRS else IMPLICIT_VR_LE
        if ts == IMPLICIT_VR_LE:
            explicit = False
        elif ts in ("", EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR_LE):
            raise NeedFallback(f"transfer syntax {ts or 'missing'}")
        else:
            # Every other standard transfer syntax (the compressed ones included) encodes the
            # data set in explicit VR little endian (PS3.5 A.4).
            explicit = True
        if not b.at_end(pos):
            b.ensure(pos + 6)
            looks_explicit = b.buf[pos + 4 : pos + 6] in _ALL_VRS
            if looks_explicit != explicit:
                raise NeedFallback("data set VR encoding differs from its transfer syntax")
        _walk(b, pos, explicit, _SERIES_NUMBER, places, 0)
    except _Truncated:
        if not has_preamble:
            raise NeedFallback("raw data set that does not parse") from None
        raise NotDicom("truncated DICOM file (it ends inside the header)") from None
    return _fields(b.buf, places, ts, has_preamble)


_PYDICOM_LOCK = threading.Lock()
_PYDICOM_TAGS = [
    0x00020002,
    0x00020010,
    0x00080005,
    0x00080016,
    0x00080018,
    0x00100020,
    0x0020000D,
    0x0020000E,
    0x00200011,
]


def read_with_pydicom(fp: IO[bytes]) -> HeaderFields:
    """The slow, thorough path: pydicom reads what the fast reader would not."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with _PYDICOM_LOCK, warnings.catch_warnings():
            # pydicom warns (and logs) about every oddity it tolerates; the manifest already
            # says what matters, and catch_warnings is process-wide, hence the lock.
            warnings.simplefilter("ignore")
            pydicom_log = logging.getLogger("pydicom")
            level = pydicom_log.level
            pydicom_log.setLevel(logging.ERROR)
            try:
                ds = pydicom.dcmread(
                    fp, stop_before_pixels=True, specific_tags=_PYDICOM_TAGS, force=True
                )
            finally:
                pydicom_log.setLevel(level)
        meta = ds.file_meta if hasattr(ds, "file_meta") else None

        def uid(tag: int, source: object = ds) -> str:
            elem = source.get(tag) if source is not None else None  # type: ignore[attr-defined]
            value = elem.value if elem is not None else None
            if value is None or isinstance(value, bytes):
                return _uid(value) if value else ""
            return str(value).strip(" \x00")

        sop_instance = uid(_SOP_INSTANCE)
        patient = ds.get(_PATIENT_ID)
        patient_id = "" if patient is None or patient.value is None else str(patient.value)
        ts = uid(_TS, meta) if meta is not None else ""
        if not ts and not sop_instance:
            raise NotDicom("not a DICOM file (no DICOM header found)")
        if not ts:
            ts = _encoding_ts(ds)
        series = ds.get(_SERIES_NUMBER)
        raw_series = None if series is None else series.value
        if raw_series is not None and not isinstance(raw_series, (bytes, str)):
            raw_series = str(raw_series) if not hasattr(raw_series, "__len__") else None
        return HeaderFields(
            sop_class_uid=uid(_SOP_CLASS),
            sop_instance_uid=sop_instance,
            study_uid=uid(_STUDY_UID),
            series_uid=uid(_SERIES_UID),
            series_number=parse_int_string(raw_series),
            transfer_syntax_uid=ts,
            patient_id=patient_id.strip(" \x00"),
            media_sop_class_uid=uid(_MEDIA_SOP_CLASS, meta) if meta is not None else "",
        )
    except NotDicom:
        raise
    except InvalidDicomError:
        raise NotDicom("not a DICOM file") from None
    except NeedFallback:
        raise NotDicom("not a DICOM file (malformed header)") from None
    except Exception as exc:  # pydicom raises many kinds on garbage input
        raise NotDicom(f"unreadable DICOM header ({type(exc).__name__})") from None


def _encoding_ts(ds: object) -> str:
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if little:
        return IMPLICIT_VR_LE if implicit else EXPLICIT_VR_LE
    return EXPLICIT_VR_BE


def read_header_stream(fp: IO[bytes]) -> HeaderFields:
    """Header fields of the DICOM object at the start of a binary stream (seekable or not).

    Non-seekable streams (members of a compressed tar) are buffered up to the fast reader's
    limit for a pydicom fallback.
    """
    first = fp.read(FIRST_READ)
    consumed = [first]

    def more(n: int) -> bytes:
        chunk = fp.read(n)
        consumed.append(chunk)
        return chunk

    try:
        return parse_prefix(first, more)
    except NeedFallback:
        pass
    if _seekable(fp):
        fp.seek(0)
        return read_with_pydicom(fp)
    # A member of a compressed tar cannot seek back: spool it (in memory up to a limit, on disk
    # beyond) so pydicom can read it; only odd files ever take this path.
    import shutil
    import tempfile

    with tempfile.SpooledTemporaryFile(max_size=MAX_HEADER) as spool:
        for chunk in consumed:
            spool.write(chunk)
        shutil.copyfileobj(fp, spool)
        spool.seek(0)
        return read_with_pydicom(spool)


def _seekable(fp: IO[bytes]) -> bool:
    try:
        return bool(fp.seekable())
    except Exception:  # tarfile's stream mode raises AttributeError from deep inside
        return False


def read_header_fd(fd: int) -> HeaderFields:
    """Header fields of the open file ``fd`` (positioned at 0): its first :data:`FIRST_READ`
    bytes in one pass, then, for a longer header, up to :data:`SECOND_READ` in one pass, then
    the general walk reading on (each answers as the next would: tests/test_discover.py)."""
    first = os.read(fd, FIRST_READ)
    fields = _parse_whole(first)
    if fields is None and len(first) == FIRST_READ:
        first += os.read(fd, SECOND_READ - FIRST_READ)
        fields = _parse_whole(first)
    if fields is not None:
        return fields
    try:
        return parse_general(first, functools.partial(os.read, fd))
    except NeedFallback:
        pass
    os.lseek(fd, 0, os.SEEK_SET)
    with os.fdopen(os.dup(fd), "rb") as fp:
        return read_with_pydicom(fp)
