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
the importer needs, and builds those bytes itself: the runs of the header between the elements
it changes are copied as they are.

Files of one series share their layout (the same elements with the same lengths, but for the
few values whose length varies), so the walk's result is remembered: a head whose element
headers (tag, VR, length) and transfer syntax are the bytes of a remembered one at the same
offsets would be walked exactly the same way, and is checked against it in one comparison
instead of being walked again (``_known_layout``).

It accepts only what it can reproduce exactly: a Part 10 file (preamble, ``DICM``, explicit VR
little endian file meta) whose data set is explicit VR little endian, elements in ascending tag
order with known VRs, zero reserved bytes, no sequence and no undefined length, no group below
0008, the header complete within the bytes given, ASCII for every value it re-encodes, a
single-byte or UTF-8 character set, and a Specific Character Set element that pydicom writes back
as it was read. Anything else returns None, and the caller takes pydicom's path as before, so the
result is always the one that path gives (tests/sandbox/test_sandbox_fastdicom.py compares the
two on pydicom's test files, synthetic variations and generated series of varied layouts).
"""

from __future__ import annotations

import functools
import operator
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
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
# The DicomHeader fields read from the data set, in the order _parse unpacks them.
_FIELDS = tuple(
    _KEYWORDS[k]
    for k in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SeriesNumber",
        "InstanceNumber",
        "SeriesDescription",
        "Modality",
        "StudyDate",
        "PatientName",
        "PatientID",
        "StudyDescription",
        "AccessionNumber",
    )
)
# The elements the walk remembers (every other one is only checked and stepped over).
_WANTED = frozenset(_KEYWORDS.values()) | {_CHARSET}
# (tag, VR) of the elements the site script sets (dicom.reencode; facts 1.7), in tag order.
_SCRIPT_VRS = {_STUDY_DESCRIPTION: b"LO", _PATIENT_NAME: b"PN", _PATIENT_ID: b"LO"}
_SCRIPT_TAGS = tuple(sorted(_SCRIPT_VRS))
_SCRIPT_CODES = {tag: _code(vr) for tag, vr in _SCRIPT_VRS.items()}
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
    charset_kept: bool
    """The Specific Character Set element is written back as it is (``_written_back``)."""

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
        if not self.charset_kept:
            raise _Decline
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
            new_elements = _script_elements(script.project, script.subject, script.session)
            for tag, new, cut in zip(_SCRIPT_TAGS, new_elements, self.cuts, strict=True):
                if new is None:
                    continue
                span = spans.get(tag)
                if span is None:  # not in the file: inserted in tag order
                    ops.append((cut, cut, tag, new))
                elif span[0] != _SCRIPT_CODES[tag]:
                    raise _Decline
                else:
                    ops.append((span[1], span[2], tag, new))
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


@functools.lru_cache(maxsize=256)
def _script_elements(project: str | None, subject: str, session: str) -> tuple[bytes | None, ...]:
    """The elements the site script writes, in ``_SCRIPT_TAGS`` order (None: left as it is);
    cached: one request's files all get the same."""
    values = (project, subject, session)
    return tuple(
        None if value is None else _element(tag, _SCRIPT_VRS[tag], _text(value))
        for tag, value in zip(_SCRIPT_TAGS, values, strict=True)
    )


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


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where a file's elements lie: what the walks found (positions only, no values), and what
    makes another head give the same walk (``check(head) == expected``)."""

    ts: str
    data_at: int
    rest_at: int
    spans: dict[int, Span]
    dropped: tuple[tuple[int, int], ...]
    cuts: tuple[int, ...]
    check: Callable[[bytes], tuple[bytes, ...]]
    expected: tuple[bytes, ...]
    pixel_tag: bytes
    fields: tuple[Span | None, ...] = ()
    """The spans of ``_FIELDS`` (None: absent)."""
    sop_uis: bool = True
    """Neither SOP UID element has another VR than UI (else the walk declines)."""
    routed: bool = False
    """Any of the routing comment elements is present."""

    def __post_init__(self) -> None:
        spans = self.spans
        object.__setattr__(self, "fields", tuple(spans.get(tag) for tag in _FIELDS))
        object.__setattr__(
            self, "sop_uis", all(spans[t][0] == _UI for t in (_SOP_CLASS, _SOP_UID) if t in spans)
        )
        object.__setattr__(self, "routed", any(tag in spans for tag in _ROUTING_TAGS))


def _unchecked(head: bytes) -> tuple[bytes, ...]:
    """The check of a layout that is never remembered (it does not stop at pixel data)."""
    return ()


def _walk(head: bytes) -> _Layout:
    """Both walks over a head not seen before; a layout that stops at pixel data is
    remembered (``_known_layout``)."""
    ts_span, data_at = _walk_meta(head)
    if ts_span is None or ts_span[0] != _UI:
        raise _Decline
    ts = head[ts_span[1] + 8 : ts_span[2]].decode("ascii").rstrip("\0 ")
    if ts != EXPLICIT_VR_LE:
        raise _Decline
    rest_at, spans, dropped, cuts = _walk_data(head, data_at)
    if rest_at == len(head):  # no pixel data: nothing to check the next head against
        return _Layout(
            ts, data_at, rest_at, spans, tuple(dropped), tuple(cuts), _unchecked, (), b""
        )
    # The walks read only these bytes of the head: each element's tag, VR and length fields
    # (and the transfer syntax's value), and the tag where they stopped. A head with the same
    # bytes there (and room for the pixel element's header after rest_at, as the walk checks)
    # walks the same way, element for element: its layout is this one.
    pieces = [slice(ts_span[1], ts_span[2])]
    at = 132
    while at < rest_at:
        _, _, vr, length = _HEADER.unpack_from(head, at)
        if vr in _LONG_CODES:
            pieces.append(slice(at, at + 12))
            at += 12 + _U32.unpack_from(head, at + 8)[0]
        else:
            pieces.append(slice(at, at + 8))
            at += 8 + length
    check = operator.itemgetter(*pieces)
    layout = _Layout(
        ts,
        data_at,
        rest_at,
        spans,
        tuple(dropped),
        tuple(cuts),
        check,
        check(head),
        head[rest_at : rest_at + 4],
    )
    global _LAYOUTS
    _LAYOUTS = (layout, *_LAYOUTS[: _MAX_LAYOUTS - 1])
    return layout


# The layouts of the last heads walked, the last one matched first. A series keeps one layout
# but for the few lengths that vary file to file (instance number, SOP instance UID), so a
# handful cover it; a new head is checked against each in C (itemgetter of the slices and a
# tuple comparison) instead of being walked element by element in Python. Threads share the
# tuple: it is replaced, never changed in place (a lost update only costs a walk).
_MAX_LAYOUTS = 16
_LAYOUTS: tuple[_Layout, ...] = ()


def _known_layout(head: bytes) -> _Layout | None:
    global _LAYOUTS
    layouts = _LAYOUTS
    room = len(head) - 8
    for i, layout in enumerate(layouts):
        if (
            layout.rest_at <= room
            and head.startswith(layout.pixel_tag, layout.rest_at)  # cheap: most misses end here
            and layout.check(head) == layout.expected
        ):
            if i:
                _LAYOUTS = (layout, *layouts[:i], *layouts[i + 1 :])
            return layout
    return None


# VRs whose single-valued printable ASCII value pydicom converts to the bytes without their
# trailing spaces and NULs (values.convert_UI / convert_string / convert_text, multi_string);
# DA only while pydicom.config.datetime_conversion is off (its default).
_PLAIN_CODES = frozenset(_code(vr) for vr in (b"UI", b"CS", b"SH", b"LO"))
_PRINTABLE = bytes(range(0x20, 0x7F)).replace(b"\\", b"")


def _values(head: bytes, spans: Sequence[Span | None], encodings: tuple[str, ...]) -> list[str]:
    """``str(value or "")`` of the value pydicom's ``Dataset.get`` would give for each element
    ("" for None: absent), as ``read_header`` uses every value. One loop for all of a file's
    fields: this runs for every file."""
    datetime_conversion = pydicom_config.datetime_conversion
    out: list[str] = []
    for span in spans:
        if span is None:
            out.append("")
            continue
        vr, start, end = span
        value = head[start + (12 if vr in _LONG_CODES else 8) : end]
        # The common cases inline (a UID differs in every file: caching it would only evict).
        if vr in _PLAIN_CODES or (vr == _DA and not datetime_conversion):
            stripped = value.rstrip(b" \0")
            if not stripped.translate(None, _PRINTABLE):
                out.append(stripped.decode("ascii"))
                continue
        elif vr == _IS:
            stripped = value.rstrip(b" \0")
            if stripped.isdigit():  # ASCII digits only (bytes): IS(n) is falsy for 0
                out.append("" if int(stripped) == 0 else stripped.decode("ascii"))
                continue
        out.append(_text_of(head[start : start + 4], _NAMES[vr], value, encodings))
    return out


@functools.lru_cache(maxsize=8192)
def _text_of(tag: bytes, vr: bytes, value: bytes, encodings: tuple[str, ...]) -> str:
    # Cached: most values repeat in every file of a session (names, comments).
    group, elem = _TAG.unpack(tag)
    raw = RawDataElement(Tag(group, elem), vr.decode(), len(value), value, 0, False, True)
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
        # (inside: an unknown character set is pydicom's warning, not the importer's)
        return tuple(convert_encodings(converted)) if converted else default


@functools.lru_cache(maxsize=256)
def _written_back(element: bytes, encodings: tuple[str, ...]) -> bool:
    """Whether pydicom writes the Specific Character Set element back as these bytes. It is the
    one element besides the SOP UIDs that pydicom converts while reading (to decode the rest),
    so it is written from its value: ``MR `` comes back ``MR``, a padding of two spaces as
    one. Cached: a session repeats one value."""
    group, elem, vr = struct.unpack_from("<HH2s", element)
    value = element[12 if _code(vr) in _LONG_CODES else 8 :]
    raw = RawDataElement(Tag(group, elem), vr.decode(), len(value), value, 0, False, True)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_data_element(out, convert_raw_data_element(raw, encoding=list(encodings)))
    return out.getvalue() == element


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
    layout = _known_layout(head)
    if layout is None:
        layout = _walk(head)
        if layout.rest_at == len(head) and not whole:
            raise _Decline  # no pixel data within the head: the header may go on
    ts, data_at, rest_at, spans = layout.ts, layout.data_at, layout.rest_at, layout.spans
    charset_raw = b""
    charset_kept = True
    encodings: tuple[str, ...] = ("iso8859",)
    charset = spans.get(_CHARSET)
    if charset is not None:
        vr, start, end = charset
        value_at = start + (12 if vr in _LONG_CODES else 8)
        encodings = _encodings_of(_NAMES[vr], head[value_at:end], encodings)
        charset_raw = head[start + 8 : end].rstrip(b"\0 ")
        charset_kept = _written_back(head[start:end], encodings)
    if not layout.sop_uis:
        raise _Decline
    (
        sop_class,
        sop_uid,
        study_uid,
        series_uid,
        series_number,
        instance_number,
        series_description,
        modality,
        study_date,
        patient_name,
        patient_id,
        study_description,
        accession_number,
    ) = _values(head, layout.fields, encodings)
    if not sop_class or not sop_uid:
        raise _Decline  # pydicom's path words the refusal
    if layout.routed:

        def get(keyword: str) -> str:
            tag = _KEYWORDS.get(keyword)
            return "" if tag is None else _values(head, (spans.get(tag),), encodings)[0]

        routing = routing_of(get)
    else:
        routing = {}  # routing_of of three absent (empty) values
    header = DicomHeader(
        sop_class=sop_class,
        sop_uid=sop_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number.strip(),
        instance_number=instance_number.strip(),
        series_description=series_description,
        modality=modality,
        study_date=study_date or None,
        patient_name=patient_name,
        patient_id=patient_id,
        study_description=study_description,
        accession_number=accession_number,
        routing=routing,
    )
    return FastFile(
        header=header,
        head=head,
        rest_at=rest_at,
        transfer_syntax=ts,
        data_at=data_at,
        spans=spans,
        dropped=layout.dropped,
        cuts=layout.cuts,
        charset_ok=charset_raw in _SAFE_CHARSETS,
        charset_kept=charset_kept,
    )
