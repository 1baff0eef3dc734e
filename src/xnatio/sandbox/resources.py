"""Resource files (facts §5): ``PUT``/``POST …/resources/{label}/files/{path}``.

``overwrite=true`` replaces; without it a clash is reported as ``{"duplicates": [...]}`` with 200
and the existing file is kept; ``extract=true`` unpacks a zip/tar on the server into the folder of
``{path}``; a request without a body is a 400.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from pathlib import Path

from xnatio.sandbox.importer import archive_kind, iter_entries
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.store import Experiment, Store
from xnatio.sandbox.zipstream import ZipStreamError


def safe_relpath(path: str) -> str:
    norm = posixpath.normpath("/" + path.replace("\\", "/")).lstrip("/")
    if not norm or norm == ".":
        raise HttpError(400, "A file name is required")
    return norm


def store_resource_files(
    store: Store,
    e: Experiment,
    *,
    scan_id: str,
    resource: str,
    rel_path: str,
    upload: Path,
    overwrite: bool,
    extract: bool,
    fmt: str | None,
    content: str | None,
    tags: str | None,
) -> list[str]:
    """Store an uploaded file (or the entries of an archive); returns the duplicates refused."""
    target_dir = store.resource_dir(e, scan_id, resource)
    existing = {f["path"] for f in store.files(e, scan_id, resource)}
    duplicates: list[str] = []
    kind = archive_kind(rel_path) if extract else None

    def put(rel: str, src_stream: object) -> None:
        rel = safe_relpath(rel)
        if rel in existing and not overwrite:
            duplicates.append(rel)
            return
        dst = target_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.part")
        md5 = hashlib.md5()
        size = 0
        try:
            with part.open("wb") as out:
                while True:
                    block = src_stream.read(1 << 20)  # type: ignore[attr-defined]
                    if not block:
                        break
                    md5.update(block)
                    out.write(block)
                    size += len(block)
            os.replace(part, dst)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise HttpError(507, f"Unable to write {rel}: {exc.strerror}") from None
        store.record_file(
            e,
            scan_id=scan_id,
            resource=resource,
            path=rel,
            size=size,
            md5=md5.hexdigest(),
            fmt=fmt,
            content=content,
            tags=tags,
        )
        existing.add(rel)

    if kind is not None:
        base = posixpath.dirname(rel_path)
        # One level only: XNAT's ZipUtils/TarUtils.extract write nested archives out as files.
        try:
            for name, stream in iter_entries(upload, kind, store.tmp_dir(), nested=False):
                put(posixpath.join(base, name) if base else name, stream)
        except ZipStreamError as err:
            raise HttpError(400, f"Unable to extract {rel_path}: {err}") from None
    else:
        with upload.open("rb") as stream:
            put(rel_path, stream)
    return duplicates
