"""Discovery: DICOM by content, every other file accounted for, headers equal to pydicom's."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from xnatio.dicomheader import (
    FIRST_READ,
    NeedFallback,
    NotDicom,
    parse_prefix,
    read_header_fd,
    read_header_stream,
)
from xnatio.discover import archive_format, check_single_study, discover
from xnatio.errors import UsageError
from xnatio.models import Phase, ProgressEvent
from xnatio.synth import SyntheticSession, generate_session

MR = "1.2.840.10008.5.1.4.1.1.4"


def _session(
    tmp_path: Path, *, series: int = 2, instances: int = 3, extras: tuple[str, ...] = ()
) -> SyntheticSession:
    return generate_session(
        tmp_path / "session", series=series, instances=instances, extras=extras, image_size=(8, 8)
    )


# -- the header reader against pydicom -----------------------------------------------------------


def _pydicom_fields(path: str) -> tuple[str, str, str, str, str, int | None] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            return None

        def text(keyword: str) -> str:
            value = ds.get(keyword)
            return "" if value is None else str(value).strip()

        raw = ds.get("SeriesNumber")
        try:
            series = int(raw) if raw not in (None, "") else None
        except TypeError:
            series = None  # multi-valued
        return (
            text("SOPClassUID"),
            text("SOPInstanceUID"),
            text("StudyInstanceUID"),
            text("SeriesInstanceUID"),
            text("PatientID"),
            series,
        )


def test_header_reader_matches_pydicom_on_its_bundled_files() -> None:
    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    assert len(files) > 100
    fast = fallback = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            first = os.read(fd, FIRST_READ)
            try:
                parse_prefix(first, lambda n, fd=fd: os.read(fd, n))
                fast += 1
            except NeedFallback:
                fallback += 1
            except NotDicom:
                pass
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                got = read_header_fd(fd)
            except NotDicom:
                # Only files pydicom finds no SOP Instance UID in may be called "not DICOM".
                expected = _pydicom_fields(path)
                assert expected is None or not expected[1], path
                continue
        finally:
            os.close(fd)
        expected = _pydicom_fields(path)
        assert expected is not None, path
        assert (
            got.sop_class_uid,
            got.sop_instance_uid,
            got.study_uid,
            got.series_uid,
            got.patient_id,
        ) == expected[:5], path
        if expected[5] is not None:
            assert got.series_number == expected[5], path
    # Most of pydicom's files take the fast path; the odd ones (big endian, deflated) do not.
    assert fast > 100 and fallback > 5


def _dataset(ts: str, **extra: object) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR
    sop = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MR
    ds.SOPInstanceUID = sop
    ds.PatientID = "P1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 7
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PixelData = b"\0" * 32
    return ds


@pytest.mark.parametrize(
    "ts",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_each_transfer_syntax_reads_like_pydicom(tmp_path: Path, ts: str) -> None:
    ds = _dataset(ts)
    # An undefined-length sequence before the wanted tags must be skipped, not misread.
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.ReferencedSOPClassUID = MR
    ds.ReferencedImageSequence = [item, item]
    path = tmp_path / "f"
    ds.save_as(path, enforce_file_format=True)
    if ts == ExplicitVRLittleEndian:
        # Rewrite the sequence with undefined lengths, as many scanners write it.
        data = path.read_bytes()
        path.write_bytes(_undefined_length_sequences(data))
        assert pydicom.dcmread(path).ReferencedImageSequence[1].ReferencedSOPInstanceUID == "1.2.3"
    with open(path, "rb") as fp:
        got = read_header_stream(fp)
    assert (got.sop_instance_uid, got.study_uid, got.series_uid) == (
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
    )
    assert got.series_number == 7 and got.patient_id == "P1" and got.transfer_syntax_uid == ts


def _undefined_length_sequences(data: bytes) -> bytes:
    """Re-encode (0008,1140) of an explicit VR LE file with undefined sequence and item lengths."""
    ds = pydicom.dcmread(io.BytesIO(data))
    buf = io.BytesIO()
    from pydicom.filewriter import dcmwrite

    seq_elem = ds["ReferencedImageSequence"]
    seq_elem.is_undefined_length = True
    for item in seq_elem.value:
        item.is_undefined_length_sequence_item = True
    dcmwrite(buf, ds, enforce_file_format=True)
    out = buf.getvalue()
    assert b"\xfe\xff\xdd\xe0" in out  # the sequence delimiter is really there
    return out


def test_long_header_and_raw_dataset_and_non_ascii(tmp_path: Path) -> None:
    # A private element bigger than the first read, before the wanted tags: the buffer grows.
    ds = _dataset(ExplicitVRLittleEndian)
    block = ds.private_block(0x0019, "XNATIO TEST", create=True)
    block.add_new(0x01, "OB", b"\x01" * (3 * FIRST_READ))
    long_path = tmp_path / "long"
    ds.save_as(long_path, enforce_file_format=True)
    fd = os.open(long_path, os.O_RDONLY)
    try:
        first = os.read(fd, FIRST_READ)
        fields = parse_prefix(first, lambda n: os.read(fd, n))
    finally:
        os.close(fd)
    assert fields.sop_instance_uid == ds.SOPInstanceUID and fields.series_number == 7

    # No preamble, no meta (raw data sets, implicit and explicit VR): read on the fast path.
    # Also a meta group without a preamble.
    for implicit, meta in ((True, False), (False, False), (True, True)):
        raw = _dataset(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
        if not meta:
            del raw.file_meta
        raw_path = tmp_path / f"raw-{implicit}-{meta}"
        raw.save_as(raw_path, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
        data = raw_path.read_bytes()
        assert data[128:132] != b"DICM" and data[:2] == (b"\x02\x00" if meta else b"\x08\x00")
        fields = parse_prefix(data, lambda n: b"")
        assert fields.sop_instance_uid == raw.SOPInstanceUID and fields.series_number == 7
        assert fields.transfer_syntax_uid == (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )

    # A Latin-1 patient ID is decoded by pydicom with the character set.
    latin = _dataset(ExplicitVRLittleEndian, SpecificCharacterSet="ISO_IR 100", PatientID="Jörg")
    latin_path = tmp_path / "latin"
    latin.save_as(latin_path, enforce_file_format=True)
    with open(latin_path, "rb") as fp:
        assert read_header_stream(fp).patient_id == "Jörg"


# -- walking directories -------------------------------------------------------------------------


def test_synthetic_session_with_every_extra(tmp_path: Path) -> None:
    s = _session(tmp_path, extras=("dicomdir", "txt", "second-study", "duplicate", "truncated"))
    events: list[ProgressEvent] = []
    m = discover(s.root, progress=events.append)
    main = {f.sop_instance_uid for f in m.files if f.study_uid == s.study_uid}
    assert main == set(s.instances)
    assert {f.sop_instance_uid for f in m.files} - main == {
        pydicom.dcmread(s.extras["second-study"]).SOPInstanceUID
    }
    reasons = {p.name: r.reason for r in m.skipped for p in [r.path]}
    assert reasons["DICOMDIR"].startswith("DICOMDIR")
    assert reasons["notes.txt"].startswith("not a DICOM file")
    assert reasons["truncated.dcm"].startswith("truncated")
    assert len(m.duplicates) == 1
    dup = m.duplicates[0]
    assert dup.path.name == "copy of first instance" and "duplicate of" in dup.reason
    # Series numbers and sizes come through.
    assert {f.series_number for f in m.files if f.study_uid == s.study_uid} == {1, 2}
    assert all(f.size == f.path.stat().st_size for f in m.files)
    # Every file under the folder is accounted for, exactly once.
    on_disk = {p for p in s.root.rglob("*") if p.is_file()}
    seen = [f.path for f in m.files] + [x.path for x in m.skipped + m.duplicates]
    assert sorted(seen) == sorted(on_disk)
    assert events and all(e.phase is Phase.DISCOVER for e in events)
    assert events[-1].current == events[-1].total == len(on_disk)

    with pytest.raises(UsageError) as err:
        check_single_study(m, allow_multiple=False)
    text = str(err.value)
    assert s.study_uid in text and s.second_study_uid in text
    assert "--allow-multiple-studies" in text and "6 files" in text and "SYNTH001" in text
    check_single_study(m, allow_multiple=True)


def test_names_do_not_matter_and_odd_entries_do_not_stop_the_walk(tmp_path: Path) -> None:
    s = _session(tmp_path, series=1, instances=3)
    root = s.root
    first = next(iter(s.instances.values()))
    first.rename(root / "S001" / "i1234.MRDC.1")
    (root / "empty").write_bytes(b"")
    os.symlink("..", root / "S001" / "up")  # a loop back to the root
    os.symlink("self", root / "self")  # ELOOP
    os.symlink("nowhere", root / "dangling")
    os.mkfifo(root / "fifo")  # opening it would block forever
    (root / "deep" / "a").mkdir(parents=True)
    os.symlink(root / "S001", root / "deep" / "a" / "series link")  # a second route to S001
    (root / "zz real").mkdir()  # reached first through a link that sorts before it
    shutil.copyfile(first.parent / "i1234.MRDC.1", root / "zz real" / "copy")
    os.symlink(root / "zz real", root / "a link")
    m = discover(root, workers=2)
    assert {f.sop_instance_uid for f in m.files} == set(s.instances)
    reasons = {r.path.name: r.reason for r in m.skipped}
    assert reasons["empty"] == "empty file (0 bytes)"
    assert reasons["fifo"] == "not a regular file: FIFO (named pipe)"
    assert reasons["dangling"] == "broken symbolic link"
    assert "self" in reasons
    assert "already walked" in reasons["up"]
    assert "already walked" in reasons["series link"]
    assert reasons["zz real"] == "folder already walked through a symbolic link"
    assert [d.path for d in m.duplicates] == [root / "a link" / "copy"]


_LIST_SKIPPED = """
import json, sys
from xnatio.discover import discover
m = discover(sys.argv[1])
print(json.dumps({"files": len(m.files), "skipped": {r.path.name: r.reason for r in m.skipped}}))
"""


def _discover_without_privileges(root: Path) -> dict[str, object]:
    """Discovery as an ordinary user would see it: root reads files whatever their permissions, so
    under root the walk runs in a child process without the capabilities that allow it (util-linux
    setpriv). It stays uid 0, so it still reaches the checkout and the interpreter wherever they
    are, but the permission bits of the tree now apply."""
    command = [sys.executable, "-c", _LIST_SKIPPED, str(root)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    env = {**os.environ, "HOME": "/nonexistent"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    result: dict[str, object] = json.loads(run.stdout)
    return result


def test_unreadable_file_and_folder_are_listed(tmp_path: Path) -> None:
    s = generate_session(tmp_path / "session", series=1, instances=2, image_size=(8, 8))
    locked_file = next(iter(s.instances.values()))
    locked_file.chmod(0)
    locked_dir = s.root / "locked"
    locked_dir.mkdir()
    (locked_dir / "inside").write_bytes(b"x")
    locked_dir.chmod(0)
    try:
        result = _discover_without_privileges(s.root)
    finally:
        locked_dir.chmod(0o755)  # so that pytest can remove tmp_path
    assert result["files"] == 1
    assert result["skipped"] == {
        locked_file.name: "not readable (permission denied)",
        "locked": "directory not readable (permission denied)",
    }


def test_bad_paths_are_one_sentence_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        discover(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="is empty"):
        discover(tmp_path / "empty")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("hello")
    (notes / "b.txt").write_text("world")
    (notes / "c").write_bytes(b"")
    with pytest.raises(UsageError) as err:
        discover(notes)
    assert "looked at 3 files" in str(err.value) and "2 x not a DICOM file" in str(err.value)
    with pytest.raises(UsageError, match="neither a directory nor"):
        discover(notes / "a.txt")


# -- archives -----------------------------------------------------------------------------------


def _pack(root: Path, out: Path, fmt: str) -> Path:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if fmt == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, p.relative_to(root).as_posix())
    else:
        mode = "w:gz" if fmt == "tgz" else "w"
        with tarfile.open(out, mode) as tf:
            for p in files:
                tf.add(p, p.relative_to(root).as_posix())
    return out


@pytest.mark.parametrize("fmt,name", [("zip", "s.zip"), ("tar", "s.tar"), ("tgz", "s.tar.gz")])
def test_archive_path_is_read_by_streaming(tmp_path: Path, fmt: str, name: str) -> None:
    s = _session(tmp_path, extras=("dicomdir", "txt", "duplicate"))
    root = s.root
    # Big endian: read by the pydicom fallback, which needs a seekable stream (a member of a
    # compressed tar is not: it is spooled).
    odd = _dataset(ExplicitVRBigEndian)
    odd.StudyInstanceUID = s.study_uid
    odd.save_as(root / "big endian", enforce_file_format=True)
    # "S001.dup" sorts before "S001/..." as a string but after it as a path: the copy in the
    # folder S001 is the first one both ways.
    shutil.copyfile(next(iter(s.instances.values())), root / "S001.dup")
    archive = _pack(root, tmp_path / name, fmt)
    assert archive_format(archive) == fmt
    from_dir = discover(root)
    events: list[ProgressEvent] = []
    m = discover(archive, progress=events.append)
    members = len(m.files) + len(m.skipped) + len(m.duplicates)
    assert events[-1].current == events[-1].total == members
    assert m.source_archive == archive
    assert [(f.member, f.sop_instance_uid, f.size, f.series_number) for f in m.files] == [
        (f.path.relative_to(root).as_posix(), f.sop_instance_uid, f.size, f.series_number)
        for f in from_dir.files
    ]
    assert all(f.path == archive for f in m.files)
    assert "big endian" in {f.member for f in m.files}
    assert sorted(r.path.name for r in m.skipped) == ["DICOMDIR", "notes.txt"]
    assert sorted(d.path.name for d in m.duplicates) == ["S001.dup", "copy of first instance"]
    assert [d.reason for d in m.duplicates] == [
        d.reason.replace(f"{root}/", "") for d in from_dir.duplicates
    ]


def test_unsupported_or_corrupt_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "x.tar.gz"
    bogus.write_bytes(gzip.compress(b"not a tar at all" * 100))
    with pytest.raises(UsageError, match="could not be read as a tgz archive"):
        discover(bogus)


# -- size ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_per_file_is_small(tmp_path: Path) -> None:
    """10,000 files: the manifest costs well under 2 KB per file (50,000 files < 100 MB)."""
    s = _session(tmp_path, series=1, instances=1)
    template_path = next(iter(s.instances.values()))
    template = template_path.read_bytes()
    sop = next(iter(s.instances)).encode()
    tree = tmp_path / "tree"
    n = 10_000
    for d in range(10):
        (tree / f"d{d}").mkdir(parents=True)
    for i in range(n):
        # Same-length replacement UID keeps every element length valid.
        new = (sop[: -len(str(i)) - 1] + b"9" + str(i).encode()).ljust(len(sop), b"0")[: len(sop)]
        (tree / f"d{i % 10}" / f"{i:05d}").write_bytes(template.replace(sop, new))
    shutil.rmtree(s.root)
    tracemalloc.start()
    m = discover(tree)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(m.files) + len(m.duplicates) == n
    assert peak / n < 2048, f"{peak / n:.0f} bytes per file"


def test_a_file_record_is_a_compact_immutable_value_named_as_before(tmp_path: Path) -> None:
    """DicomFile keeps its path as one string (issue 16 item 4) yet reads as the dataclass it
    was: named as str(Path(...)), equal and hashed by value, immutable, ``dataclasses.replace``
    and pickling work, and discovery's records hold the walked string itself."""
    import dataclasses
    import pickle

    from xnatio.models import DicomFile, file_path

    fields = ("s", "se", "sop", "cl", 3, "ts", "p")
    f = DicomFile("a//b/./c.dcm", 10, 20, *fields)
    assert f.fspath == file_path(f) == "a/b/c.dcm" and f.path == Path("a/b/c.dcm")
    assert f == DicomFile(Path("a/b/c.dcm"), 10, 20, *fields)
    assert hash(f) == hash(DicomFile(Path("a/b/c.dcm"), 10, 20, *fields))
    changed = dataclasses.replace(f, ctime_ns=5)
    assert changed != f and changed.ctime_ns == 5 and changed.path == f.path
    assert pickle.loads(pickle.dumps(changed)) == changed
    with pytest.raises(AttributeError):
        f.size = 11  # type: ignore[misc]
    assert not hasattr(f, "__dict__")
    member = DicomFile(tmp_path / "x.zip", 1, 2, *fields, member="d/e.dcm")
    assert file_path(member) == str(tmp_path / "x.zip" / "d/e.dcm")
    generate_session(tmp_path / "s", series=1, instances=2, image_size=(8, 8))
    manifest = discover(tmp_path / "s")
    walked = sorted(str(p) for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert [file_path(g) for g in manifest.files] == walked
    assert all(file_path(g) is g.fspath for g in manifest.files)


# -- the one-pass header reader and the worker processes (issue 16: the first request sooner) ----


def _both_paths(data: bytes) -> tuple[object, object]:
    """(one-pass reader, general walk) on ``data`` alone: fields or the exception's type; the
    one-pass reader may decline (None), never differ."""
    from xnatio.dicomheader import _parse_whole, parse_general

    def run(fn: object) -> object:
        try:
            return fn()  # type: ignore[operator]
        except (NeedFallback, NotDicom) as exc:
            return type(exc)

    return run(lambda: _parse_whole(data)), run(lambda: parse_general(data, lambda n: b""))


def test_one_pass_reader_answers_as_the_general_walk_or_declines(tmp_path: Path) -> None:
    answered = 0
    datas = []
    for path in get_testdata_files():
        if os.path.isfile(path):
            with open(path, "rb") as fp:
                datas.append(fp.read(FIRST_READ))
    # Every length of a file as discovery writes them, and of one with a sequence (defined and
    # undefined lengths), implicit VR and a long private element: whole and cut anywhere.
    ds = _dataset(ExplicitVRLittleEndian)
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedImageSequence = [item]
    ds.save_as(tmp_path / "seq", enforce_file_format=True)
    seq = (tmp_path / "seq").read_bytes()
    _dataset(ImplicitVRLittleEndian).save_as(tmp_path / "imp", enforce_file_format=True)
    long = _dataset(ExplicitVRLittleEndian)
    block = long.private_block(0x0019, "XNATIO TEST", create=True)
    block.add_new(0x01, "OB", b"\x01" * 700)
    long.save_as(tmp_path / "long", enforce_file_format=True)
    others = [(tmp_path / name).read_bytes() for name in ("imp", "long")]
    for data in (seq, _undefined_length_sequences(seq), *others):
        datas += [data[:cut] for cut in range(0, min(len(data), 1500))] + [data]
    for data in datas:
        fast, general = _both_paths(data)
        if fast is not None:
            answered += 1
            assert fast == general, data[:200]
    assert answered > 100


def _odd_tree(tmp_path: Path) -> Path:
    """A session with every odd input, over several folders and many chunks."""
    extras = ("dicomdir", "txt", "duplicate", "truncated")
    s = _session(tmp_path, series=3, instances=9, extras=extras)
    root = s.root
    (root / "empty").write_bytes(b"")
    os.symlink("nowhere", root / "dangling")
    os.mkfifo(root / "S001" / "fifo")
    (root / "S002" / "notes").write_text("not DICOM")
    return root


def _same(a: object, b: object) -> None:
    assert a.files == b.files  # type: ignore[attr-defined]
    assert a.skipped == b.skipped and a.duplicates == b.duplicates  # type: ignore[attr-defined]


def test_worker_processes_give_the_serial_manifest_in_the_same_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xnatio.discover as discovery

    root = _odd_tree(tmp_path)
    told: list[ProgressEvent] = []
    serial = discover(root, workers=1, progress=told.append)
    monkeypatch.setattr(discovery, "_PROCESS_CHUNK", 4)  # many chunks per worker
    events: list[ProgressEvent] = []
    parallel = discover(root, processes=2, progress=events.append)
    _same(parallel, serial)
    assert [str(f.path) for f in parallel.files] == sorted(str(f.path) for f in serial.files)
    assert events[-1] == told[-1] and events[-1].current == events[-1].total == 33
    # Above the threshold, workers start on their own (here: a lowered one).
    monkeypatch.setattr(discovery, "PROCESS_THRESHOLD", 10)
    started: list[int] = []
    real = discovery.Workers

    class Counted(real):  # type: ignore[misc,valid-type]
        def __init__(self, n: int) -> None:
            super().__init__(n)
            started.append(n)

    monkeypatch.setattr(discovery, "Workers", Counted)
    monkeypatch.setattr(discovery, "_process_count", lambda: 2)  # whatever this machine has
    _same(discover(root), serial)
    assert started == [2]
    # Started after the walk when the early look at the top folders misses how many there are.
    monkeypatch.setattr(discovery, "_looks_big", lambda root: False)
    _same(discover(root), serial)
    assert started == [2, 2]
    # Not on a machine of one core (a worker would only add its start-up), nor below the
    # threshold.
    monkeypatch.setattr(discovery, "_process_count", lambda: 1)
    _same(discover(root), serial)
    monkeypatch.setattr(discovery, "_process_count", lambda: 2)
    monkeypatch.setattr(discovery, "PROCESS_THRESHOLD", 1000)
    _same(discover(root), serial)
    assert started == [2, 2]


_DIES_AFTER_ONE_CHUNK = """
import marshal, os, sys
from xnatio.examine import _read_frame, _write_frame, examine, pack
chunk = marshal.loads(_read_frame(sys.stdin.buffer))
_write_frame(sys.stdout.buffer, marshal.dumps(pack([examine(p) for p in chunk])))
sys.stderr.write("Traceback (most recent call last):\\nMemoryError: worker broke on purpose\\n")
sys.stderr.flush()
os._exit(3)
"""
_ANSWERS_GARBAGE = """
import sys
sys.stdout.buffer.write((5).to_bytes(8, "little") + b"xxxxx")
sys.stdout.buffer.flush()
sys.stdin.buffer.read()
"""


@pytest.mark.parametrize(
    "script,why",
    [
        (_DIES_AFTER_ONE_CHUNK, "MemoryError: worker broke on purpose"),
        (_ANSWERS_GARBAGE, "an answer that could not be read"),
        ("import sys; sys.exit(7)", "exit status 7"),
    ],
)
def test_a_failed_worker_is_one_line_and_its_files_are_read_here(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    script: str,
    why: str,
) -> None:
    import xnatio.discover as discovery
    import xnatio.examine as examine

    root = _odd_tree(tmp_path)
    serial = discover(root, workers=1)
    monkeypatch.setattr(discovery, "_PROCESS_CHUNK", 4)
    monkeypatch.setattr(examine, "WORKER_COMMAND", ("-c", script))
    with caplog.at_level("WARNING", logger="xnatio.examine"):
        parallel = discover(root, processes=1)
    _same(parallel, serial)  # every file examined once, in this process where the worker failed
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"a discovery worker stopped ({why}): reading its share of the headers in this process"
    ]


def test_ctrl_c_stops_discovery_and_no_worker_is_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xnatio.discover as discovery

    root = _odd_tree(tmp_path)
    monkeypatch.setattr(discovery, "_PROCESS_CHUNK", 4)
    pools: list[discovery.Workers] = []
    real = discovery.Workers

    class Recorded(real):  # type: ignore[misc,valid-type]
        def __init__(self, n: int) -> None:
            super().__init__(n)
            pools.append(self)
            self.procs = [w.proc for w in self.workers]

    monkeypatch.setattr(discovery, "Workers", Recorded)

    def interrupt(event: ProgressEvent) -> None:
        if event.current > 0:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    with pytest.raises(KeyboardInterrupt):
        discover(root, processes=2, progress=interrupt)
    discover(root, processes=2)  # and one that ends normally
    assert len(pools) == 2
    for pool in pools:
        assert len(pool.procs) == 2 and not pool.workers
        for proc in pool.procs:
            assert proc.returncode is not None  # killed or ended, and reaped
            with pytest.raises(ProcessLookupError):
                os.kill(proc.pid, 0)


def test_files_are_named_as_their_paths_whatever_the_root_looks_like(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xnatio.models import file_path

    s = _session(tmp_path, series=1, instances=2)
    expected = sorted(str(p.relative_to(s.root)) for p in s.instances.values())
    monkeypatch.chdir(s.root)
    assert sorted(file_path(f) for f in discover(".").files) == expected  # not "./S001/…"
    monkeypatch.chdir(tmp_path)
    for root in ("session", "session/", "./session", "session/../session"):
        named = sorted(file_path(f) for f in discover(root).files)
        assert named == sorted(str(Path(root) / name) for name in expected), root
