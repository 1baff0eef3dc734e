"""C-STORE pieces without a network: routing splice, re-encoding, statuses, association plan."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from xnatio.errors import UsageError
from xnatio.models import DicomFile
from xnatio.transports.dicom_store import (
    plan_associations,
    proposed_contexts,
    routing_comment,
)
from xnatio.transports.dicom_store.encode import (
    DEFLATED_LE,
    EncodeError,
    read_as_is,
    transcode,
)
from xnatio.transports.dicom_store.status import meaning

ROUTE = "Project:P Subject:S Session:E"


def decode(data: bytes, ts: str) -> Dataset:
    if ts == DEFLATED_LE:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    return read_dataset(io.BytesIO(data), ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian)


def write(path: Path, ds: Dataset, ts: str) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def tricky(**extra: object) -> Dataset:
    """A header with an undefined-length sequence (nested) before group 0010."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    inner = Dataset()
    inner.CodeValue = "X"
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, item])
    ds.PatientName, ds.PatientID = "Doe^J", "ID1"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.PixelData = bytes(range(256)) * 4
    ds["PixelData"].VR = "OW"
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    "ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize("existing", [None, "old comment that is longer than the route, odd"])
def test_splice_sets_patient_comments_and_keeps_everything_else(
    tmp_path: Path, ts: str, existing: str | None
) -> None:
    ds = tricky() if existing is None else tricky(PatientComments=existing)
    path = write(tmp_path / "f", ds, ts)
    original = dcmread(path)
    # Undefined lengths for the sequences and items, as many scanners write them.
    for elem in original.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    original.save_as(path, enforce_file_format=True)
    before = path.read_bytes()
    assert before.count(b"\xfe\xff\x0d\xe0" if ts != ExplicitVRBigEndian else b"\xff\xfe\xe0\x0d")

    sent = decode(b"".join(read_as_is(path, ts, ROUTE)), ts)

    assert path.read_bytes() == before
    assert sent.PatientComments == ROUTE
    assert sent.PixelData == original.PixelData
    del sent.PatientComments
    if "PatientComments" in original:
        del original.PatientComments
    assert sent == original


def test_splice_corrects_a_retired_group_length(tmp_path: Path) -> None:
    path = write(tmp_path / "f", tricky(), ExplicitVRLittleEndian)
    data = path.read_bytes()
    # pydicom drops group lengths on write: insert (0010,0000) by hand, as old scanners wrote it.
    start = data.index(b"\x10\x00\x10\x00PN")
    end = data.index(b"\x20\x00\x0d\x00UI")
    length = b"\x10\x00\x00\x00UL\x04\x00" + (end - start).to_bytes(4, "little")
    path.write_bytes(data[:start] + length + data[start:])

    sent = decode(b"".join(read_as_is(path, ExplicitVRLittleEndian, ROUTE)), ExplicitVRLittleEndian)
    element = 8 + len(ROUTE) + len(ROUTE) % 2
    assert sent[0x00100000].value == end - start + element
    assert sent.PatientComments == ROUTE


def test_deflated_is_inflated_spliced_and_deflated_again() -> None:
    path = Path(get_testdata_file("image_dfl.dcm"))
    raw = b"".join(read_as_is(path, DEFLATED_LE, ROUTE))
    assert len(raw) % 2 == 0
    sent = decode(raw, DEFLATED_LE)
    assert sent.PatientComments == ROUTE
    assert sent.PixelData == dcmread(path).PixelData
    untouched = b"".join(read_as_is(path, DEFLATED_LE, None))
    assert len(untouched) % 2 == 0 and "PatientComments" not in decode(untouched, DEFLATED_LE)


def test_big_endian_is_converted_with_pixels_swapped() -> None:
    path = Path(get_testdata_file("MR_small_bigendian.dcm"))
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        sent = decode(transcode(path, ExplicitVRBigEndian, target, ROUTE), target)
        assert sent.PixelData == dcmread(get_testdata_file("MR_small.dcm")).PixelData
        assert sent.PatientComments == ROUTE


def test_transcode_without_decoder_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    from pydicom.pixels.decoders.base import get_decoder

    # The dev extra installs decoders (xnatio[codecs]); take them out of this one decoder so
    # the path a user without them meets is tested here too. pydicom moves a plugin whose
    # import fails from _available to _unavailable: do the same.
    decoder = get_decoder(UID("1.2.840.10008.1.2.4.50"))
    # (pillow may be installed too: matplotlib, the bench extra, brings it.)
    missing = {name: ("(not installed)",) for name in decoder._available}
    monkeypatch.setattr(decoder, "_unavailable", {**decoder._unavailable, **missing})
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(EncodeError, match=r"no decoder is installed \(install one of: .*pillow"):
        transcode(path, "1.2.840.10008.1.2.4.50", ExplicitVRLittleEndian, None)


def test_transcode_decompresses_jpeg_when_a_decoder_is_installed() -> None:
    path = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    from xnatio.transports.dicom_store.encode import decoder_missing

    if decoder_missing("1.2.840.10008.1.2.4.50") is not None:
        pytest.skip("no JPEG decoder here: pip install 'xnatio[codecs]'")
    sent = decode(
        transcode(path, "1.2.840.10008.1.2.4.50", ExplicitVRLittleEndian, ROUTE),
        ExplicitVRLittleEndian,
    )
    original = dcmread(path)
    assert sent.SOPInstanceUID == original.SOPInstanceUID
    assert sent.PatientComments == ROUTE
    assert len(sent.PixelData) == original.Rows * original.Columns * 3


@pytest.mark.parametrize(
    ("status", "stored", "text"),
    [
        (0x0000, True, ""),
        (0x0001, True, "C-STORE status 0x0001 (warning)"),
        (0xB000, True, "C-STORE status 0xB000 (warning: coercion of data elements)"),
        (0xB123, True, "C-STORE status 0xB123 (warning)"),
        (0xA701, False, "C-STORE status 0xA701 (failure: refused: out of resources)"),
        (0xA900, False, "C-STORE status 0xA900 (failure: data set does not match sop class)"),
        (0xC005, False, "C-STORE status 0xC005 (failure: cannot understand): bad tag"),
        (0x0122, False, "C-STORE status 0x0122 (failure: refused: sop class not supported)"),
        (0xFE00, False, "C-STORE status 0xFE00 (cancel)"),
        (0xD000, False, "C-STORE status 0xD000 (failure: unknown status)"),
    ],
)
def test_status_meanings(status: int, stored: bool, text: str) -> None:
    comment = "bad tag" if status == 0xC005 else ""
    assert meaning(status, comment) == (stored, text)


def test_routing_comment_keeps_given_parts_and_refuses_unroutable_values() -> None:
    assert routing_comment("P", "S", "E") == ROUTE
    assert routing_comment("P", None, "E-1") == "Project:P Session:E-1"
    assert routing_comment(None, None, None) is None
    with pytest.raises(UsageError, match="subject 'a b' cannot be routed"):
        routing_comment("P", "a b", None)


def _file(
    i: int, sop: str = "1.2.3", ts: str = ExplicitVRLittleEndian, size: int = 100
) -> DicomFile:
    return DicomFile(Path(f"/x/{i}"), size, 0, "st", f"se{i // 10}", f"1.{i}", sop, 1, ts, "p")


def test_plan_balances_bytes_keeps_order_and_respects_128_contexts() -> None:
    files = [_file(i) for i in range(100)]
    groups = plan_associations(files, 7)
    assert len(groups) == 7
    assert [f for g in groups for f in g] == files
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert plan_associations(files[:3], 45) == [[f] for f in files[:3]]

    many = [_file(i, sop=f"1.2.{i}", ts="1.2.840.10008.1.2.4.50") for i in range(60)]
    groups = plan_associations(many, 1)  # 3 contexts each: 42 classes fit in one association
    assert [len(g) for g in groups] == [42, 18]
    for g in groups:
        contexts = proposed_contexts(g)
        assert len(contexts) <= 128
        assert [c.context_id for c in contexts] == list(range(1, 2 * len(contexts), 2))
        assert all(len(c.transfer_syntaxes) == 1 for c in contexts)


def test_associate_rq_and_c_store_rq_decode_with_pynetdicom_and_pydicom() -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    from xnatio.transports.dicom_store.pdu import (
        ProposedContext,
        build_associate_rq,
        c_store_rq,
    )

    contexts = [
        ProposedContext(1, "1.2.840.10008.5.1.4.1.1.4", (ExplicitVRLittleEndian,)),
        ProposedContext(3, "1.3.12.2.1107.5.9.1", (ImplicitVRLittleEndian,)),
    ]
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(build_associate_rq("XNAT", "XNATIO", contexts, 0))
    assert (pdu.called_ae_title, pdu.calling_ae_title) == ("XNAT", "XNATIO")
    assert [
        (c.context_id, c.abstract_syntax, c.transfer_syntax) for c in pdu.presentation_context
    ] == [
        (1, "1.2.840.10008.5.1.4.1.1.4", [ExplicitVRLittleEndian]),
        (3, "1.3.12.2.1107.5.9.1", [ImplicitVRLittleEndian]),
    ]
    assert pdu.user_information.maximum_length == 0

    command = read_dataset(io.BytesIO(c_store_rq(7, "1.2.3", "1.2.3.45")), True, True)
    assert command.CommandGroupLength == len(c_store_rq(7, "1.2.3", "1.2.3.45")) - 12
    assert (command.CommandField, command.MessageID, command.CommandDataSetType) == (1, 7, 0)
    assert (command.AffectedSOPClassUID, command.AffectedSOPInstanceUID) == ("1.2.3", "1.2.3.45")


def test_splice_steps_over_an_un_sequence_of_undefined_length(tmp_path: Path) -> None:
    # PS3.5 6.2.2: the items of an UN element of undefined length are Implicit VR LE, so an
    # explicit-VR reading of them would land in the middle of a value.
    path = write(tmp_path / "f", tricky(), ExplicitVRLittleEndian)
    data = path.read_bytes()
    un = (
        b"\x09\x00\x10\x00UN\x00\x00\xff\xff\xff\xff"  # (0009,1010) UN, undefined length
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # item, undefined length
        + b"\x09\x00\x11\x10\x06\x00\x00\x00ABCDEF"  # (0009,1011) implicit VR, 6 bytes
        + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # item delimitation
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # sequence delimitation
    )
    at = data.index(b"\x10\x00\x10\x00PN")
    path.write_bytes(data[:at] + un + data[at:])

    raw = b"".join(read_as_is(path, ExplicitVRLittleEndian, ROUTE))
    assert raw.index(un) < raw.index(b"\x10\x00\x10\x00PN") < raw.index(b"\x10\x00\x00\x40LT")
    assert decode(raw, ExplicitVRLittleEndian).PatientComments == ROUTE
