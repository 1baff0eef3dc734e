"""The importer's stored file is written with writev: every byte in order, whatever the kernel
takes per call, and a file that takes nothing is an error, not a hang."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from xnatio.sandbox import importer
from xnatio.sandbox.knobs import KnobBox, Knobs
from xnatio.sandbox.store import Store
from xnatio.synth import generate_session


def _written(path: Path, parts: list[bytes | memoryview]) -> bytes:
    """What ``_write_all`` leaves in a new file at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        importer._write_all(fd, parts)
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize("per_call", [1, 7, 4096, 1 << 30])
def test_every_byte_is_written_in_order_whatever_each_call_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_call: int
) -> None:
    real = os.writev
    calls: list[int] = []

    def short(fd: int, parts: list[bytes | memoryview]) -> int:
        calls.append(len(parts))
        joined = b"".join(bytes(p) for p in parts)[:per_call]
        return real(fd, [joined])

    monkeypatch.setattr(os, "writev", short)
    parts: list[bytes | memoryview] = [b"head", b"", memoryview(b"0123456789" * 50)[3:], b"tail"]
    expected = b"".join(bytes(p) for p in parts)
    assert _written(tmp_path / "f", parts) == expected
    assert parts == []  # emptied for the next pieces
    if per_call >= len(expected):
        assert calls == [4]  # one call for all of them


def test_more_pieces_than_one_call_takes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "_IOV_MAX", 3)
    parts: list[bytes | memoryview] = [bytes([i]) * (i + 1) for i in range(10)]
    expected = b"".join(bytes(p) for p in parts)
    assert _written(tmp_path / "f", parts) == expected


def test_a_file_that_takes_nothing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "writev", lambda fd, parts: 0)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError):
            importer._write_all(fd, [b"x"])
    finally:
        os.close(fd)


def test_a_large_file_is_written_a_mebibyte_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: Store
) -> None:
    """Memory stays bounded for any file size: what is gathered is written each MiB."""
    s = generate_session(tmp_path / "s", series=1, instances=1, image_size=(1100, 1100))
    (path,) = s.instances.values()
    data = path.read_bytes()
    assert len(data) > 2 * importer._WRITE_AT
    sizes: list[int] = []
    real = os.writev

    def counting(fd: int, parts: list[bytes | memoryview]) -> int:
        sizes.append(sum(len(p) for p in parts))
        return real(fd, parts)

    monkeypatch.setattr(os, "writev", counting)
    p = importer.ImportParams.from_params(
        {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}, "application/zip"
    )
    job = importer.DicomImport(store, KnobBox(Knobs()), p, "/data/services/import")
    job.run(iter([("big.dcm", io.BytesIO(data))]))
    (row,) = store.list_prearc("P")
    (f,) = store.prearc_files(row.id)
    stored = (store.prearc_dir(row) / "SCANS" / f["scan"] / "DICOM" / f["name"]).read_bytes()
    assert hashlib.md5(stored).hexdigest() == f["md5"] and len(stored) == f["size"]
    assert stored[-1000:] == data[-1000:]  # the pixel data as sent
    assert len(sizes) >= 2 and max(sizes) < importer._WRITE_AT + (1 << 20) + (1 << 16)
