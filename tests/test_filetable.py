"""The per-file columns of a manifest (models.FileTable, SopIndex): what goes in comes out.

A manifest keeps its files in columns and makes a DicomFile record when one is asked for
(issue 16 item 4); these tests hold it to giving back exactly the records it was given, in
order, through views and pickling, and discovery to recording what the files say.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnatio.discover import discover
from xnatio.models import (
    DicomFile,
    FileOutcome,
    FileTable,
    Manifest,
    Outcome,
    SopIndex,
    SplitStrings,
    file_path,
)
from xnatio.result import NOT_SENT, RunOutcomes, assemble_result
from xnatio.synth import generate_session

UID = "1.2.826.0.1.3680043.8.498."


def _record(i: int, **changes: object) -> DicomFile:
    f = DicomFile(
        path=Path(f"/data/exam/S{i % 3:03d}/1.2.826.0.1.3680043.8.498.{10**30 + i}"),
        size=1000 + i,
        mtime_ns=1_700_000_000_000_000_000 + i,
        study_uid=f"1.2.3.{i % 2}",
        series_uid=f"1.2.3.{i % 2}.{i % 3}",
        sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{10**30 + i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_number=i % 3 + 1,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id=f"P{i % 2}",
        ctime_ns=1_700_000_000_000_000_000 + i,
    )
    return dataclasses.replace(f, **changes) if changes else f


# Every field at an edge the columns must keep exactly.
ODD = [
    _record(0, series_number=None),  # no Series Number
    _record(1, member="inner/IM0001.dcm"),  # an archive member
    _record(2, ctime_ns=0),  # ctime unknown (differs from mtime)
    _record(3, size=5 * 2**32),  # larger than 4 GiB
    _record(4, path=Path("/data/caf\u00e9/n\udcff.dcm")),  # a name that is not UTF-8
    _record(5, sop_instance_uid="1.2.", patient_id=""),  # ends with its separator; empty
    _record(6, sop_instance_uid="no-dots-at-all", path=Path("relative")),  # nothing packed
    _record(7, mtime_ns=-5, ctime_ns=-5, size=0),  # before 1970, empty
    _record(8, sop_instance_uid="1.23"),  # an odd number of digits and dots
]


def test_a_table_gives_back_every_record_it_was_given_in_order() -> None:
    records = [_record(i) for i in range(300)] + ODD
    table = FileTable(records)
    assert len(table) == len(records)
    assert list(table) == records
    assert table == records and records == table  # compared by content, either way round
    assert [table[i] for i in range(len(records))] == records
    assert table[-1] == records[-1]
    with pytest.raises(IndexError):
        table[len(records)]
    with pytest.raises(IndexError):
        table[-len(records) - 1]
    assert table.total_bytes == sum(f.size for f in records)
    assert [table.name_of(i) for i in range(len(table))] == [file_path(f) for f in records]
    assert table != records[:-1] and table != [*records[:-1], _record(999)]


def test_views_keep_the_order_asked_for_and_share_the_columns() -> None:
    records = [_record(i) for i in range(20)] + ODD
    table = FileTable(records)
    view = table.take([5, 1, 22, 1])
    assert list(view) == [records[5], records[1], records[22], records[1]]
    assert view.is_view and not table.is_view
    assert list(view.take([2, 0])) == [records[22], records[5]]  # a view of a view
    assert list(table[3:9:2]) == records[3:9:2]
    assert view.total_bytes == sum(f.size for f in view)
    with pytest.raises(TypeError):
        view.append(records[0])
    table.append(_record(50))  # the table itself still grows
    assert table[-1] == _record(50)


def test_a_manifest_stores_records_as_a_table_with_the_same_studies() -> None:
    records = [_record(i) for i in range(30)]
    m = Manifest(root=Path("/data"), files=records)
    assert isinstance(m.files, FileTable)
    assert m.files == records
    assert m.total_bytes == sum(f.size for f in records)
    by_study: dict[str, list[DicomFile]] = {}
    for f in records:
        by_study.setdefault(f.study_uid, []).append(f)
    summaries = m.studies()
    assert [(s.study_uid, s.patient_id, s.file_count, s.total_bytes) for s in summaries] == [
        (uid, fs[0].patient_id, len(fs), sum(f.size for f in fs))
        for uid, fs in sorted(by_study.items(), key=lambda kv: -len(kv[1]))
    ]


def test_tables_and_views_pickle_whole() -> None:
    table = FileTable([_record(i) for i in range(40)] + ODD)
    again = pickle.loads(pickle.dumps(table))
    assert again == table
    view = table.take([7, 3])
    assert list(pickle.loads(pickle.dumps(view))) == [table[7], table[3]]
    again.append(_record(77))  # an unpickled table is a table: it can grow
    assert again[-1] == _record(77)


def test_the_uid_index_finds_the_first_file_of_each_uid() -> None:
    table = FileTable([_record(i) for i in range(100)])
    index = SopIndex(table)  # sized for none: it grows
    for i in range(100):
        assert index.get(table.sop_instance_uid(i)) is None
        index.add(table.sop_instance_uid(i), i)
    assert all(index.get(table.sop_instance_uid(i)) == i for i in range(100))
    assert index.get("1.2.3.4.5") is None


def test_discovery_records_what_each_file_says(tmp_path: Path) -> None:
    session = generate_session(tmp_path / "exam", series=2, instances=3, image_size=(8, 8))
    os.utime(next(iter(session.instances.values())), ns=(1, 2))  # one mtime != its ctime
    (tmp_path / "exam" / "copy.dcm").write_bytes(
        next(iter(session.instances.values())).read_bytes()
    )
    m = discover(tmp_path / "exam", workers=1)
    assert len(m.files) == len(session.instances) and len(m.duplicates) == 1
    for f in m.files:
        st = os.stat(f.fspath)
        ds = pydicom.dcmread(f.fspath, stop_before_pixels=True)
        assert (f.size, f.mtime_ns, f.ctime_ns) == (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        assert f.sop_instance_uid == ds.SOPInstanceUID
        assert (f.study_uid, f.series_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert f.series_number == int(ds.SeriesNumber)
        assert f.sop_class_uid == ds.SOPClassUID and f.patient_id == ds.PatientID
        assert f.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        assert f.member is None and f.fspath == str(Path(f.fspath))
    (dup,) = m.duplicates
    first = next(f for f in m.files if f.sop_instance_uid == dup.sop_instance_uid)
    assert dup.reason == f"duplicate of {first.fspath} (same SOP Instance UID)"
    assert [f.fspath for f in m.files] == sorted(f.fspath for f in m.files)


def test_run_outcomes_are_found_by_record_and_by_path_and_read_the_columns() -> None:
    records = [_record(i) for i in range(100, 112)] + ODD  # every path its own
    table = FileTable(records)
    view = table.take(range(3, len(records)))
    outcomes = RunOutcomes(view)
    assert len(outcomes) == len(view)
    f = view[4]
    o = outcomes.of(f)
    assert o is outcomes[file_path(f)] is outcomes.of(dataclasses.replace(f))  # a plain record
    assert o == FileOutcome(
        file_path(f), Outcome.FAILED, NOT_SENT, f.sop_instance_uid, f.series_uid, f.size
    )
    o.outcome, o.reason, o.batch = Outcome.UPLOADED, "", 2
    assert [x.outcome for x in outcomes.values()].count(Outcome.UPLOADED) == 1
    again = pickle.loads(pickle.dumps(o))
    assert type(again) is FileOutcome and again == o and again.batch == 2
    with pytest.raises(KeyError):
        outcomes.of(table[0])  # not a file of this run
    result = assemble_result(
        Manifest(Path("/data"), view), outcomes, transport="rest", duration=1, batches_total=1
    )
    assert [x.path for x in result.files] == [file_path(g) for g in view]
    assert result.files[4] is o


def test_a_table_is_extended_as_a_list_is() -> None:
    table = FileTable([_record(1)])
    table += FileTable([_record(2)])
    table += [_record(3)]
    table.extend(table)
    assert table == [_record(1), _record(2), _record(3)] * 2
    with pytest.raises(TypeError):
        view = table.take([0])
        view += [_record(4)]


@settings(max_examples=150, deadline=None)
@given(
    kept=st.lists(st.booleans(), min_size=1, max_size=40),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=40),
    one_by_one=st.booleans(),
)
def test_a_table_sharing_the_walks_paths_gives_back_the_paths_it_was_given(
    kept: list[bool], chunks: list[int], one_by_one: bool
) -> None:
    """FileTable.share_paths (discovery's walk list as the path column, issue 16 item 4): some
    of the walked paths added in order, in chunks (add_many) or one by one (add), give the
    same paths as a table of its own; the walk's list is never changed; the column stays the
    walk's own list exactly while the rows are the first walked paths (a path left out
    after the last row costs nothing)."""
    walked = [
        f"/data/exam/S{i % 3}/IM{i:04d}.dcm" if i % 4 else f"/data/{UID}{i}"
        for i in range(len(kept))
    ]
    walk = SplitStrings("/")
    walk.extend(walked)
    table = FileTable()
    table.share_paths(walk)
    names = [p for p, keep in zip(walked, kept, strict=True) if keep]
    at, sizes = 0, iter(chunks * len(names))
    while at < len(names):
        part = names[at : at + next(sizes)]
        rows = [_record(at + j, path=Path(p)) for j, p in enumerate(part)]
        if one_by_one:
            table.extend(rows)
        else:
            columns = zip(*(_fields(f) for f in rows), strict=True)
            table.add_many(*columns)
        at += len(part)
    assert [table.fspath(i) for i in range(len(table))] == names
    assert list(walk) == walked
    assert (table._cols.fspath is walk) == (names == walked[: len(names)])


def _fields(f: DicomFile) -> tuple[object, ...]:
    """A record's fields in FileTable.add_many's order (files on disk: no member)."""
    return (
        f.fspath,
        f.size,
        f.mtime_ns,
        f.study_uid,
        f.series_uid,
        f.sop_instance_uid,
        f.sop_class_uid,
        f.series_number,
        f.transfer_syntax_uid,
        f.patient_id,
        f.ctime_ns,
    )


def test_discovery_keeps_each_walked_path_once(tmp_path: Path) -> None:
    """A folder of DICOM files only: the file table's paths are the walk's own list (kept
    once, issue 16 item 4); with a file skipped among them, a copy of its own, the same paths."""
    session = generate_session(tmp_path / "exam", series=2, instances=3, image_size=(8, 8))
    clean = discover(tmp_path / "exam", workers=1)
    assert clean.files._cols.fspath_shared and len(clean.files._cols.fspath) == len(clean.files)
    expected = sorted(str(p) for p in session.instances.values())
    assert [f.fspath for f in clean.files] == expected
    first = Path(expected[0])
    (first.parent / (first.name + ".txt")).write_text("not DICOM")  # right after the first
    mixed = discover(tmp_path / "exam", workers=1)
    assert not mixed.files._cols.fspath_shared
    assert [f.fspath for f in mixed.files] == expected and len(mixed.skipped) == 1
