"""The importer's fast path: read the header fields and build the stored bytes of an ordinary
DICOM file without pydicom's full parse and re-serialization, giving exactly the answer
``dicom.read_header`` + ``dicom.reencode`` give (facts 1.7: regenerated file meta, the header
re-encoded after the site script, the rest verbatim).

Most of the sandbox's CPU per file went to pydicom reading every header element into a
``Dataset`` (twice: once to route the file, once to re-encode it) and writing it back. For the
files nearly every scanner and every benchmark sends, pydicom's output is predictable element by
element: an element it only read and did not touch is written back as the same bytes (tag, VR,
length, raw value: ``filewriter.write_data_element`` writes a raw element's value as it is), group
lengths of groups above 6 are dropped, the two UIDs it reads for the new file meta are written
back converted, and the script's three elements are re-encoded (or inserted in tag order). This
module walks the header once at byte level, asks pydicom's own converters only for the few values
the importer needs, and builds those bytes itself.

It accepts only what it can reproduce exactly: a Part 10 file (preamble, ``DICM``, explicit VR
little endian file meta) whose data set is explicit VR little endian, elements in ascending tag
order with known VRs, zero reserved bytes, no sequence and no undefined length, no group below
0008, the header complete within the bytes given, ASCII for every value it re-encodes, and a
single-byte or UTF-8 character set. Anything else returns None, and the caller takes pydicom's
path as before, so the result is always the one that path gives (tests/sandbox/
test_sandbox_fastdicom.py compares the two on pydicom's test files and synthetic variations).
"""

from __future__ import annotations

import functools
import struct
import warnings
from dataclasses import dataclass

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.tag import Tag

from xnatio.sandbox.dicom import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    DicomHeader,
    SiteScript,
    routing_of,
)

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def _code(vr: bytes) -> int:
    """A VR as the little-endian 16-bit integer the element header holds (one unpack reads the
    tag, the VR and the 16-bit length together)."""
    return int.from_bytes(vr, "little")


_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN"
    b" UR US UT UV".split()
)
# PS3.5 table 7.1-1: a 2-byte reserved field and a 4-byte length.
_LONG = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_NAMES = {_code(vr): vr for vr in _VRS}
_SHORT_CODES = frozenset(_code(vr) for vr in _VRS - _LONG)
_LONG_CODES = frozenset(_code(vr) for vr in _LONG)
# Sequences are declined (their items would need walking): not among the accepted codes.
_LONG_ACCEPTED = _LONG_CODES - {_code(b"SQ")}
_UI, _IS, _DA = _code(b"UI"), _code(b"IS"), _code(b"DA")
# Where pydicom's stop_before_pixels stops (filereader._at_pixel_data).
_PIXELS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_FIRST_PIXEL = min(_PIXELS)
_SAFE_CHARSETS = frozenset({b"", b"ISO_IR 100", b"ISO_IR 6", b"ISO_IR 192"})

_CHARSET = 0x00080005
_SOP_CLASS = 0x00080016
_SOP_UID = 0x00080018
_STUDY_DESCRIPTION = 0x00081030
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_KEYWORDS = {
    "SOPClassUID": _SOP_CLASS,
    "SOPInstanceUID": _SOP_UID,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
    "SeriesDescription": 0x0008103E,
    "Modality": 0x00080060,
    "StudyDate": 0x00080020,
    "PatientName": _PATIENT_NAME,
    "PatientID": _PATIENT_ID,
    "StudyDescription": _STUDY_DESCRIPTION,
    "AccessionNumber": 0x00080050,
    "PatientComments": 0x00104000,
    "StudyComments": 0x00324000,
    "AdditionalPatientHistory": 0x001021B0,
}
_ROUTING_TAGS = (0x00104000, 0x00324000, 0x001021B0)
# The elements the walk remembers (every other one is only checked and stepped over).
_WANTED = frozenset(_KEYWORDS.values()) | {_CHARSET}
# (tag, VR) of the elements the site script sets (dicom.reencode; facts 1.7), in tag order.
_SCRIPT_VRS = {_STUDY_DESCRIPTION: b"LO", _PATIENT_NAME: b"PN", _PATIENT_ID: b"LO"}
_SCRIPT_TAGS = tuple(sorted(_SCRIPT_VRS))
_NO_TAG = 1 << 32  # above every tag

_HEADER = struct.Struct("<HHHH")  # group, element, VR, 16-bit length (or the reserved bytes)
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")
_PREAMBLE = b"\0" * 128 + b"DICM"

Span = tuple[int, int, int]
"""(VR code, start, end) of one element in ``head``; its value starts 8 or 12 bytes in."""


class _Decline(Exception):
    """Not a file this module reproduces exactly: take pydicom's path."""


@dataclass(frozen=True, slots=True)
class FastFile:
    """One parsed header: the importer's fields, where the rest starts, and what re-encoding
    needs (where the few elements it changes, drops or inserts lie in ``head``)."""

    header: DicomHeader
    head: bytes
    rest_at: int
    """Offset of the pixel data element (or the end of the file): stored verbatim from here."""
    transfer_syntax: str
    data_at: int
    """Offset of the data set's first element (the end of the file meta group)."""
    spans: dict[int, Span]
    """The data set elements the importer reads or re-encodes, by tag."""
    dropped: tuple[tuple[int, int], ...]
    """(start, end) of the data set's group length elements, which pydicom does not write."""
    cuts: tuple[int, ...]
    """For each script tag (``_SCRIPT_TAGS``): where the first element at or above it starts,
    i.e. where the script's element goes when the file has none."""
    charset_ok: bool

    def stored_prefix(self, script: SiteScript | None) -> bytes | None:
        """The stored file up to ``rest_at`` (``dicom.reencode``'s bytes), or None to decline."""
        try:
            return self._encode(script)
        except _Decline:
            return None

    def _encode(self, script: SiteScript | None) -> bytes:
        # Every element pydicom writes back as read is copied as one run of ``head``; only the
        # SOP UIDs (written back converted), the group lengths (dropped) and the script's
        # elements (replaced, or inserted in tag order) are spliced in.
        h = self.header
        spans = self.spans
        meta_a, meta_tail, meta_len, class_element = _meta_parts(h.sop_class, self.transfer_syntax)
        uid = _uid(h.sop_uid)
        uid_element = _element(0x00020003, b"UI", uid)
        ops: list[tuple[int, int, int, bytes]] = [(s, e, 0, b"") for s, e in self.dropped]
        _, start, end = spans[_SOP_CLASS]
        ops.append((start, end, _SOP_CLASS, class_element))
        _, start, end = spans[_SOP_UID]
        ops.append((start, end, _SOP_UID, _element(_SOP_UID, b"UI", uid)))
        if script is not None:
            if not self.charset_ok:
                raise _Decline
            values = (
                None if script.project is None else _text(script.project),
                _text(script.subject),
                _text(script.session),
            )
            for tag, value, cut in zip(_SCRIPT_TAGS, values, self.cuts, strict=True):
                if value is None:
                    continue
                vr = _SCRIPT_VRS[tag]
                span = spans.get(tag)
                if span is None:  # not in the file: inserted in tag order
                    ops.append((cut, cut, tag, _element(tag, vr, value)))
                elif span[0] != _code(vr):
                    raise _Decline
                else:
                    ops.append((span[1], span[2], tag, _element(tag, vr, value)))
        ops.sort()  # by position; an insertion before what starts where it goes
        head = self.head
        out = [
            _PREAMBLE,
            _element(0x00020000, b"UL", _U32.pack(meta_len + len(uid_element))),
            meta_a,
            uid_element,
            meta_tail,
        ]
        at = self.data_at
        for start, end, _, piece in ops:
            out.append(head[at:start])
            out.append(piece)
            at = end
        out.append(head[at : self.rest_at])
        return b"".join(out)


@functools.lru_cache(maxsize=1024)
def _text(value: str) -> bytes:
    """A string value as pydicom writes a text VR (PN, LO) set from ``str``: encoded, padded
    with a space to even length. Only plain ASCII (no backslash: it would be multi-valued)."""
    if not value.isascii() or "\\" in value or not value.isprintable():
        raise _Decline
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (16-bit length VRs only: UI, PN, LO, SH, UL)."""
    if len(value) > 0xFFFF:
        raise _Decline
    return _TAG.pack(tag >> 16, tag & 0xFFFF) + vr + _U16.pack(len(value)) + value


_META_VERSION = _TAG.pack(2, 1) + b"OB\0\0" + _U32.pack(2) + b"\0\1"


@functools.lru_cache(maxsize=64)
def _meta_parts(sop_class: str, ts: str) -> tuple[bytes, bytes, int, bytes]:
    """The pieces of the file meta group ``reencode`` writes (version, the two SOP UIDs, the
    transfer syntax and dcm4che2's implementation identity, facts 1.7, behind its group length)
    that are the same for a whole series: the part before the SOP instance UID, the part after
    it, their length; and the data set's SOP class element as written back. Cached: a series
    has one SOP class."""
    before = _META_VERSION + _element(0x00020002, b"UI", _uid(sop_class))
    after = b"".join(
        (
            _element(0x00020010, b"UI", _uid(ts)),
            _element(0x00020012, b"UI", _uid(str(IMPLEMENTATION_CLASS_UID))),
            _element(0x00020013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        )
    )
    return before, after, len(before) + len(after), _element(_SOP_CLASS, b"UI", _uid(sop_class))


def _walk_meta(head: bytes) -> tuple[Span | None, int]:
    """The file meta group's elements from offset 132 (explicit VR little endian, group 0002):
    the transfer syntax element's span (None if absent) and where the data set starts."""
    end = len(head)
    at = 132
    last = -1
    ts: Span | None = None
    while at < end:
        if end - at < 8:
            raise _Decline  # a truncated element (or a header longer than the head)
        group, elem, vr, length = _HEADER.unpack_from(head, at)
        if group != 2:
            break
        tag = group << 16 | elem
        if tag <= last:
            raise _Decline
        at, nxt = _step(head, at, vr, length, end)
        if tag == 0x00020010:
            ts = (vr, at, nxt)
        last = tag
        at = nxt
    return ts, at


def _step(head: bytes, at: int, vr: int, length: int, end: int) -> tuple[int, int]:
    """(start, end) of the element at ``at`` with VR code ``vr`` and 16-bit length field
    ``length``; declines what the walk does not take (an unknown VR, a sequence, non-zero
    reserved bytes, an undefined length, a value past the head)."""
    if vr in _SHORT_CODES:
        nxt = at + 8 + length
    elif vr in _LONG_ACCEPTED and not length and end - at >= 12:
        length = _U32.unpack_from(head, at + 8)[0]
        if length == 0xFFFFFFFF:
            raise _Decline
        nxt = at + 12 + length
    else:
        raise _Decline
    if nxt > end:
        raise _Decline
    return at, nxt


def _walk_data(
    head: bytes, at: int
) -> tuple[int, dict[int, Span], list[tuple[int, int]], list[int]]:
    """The data set's elements from ``at`` up to the pixel data (explicit VR little endian,
    ascending tags from group 0008): where the walk stopped, the spans of the wanted elements,
    the group lengths, and the script tags' cuts (``FastFile.cuts``).

    The hot loop of the fast path: one unpack per element (tag, VR and the 16-bit length
    together), a set lookup for the VR, and only the few wanted elements remembered."""
    unpack = _HEADER.unpack_from
    u32 = _U32.unpack_from
    short, long_ok, wanted, pixels = _SHORT_CODES, _LONG_ACCEPTED, _WANTED, _PIXELS
    spans: dict[int, Span] = {}
    dropped: list[tuple[int, int]] = []
    cuts: list[int] = []
    threshold = _SCRIPT_TAGS[0]
    end = len(head)
    last = 0x0007FFFF  # a tag at or below it (group < 0008) is declined like one out of order
    while at < end:
        if end - at < 8:
            raise _Decline  # a truncated element (or a header longer than the head)
        group, elem, vr, length = unpack(head, at)
        tag = group << 16 | elem
        if tag >= _FIRST_PIXEL and tag in pixels:
            break
        if tag <= last:
            raise _Decline
        if vr in short:
            nxt = at + 8 + length
        elif vr in long_ok and not length and end - at >= 12:
            length = u32(head, at + 8)[0]
            if length == 0xFFFFFFFF:
                raise _Decline
            nxt = at + 12 + length
        else:
            raise _Decline  # an unknown VR, a sequence, or reserved bytes that are not zero
        if nxt > end:
            raise _Decline
        while tag >= threshold:
            cuts.append(at)
            threshold = _SCRIPT_TAGS[len(cuts)] if len(cuts) < len(_SCRIPT_TAGS) else _NO_TAG
        if tag in wanted:
            spans[tag] = (vr, at, nxt)
        elif not elem:
            dropped.append((at, nxt))  # a group length (every group here is above 6)
        last = tag
        at = nxt
    while len(cuts) < len(_SCRIPT_TAGS):
        cuts.append(at)
    return at, spans, dropped, cuts


# VRs whose single-valued printable ASCII value pydicom converts to the bytes without their
# trailing spaces and NULs (values.convert_UI / convert_string / convert_text, multi_string);
# DA only while pydicom.config.datetime_conversion is off (its default).
_PLAIN_CODES = frozenset(_code(vr) for vr in (b"UI", b"CS", b"SH", b"LO"))
_PRINTABLE = bytes(range(0x20, 0x7F)).replace(b"\\", b"")


def _value(head: bytes, tag: int, span: Span, encodings: tuple[str, ...]) -> str:
    """``str(value or "")`` of the value pydicom's ``Dataset.get`` would give for the element,
    as ``read_header`` uses every value."""
    vr, start, end = span
    value = head[start + (12 if vr in _LONG_CODES else 8) : end]
    # The common cases inline (a UID differs in every file: caching it would only evict).
    if vr in _PLAIN_CODES or (vr == _DA and not pydicom_config.datetime_conversion):
        stripped = value.rstrip(b" \0")
        if not stripped.translate(None, _PRINTABLE):
            return stripped.decode("ascii")
    elif vr == _IS:
        stripped = value.rstrip(b" \0")
        if stripped.isdigit():  # ASCII digits only (bytes): IS(n) is falsy for 0
            return "" if int(stripped) == 0 else stripped.decode("ascii")
    return _text_of(tag, _NAMES[vr], value, encodings)


@functools.lru_cache(maxsize=8192)
def _text_of(tag: int, vr: bytes, value: bytes, encodings: tuple[str, ...]) -> str:
    # Cached: most values repeat in every file of a session (names, comments).
    raw = RawDataElement(Tag(tag), vr.decode(), len(value), value, 0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return str(convert_raw_data_element(raw, encoding=list(encodings)).value or "")


@functools.lru_cache(maxsize=256)
def _encodings_of(vr: bytes, value: bytes, default: tuple[str, ...]) -> tuple[str, ...]:
    """The encodings a Specific Character Set value names, as pydicom converts it; cached: a
    session repeats one value in every file (converting it was 4 % of the import's CPU)."""
    raw = RawDataElement(Tag(_CHARSET), vr.decode(), len(value), value, 0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert_raw_data_element(raw, encoding=list(default)).value
    return tuple(convert_encodings(converted)) if converted else default


def parse(head: bytes, whole: bool) -> FastFile | None:
    """The fast reading of ``head`` (the first bytes of an entry; ``whole``: all of it), or None
    when pydicom's path must decide (see the module docstring)."""
    try:
        return _parse(head, whole)
    except _Decline:
        return None
    except (ValueError, TypeError, LookupError, struct.error):
        return None  # a value pydicom's converters refuse: its own path says what to answer


def _parse(head: bytes, whole: bool) -> FastFile:
    if len(head) < 144 or head[128:132] != b"DICM":
        raise _Decline
    ts_span, data_at = _walk_meta(head)
    if ts_span is None or ts_span[0] != _UI:
        raise _Decline
    ts = head[ts_span[1] + 8 : ts_span[2]].decode("ascii").rstrip("\0 ")
    if ts != EXPLICIT_VR_LE:
        raise _Decline
    rest_at, spans, dropped, cuts = _walk_data(head, data_at)
    if rest_at == len(head) and not whole:
        raise _Decline  # no pixel data within the head: the header may go on
    charset_raw = b""
    encodings: tuple[str, ...] = ("iso8859",)
    charset = spans.get(_CHARSET)
    if charset is not None:
        vr, start, end = charset
        value_at = start + (12 if vr in _LONG_CODES else 8)
        encodings = _encodings_of(_NAMES[vr], head[value_at:end], encodings)
        charset_raw = head[start + 8 : end].rstrip(b"\0 ")
    for tag in (_SOP_CLASS, _SOP_UID):
        if tag in spans and spans[tag][0] != _UI:
            raise _Decline

    def get(keyword: str) -> str:
        tag = _KEYWORDS[keyword]
        span = spans.get(tag)
        return "" if span is None else _value(head, tag, span, encodings)

    sop_class = get("SOPClassUID")
    sop_uid = get("SOPInstanceUID")
    if not sop_class or not sop_uid:
        raise _Decline  # pydicom's path words the refusal
    if any(tag in spans for tag in _ROUTING_TAGS):
        routing = routing_of(lambda kw: get(kw) if kw in _KEYWORDS else "")
    else:
        routing = {}  # routing_of of three empty values
    header = DicomHeader(
        sop_class=sop_class,
        sop_uid=sop_uid,
        study_uid=get("StudyInstanceUID"),
        series_uid=get("SeriesInstanceUID"),
        series_number=get("SeriesNumber").strip(),
        instance_number=get("InstanceNumber").strip(),
        series_description=get("SeriesDescription"),
        modality=get("Modality"),
        study_date=get("StudyDate") or None,
        patient_name=get("PatientName"),
        patient_id=get("PatientID"),
        study_description=get("StudyDescription"),
        accession_number=get("AccessionNumber"),
        routing=routing,
    )
    return FastFile(
        header=header,
        head=head,
        rest_at=rest_at,
        transfer_syntax=ts,
        data_at=data_at,
        spans=spans,
        dropped=tuple(dropped),
        cuts=tuple(cuts),
        charset_ok=charset_raw in _SAFE_CHARSETS,
    )
