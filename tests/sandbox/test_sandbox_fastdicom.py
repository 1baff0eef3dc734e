"""The importer's fast path (``sandbox.fastdicom``) against pydicom's path (``dicom.read_header``
+ ``dicom.reencode``): for every file it accepts, the same header fields and the same stored
bytes, with and without the site script (facts 1.7); what it cannot reproduce it declines."""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xnatio.sandbox import fastdicom
from xnatio.sandbox.dicom import HEAD_BYTES, SiteScript, Unparsable, read_header, reencode
from xnatio.synth import generate_session

SCRIPTS = [
    None,
    SiteScript("P", "S", "E"),
    SiteScript(None, "Subj^One", "sess-01x"),
    SiteScript("PROJ_1", "", "E"),
]
EXPLICIT = b"1.2.840.10008.1.2.1\0"
IMPLICIT = b"1.2.840.10008.1.2\0"
LONG = {b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR"}


def el(tag: int, vr: bytes, value: bytes, reserved: bytes = b"\0\0") -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG:
        return head + reserved + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def part10(elements: list[bytes], ts: bytes = EXPLICIT, pixels: bool = True) -> bytes:
    meta = [
        el(0x00020001, b"OB", b"\0\1"),
        el(0x00020002, b"UI", b"1.2.840.10008.5.1.4.1.1.4\0"),
        el(0x00020003, b"UI", b"1.2.3.4.5.6\0"),
        el(0x00020010, b"UI", ts),
        el(0x00020013, b"SH", b"SOMETOOL"),
    ]
    body = b"".join(meta)
    out = b"\0" * 128 + b"DICM" + el(0x00020000, b"UL", struct.pack("<I", len(body))) + body
    out += b"".join(elements)
    if pixels:
        out += el(0x7FE00010, b"OW", bytes(range(256)) * 8)
    return out


def base(**replace: bytes) -> dict[int, tuple[bytes, bytes]]:
    """A typical header as {tag: (VR, value)}; ``replace`` keys are hex tags."""
    elements = {
        0x00080005: (b"CS", b"ISO_IR 100"),
        0x00080016: (b"UI", b"1.2.840.10008.5.1.4.1.1.4\0"),
        0x00080018: (b"UI", b"1.2.3.4.5.6\0"),
        0x00080020: (b"DA", b"20260101"),
        0x00080060: (b"CS", b"MR"),
        0x00081030: (b"LO", b"a study "),
        0x0008103E: (b"LO", b"series one"),
        0x00100010: (b"PN", b"Doe^John"),
        0x00100020: (b"LO", b"PID7"),
        0x0020000D: (b"UI", b"1.2.3.4.7\0"),
        0x0020000E: (b"UI", b"1.2.3.4.8\0"),
        0x00200011: (b"IS", b"4 "),
        0x00200013: (b"IS", b"12"),
        0x00280010: (b"US", struct.pack("<H", 32)),
    }
    for key, value in replace.items():
        tag = int(key[1:], 16)
        if value == b"-":
            elements.pop(tag, None)
        else:
            elements[tag] = (value[:2], value[2:])
    return elements


def build(elements: dict[int, tuple[bytes, bytes]], **kw: object) -> bytes:
    return part10([el(t, vr, v) for t, (vr, v) in sorted(elements.items())], **kw)  # type: ignore[arg-type]


def variations() -> Iterator[tuple[str, bytes]]:
    yield "typical", build(base())
    yield "no script elements", build(base(x00100010=b"-", x00100020=b"-", x00081030=b"-"))
    yield "uid padded with a space", build(base(x00080018=b"UI1.2.3.4.5.6 "))
    yield "uid of even length", build(base(x00080018=b"UI1.2.3.4.56"))
    yield "odd length, no padding", build(base(x0008103E=b"LOabc"))
    yield "trailing spaces", build(base(x0008103E=b"LOab    ", x00080060=b"CSMR  "))
    yield "leading spaces", build(base(x0008103E=b"LO  ab", x00200011=b"IS 7"))
    yield "series number zero", build(base(x00200011=b"IS0 "))
    yield "series number plus", build(base(x00200011=b"IS+5"))
    yield "empty instance number", build(base(x00200013=b"IS"))
    yield "multi-valued description", build(base(x00081030=b"LOA\\B "))
    yield "multi-valued modality", build(base(x00080060=b"CSMR\\CT "))
    yield "latin-1 name", build(base(x00100010=b"PNM\xfcller^J"))
    yield "utf-8 name", build(base(x00080005=b"CSISO_IR 192", x00100010=b"PNM\xc3\xbcller"))
    yield "iso 2022", build(base(x00080005=b"CSISO 2022 IR 87"))
    yield "no charset", build(base(x00080005=b"-"))
    yield "charset padded twice", build(base(x00080005=b"CSISO_IR 100  "))
    yield "charset of odd length", build(base(x00080005=b"CSISO_IR 6 "))
    yield "routing comments", build(base(x00104000=b"LTProject: P9 Subject: S9 Session: E9"))
    yield "name with wrong VR", build(base(x00100010=b"LODoe"))
    yield "sop class as UN", build(base(x00080016=b"UN1.2.840.10008.5.1.4.1.1.4\0"))
    yield "no sop instance", build(base(x00080018=b"-"))
    yield (
        "private elements",
        build(base(x00090010=b"LOACME 1.0", x00091001=b"UN\x01\x02\x03", x00091002=b"OB\x00\x01")),
    )
    yield "study date as DT", build(base(x00080020=b"DT20260101"))
    elements = base()
    raw = [el(t, vr, v) for t, (vr, v) in sorted(elements.items())]
    yield "group length", part10([el(0x00080000, b"UL", b"\x10\0\0\0"), *raw])
    # The script's Study Description goes where the dropped group length of 0010 was.
    before = base(x00081030=b"-", x0008103E=b"-", x00100000=b"UL\x10\0\0\0")
    yield "group length where a script element goes", build(before)
    yield "out of order", part10([raw[1], raw[0], *raw[2:]])
    yield "unknown VR", part10([*raw[:4], el(0x00080021, b"XX", b"ab"), *raw[4:]])
    yield "reserved bytes", part10([*raw[:4], el(0x00080021, b"OB", b"ab", b"\1\0"), *raw[4:]])
    yield "OB element", part10([*raw[:4], el(0x00080021, b"OB", b"ab"), *raw[4:]])
    seq = el(0x00081140, b"SQ", b"\xfe\xff\x00\xe0\0\0\0\0")
    yield "sequence", part10([*raw[:8], seq, *raw[8:]])
    yield "no pixel data", part10(raw, pixels=False)
    yield "implicit VR", part10(raw, ts=IMPLICIT)
    yield "group 2 in data set", part10([el(0x00020016, b"AE", b"AE"), *raw])
    yield "no preamble", part10(raw)[128:]


def pydicom_files() -> Iterator[tuple[str, bytes]]:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    for path in sorted(folder.iterdir()):
        if path.is_file():
            yield path.name, path.read_bytes()


def compare(name: str, data: bytes, tmp: Path) -> bool:
    """True if the fast path took the file; asserts it gave pydicom's answer."""
    head = data[:HEAD_BYTES]
    fast = fastdicom.parse(head, whole=len(head) < HEAD_BYTES)
    if fast is None:
        return False
    src = tmp / "in"
    src.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = read_header(head, name)
        except Unparsable as exc:
            pytest.fail(f"{name}: fast path accepted what pydicom refuses ({exc})")
        assert fast.header == expected, name
        took = False
        for script in SCRIPTS:
            prefix = fast.stored_prefix(script)
            if prefix is None:
                continue
            took = True
            reencode(str(src), str(tmp / "out"), script)
            assert prefix + data[fast.rest_at :] == (tmp / "out").read_bytes(), (name, script)
    assert fast.head[: fast.rest_at] + data[fast.rest_at :] == data
    return took or fast.header == expected


def test_fast_path_gives_pydicoms_header_and_bytes(tmp_path: Path) -> None:
    taken = [name for name, data in variations() if compare(name, data, tmp_path)]
    # The ordinary cases are taken (else the comparisons would prove nothing)...
    for name in ("typical", "no script elements", "uid padded with a space", "OB element"):
        assert name in taken
    # ...and what cannot be reproduced byte for byte is left to pydicom.
    for name in ("out of order", "unknown VR", "reserved bytes", "sequence", "implicit VR"):
        assert name not in taken
    assert len(taken) >= 20, taken


def test_fast_path_declines_scripts_it_cannot_encode(tmp_path: Path) -> None:
    fast = fastdicom.parse(build(base()), whole=True)
    assert fast is not None
    assert fast.stored_prefix(SiteScript("P", "M\u00fcller", "E")) is None
    assert fast.stored_prefix(SiteScript("P", "a\\b", "E")) is None
    iso2022 = fastdicom.parse(build(base(x00080005=b"CSISO 2022 IR 87")), whole=True)
    assert iso2022 is not None and iso2022.stored_prefix(SiteScript("P", "S", "E")) is None
    assert fastdicom.parse(build(base())[:200], whole=False) is None  # header cut short


def test_fast_path_on_pydicoms_test_files_and_synthetic_sessions(tmp_path: Path) -> None:
    for name, data in pydicom_files():
        compare(name, data, tmp_path)
    s = generate_session(tmp_path / "s", series=2, instances=3, image_size=(32, 32))
    for path in s.instances.values():
        assert compare(path.name, path.read_bytes(), tmp_path), path.name


# -- varied layouts, and the layouts the fast path remembers -----------------------------------
# A series of files sharing a layout (the same elements, the same lengths) but not their values,
# with now and then a file whose lengths differ: what the remembered layouts (fastdicom
# ``_known_layout``) must tell apart, compared file by file with pydicom's path.

_OPTIONAL = {
    0x00080000: b"UL",  # group lengths: dropped by pydicom
    0x00080005: b"CS",
    0x00080008: b"CS",
    0x00080050: b"SH",
    0x00081030: b"LO",  # the script's three
    0x00090010: b"LO",
    0x00091001: b"UN",
    0x00100000: b"UL",
    0x00100010: b"PN",
    0x00100020: b"LO",
    0x00104000: b"LT",
    0x00180050: b"DS",
    0x00181030: b"UT",
    0x00200000: b"UL",
    0x00280000: b"UL",
}
_VALUES = {
    b"UL": st.binary(min_size=4, max_size=4),
    b"CS": st.sampled_from([b"ISO_IR 100", b"ISO_IR 192", b"ORIGINAL\\PRIMARY", b"MR ", b""]),
    b"SH": st.text("AB12 ", max_size=9).map(str.encode),
    b"LO": st.text("Ab1 ^-", max_size=12).map(str.encode),
    b"PN": st.text("Ab^ ", max_size=10).map(str.encode),
    b"LT": st.sampled_from([b"Project: P1 Subject: S1", b"nothing", b"Session: E-2 "]),
    b"DS": st.sampled_from([b"1.5 ", b"0.25", b"3"]),
    b"UN": st.binary(max_size=9),
    b"UT": st.text("xyz ", max_size=7).map(str.encode),
}


@st.composite
def series(draw: st.DrawFn) -> list[bytes]:
    present = draw(st.sets(st.sampled_from(sorted(_OPTIONAL))))
    fixed = {tag: (_OPTIONAL[tag], draw(_VALUES[_OPTIONAL[tag]])) for tag in present}
    uid_digits = draw(st.integers(1, 12))
    files = []
    for _ in range(draw(st.integers(2, 4))):
        # Same length as the others (a remembered layout) or, now and then, one digit more.
        digits = uid_digits + draw(st.sampled_from([0, 0, 0, 1]))
        uid = b"1.2.3." + draw(st.text("0123456789", min_size=digits, max_size=digits)).encode()
        pad = draw(st.sampled_from([b"\0", b" ", b""]))
        elements = {
            0x00080016: (b"UI", b"1.2.840.10008.5.1.4.1.1.4\0"),
            0x00080018: (b"UI", uid + (pad if len(uid) % 2 else b"")),
            0x00080060: (b"CS", draw(st.sampled_from([b"MR", b"CT", b"OT"]))),
            0x0020000D: (b"UI", b"1.2.3.4.7\0"),
            0x00200013: (b"IS", draw(st.sampled_from([b"1 ", b"12", b"0 ", b"007 ", b""]))),
            **fixed,
        }
        files.append(build(elements))
    return files


@given(series())
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_varied_layouts_give_pydicoms_header_and_bytes(tmp_path: Path, files: list[bytes]) -> None:
    for i, data in enumerate(files):
        assert compare(f"file{i}", data, tmp_path), f"file{i} declined"


def test_a_remembered_layout_does_not_outlive_what_it_checked(tmp_path: Path) -> None:
    typical = build(base())
    first = fastdicom.parse(typical, whole=True)
    assert first is not None
    # The same layout with other values of the same lengths: the new file's values.
    other = typical.replace(b"1.2.3.4.5.6\0", b"1.2.3.4.5.9\0").replace(b"Doe^John", b"Roe^Jane")
    again = fastdicom.parse(other, whole=True)
    assert again is not None and compare("other", other, tmp_path)
    assert (again.header.sop_uid, again.header.patient_name) == ("1.2.3.4.5.9", "Roe^Jane")
    # A transfer syntax of the same length (explicit VR big endian) is not the one remembered.
    big = typical.replace(EXPLICIT, b"1.2.840.10008.1.2.2\0")
    assert fastdicom.parse(big, whole=True) is None
    # Cut within the pixel data element's header: the walk could not read it, nor may a match.
    assert fastdicom.parse(typical[: first.rest_at + 7], whole=False) is None
    assert fastdicom.parse(typical[: first.rest_at + 8], whole=False) is not None
    # The same elements up to the remembered end, then one more before the pixel data.
    longer = build({**base(), 0x00324000: (b"LT", b"Project: P2")})
    assert longer[: first.rest_at] == typical[: first.rest_at]
    assert compare("longer", longer, tmp_path)
    assert fastdicom.parse(longer, whole=True).header.routing == {"project": "P2"}  # type: ignore[union-attr]
    # A pixel data tag at the remembered offset after elements of other lengths is no match.
    shifted = build(base(x0008103E=b"LOseries one!!", x00100010=b"PNDoe^Jo"))
    assert len(shifted) == len(typical)
    assert compare("shifted", shifted, tmp_path)
