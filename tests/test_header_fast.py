"""The header reader's fast paths give the general walk's answer (issue 16 item 4).

Files are built byte by byte here (not by pydicom, which pads and validates), so that odd
lengths, odd Series Number strings, missing tags and long headers reach the one-pass reader.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest

from xnatio import dicomheader
from xnatio.dicomheader import (
    EXPLICIT_VR_LE,
    FIRST_READ,
    IMPLICIT_VR_LE,
    SECOND_READ,
    HeaderFields,
    NeedFallback,
    NotDicom,
    _parse_whole,
    parse_general,
    read_header_fd,
)
from xnatio.models import SplitStrings

MR = b"1.2.840.10008.5.1.4.1.1.4"


def _element(tag: int, vr: bytes, value: bytes, *, explicit: bool = True) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<L", len(value)) + value
    if vr in (b"OB", b"UN", b"UT", b"SQ"):
        return head + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def _file(
    *,
    ts: bytes = EXPLICIT_VR_LE.encode(),
    series_number: bytes | None = b"7 ",
    patient: bytes | None = b"P1",
    private: int = 0,
    study: bytes | None = b"1.2.3.4\0",
) -> bytes:
    """A Part 10 file: its meta group, then the data set in ``ts``'s encoding, with the given
    raw values (None: the element is left out) and a private OB of ``private`` bytes before
    group 0020 (a longer header)."""
    explicit = ts != IMPLICIT_VR_LE.encode()
    meta = (
        _element(0x00020001, b"OB", b"\0\1")
        + _element(0x00020002, b"UI", MR + b"\0")
        + _element(0x00020003, b"UI", b"1.2.3.9")  # an odd length, no padding
        + _element(0x00020010, b"UI", ts if len(ts) % 2 == 0 else ts + b"\0")
    )
    meta = _element(0x00020000, b"UL", struct.pack("<L", len(meta))) + meta
    items: list[tuple[int, bytes, bytes | None]] = [
        (0x00080016, b"UI", MR + b"\0"),
        (0x00080018, b"UI", b"1.2.3.9"),
        (0x00100020, b"LO", patient),
        (0x00190010, b"LO", b"XNATIO TEST " if private else None),
        (0x00191001, b"OB", b"\1" * private if private else None),
        (0x0020000D, b"UI", study),
        (0x0020000E, b"UI", b"1.2.3.5\0"),
        (0x00200011, b"IS", series_number),
        (0x00200013, b"IS", b"1 "),
        (0x00280010, b"US", b"\4\0"),
    ]
    data = b"".join(
        _element(tag, vr, value, explicit=explicit) for tag, vr, value in items if value is not None
    )
    return b"\0" * 128 + b"DICM" + meta + data


def _general(data: bytes) -> object:
    try:
        return parse_general(data, lambda n: b"")
    except (NeedFallback, NotDicom) as exc:
        return type(exc)


NUMBERS = [b"7 ", b" 8", b"+8", b"-3", b"8\0", b"\x008", b"1\\2", b"3.0", b"3.5", b"", b"x"]
NUMBERS += [b"1_0", b"\t9\n", b"\xa09", b"12345678901234567890", None]


@pytest.mark.parametrize("ts", [EXPLICIT_VR_LE, IMPLICIT_VR_LE])
def test_one_pass_reader_reads_odd_values_as_the_general_walk(ts: str) -> None:
    answered = []
    for number in NUMBERS:
        for patient in (b"P1", b"P12", b" P ", b"\0P1 ", b"", None):  # odd, even, padded, empty…
            for study in (b"1.2.3.4\0", b"1.2.3", None):
                data = _file(ts=ts.encode(), series_number=number, patient=patient, study=study)
                fast = _parse_whole(data)
                assert fast is not None, (number, patient, study)  # the fast path answers
                assert fast == _general(data), (number, patient, study)
                answered.append(fast)
    # The values are really read: a number, None for the empty or missing or odd ones.
    numbers = {f.series_number for f in answered}
    assert {7, 8, -3, 3, 10, 9, None} <= numbers and 2 not in numbers
    assert {f.patient_id for f in answered} == {"P1", "P12", "P", ""}
    assert {f.study_uid for f in answered} == {"1.2.3.4", "1.2.3", ""}
    assert {f.transfer_syntax_uid for f in answered} == {ts}


def test_one_pass_reader_declines_where_the_general_walk_must_decide() -> None:
    data = _file()
    # Cut anywhere: it declines or answers as the general walk, never differs.
    for cut in range(len(data) + 1):
        fast = _parse_whole(data[:cut])
        if fast is not None:
            assert fast == _general(data[:cut]), cut
    # Not ASCII (a character set to apply): the general walk refuses it, pydicom then reads it.
    for value in ({"patient": b"J\xf6rg"}, {"study": b"1.2.\xb3"}):
        latin = _file(**value)  # type: ignore[arg-type]
        assert _parse_whole(latin) is None and _general(latin) is NeedFallback
    # Big endian: the general walk (then pydicom) decides.
    assert _parse_whole(_file(ts=b"1.2.840.10008.1.2.2")) is None
    # A data set whose encoding differs from its transfer syntax.
    implicit_data = _file(ts=IMPLICIT_VR_LE.encode())
    meta_end = implicit_data.index(b"\x08\x00\x16\x00")
    lying = _file()[:meta_end] + implicit_data[meta_end:]
    assert _parse_whole(lying) is None


def _reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes ``os.read`` is asked for by the header reader."""
    asked: list[int] = []
    real = os.read

    def read(fd: int, n: int) -> bytes:
        asked.append(n)
        return real(fd, n)

    monkeypatch.setattr(dicomheader.os, "read", read)
    return asked


@pytest.mark.parametrize(
    ("private", "reads"),
    [
        (0, 1),  # the header within the first read
        (FIRST_READ, 2),  # within the second: read on once, one pass again
        (SECOND_READ, None),  # longer: the general walk reads on
    ],
)
@pytest.mark.parametrize("ts", [EXPLICIT_VR_LE, IMPLICIT_VR_LE])
def test_read_header_fd_reads_a_long_header_as_the_general_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private: int, reads: int | None, ts: str
) -> None:
    data = _file(ts=ts.encode(), private=private, series_number=b"12")
    path = tmp_path / "f"
    path.write_bytes(data + b"\0" * 64)
    expected = _general(data)
    assert isinstance(expected, HeaderFields) and expected.series_number == 12
    asked = _reads(monkeypatch)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_header_fd(fd) == expected
    finally:
        os.close(fd)
    if reads is not None:
        assert len(asked) == reads
    else:
        assert len(asked) > 2


def test_split_strings_slice_is_indexing_by_the_range() -> None:
    texts = ["/a/b/1.2.3", "/a/b/1.2.34", "/a/c/x.dcm", "/a/", "/a/b/1.2.840.10008.5", "rel"]
    texts += ["", "/é/ü/\udcff", "/a/b/12", "/a/b/1.2.3", "/a/d/7"]
    strings = SplitStrings("/")
    strings.extend(texts)
    for start in range(len(texts) + 1):
        for stop in range(start, len(texts) + 1):
            assert strings.slice(start, stop) == texts[start:stop], (start, stop)
    # UIDs only (the fast case), odd and even lengths, after other rows.
    uids = [f"/w/S{i % 3}/1.2.826.0.{i * 7919}" for i in range(50)]
    strings.extend(uids)
    assert strings.slice(len(texts), len(texts) + 50) == uids
    assert strings.slice(len(texts) - 2, len(texts) + 3) == texts[-2:] + uids[:3]


@pytest.mark.parametrize("tag_bits", [27, 8])  # 8: slots beyond the kept bits (decodes)
def test_uid_index_reads_a_uid_back_only_where_its_hash_matches(
    monkeypatch: pytest.MonkeyPatch, tag_bits: int
) -> None:
    from xnatio import models
    from xnatio.models import FileTable, SopIndex

    monkeypatch.setattr(models, "_TAG", (1 << tag_bits) - 1)
    monkeypatch.setattr(models, "_TAG_BITS", ((1 << tag_bits) - 1) << models._TAG_SHIFT)
    n = 3000
    table = FileTable()
    uids = [f"1.2.826.0.1.3680043.8.498.{10**30 + 7919 * i}" for i in range(n)]
    table.add_many(
        [f"/s/{u}" for u in uids], [1] * n, [2] * n, ["1.2"] * n, ["1.2.3"] * n, uids,
        ["1.2.840"] * n, [1] * n, ["1.2.840.10008.1.2.1"] * n, ["P"] * n, [2] * n,
    )  # fmt: skip
    reads: list[int] = []
    real = FileTable.sop_instance_uid
    monkeypatch.setattr(
        FileTable, "sop_instance_uid", lambda self, i: reads.append(i) or real(self, i)
    )
    index = SopIndex(table)  # sized for none: it grows
    for i, uid in enumerate(uids):
        index.add(uid, i)
    if tag_bits == 27:
        assert len(reads) <= n // 100  # growing reads no UID back
    reads.clear()
    assert [index.get(uid) for uid in uids] == list(range(n))
    if tag_bits == 27:
        assert len(reads) <= n + n // 100  # the one that matches (a 27-bit hash clash is rare)
    reads.clear()
    assert all(index.get(uid + "9") is None for uid in uids)
    if tag_bits == 27:
        assert len(reads) <= n // 100


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_GETPIPE_SZ"), reason="Linux pipes only")
def test_worker_pipes_hold_the_chunks_sent_ahead() -> None:
    import fcntl

    from xnatio.examine import _PIPE_SIZE, Workers

    # The parent's writes of chunks sent ahead must not wait on the worker's input thread.
    with Workers(1, [sys.executable, "-c", "import sys; sys.stdin.read()"]) as pool:
        (worker,) = pool.workers
        for pipe in (worker.proc.stdin, worker.proc.stdout):
            assert pipe is not None
            assert fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ) >= _PIPE_SIZE


@pytest.mark.parametrize("auto", [False, True])
def test_answers_are_taken_while_the_folders_are_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auto: bool
) -> None:
    """The workers' answers go into the file table during the walk (Workers.ready), so they are
    fed on and do not wait for its end; the manifest is the one read in this process. With
    ``auto``: workers started early for a folder that then holds fewer files than make them
    worth it, some answers taken already: the rest are theirs too (none read twice)."""
    import select

    import xnatio.discover as discovery
    from xnatio.discover import discover
    from xnatio.synth import generate_session

    root = generate_session(tmp_path / "s", series=5, instances=6, image_size=(8, 8)).root
    serial = discover(root, workers=1)
    monkeypatch.setattr(discovery, "_PROCESS_CHUNK", 2)
    pools: list[discovery.Workers] = []
    real_workers = discovery.Workers

    class Recorded(real_workers):  # type: ignore[misc,valid-type]
        def __init__(self, n: int) -> None:
            super().__init__(n)
            pools.append(self)

    monkeypatch.setattr(discovery, "Workers", Recorded)
    walking: list[bool] = [False]
    real_walk, real_scandir = discovery._walk, os.scandir

    def walk(*args: object) -> object:
        walking[0] = True
        try:
            return real_walk(*args)  # type: ignore[arg-type]
        finally:
            walking[0] = False

    def scandir(path: str) -> object:
        # Each folder is listed once the answer awaited next is there (no race with the
        # workers: the walk waits for them here, as a slow file system would make it).
        pool = pools[0] if pools else None
        if walking[0] and pool is not None and pool.answered < pool._next:
            worker = pool.workers[pool.answered % len(pool.workers)]
            select.select([worker.proc.stdout], [], [], 30)
        return real_scandir(path)

    taken: list[bool] = []
    real_take = discovery._Collector.take

    def take(self: object, *args: object) -> None:
        taken.append(walking[0])
        real_take(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(discovery, "_walk", walk)
    monkeypatch.setattr(discovery.os, "scandir", scandir)
    monkeypatch.setattr(discovery._Collector, "take", take)
    if auto:
        monkeypatch.setattr(discovery, "_looks_big", lambda root: True)
        monkeypatch.setattr(discovery, "_process_count", lambda: 2)
    parallel = discover(root) if auto else discover(root, processes=2)
    assert len(pools) == 1
    assert parallel.files == serial.files and parallel.duplicates == serial.duplicates
    assert parallel.skipped == serial.skipped
    assert len(taken) == 15 and any(taken)  # 30 files in chunks of 2, some during the walk
