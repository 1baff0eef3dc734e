"""C-STORE transport against real peers: dcmtk's storescp and in-process pynetdicom SCPs.

Each test checks what arrived, instance by instance: SOP Instance UIDs complete, pixel data
byte-identical (or correctly decompressed), Patient Comments carrying the route, files on disk
unchanged.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import MRImageStorage, Verification, register_uid

from xnatio.errors import ConfigError, UnreachableError, UsageError
from xnatio.models import DicomFile, Manifest, Outcome, Phase, ProgressEvent, SkippedFile
from xnatio.retry import RetryPolicy
from xnatio.synth import generate_session
from xnatio.transports.dicom_store import send_associations
from xnatio.transports.dicom_store.encode import dataset_offset, decoder_missing

pytestmark = pytest.mark.integration

ROUTE = "Project:PRJ Subject:SUBJ-1 Session:SESS_1"
# Short backoffs: the retries themselves are what these tests check, not their pace.
FAST = RetryPolicy(retries=3, base=0.01, cap=0.05)
STORESCP = "/usr/bin/storescp"
# pydicom's bundled files, one per encoding the issue names.
COMPRESSED = {
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",
    "MR_small.dcm": "1.2.840.10008.1.2.1",
}


# -- input ---------------------------------------------------------------------------------------


def manifest_of(root: Path) -> Manifest:
    """DicomFile records read with pydicom (the tests do not depend on discovery's internals)."""
    m = Manifest(root=root)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ds = dcmread(path, stop_before_pixels=True)
        st = path.stat()
        m.files.append(
            DicomFile(
                path=path,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                study_uid=ds.StudyInstanceUID,
                series_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_number=ds.get("SeriesNumber"),
                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                patient_id=str(ds.get("PatientID", "")),
            )
        )
    return m


def digests(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture
def session(tmp_path: Path) -> Path:
    root = tmp_path / "session"
    generate_session(root, series=2, instances=6, image_size=(32, 32), seed=7)
    return root


@pytest.fixture
def odd_files(tmp_path: Path) -> Path:
    """pydicom's compressed/deflated/big-endian files, each with its own SOP Instance UID and
    one shared study, written with pydicom without touching their encoded pixel data."""
    root = tmp_path / "odd"
    root.mkdir()
    study = generate_uid()
    for name in COMPRESSED:
        ds = dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.save_as(root / name, enforce_file_format=True)
    return root


# -- peers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[int, Path]]]:
    """Start dcmtk's storescp with extra options; returns (port, output directory)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[int, Path]:
        out = tmp_path / f"received{len(procs)}"
        out.mkdir()
        port = free_port()
        proc = subprocess.Popen(
            [STORESCP, *options, "-aet", "XNAT", "-od", str(out), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return port, out
            except OSError:
                time.sleep(0.025)
        raise RuntimeError("storescp did not start")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(5)


@dataclass
class Received:
    """What an in-process SCP saw: data sets it answered, in order, and the statuses."""

    datasets: list[Dataset] = field(default_factory=list)
    syntaxes: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)  # SOP UIDs answered with success/warning
    associations: int = 0
    rejected: int = 0
    open_now: set[Any] = field(default_factory=set)  # associations accepted and not yet closed
    most_open: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def scp() -> Iterator[Callable[..., tuple[int, Received]]]:
    """A pynetdicom SCP on an ephemeral port; ``status_for(ds)`` picks each C-STORE status."""
    servers: list[Any] = []

    def start(
        *,
        status_for: Callable[[Dataset, Any], int] = lambda ds, e: 0x0000,
        syntaxes: list[str] | None = None,
        sop_classes: list[str] | None = None,
        require_called: bool = False,
        max_associations: int = 10,
    ) -> tuple[int, Received]:
        got = Received()
        ae = AE(ae_title="XNAT")
        ae.require_called_aet = require_called
        ae.maximum_associations = max_associations
        ts = syntaxes or ALL_TRANSFER_SYNTAXES
        if sop_classes is None:
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ts)
        else:
            for uid in sop_classes:
                ae.add_supported_context(uid, ts)
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            status = status_for(ds, event)
            with got.lock:
                got.datasets.append(ds)
                got.syntaxes.append(str(event.context.transfer_syntax))
                if status == 0 or 0xB000 <= status <= 0xBFFF:
                    got.stored.append(ds.SOPInstanceUID)
            return status

        def on_open(event: Any) -> None:
            with got.lock:
                got.associations += 1
                got.open_now.add(event.assoc)
                got.most_open = max(got.most_open, len(got.open_now))

        def on_close(event: Any) -> None:
            with got.lock:
                got.open_now.discard(event.assoc)

        def on_reject(event: Any) -> None:
            with got.lock:
                got.rejected += 1

        server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, on_store),
                (evt.EVT_ACCEPTED, on_open),
                (evt.EVT_REJECTED, on_reject),
                (evt.EVT_CONN_CLOSE, on_close),
            ],
        )
        servers.append(server)
        return server.server_address[1], got

    yield start
    for server in servers:
        server.shutdown()


def send(root: Path, port: int, **kw: Any) -> Any:
    kw.setdefault("manifest", manifest_of(root))
    kw.setdefault("num_batches", 3)
    kw.setdefault("project", "PRJ")
    kw.setdefault("subject", "SUBJ-1")
    kw.setdefault("session", "SESS_1")
    kw.setdefault("allow_multiple_studies", True)
    return send_associations(root, "127.0.0.1", port, **kw)


# -- dcmtk storescp --------------------------------------------------------------------------------


def test_storescp_receives_every_instance_with_route_and_identical_pixels(
    session: Path, storescp: Callable[..., tuple[int, Path]]
) -> None:
    before = digests(session)
    port, out = storescp("--fork")
    events: list[ProgressEvent] = []
    result = send(session, port, num_batches=4, progress_callback=events.append)

    assert result.success, result.errors
    assert result.transport == "dicom-store"
    assert len(result.uploaded) == result.total_files == 12
    sent = {str(f.path): dcmread(f.path) for f in manifest_of(session).files}
    arrived = {ds.SOPInstanceUID: ds for ds in map(dcmread, out.iterdir())}
    assert set(arrived) == {ds.SOPInstanceUID for ds in sent.values()}
    for ds in sent.values():
        got = arrived[ds.SOPInstanceUID]
        assert got.PatientComments == ROUTE
        assert got.PixelData == ds.PixelData
        assert "PatientComments" not in ds  # the file on disk was not touched
    assert digests(session) == before
    phases = {e.phase for e in events}
    assert Phase.CONNECT in phases and Phase.UPLOAD in phases
    last = [e for e in events if e.phase is Phase.UPLOAD][-1]
    assert (last.current, last.total, last.batches_total) == (12, 12, result.batches_total)
    assert last.bytes_done == last.bytes_total == sum(f.size for f in result.files)
    # Each association's file is in flight until its C-STORE response (issue 17's display).
    in_flight = [e.files_in_flight for e in events if e.phase is Phase.UPLOAD]
    assert 0 < max(in_flight) <= result.batches_total and last.files_in_flight == 0


def test_storescp_compressed_files_go_in_their_own_syntax(
    odd_files: Path, storescp: Callable[..., tuple[int, Path]]
) -> None:
    before = digests(odd_files)
    port, out = storescp("+xa", "+B")  # accept every syntax; write received bytes as they came
    result = send(odd_files, port, num_batches=2)

    assert result.success, result.errors
    arrived = {ds.SOPInstanceUID: ds for ds in map(dcmread, out.iterdir())}
    for path in odd_files.iterdir():
        ds = dcmread(path)
        got = arrived[ds.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == COMPRESSED[path.name], path.name
        assert got.PatientComments == ROUTE
        assert got.PixelData == ds.PixelData, path.name  # still compressed, byte for byte
        if COMPRESSED[path.name] not in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"):
            # Explicit VR LE data sets: the bytes sent are the file's, plus one element.
            value = ROUTE.encode() + b" " * (len(ROUTE) % 2)
            element = b"\x10\x00\x00\x40LT" + len(value).to_bytes(2, "little") + value
            mine = path.read_bytes()
            raw = next(p for p in out.iterdir() if p.name.endswith(ds.SOPInstanceUID)).read_bytes()
            assert element in raw
            assert (
                raw[dataset_offset(raw) :].replace(element, b"", 1) == mine[dataset_offset(mine) :]
            )
    assert digests(odd_files) == before


def test_routing_off_sends_files_untouched(
    session: Path, storescp: Callable[..., tuple[int, Path]]
) -> None:
    port, out = storescp("+B")
    result = send(session, port, routing=False, num_batches=1)
    assert result.success
    # +B writes the data set exactly as received: after the File Meta Information, the bytes
    # that arrived are the bytes of the file on disk.
    for path in session.rglob("*"):
        if path.is_file():
            mine = path.read_bytes()
            got = (out / f"MR.{dcmread(path).SOPInstanceUID}").read_bytes()
            assert got[dataset_offset(got) :] == mine[dataset_offset(mine) :]


# -- pynetdicom SCPs -------------------------------------------------------------------------------


def test_statuses_are_reported_file_by_file(
    session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    files = manifest_of(session).files
    statuses = [0x0000, 0xB000, 0xA700, 0xC000] * 3
    chosen = dict(zip((f.sop_instance_uid for f in files), statuses, strict=True))
    port, got = scp(status_for=lambda ds, e: chosen[ds.SOPInstanceUID])
    result = send(session, port, manifest=Manifest(session, files))

    by_uid = {o.sop_instance_uid: o for o in result.files}
    assert not result.success
    for uid, status in chosen.items():
        o = by_uid[uid]
        if status == 0x0000:
            assert (o.outcome, o.reason) == (Outcome.UPLOADED, "")
        elif status == 0xB000:
            assert o.outcome is Outcome.UPLOADED and "0xB000" in o.reason and "warning" in o.reason
        elif status == 0xA700:
            assert o.outcome is Outcome.FAILED and "0xA700" in o.reason
            assert "out of resources" in o.reason
        else:
            assert o.outcome is Outcome.FAILED and "0xC000" in o.reason
            assert "cannot understand" in o.reason
    assert sorted(ds.SOPInstanceUID for ds in got.datasets) == sorted(chosen)
    assert any("0xA700" in e for e in result.errors)


def test_skipped_and_duplicate_files_are_accounted(
    session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    port, got = scp()
    m = manifest_of(session)
    m.skipped.append(SkippedFile(session / "notes.txt", "not a DICOM file", 12))
    m.duplicates.append(SkippedFile(session / "copy", "duplicate of another file", 99))
    result = send(session, port, manifest=m)
    assert result.success
    assert [(o.path, o.outcome) for o in result.skipped] == [
        (str(session / "notes.txt"), Outcome.SKIPPED),
        (str(session / "copy"), Outcome.SKIPPED),
    ]
    assert len(got.datasets) == 12


def test_wrong_called_ae_title_is_one_sentence(
    session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    port, got = scp(require_called=True)
    with pytest.raises(ConfigError) as err:
        send(session, port, called_aet="NOTXNAT")
    assert str(err.value) == (
        f"DICOM peer 127.0.0.1:{port} rejected the association: called AE title 'NOTXNAT' is "
        "not recognised there (check --dicom-called-aet)."
    )
    assert got.datasets == []


def test_closed_port_and_unknown_host_are_unreachable(session: Path) -> None:
    port = free_port()
    with pytest.raises(UnreachableError, match=r"port \d+ is closed on 127.0.0.1"):
        send(session, port)
    with pytest.raises(UnreachableError, match=r"no such host 'no-such-host\.invalid'"):
        send_associations(session, "no-such-host.invalid", 8104, manifest=manifest_of(session))


def test_abort_mid_association_resumes_without_resending_confirmed_files(
    session: Path,
    scp: Callable[..., tuple[int, Received]],
) -> None:
    calls = {"n": 0}

    def abort_twice(ds: Dataset, event: Any) -> int:
        calls["n"] += 1
        if calls["n"] in (4, 9):
            event.assoc.abort()  # the 4th and 9th requests never get an answer
            return 0xA700
        return 0x0000

    port, got = scp(status_for=abort_twice)
    result = send(session, port, num_batches=1, retry=FAST)

    assert result.success, result.errors
    assert len(result.uploaded) == 12
    # Every instance confirmed exactly once; the two unanswered ones were sent again.
    assert sorted(got.stored) == sorted(o.sop_instance_uid for o in result.files)
    assert len(got.datasets) == 14
    assert got.associations == 3 + 1  # C-ECHO, then the batch opened three times


def test_peer_that_always_aborts_fails_files_after_retries(
    session: Path,
    scp: Callable[..., tuple[int, Received]],
) -> None:

    def abort(ds: Dataset, event: Any) -> int:
        event.assoc.abort()
        return 0

    port, got = scp(status_for=abort)
    result = send(session, port, num_batches=2, retry=RetryPolicy(retries=2, base=0.01, cap=0.05))
    assert not result.success
    assert len(result.failed) == 12
    assert all("aborted the association" in o.reason for o in result.failed)
    assert result.batches_failed == 2
    assert got.associations == 1 + 2 * 3
    gave_up = [e for e in result.errors if e.startswith("association ")]
    assert len(gave_up) == 2
    assert all("file(s) not sent: the peer aborted the association" in e for e in gave_up)


def test_uncompressed_only_peer_gets_decompressed_or_a_reason(
    odd_files: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    before = digests(odd_files)
    port, got = scp(syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    result = send(odd_files, port)

    arrived = {ds.SOPInstanceUID: ds for ds in got.datasets}
    reference = dcmread(get_testdata_file("MR_small.dcm")).PixelData
    for o in result.files:
        name = Path(o.path).name
        ts = COMPRESSED[name]
        missing = (
            decoder_missing(ts)
            if ts not in ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
            else None
        )
        if ts == ExplicitVRLittleEndian:
            assert (o.outcome, o.reason) == (Outcome.UPLOADED, "")
        elif missing is None:
            assert o.outcome is Outcome.UPLOADED, o.reason
            assert "sent as Explicit VR Little Endian" in o.reason
            ds = arrived[o.sop_instance_uid]
            assert ds.PatientComments == ROUTE
            assert ds.SOPInstanceUID == o.sop_instance_uid
            if name.startswith("MR_small") and ts != "1.2.840.10008.1.2.4.50":
                assert ds.PixelData == reference, name  # lossless: the very same pixels
        else:
            assert o.outcome is Outcome.FAILED
            assert o.reason.startswith("the peer accepts only uncompressed syntaxes for ")
            assert "no decoder is installed (install one of:" in o.reason
    assert {s for s in got.syntaxes} <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    assert digests(odd_files) == before


def test_refused_sop_class_fails_only_its_files(
    tmp_path: Path, session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    ct = tmp_path / "ct"
    generate_session(ct, series=1, instances=2, modality="CT", image_size=(16, 16), seed=3)
    m = manifest_of(session)
    m.files += manifest_of(ct).files
    port, got = scp(sop_classes=[MRImageStorage])
    result = send(session, port, manifest=m, num_batches=1)

    assert len(result.uploaded) == 12 and len(got.datasets) == 12
    assert len(result.failed) == 2
    for o in result.failed:
        assert (
            o.reason == "the peer does not accept CT Image Storage (abstract syntax not supported)"
        )


def test_private_sop_classes_split_over_associations_beyond_128_contexts(
    tmp_path: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    # 70 private SOP classes x 2 contexts (the two uncompressed syntaxes) = 140 > 128.
    root = tmp_path / "private"
    root.mkdir()
    classes = [f"1.3.12.2.1107.5.9.{i}" for i in range(1, 71)]
    study = generate_uid()
    for i, uid in enumerate(classes):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.PatientID, ds.Modality = "P", "OT"
        ds.add_new(0x00291010, "OB", bytes([i]) * 10)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            uid,
            ds.SOPInstanceUID,
        )
        ds.save_as(root / f"f{i:02d}", enforce_file_format=True)
    for i, uid in enumerate(classes):
        register_uid(uid, f"XnatioTestPrivateStorage{i}", StorageServiceClass)
    port, got = scp(sop_classes=classes)
    result = send(root, port, num_batches=1)
    assert result.success, result.errors
    assert result.batches_total == 2
    assert sorted(d.SOPClassUID for d in got.datasets) == sorted(classes)
    assert all(d.PatientComments == ROUTE for d in got.datasets)


def test_file_deleted_after_discovery_fails_alone(
    session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    port, got = scp()
    m = manifest_of(session)
    gone = m.files[3]
    gone.path.unlink()
    result = send(session, port, manifest=m, num_batches=1)
    assert [o.path for o in result.failed] == [str(gone.path)]
    assert result.failed[0].reason.startswith("cannot read the file: ")
    assert len(got.datasets) == 11


def test_discovers_when_no_manifest_is_given(
    session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    port, got = scp()
    result = send_associations(session, "127.0.0.1", port, num_batches=2, project="PRJ")
    assert result.success
    assert len(got.datasets) == result.total_files == 12
    assert all(d.PatientComments == "Project:PRJ" for d in got.datasets)


def test_transiently_rejected_associations_are_retried(
    session: Path,
    scp: Callable[..., tuple[int, Received]],
) -> None:
    port, got = scp(max_associations=1)  # the others are rejected: local limit exceeded
    result = send(session, port, num_batches=4, retry=RetryPolicy(retries=20, base=0.05, cap=0.2))
    assert result.success, result.errors
    assert got.rejected > 0 and got.associations == 1 + 4
    assert sorted(got.stored) == sorted(o.sop_instance_uid for o in result.files)


# pynetdicom's SCP sometimes leaves its socket to the garbage collector when an A-ABORT arrives
# while its C-STORE handler runs; every socket of ours is checked closed below.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_fatal_error_in_one_association_stops_the_others(
    session: Path, scp: Callable[..., tuple[int, Received]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One cancel path: a callback that raises (here KeyboardInterrupt, once, in one association's
    thread) interrupts the other association mid-way, instead of letting it send its files."""
    from xnatio.transports.dicom_store import ul

    release = threading.Event()

    def slow(ds: Dataset, event: Any) -> int:
        release.wait(0.2)
        return 0x0000

    raised: list[int] = []

    def interrupt_once(e: ProgressEvent) -> None:
        if e.phase is Phase.UPLOAD and e.current >= 2 and not raised:
            raised.append(e.current)
            raise KeyboardInterrupt

    ours: list[socket.socket] = []
    connect = ul.connect

    def connect_and_keep(host: str, port: int, timeout: float) -> socket.socket:
        ours.append(connect(host, port, timeout))
        return ours[-1]

    monkeypatch.setattr(ul, "connect", connect_and_keep)
    port, got = scp(status_for=slow)
    with pytest.raises(KeyboardInterrupt):
        send(session, port, num_batches=2, progress_callback=interrupt_once)
    release.set()
    # Two associations of six files: two answered, at most one more in flight in the other one
    # when it was interrupted. Without the cancel the other association sends all its six.
    assert raised and len(got.datasets) < 6
    assert not [t for t in threading.enumerate() if t.name.startswith("c-store")]
    assert len(ours) == 3 and all(s.fileno() == -1 for s in ours)  # C-ECHO and two, all closed


def test_no_more_associations_at_once_than_num_batches(
    tmp_path: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    """--num-batches bounds the associations open at once, even when the 128-context limit
    splits the plan into more groups (docs/dicom-store-upload.md: "parallel associations")."""
    root = tmp_path / "private"
    root.mkdir()
    classes = [f"1.3.12.2.1107.5.99.{i}" for i in range(1, 200)]
    study = generate_uid()
    for i, uid in enumerate(classes):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.PatientID, ds.Modality = "P", "OT"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(root / f"f{i:03d}", enforce_file_format=True)
        register_uid(uid, f"XnatioTestBoundStorage{i}", StorageServiceClass)
    port, got = scp(sop_classes=classes, max_associations=20)
    result = send(root, port, num_batches=2)
    assert result.success, result.errors
    assert result.batches_total == 4  # 199 classes x 2 contexts: 2 groups, each split in two
    assert got.most_open == 2 and len(got.datasets) == len(classes)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_members_of_a_zip_or_tar_path_are_sent(
    tmp_path: Path, session: Path, scp: Callable[..., tuple[int, Received]], kind: str
) -> None:
    from xnatio.discover import discover

    archive = Path(shutil.make_archive(str(tmp_path / "upload"), kind, session))
    port, got = scp()
    result = send_associations(archive, "127.0.0.1", port, num_batches=3, project="PRJ")

    assert result.success, result.errors
    on_disk = {dcmread(p).SOPInstanceUID: dcmread(p) for p in session.rglob("*") if p.is_file()}
    arrived = {ds.SOPInstanceUID: ds for ds in got.datasets}
    assert set(arrived) == set(on_disk)
    for uid, ds in arrived.items():
        assert ds.PixelData == on_disk[uid].PixelData
        assert ds.PatientComments == "Project:PRJ"
    assert all(o.path.startswith(f"{archive}/") for o in result.files)
    assert len(discover(archive).files) == result.total_files == 12


def test_gzipped_tar_path_is_refused_with_a_hint(
    tmp_path: Path, session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    archive = shutil.make_archive(str(tmp_path / "upload"), "gztar", session)
    port, got = scp()
    with pytest.raises(UsageError, match=r"compressed tar.*--transport rest"):
        send_associations(archive, "127.0.0.1", port)
    assert got.associations == 0


def test_file_the_peer_never_answers_fails_alone(
    session: Path,
    scp: Callable[..., tuple[int, Received]],
) -> None:
    files = manifest_of(session).files
    stuck = files[4].sop_instance_uid
    release = threading.Event()

    def hang_on_one(ds: Dataset, event: Any) -> int:
        if ds.SOPInstanceUID == stuck:
            release.wait(5)
        return 0x0000

    port, got = scp(status_for=hang_on_one)
    result = send(session, port, num_batches=1, dimse_timeout=0.3, retry=FAST)
    release.set()

    assert [o.sop_instance_uid for o in result.failed] == [stuck]
    assert result.failed[0].reason == (
        "not sent: the peer did not answer in time twice while this file was being sent"
    )
    assert len(result.uploaded) == 11
    assert got.stored.count(files[5].sop_instance_uid) == 1


def test_peer_refusing_every_offered_syntax_is_named_per_file(
    session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    port, got = scp(syntaxes=["1.2.840.10008.1.2.4.50"])  # JPEG Baseline only
    result = send(session, port, num_batches=2)
    assert got.datasets == []
    assert len(result.failed) == 12 and result.batches_failed == 2
    assert {o.reason for o in result.failed} == {
        "the peer accepted no transfer syntax for MR Image Storage (proposed Explicit VR Little "
        "Endian and the uncompressed ones: transfer syntax not supported)"
    }


def test_storescp_default_syntaxes_get_converted_files(
    odd_files: Path, storescp: Callable[..., tuple[int, Path]]
) -> None:
    # Without +xa dcmtk's storescp takes only the uncompressed syntaxes (big endian included).
    port, out = storescp()
    result = send(odd_files, port)
    arrived = {ds.SOPInstanceUID: ds for ds in map(dcmread, out.iterdir())}
    for o in result.files:
        name, ts = Path(o.path).name, COMPRESSED[Path(o.path).name]
        if ts in (ExplicitVRLittleEndian, "1.2.840.10008.1.2.2"):
            assert (o.outcome, o.reason) == (Outcome.UPLOADED, ""), name
        elif ts == "1.2.840.10008.1.2.1.99" or decoder_missing(ts) is None:
            assert o.outcome is Outcome.UPLOADED, (name, o.reason)
            assert "(the peer refused" in o.reason
        else:
            assert o.outcome is Outcome.FAILED and "no decoder is installed" in o.reason
            continue
        assert arrived[o.sop_instance_uid].PatientComments == ROUTE
    big_endian = dcmread(odd_files / "MR_small_bigendian.dcm")
    assert arrived[big_endian.SOPInstanceUID].PixelData == big_endian.PixelData


def test_large_instance_streams_in_fragments_byte_for_byte(
    tmp_path: Path, storescp: Callable[..., tuple[int, Path]]
) -> None:
    root = tmp_path / "large"
    generate_session(root, series=1, instances=1, image_size=(16, 16), seed=5)
    path = next(p for p in root.rglob("*") if p.is_file())
    ds = dcmread(path)
    ds.Rows, ds.Columns = 1000, 1100  # 2.2 MB of pixels: several read chunks and PDUs
    ds.PixelData = bytes(random.Random(1).randbytes(1000 * 1100 * 2))
    ds.save_as(path, enforce_file_format=True)
    port, out = storescp("-pdu", "4096")
    result = send(root, port)
    assert result.success, result.errors
    got = dcmread(out / f"MR.{ds.SOPInstanceUID}")
    assert got.PixelData == ds.PixelData and got.PatientComments == ROUTE


def test_member_unreadable_halfway_fails_alone(
    tmp_path: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    import zipfile

    src = tmp_path / "src"
    generate_session(src, series=1, instances=3, image_size=(256, 256), seed=11)
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(q for q in src.rglob("*") if q.is_file()):
            zf.write(p, p.relative_to(src).as_posix())
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    # Flip a byte near the end of the second member: its CRC fails only when read to the end.
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(names[1])
    data = bytearray(archive.read_bytes())
    header_len = 30 + len(info.filename.encode()) + len(info.extra)
    data[info.header_offset + header_len + info.file_size - 10] ^= 0xFF
    archive.write_bytes(bytes(data))

    port, got = scp()
    result = send_associations(archive, "127.0.0.1", port, num_batches=1, project="PRJ")

    assert [o.path for o in result.failed] == [f"{archive}/{names[1]}"]
    assert result.failed[0].reason.startswith("reading the file failed while sending it: Bad CRC")
    assert len(result.uploaded) == 2 and len(got.stored) == 2


def test_a_port_that_does_not_speak_dicom_is_named(session: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer_like_http() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer_like_http, daemon=True)
    thread.start()
    with pytest.raises(UnreachableError) as err:
        send(session, port)
    thread.join(5)
    server.close()
    assert str(err.value) == (
        f"DICOM peer XNAT@127.0.0.1:{port}: the peer does not speak DICOM (its answer starts "
        "'HTTP/1') during C-ECHO."
    )


def test_associations_replay_serially_with_an_injected_executor(
    session: Path, scp: Callable[..., tuple[int, Received]]
) -> None:
    from xnatio.coordinator import SerialExecutor

    port, got = scp()
    result = send(session, port, num_batches=3, executor=lambda workers: SerialExecutor())
    assert result.success, result.errors
    assert result.batches_total == 3 and got.most_open == 1
    assert [o.batch for o in result.files] == sorted(o.batch for o in result.files)
