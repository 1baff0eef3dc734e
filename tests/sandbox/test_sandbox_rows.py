"""The importer's per-file row work, in-process (no HTTP): a later file of a row this request
already writes takes one statement (``Store.touch_row``) instead of ``session_for_file``'s
transaction, and the name owners come from the store's in-memory copy of ``prearc_files``. Both
must decide exactly as the full path does when the row changes under the request (facts 1.2,
1.6, 3.2)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from sandbox_helpers import session

from xnatio.sandbox.importer import DicomImport, ImportParams
from xnatio.sandbox.knobs import KnobBox, Knobs
from xnatio.sandbox.store import Store

DEST = {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}


def _run(
    store: Store,
    files: list[bytes],
    between: Callable[[int], None],
    **params: str,
) -> DicomImport:
    """Import ``files`` in one request; ``between(i)`` runs before the i-th file (i ≥ 1)."""

    def entries() -> Iterator[tuple[str, IO[bytes]]]:
        for i, data in enumerate(files):
            if i:
                between(i)
            yield f"f{i}.dcm", io.BytesIO(data)

    p = ImportParams.from_params({**DEST, **params}, "application/zip")
    job = DicomImport(store, KnobBox(Knobs()), p, "/data/services/import")
    job.run(entries())
    return job


def _files(tmp_path: Path, n: int = 3) -> list[bytes]:
    s = session(tmp_path, series=1, instances=n)
    return [p.read_bytes() for p in s.instances.values()]


def test_a_row_deleted_while_a_request_writes_is_made_again(store: Store, tmp_path: Path) -> None:
    deleted: list[int] = []

    def delete_row(i: int) -> None:
        if i == 2:
            (row,) = store.list_prearc("P")
            deleted.append(row.id)
            store.delete_prearc(row)

    _run(store, _files(tmp_path), delete_row)
    (row,) = store.list_prearc("P")  # the third file made the row again, as the first did
    assert [f["name"] for f in store.prearc_files(row.id)] == ["f2.dcm"]
    assert store.prearc_dir(row).joinpath("SCANS", "1", "DICOM", "f2.dcm").is_file()


def test_a_build_between_two_files_leaves_the_row_interrupted(store: Store, tmp_path: Path) -> None:
    seen: list[str] = []

    def build_starts(i: int) -> None:
        (row,) = store.list_prearc("P")
        if i == 1:
            store._set_status(row.id, "BUILDING")  # an idle build took the row (facts 3.2)
        else:
            seen.append(row.status)

    _run(store, _files(tmp_path), build_starts)
    assert seen == ["RECEIVING_INTERRUPT"]  # PDB:2089-2118, as session_for_file answers


def test_a_direct_archive_row_that_left_receiving_sends_the_rest_to_the_prearchive(
    store: Store, tmp_path: Path
) -> None:
    def archiving(i: int) -> None:
        if i == 1:
            (row,) = [r for r in store._q("SELECT id FROM prearc WHERE direct=1")]
            store._set_status(row["id"], "ARCHIVING")

    job = _run(store, _files(tmp_path), archiving, **{"Direct-Archive": "true"})
    rows = {bool(r["direct"]): r["id"] for r in store._q("SELECT id, direct FROM prearc")}
    assert set(rows) == {True, False}  # facts 1.6: DAS:123-148
    assert [f["name"] for f in store.prearc_files(rows[True])] == ["f0.dcm"]
    assert [f["name"] for f in store.prearc_files(rows[False])] == ["f1.dcm", "f2.dcm"]
    assert job.files_written == 3


def _row(store: Store) -> int:
    s = store.session_for_file(
        project="P", tag="1.2.3", name="E", subject="S", scan_date=None,
        prevent_auto_commit=True, writer_of=set(),
    )  # fmt: skip
    assert s is not None
    store.release_writers({s.id})
    return s.id


@pytest.mark.parametrize("how", ["delete", "archive"])
def test_a_row_id_used_again_does_not_inherit_the_old_rows_names(store: Store, how: str) -> None:
    sid = _row(store)
    store.record_prearc_file(sid, "1", "a.dcm", sop_uid="1.1", size=1, md5="x")
    assert store.prearc_file_owner(sid, "1", "a.dcm") == "1.1"
    row = store.get_prearc_by_id(sid)
    assert row is not None
    if how == "delete":
        store.delete_prearc(row)
    else:
        store.archive(row, merge=False, overwrite=False)
    again = _row(store)
    assert again == sid  # SQLite gives the freed id to the next row
    assert store.prearc_file_owner(again, "1", "a.dcm") is None


def test_a_name_recorded_by_another_request_is_seen(store: Store) -> None:
    sid = _row(store)
    assert store.prearc_file_owner(sid, "1", "a.dcm") is None  # loaded, empty
    store.record_prearc_file(sid, "1", "a.dcm", sop_uid="1.1", size=1, md5="x")
    assert store.prearc_file_owner(sid, "1", "a.dcm") == "1.1"
    store.close()  # (the open catalog holds its database)
    fresh = Store(store.root)  # what the index says, read afresh
    try:
        assert fresh.prearc_file_owner(sid, "1", "a.dcm") == "1.1"
    finally:
        fresh.close()
