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
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN"
    b" UR US UT UV".split()
)
# PS3.5 table 7.1-1: a 2-byte reserved field and a 4-byte length.
_LONG = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR"})
_LONG = _LONG | {b"UT", b"UV"}
# Where pydicom's stop_before_pixels stops (filereader._at_pixel_data).
_PIXELS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
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
# (tag, VR) of the elements the site script sets (dicom.reencode; facts 1.7).
_SCRIPT_VRS = {_STUDY_DESCRIPTION: b"LO", _PATIENT_NAME: b"PN", _PATIENT_ID: b"LO"}

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


class _Decline(Exception):
    """Not a file this module reproduces exactly: take pydicom's path."""


@dataclass(frozen=True)
class FastFile:
    """One parsed header: the importer's fields, where the rest starts, and what re-encoding
    needs (the data set's elements as byte spans of ``head``)."""

    header: DicomHeader
    head: bytes
    rest_at: int
    """Offset of the pixel data element (or the end of the file): stored verbatim from here."""
    transfer_syntax: str
    elements: tuple[tuple[int, bytes, int, int], ...]
    """(tag, VR, start, end) of every data set element, in tag order."""
    charset_ok: bool

    def stored_prefix(self, script: SiteScript | None) -> bytes | None:
        """The stored file up to ``rest_at`` (``dicom.reencode``'s bytes), or None to decline."""
        try:
            return self._encode(script)
        except _Decline:
            return None

    def _encode(self, script: SiteScript | None) -> bytes:
        h = self.header
        values: dict[int, bytes] = {}
        if script is not None:
            if not self.charset_ok:
                raise _Decline
            if script.project is not None:
                values[_STUDY_DESCRIPTION] = _text(script.project)
            values[_PATIENT_NAME] = _text(script.subject)
            values[_PATIENT_ID] = _text(script.session)
        out = [b"\0" * 128, b"DICM", _file_meta(h.sop_class, h.sop_uid, self.transfer_syntax)]
        head = self.head
        pending = sorted(values)
        for tag, vr, start, end in self.elements:
            while pending and pending[0] < tag:
                new = pending.pop(0)  # not in the file: inserted in tag order
                out.append(_element(new, _SCRIPT_VRS[new], values[new]))
            if pending and pending[0] == tag:
                pending.pop(0)
                if vr != _SCRIPT_VRS[tag]:
                    raise _Decline
                out.append(_element(tag, vr, values[tag]))
            elif tag == _SOP_CLASS:
                out.append(_element(tag, vr, _uid(h.sop_class)))
            elif tag == _SOP_UID:
                out.append(_element(tag, vr, _uid(h.sop_uid)))
            else:
                out.append(head[start:end])
        for new in pending:
            out.append(_element(new, _SCRIPT_VRS[new], values[new]))
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


def _file_meta(sop_class: str, sop_uid: str, ts: str) -> bytes:
    """The file meta group ``reencode`` writes: version, the two SOP UIDs, the transfer syntax
    and dcm4che2's implementation identity (facts 1.7), behind its group length."""
    body = b"".join(
        (
            _META_VERSION,
            _element(0x00020002, b"UI", _uid(sop_class)),
            _element(0x00020003, b"UI", _uid(sop_uid)),
            _meta_tail(ts),
        )
    )
    return _element(0x00020000, b"UL", _U32.pack(len(body))) + body


_META_VERSION = _TAG.pack(2, 1) + b"OB\0\0" + _U32.pack(2) + b"\0\1"


@functools.lru_cache(maxsize=16)
def _meta_tail(ts: str) -> bytes:
    """Transfer syntax and dcm4che2's implementation identity: the same in every file."""
    return b"".join(
        (
            _element(0x00020010, b"UI", _uid(ts)),
            _element(0x00020012, b"UI", _uid(str(IMPLEMENTATION_CLASS_UID))),
            _element(0x00020013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        )
    )


def _walk(head: bytes, at: int, *, meta: bool) -> tuple[list[tuple[int, bytes, int, int]], int]:
    """Explicit VR little endian elements from ``at``: the file meta group (``meta``) or the data
    set up to the pixel data; returns the elements and where the walk stopped."""
    out: list[tuple[int, bytes, int, int]] = []
    end = len(head)
    last = -1
    while at < end:
        if end - at < 8:
            raise _Decline  # a truncated element (or a header longer than the head)
        group, elem = _TAG.unpack_from(head, at)
        tag = group << 16 | elem
        if meta and group != 2:
            return out, at
        if not meta and tag in _PIXELS:
            return out, at
        if tag <= last or (not meta and group < 8):
            raise _Decline
        vr = head[at + 4 : at + 6]
        if vr not in _VRS or vr == b"SQ":
            raise _Decline
        if vr in _LONG:
            if end - at < 12 or head[at + 6 : at + 8] != b"\0\0":
                raise _Decline
            length = _U32.unpack_from(head, at + 8)[0]
            value_at = at + 12
        else:
            length = _U16.unpack_from(head, at + 6)[0]
            value_at = at + 8
        if length == 0xFFFFFFFF or value_at + length > end:
            raise _Decline
        out.append((tag, bytes(vr), at, value_at + length))
        last = tag
        at = value_at + length
    return out, at


# VRs whose single-valued printable ASCII value pydicom converts to the bytes without their
# trailing spaces and NULs (values.convert_UI / convert_string / convert_text, multi_string);
# DA only while pydicom.config.datetime_conversion is off (its default).
_PLAIN_VRS = frozenset({b"UI", b"CS", b"SH", b"LO"})
_PRINTABLE = bytes(range(0x20, 0x7F)).replace(b"\\", b"")


def _value(head: bytes, element: tuple[int, bytes, int, int], encodings: tuple[str, ...]) -> str:
    """``str(value or "")`` of the value pydicom's ``Dataset.get`` would give for the element,
    as ``read_header`` uses every value."""
    tag, vr, start, end = element
    value_at = start + (12 if vr in _LONG else 8)
    return _text_of(tag, vr, head[value_at:end], encodings)


@functools.lru_cache(maxsize=8192)
def _text_of(tag: int, vr: bytes, value: bytes, encodings: tuple[str, ...]) -> str:
    # Cached: most values repeat in every file of a session (dates, names, series).
    if vr in _PLAIN_VRS or (vr == b"DA" and not pydicom_config.datetime_conversion):
        stripped = value.rstrip(b" \0")
        if not stripped.translate(None, _PRINTABLE):
            return stripped.decode("ascii")
    if vr == b"IS":
        stripped = value.rstrip(b" \0")
        if stripped.isdigit():  # ASCII digits only (bytes): IS(n) is falsy for 0
            return "" if int(stripped) == 0 else stripped.decode("ascii")
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
    meta, at = _walk(head, 132, meta=True)
    ts_element = next((e for e in meta if e[0] == 0x00020010), None)
    if ts_element is None or ts_element[1] != b"UI":
        raise _Decline
    ts = head[ts_element[2] + 8 : ts_element[3]].decode("ascii").rstrip("\0 ")
    if ts != EXPLICIT_VR_LE:
        raise _Decline
    elements, rest_at = _walk(head, at, meta=False)
    if rest_at == len(head) and not whole:
        raise _Decline  # no pixel data within the head: the header may go on
    by_tag = {e[0]: e for e in elements}
    charset_raw = b""
    encodings: tuple[str, ...] = ("iso8859",)
    if _CHARSET in by_tag:
        tag, vr, start, end = by_tag[_CHARSET]
        value_at = start + (12 if vr in _LONG else 8)
        encodings = _encodings_of(vr, head[value_at:end], encodings)
        charset_raw = head[start + 8 : end].rstrip(b"\0 ")
    for tag in (_SOP_CLASS, _SOP_UID):
        if tag in by_tag and by_tag[tag][1] != b"UI":
            raise _Decline

    def get(keyword: str) -> str:
        element = by_tag.get(_KEYWORDS[keyword])
        return "" if element is None else _value(head, element, encodings)

    sop_class = str(get("SOPClassUID") or "")
    sop_uid = str(get("SOPInstanceUID") or "")
    if not sop_class or not sop_uid:
        raise _Decline  # pydicom's path words the refusal
    header = DicomHeader(
        sop_class=sop_class,
        sop_uid=sop_uid,
        study_uid=str(get("StudyInstanceUID") or ""),
        series_uid=str(get("SeriesInstanceUID") or ""),
        series_number=str(get("SeriesNumber") or "").strip(),
        instance_number=str(get("InstanceNumber") or "").strip(),
        series_description=str(get("SeriesDescription") or ""),
        modality=str(get("Modality") or ""),
        study_date=str(get("StudyDate") or "") or None,
        patient_name=str(get("PatientName") or ""),
        patient_id=str(get("PatientID") or ""),
        study_description=str(get("StudyDescription") or ""),
        accession_number=str(get("AccessionNumber") or ""),
        routing=routing_of(lambda kw: get(kw) if kw in _KEYWORDS else ""),
    )
    return FastFile(
        header=header,
        head=head,
        rest_at=rest_at,
        transfer_syntax=ts,
        elements=tuple(e for e in elements if not (e[0] & 0xFFFF == 0 and e[0] >> 16 > 6)),
        charset_ok=charset_raw in _SAFE_CHARSETS,
    )
