"""Property-based tests of the C-STORE pieces without a network (hypothesis).

The routing splice against pydicom, the element walker against pydicom's own element reader, and
the PDUs and command sets against pynetdicom's and pydicom's decoders, on generated data.
"""

from __future__ import annotations

import contextlib
import io
import socket
import string
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from xnatio.dicomheader import Buffer, walk_elements
from xnatio.errors import UsageError
from xnatio.transports.dicom_store.encode import routing_element, splice_route
from xnatio.transports.dicom_store.pdu import (
    ProposedContext,
    build_associate_rq,
    c_echo_rq,
    c_store_rq,
    parse_command,
)
from xnatio.transports.dicom_store.plan import routing_comment
from xnatio.transports.dicom_store.ul import Association

FAST = settings(max_examples=60, deadline=None)
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]

# Values of the other elements avoid ':' so that the routing element's bytes cannot occur in them.
plain_text = st.text(alphabet=string.ascii_letters + string.digits + " ^", max_size=40)
route_value = st.one_of(st.none(), st.text(alphabet=string.ascii_letters + "0123456789_-"))
any_comment = st.one_of(st.none(), st.text(alphabet=string.printable.strip(), max_size=200))
uids = st.lists(st.integers(0, 99999), min_size=2, max_size=8).map(
    lambda parts: "1." + ".".join(map(str, parts))
)


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    """A header like a scanner's: text and numbers around group 0010, maybe nested sequences of
    defined or undefined length, private elements, and something after Patient Comments."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = draw(uids)
    ds.StudyDescription = draw(plain_text)
    if draw(st.booleans()):
        items = []
        for _ in range(draw(st.integers(0, 3))):
            item = Dataset()
            item.ReferencedSOPInstanceUID = draw(uids)
            if draw(st.booleans()):
                inner = Dataset()
                inner.CodeValue = draw(plain_text)[:16]  # SH
                item.PurposeOfReferenceCodeSequence = Sequence([inner])
            items.append(item)
        ds.ReferencedImageSequence = Sequence(items)
    ds.add_new(0x00091010, "LO", draw(plain_text))  # a private element before group 0010
    ds.add_new(0x00091011, "OB", draw(st.binary(max_size=64).map(lambda b: b[: len(b) // 2 * 2])))
    ds.PatientName = draw(plain_text)
    ds.PatientID = draw(plain_text)
    if draw(st.booleans()):
        ds.PatientWeight = str(draw(st.integers(1, 300)))
    if draw(st.booleans()):
        ds.AdditionalPatientHistory = draw(plain_text)  # (0010,21B0), after Patient Comments
    ds.StudyInstanceUID = draw(uids)
    ds.SeriesNumber = draw(st.integers(0, 9999))
    ds.PixelData = draw(st.binary(min_size=2, max_size=256).map(lambda b: b[: len(b) // 2 * 2]))
    ds["PixelData"].VR = "OW"
    undefined = draw(st.booleans())
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = undefined
            for item in elem.value:
                item.is_undefined_length_sequence_item = undefined
    return ds


def encode(ds: Dataset, ts: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = ts != ExplicitVRBigEndian
    fp.is_implicit_VR = ts == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


def decode(data: bytes, ts: str) -> Dataset:
    return read_dataset(io.BytesIO(data), ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian)


@FAST
@given(
    ds=datasets(),
    ts=st.sampled_from(SYNTAXES),
    project=route_value,
    subject=route_value,
    session=route_value,
    existing=any_comment,
)
def test_splice_sets_the_route_and_keeps_every_other_byte(
    ds: Dataset,
    ts: str,
    project: str | None,
    subject: str | None,
    session: str | None,
    existing: str | None,
) -> None:
    route = routing_comment(project, subject, session)
    if route is None:
        return  # nothing to route: the file goes untouched (read_as_is with route=None)
    without = encode(ds, ts)
    if existing is not None:
        ds.PatientComments = existing
    sent = splice_route(
        Buffer(encode(ds, ts), limit=None),
        0,
        route,
        implicit=ts == ImplicitVRLittleEndian,
        little=ts != ExplicitVRBigEndian,
    )
    element = routing_element(route, ts == ImplicitVRLittleEndian, ts != ExplicitVRBigEndian)
    at = sent.index(element)
    # Every other element byte-identical: take the routing element out, and the data set is the
    # one written without any Patient Comments.
    assert sent[:at] + sent[at + len(element) :] == without
    got = decode(sent, ts)
    assert got.PatientComments == route
    del got.PatientComments
    assert got == decode(without, ts)


@FAST
@given(value=st.text(min_size=1, max_size=10))
def test_routing_values_are_ascii_word_characters_or_refused(value: str) -> None:
    # XNAT's routing pattern is Java's [\w-], ASCII only (facts file, section 6); the element is
    # encoded in ASCII, so anything else must be refused before sending, not fail every file.
    ok = all(c in string.ascii_letters + string.digits + "_-" for c in value)
    if ok:
        assert routing_comment(value, None, None) == f"Project:{value}"
    else:
        with pytest.raises(UsageError):
            routing_comment(value, None, None)


@FAST
@given(ds=datasets(), ts=st.sampled_from(SYNTAXES), comment=any_comment)
def test_walker_finds_what_pydicom_reads(ds: Dataset, ts: str, comment: str | None) -> None:
    if comment is not None:
        ds.PatientComments = comment
    data = encode(ds, ts)
    little = ts != ExplicitVRBigEndian
    implicit = ts == ImplicitVRLittleEndian
    raw = list(data_element_generator(io.BytesIO(data), implicit, little))
    found: dict[int, tuple[int, int]] = {}
    wanted = frozenset(int(r.tag) for r in raw)
    end = walk_elements(
        Buffer(data, limit=None),
        0,
        explicit=not implicit,
        little=little,
        stop=0xFFFDFFFF,
        wanted=wanted,
        found=found,
    )
    assert end == len(data)
    for r in raw:
        if hasattr(r, "value_tell") and r.length != 0xFFFFFFFF:
            assert found[int(r.tag)] == (r.value_tell, r.length), r.tag
    # Stopping early: the walk ends at the first element past ``stop``, as pydicom lists them.
    tags = [int(r.tag) for r in raw]
    for stop in (0x00100010, 0x00103FFF, 0x00104000):
        after = [t for t in tags if t > stop]
        pos = walk_elements(
            Buffer(data, limit=None), 0, explicit=not implicit, little=little, stop=stop
        )
        if after:
            first = next(r for r in raw if int(r.tag) == after[0])
            header = 8 if implicit or getattr(first, "VR", "") not in LONG_VRS else 12
            assert pos == _tell(first) - header
        else:
            assert pos == len(data)


LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _tell(r: object) -> int:
    return int(r.value_tell)  # type: ignore[attr-defined]


ae_titles = st.text(alphabet=string.ascii_uppercase + string.digits + "_", min_size=1, max_size=16)


@FAST
@given(
    called=ae_titles,
    calling=ae_titles,
    max_pdu=st.integers(0, 2**32 - 1),
    pairs=st.lists(st.tuples(uids, st.sampled_from(SYNTAXES)), min_size=1, max_size=128),
)
def test_associate_rq_round_trips_through_pynetdicom(
    called: str, calling: str, max_pdu: int, pairs: list[tuple[str, str]]
) -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    contexts = [ProposedContext(2 * i + 1, sop, (ts,)) for i, (sop, ts) in enumerate(pairs)]
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(build_associate_rq(called, calling, contexts, max_pdu))
    assert (pdu.called_ae_title, pdu.calling_ae_title) == (called, calling)
    assert pdu.user_information.maximum_length == max_pdu
    assert [
        (c.context_id, c.abstract_syntax, c.transfer_syntax) for c in pdu.presentation_context
    ] == [(c.context_id, c.abstract_syntax, list(c.transfer_syntaxes)) for c in contexts]


@FAST
@given(message_id=st.integers(1, 0xFFFF), sop_class=uids, sop_instance=uids)
def test_command_sets_round_trip_through_pydicom(
    message_id: int, sop_class: str, sop_instance: str
) -> None:
    store = c_store_rq(message_id, sop_class, sop_instance)
    command = read_dataset(io.BytesIO(store), True, True)
    assert command.CommandGroupLength == len(store) - 12
    assert (command.CommandField, command.MessageID, command.CommandDataSetType) == (
        1,
        message_id,
        0,
    )
    assert (command.AffectedSOPClassUID, command.AffectedSOPInstanceUID) == (
        sop_class,
        sop_instance,
    )
    fields = parse_command(store)
    assert fields[0x0110] == message_id.to_bytes(2, "little")
    echo = read_dataset(io.BytesIO(c_echo_rq(message_id)), True, True)
    assert (echo.CommandField, echo.MessageID, echo.CommandDataSetType) == (0x30, message_id, 0x101)


@contextlib.contextmanager
def unconnected_association(peer_max: int) -> Iterator[Association]:
    mine, theirs = socket.socketpair()  # only framing is tested: nothing is sent
    with mine, theirs:
        yield Association(mine, {}, {}, peer_max, 1.0, 1.0, 1.0)


@FAST
@given(
    data=st.binary(max_size=5000).map(lambda b: b[: len(b) // 2 * 2]),
    peer_max=st.sampled_from([0, 8, 16, 100, 4096, 16384]),
    context_id=st.integers(0, 127).map(lambda i: 2 * i + 1),
    command=st.booleans(),
    last=st.booleans(),
)
def test_p_data_tf_fragments_decode_with_pynetdicom(
    data: bytes,
    peer_max: int,
    context_id: int,
    command: bool,
    last: bool,
) -> None:
    from pynetdicom.pdu import P_DATA_TF

    with unconnected_association(peer_max) as association:
        parts = association._pdus(context_id, data, command=command, last=last)
    pdus = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
    joined = b""
    for n, raw in enumerate(pdus):
        pdu = P_DATA_TF()
        pdu.decode(raw)
        if peer_max:
            assert len(raw) - 6 <= peer_max  # the peer's limit bounds the variable field
        ((pcid, fragment),) = [
            (v.presentation_context_id, v.presentation_data_value)
            for v in pdu.presentation_data_value_items
        ]
        header = fragment[0]
        assert pcid == context_id
        assert bool(header & 0x01) is command
        assert bool(header & 0x02) is (last and n == len(pdus) - 1)
        joined += fragment[1:]
    assert joined == data
