"""Discovery's bulk path (issue 16 item 4): a worker answers a chunk of files as columns
(``examine.pack``) and the parent appends them with one ``FileTable.add_many``. These tests hold
the bulk path to what the per-file path gives: the same columns, the same order, the same
duplicates, and a worker whose answer is wrong costs one line, not a file.
"""

from __future__ import annotations

import marshal
import shutil
from pathlib import Path
from typing import Any

import pytest

from xnatio.discover import discover
from xnatio.examine import Found, Result, _is_packed, pack
from xnatio.models import FileTable
from xnatio.synth import generate_session

UID = "1.2.826.0.1.3680043.8.498."


def _row(i: int) -> tuple[Any, ...]:
    """The fields of one file, as FileTable.add takes them; every few rows at an edge."""
    uid = f"{UID}{10**20 + i}"
    name = uid if i % 5 else f"IM{i:05d}.dcm"  # UID-named files, and others among them
    folder = f"/data/exam/S{i // 40:03d}/"
    if i == 17:
        folder = "/data/caf\u00e9/n\udcff/"  # a folder name that is not UTF-8
    if i == 23:
        uid = "1.2."  # ends with its separator
    if i == 29:
        uid = "1.23"  # an odd number of digits and dots
    if i == 31:
        uid = "no-dots-at-all"  # not a UID: kept as text
    size = 5 * 2**32 if i == 77 else 1000 + i  # wider than 4 GiB from row 77 on
    mtime = 1_700_000_000_000_000_000 + i
    ctime = mtime if i < 50 else mtime + 7  # ctime differs from mtime from row 50 on
    number = None if i % 11 == 0 else i  # > 255 distinct series numbers: codes widen
    return (
        folder + name,
        size,
        mtime,
        f"1.2.3.{i % 2}",
        f"1.2.3.{i % 2}.{i % 3}",
        uid,
        "1.2.840.10008.5.1.4.1.1.4",
        number,
        "1.2.840.10008.1.2.1",
        "" if i % 7 == 0 else f"P{i % 2}",
        None,
        ctime,
    )


ROWS = [_row(i) for i in range(300)]


def _state(obj: Any) -> Any:
    """Every slot of the columns, recursively: two tables built alike are equal here."""
    if hasattr(obj, "__slots__"):
        return {k: _state(getattr(obj, k)) for k in obj.__slots__}
    if isinstance(obj, dict):
        return {k: _state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_state(v) for v in obj]
    if hasattr(obj, "typecode"):
        return (obj.typecode, list(obj))
    return obj


def _add_many(table: FileTable, rows: list[tuple[Any, ...]]) -> None:
    fspath, size, mtime, study, series, uid, klass, number, ts, patient, _, ctime = zip(
        *rows, strict=True
    )
    table.add_many(fspath, size, mtime, study, series, uid, klass, number, ts, patient, ctime)


def _per_file(rows: list[tuple[Any, ...]], first: tuple[Any, ...] | None = None) -> FileTable:
    table = FileTable()
    for row in ([first] if first else []) + rows:
        table.add(*row)
    return table


@pytest.mark.parametrize("chunk", [1, 7, 100, 300])
def test_add_many_builds_the_columns_add_builds(chunk: int) -> None:
    bulk = FileTable()
    for start in range(0, len(ROWS), chunk):
        _add_many(bulk, ROWS[start : start + chunk])
    one_by_one = _per_file(ROWS)
    assert _state(bulk._cols) == _state(one_by_one._cols)
    assert list(bulk) == list(one_by_one) and len(bulk) == 300
    assert bulk._cols.size.typecode == "q" and bulk._cols.ctime_ns is not None


def test_add_many_after_an_archive_member_keeps_the_member_column() -> None:
    member = ("/data/a.zip", 9, 1, "1.2", "1.2.1", "1.2.9", "1.2.840", 1, "1.2.840", "P", "x", 1)
    bulk = _per_file([], first=member)
    _add_many(bulk, ROWS[:40])
    assert _state(bulk._cols) == _state(_per_file(ROWS[:40], first=member)._cols)
    assert bulk.member(0) == "x" and bulk.member(5) is None


def test_add_many_refuses_bad_columns_and_leaves_the_table_as_it_was() -> None:
    table = _per_file(ROWS[:10])
    before = _state(table._cols)
    bad_uid = [*ROWS[10:20]]
    bad_uid[4] = (*bad_uid[4][:5], 12345, *bad_uid[4][6:])  # a number where a UID goes
    with pytest.raises(TypeError):
        _add_many(table, bad_uid)
    bad_size = [*ROWS[10:20]]
    bad_size[9] = (bad_size[9][0], "big", *bad_size[9][2:])
    with pytest.raises(TypeError):
        _add_many(table, bad_size)
    fspath, size, *rest = zip(*ROWS[10:20], strict=True)
    with pytest.raises(ValueError, match="differ in length"):
        table.add_many(fspath, size[:-1], *rest[:8], rest[9])  # type: ignore[arg-type]
    assert _state(table._cols) == before
    with pytest.raises(TypeError, match="view"):
        _add_many(table[2:5], ROWS[10:12])


def _found(i: int) -> Found:
    return (100 + i, 5, 6, "1.2.840", f"1.2.{i}", "1.2", "1.2.1", i, "1.2.840.1", "P")


def test_pack_gives_columns_and_skips_at_their_places() -> None:
    results: list[Result] = [("empty file (0 bytes)", 0), _found(1), _found(2)]
    results += [("not a DICOM file", 12), _found(4), ("not readable", 3)]
    packed = pack(results)
    skips = [(0, "empty file (0 bytes)", 0), (3, "not a DICOM file", 12), (5, "not readable", 3)]
    assert packed[0] == skips
    assert packed[1:] == tuple(zip(_found(1), _found(2), _found(4), strict=True))
    assert pack([]) == ([], *((),) * 10)
    assert pack([("x", 1)]) == ([(0, "x", 1)], *((),) * 10)
    # What a worker sends is checked for this shape before it is used.
    sent = marshal.loads(marshal.dumps(packed))
    assert _is_packed(sent, 6)
    assert not _is_packed(sent, 7)  # a file missing
    assert not _is_packed(sent[:-1], 6)  # a column missing
    wrong_place = ([(6, "x", 0), *sent[0][1:]], *sent[1:])
    assert not _is_packed(wrong_place, 6)
    out_of_order = (list(reversed(sent[0])), *sent[1:])
    assert not _is_packed(out_of_order, 6)
    assert not _is_packed([*sent], 6)  # a list, not a tuple


def _with_copies(tmp_path: Path) -> tuple[Path, list[tuple[Path, Path]]]:
    """A session where some files are copied under other names: copies within a chunk of four
    paths and across chunks, the copy sorting before and after its original; and each
    duplicate with the first copy it duplicates, in path order."""
    s = generate_session(tmp_path / "session", series=2, instances=6, image_size=(8, 8))
    files = sorted(p for p in s.root.rglob("*") if p.is_file())
    first = files[0].parent / "0-copy-first"  # sorts before every original
    right_after = files[1].with_name(files[1].name + "-copy")
    elsewhere = files[-1].parent / "zz-copy-elsewhere"  # another folder, last
    for original, copy in ((files[0], first), (files[1], right_after), (files[2], elsewhere)):
        shutil.copy(original, copy)
    return s.root, [(files[0], first), (right_after, files[1]), (elsewhere, files[2])]


def test_duplicates_within_and_across_chunks_are_found_in_path_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xnatio.discover as discovery

    root, expected = _with_copies(tmp_path)
    serial = discover(root, workers=1)
    assert [(d.path, d.reason) for d in serial.duplicates] == [
        (dup, f"duplicate of {first} (same SOP Instance UID)") for dup, first in expected
    ]
    assert len(serial.files) == 12 and [str(f.path) for f in serial.files] == sorted(
        str(p) for p in root.rglob("*") if p.is_file() and p not in {d for d, _ in expected}
    )
    for chunk in (1, 2, 4, 100):
        monkeypatch.setattr(discovery, "_PROCESS_CHUNK", chunk)
        monkeypatch.setattr(discovery, "_CHUNK", chunk)
        for parallel in (discover(root, processes=2), discover(root, workers=1)):
            assert parallel.files == serial.files
            assert parallel.duplicates == serial.duplicates
            assert parallel.skipped == serial.skipped


_ANSWERS_SHORT_COLUMNS = """
import marshal, sys
from xnatio.examine import _read_frame, _write_frame, examine, pack
while (frame := _read_frame(sys.stdin.buffer)) is not None:
    skips, *columns = pack([examine(p) for p in marshal.loads(frame)])
    _write_frame(sys.stdout.buffer, marshal.dumps((skips, *(c[1:] for c in columns))))
"""


def test_a_worker_answer_of_the_wrong_shape_is_one_line_and_read_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import xnatio.discover as discovery
    import xnatio.examine as examine

    root, _ = _with_copies(tmp_path)
    serial = discover(root, workers=1)
    monkeypatch.setattr(discovery, "_PROCESS_CHUNK", 3)
    monkeypatch.setattr(examine, "WORKER_COMMAND", ("-c", _ANSWERS_SHORT_COLUMNS))
    with caplog.at_level("WARNING", logger="xnatio.examine"):
        parallel = discover(root, processes=1)
    assert parallel.files == serial.files and parallel.duplicates == serial.duplicates
    assert [r.getMessage() for r in caplog.records] == [
        "a discovery worker stopped (an answer that could not be read): reading its share of "
        "the headers in this process"
    ]


@pytest.mark.parametrize("chunk", [3, 4, 100])
def test_workers_fed_during_the_walk_give_the_serial_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, chunk: int
) -> None:
    """Chunks sent while the folders are walked (Workers.feed), some workers' last chunk among
    them (15 files: chunks of 3 all sent during the walk, of 4 all but the last, of 100 none)."""
    import xnatio.discover as discovery
    import xnatio.examine as examine

    root, _ = _with_copies(tmp_path)
    serial = discover(root, workers=1)
    monkeypatch.setattr(discovery, "_PROCESS_CHUNK", chunk)
    fed: list[int] = []
    real_feed = examine.Workers.feed

    def feed(self: examine.Workers, paths: Any, chunk: int) -> None:
        real_feed(self, paths, chunk)
        fed.append(self._next)

    monkeypatch.setattr(examine.Workers, "feed", feed)
    with caplog.at_level("WARNING", logger="xnatio.examine"):
        parallel = discover(root, processes=2)
    assert parallel.files == serial.files and parallel.duplicates == serial.duplicates
    assert parallel.skipped == serial.skipped
    assert fed and fed[-1] == 15 // chunk  # every whole chunk was sent during the walk
    assert not caplog.records  # each worker answered each of its chunks once, in order


def test_a_worker_that_dies_while_fed_costs_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import xnatio.discover as discovery
    import xnatio.examine as examine

    root, _ = _with_copies(tmp_path)
    serial = discover(root, workers=1)
    monkeypatch.setattr(discovery, "_PROCESS_CHUNK", 2)
    monkeypatch.setattr(examine, "WORKER_COMMAND", ("-c", "import os; os._exit(9)"))
    with caplog.at_level("WARNING", logger="xnatio.examine"):
        parallel = discover(root, processes=1)
    assert parallel.files == serial.files and parallel.duplicates == serial.duplicates
    assert [r.getMessage() for r in caplog.records] == [
        "a discovery worker stopped (exit status 9): reading its share of the headers in this "
        "process"
    ]
