"""``POST /data/services/import``: DICOM-zip and gradual-DICOM, as XNAT's Importer does them.

The body (already spooled to disk by the server) is read entry by entry; nested archives are
opened too, directory entries skipped. Each entry's header decides its prearchive session
(project, StudyInstanceUID, label) and its scan folder (Series Number); its bytes are streamed
to disk with the MD5 computed on the way. Entries written before a bad one stay (XNAT's partial
write); ``Ignore-Unparsable`` skips bad entries instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from xnatio.sandbox.dicom import (
    HEAD_BYTES,
    DicomHeader,
    Unparsable,
    clean_label,
    namer_file_name,
    read_header,
    requested_file_name,
    scan_dir,
)
from xnatio.sandbox.knobs import KnobBox
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.store import UNASSIGNED, Experiment, PrearcSession, Store
from xnatio.sandbox.zipstream import ZipStreamError, iter_zip_stream

IMPORT_PATH = "/data/services/import"
HANDLERS = {"DICOM-zip", "gradual-DICOM", "SI"}

# Raw bodies get a file name from their Content-Type; the archive reader is picked from it.
RAW_NAMES = {
    "application/zip": "upload.zip",
    "application/x-tar": "upload.tar",
    "application/x-gtar": "upload.tar.gz",
    "application/x-gzip": "upload.gzip",
    "application/octet-stream": "upload",
}

_DEST = re.compile(
    r"^/(?P<kind>prearchive|archive)"
    r"(?:/projects/(?P<project>[^/]+)"
    r"(?:/subjects/(?P<subject>[^/]+)(?:/experiments/(?P<label>[^/]+))?)?)?/?$"
)


def archive_kind(name: str) -> str | None:
    """'zip', 'tar' or 'tgz' from a file name, case-sensitively as XNAT does; else None."""
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(".tar"):
        return "tar"
    if name.endswith((".tar.gz", ".tgz")):
        return "tgz"
    return None


@dataclass
class Dest:
    kind: str  # "prearchive" | "archive"
    project: str | None = None
    subject: str | None = None
    label: str | None = None


def parse_dest(value: str) -> Dest:
    path = value[len("/data") :] if value.startswith("/data/") else value
    m = _DEST.match(path)
    if not m:
        raise HttpError(400, "Parameter dest format error")
    return Dest(m["kind"], m["project"], m["subject"], m["label"])


def truthy(value: str | None) -> bool:
    return (value or "").lower() == "true"


@dataclass
class ImportParams:
    handler: str
    project: str | None
    subject: str | None
    label: str | None
    dest: Dest | None
    overwrite: str | None
    direct_archive: bool
    ignore_unparsable: bool
    prevent_auto_commit: bool
    rename: bool

    @classmethod
    def from_params(cls, p: dict[str, str]) -> ImportParams:
        handler = p.get("import-handler", "SI")
        if handler not in HANDLERS:
            raise HttpError(404, f"Unknown importer implementation specified: {handler}")
        zipish = handler != "gradual-DICOM"

        def pick(primary: str, alias: str) -> str | None:
            value = p.get(primary) or (p.get(alias) if zipish else None)
            return value or None

        dest = parse_dest(p["dest"]) if p.get("dest") else None
        project = pick("PROJECT_ID", "project") or (dest.project if dest else None)
        return cls(
            handler=handler,
            project=project,
            subject=pick("SUBJECT_ID", "subject") or (dest.subject if dest else None),
            label=pick("EXPT_LABEL", "session") or (dest.label if dest else None),
            dest=dest,
            # Quirk kept from XNAT: any value at all (even "none") turns merging on.
            overwrite=p.get("overwrite"),
            direct_archive=truthy(p.get("Direct-Archive")),
            ignore_unparsable=truthy(p.get("Ignore-Unparsable")),
            prevent_auto_commit=truthy(p.get("prevent_auto_commit")),
            rename=truthy(p.get("rename")),
        )


class FullReader:
    """A file-like view of a request body whose ``read(n)`` returns n bytes unless at the end
    (a socket read may return fewer)."""

    def __init__(self, source: object) -> None:
        self._source = source
        self.name = "upload"

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        got = 0
        while n < 0 or got < n:
            block = self._source.read((n - got) if n >= 0 else 1 << 16)  # type: ignore[attr-defined]
            if not block:
                break
            parts.append(block)
            got += len(block)
        return b"".join(parts)


def iter_entries(
    source: Path | FullReader, kind: str, tmp_dir: Path, *, nested: bool = True
) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, stream) for every file in an archive; ``nested`` also opens archives inside it
    (the DICOM importer does; resource ``extract=true`` writes them out as files).

    ``source`` is a spooled file (a multipart part) or the request body itself, read as it
    arrives, like XNAT's importer reads its input stream (zips as ZipInputStream does, see
    ``zipstream``), so a body cut off in the middle leaves the entries before the cut imported.
    """

    def entries(name: str, stream: IO[bytes]) -> Iterator[tuple[str, IO[bytes]]]:
        if nested:
            yield from _maybe_nested(name, stream, tmp_dir)
        else:
            yield name, stream

    try:
        if kind == "zip":
            with contextlib.ExitStack() as stack:
                raw = stack.enter_context(source.open("rb")) if isinstance(source, Path) else source
                for entry_name, entry in iter_zip_stream(raw):
                    yield from entries(entry_name, entry)  # type: ignore[arg-type]
        else:
            with _open_tar(source, kind) as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    member_stream = tf.extractfile(member)
                    if member_stream is not None:
                        with member_stream:
                            yield from entries(member.name, member_stream)
    except (ZipStreamError, tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        name = source.name if isinstance(source, Path) else "upload"
        raise HttpError(400, f"unable to read archive {name}: {exc}") from None


def _open_tar(source: Path | FullReader, kind: str) -> tarfile.TarFile:
    if isinstance(source, Path):
        return tarfile.open(source, "r:gz" if kind == "tgz" else "r:")
    mode = "r|gz" if kind == "tgz" else "r|"  # stream mode: no seeking back
    return tarfile.open(fileobj=source, mode=mode)  # type: ignore[call-overload,no-any-return]


def _maybe_nested(name: str, stream: IO[bytes], tmp_dir: Path) -> Iterator[tuple[str, IO[bytes]]]:
    inner = archive_kind(name)
    if inner is None:
        yield name, stream
        return
    # Read straight out of the outer entry, front to back, as XNAT nests its input streams.
    yield from iter_entries(FullReader(stream), inner, tmp_dir)


class DicomImport:
    """One import request's work. ``run`` returns the URIs for the text/uri-list answer."""

    def __init__(self, store: Store, knobs: KnobBox, params: ImportParams, path: str) -> None:
        self.store = store
        self.knobs = knobs
        self.p = params
        self.path = path
        self.writer_of: set[int] = set()
        self.sessions: dict[int, PrearcSession] = {}
        self.direct: dict[str, tuple[Experiment, str]] = {}
        self.files_written = 0

    # -- the request -----------------------------------------------------------------------
    def run(self, entries: Iterator[tuple[str, IO[bytes]]]) -> list[str]:
        last_error: Unparsable | None = None
        try:
            for name, stream in entries:
                try:
                    self._one(name, stream)
                except Unparsable as err:
                    if not self.p.ignore_unparsable:
                        raise HttpError(400, str(err)) from None
                    last_error = err
                except ZipStreamError as err:  # found while reading the entry's bytes
                    raise HttpError(400, f"unable to read DICOM object {name}: {err}") from None
            if self.files_written == 0 and last_error is not None:
                raise HttpError(400, str(last_error))
            return self._finish()
        finally:
            self.store.release_writers(self.writer_of)

    def _finish(self) -> list[str]:
        uris: list[str] = []
        k = self.knobs.get()
        for sid, s in self.sessions.items():
            auto = s.project in k.auto_archive_projects
            to_archive = (self.p.dest is not None and self.p.dest.kind == "archive") or (
                auto and self.p.dest is not None
            )
            if to_archive:
                # This request is done writing; only *other* writers block the archiver.
                self.store.release_writers({sid})
                self.writer_of.discard(sid)
                built = self.store.build(self.store.get_prearc_by_id(sid) or s)
                e = self.store.archive(
                    built,
                    project=s.project,
                    subject=self.p.subject,
                    label=self.p.label,
                    overwrite=self.p.overwrite,
                    wrapped=True,
                    delay=self._archive_delay,
                )
                uris.append(e.archive_uri)
            else:
                if self.p.dest is not None:
                    current = self.store.get_prearc_by_id(sid) or s
                    self.store.build(current)
                uris.append(s.external_url)
        for e, tag in self.direct.values():
            uris.append(f"/xapi/direct-archive/{e.project}/{tag}/{e.label}")
        return list(dict.fromkeys(uris))

    def _archive_delay(self) -> None:
        ms = self.knobs.get().archive_ms
        if ms > 0:
            time.sleep(ms / 1000)

    # -- one entry -------------------------------------------------------------------------
    def _one(self, name: str, stream: IO[bytes]) -> None:
        head = stream.read(HEAD_BYTES)
        spooled: Path | None = None
        try:
            try:
                h = read_header(head, name)
            except Unparsable:
                if len(head) < HEAD_BYTES:
                    raise
                # A header longer than the head: spool the entry and parse the whole file.
                spooled = self.store.tmp_dir() / f"entry-{uuid.uuid4().hex}"
                with spooled.open("wb") as out:
                    out.write(head)
                    shutil.copyfileobj(stream, out, 1 << 20)
                h = read_header(head, name, str(spooled))
            if spooled is not None:
                with spooled.open("rb") as whole:
                    self._place(name, h, whole.read(0), whole)
            else:
                self._place(name, h, head, stream)
        finally:
            if spooled is not None:
                spooled.unlink(missing_ok=True)
        self.files_written += 1

    def _identity(self, h: DicomHeader) -> tuple[str, str, str]:
        """(project, subject, label) from the parameters, else from the DICOM routing rules."""
        project = self.p.project or h.routing.get("project") or None
        subject = self.p.subject or h.routing.get("subject") or clean_label(h.patient_name)
        label = (
            self.p.label or h.routing.get("session") or clean_label(h.patient_id) or "dicom_upload"
        )
        return project or UNASSIGNED, subject or label, label

    def _place(self, name: str, h: DicomHeader, head: bytes, rest: IO[bytes]) -> None:
        project, subject, label = self._identity(h)
        scan = scan_dir(h)
        if self.p.direct_archive and project != UNASSIGNED:
            e = self.store.direct_archive_target(
                project=project,
                tag=h.study_uid,
                label=label,
                subject=subject,
                modality=h.modality,
                date=h.study_date,
            )
            if e is not None:
                self._write_direct(e, scan, name, h, head, rest)
                return
        s = self.store.session_for_file(
            project=project,
            tag=h.study_uid,
            name=label,
            subject=subject,
            scan_date=h.study_date,
            prevent_auto_commit=self.p.prevent_auto_commit,
            autoarchive=None,
            writer_of=self.writer_of,
        )
        self.sessions.setdefault(s.id, s)
        wanted = self._wanted_name(name)
        owner = self.store.prearc_file_owner(s.id, scan, wanted) if wanted else None
        file_name = self._file_name(owner, wanted, h)
        folder = self.store.prearc_dir(s) / "SCANS" / scan / "DICOM"
        with self.store.file_lock(s.id, scan + "/" + file_name):
            size, md5 = self._write(folder / file_name, head, rest)
            self.store.record_prearc_file(
                s.id,
                scan,
                file_name,
                sop_uid=h.sop_uid,
                sop_class=h.sop_class,
                series_uid=h.series_uid,
                series_number=h.series_number,
                series_description=h.series_description,
                modality=h.modality,
                study_date=h.study_date,
                size=size,
                md5=md5,
            )

    def _file_name(self, owner: str | None, wanted: str | None, h: DicomHeader) -> str:
        # XNAT keeps the uploaded name unless rename=true, the name is unusable, or another
        # object already has it in this scan (GradualDicomImporter.getSafeFile).
        if wanted is None or (owner is not None and owner != h.sop_uid):
            return namer_file_name(h)
        return wanted

    def _wanted_name(self, name: str) -> str | None:
        return None if self.p.rename else requested_file_name(name)

    def _write_direct(
        self, e: Experiment, scan: str, name: str, h: DicomHeader, head: bytes, rest: IO[bytes]
    ) -> None:
        wanted = self._wanted_name(name)
        owner = self.store.archived_file_owner(e, scan, wanted) if wanted else None
        file_name = self._file_name(owner, wanted, h)
        self.direct.setdefault(e.id, (e, h.study_uid))
        folder = self.store.resource_dir(e, scan, "DICOM")
        with self.store.file_lock(0, f"{e.id}/{scan}/{file_name}"):
            size, md5 = self._write(folder / file_name, head, rest)
            self.store.upsert_scan(
                e,
                scan,
                series_description=h.series_description,
                modality=h.modality,
                uid=h.series_uid,
            )
            self.store.record_file(
                e,
                scan_id=scan,
                resource="DICOM",
                path=file_name,
                size=size,
                md5=md5,
                sop_uid=h.sop_uid,
                series_number=h.series_number,
                fmt="DICOM",
                content="RAW",
            )

    def _write(self, target: Path, head: bytes, rest: IO[bytes]) -> tuple[int, str]:
        """Stream head + rest to ``target`` (atomically replaced), returning (size, md5).

        Runs under the file lock, like XNAT's write (+ anonymization): ``per_file_ms`` is spent
        here, which is also what makes the same-file race observable.
        """
        if self.knobs.disk_full_for(self.path):
            raise HttpError(507, "No space left on device")
        ms = self.knobs.get().per_file_ms
        if ms > 0:
            time.sleep(ms / 1000)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        md5 = hashlib.md5()
        size = 0
        try:
            with part.open("wb") as out:
                for block in _blocks(head, rest):
                    md5.update(block)
                    out.write(block)
                    size += len(block)
            if self.knobs.get().site_anonymization:
                size, digest = anonymize_in_place(part)
                os.replace(part, target)
                return size, digest
            os.replace(part, target)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise HttpError(507, f"Unable to write {target.name}: {exc.strerror}") from None
        return size, md5.hexdigest()


def anonymize_in_place(path: Path) -> tuple[int, str]:
    """What a site-wide anonymization script does to a stored file: the header changes, so
    the archived file's size and MD5 differ from what the client sent."""
    from pydicom import dcmread

    ds = dcmread(path, force=True)
    ds.PatientComments = "anonymized by the XNAT sandbox's site-wide script"
    ds.DeidentificationMethod = "XNAT sandbox site anonymization"
    ds.save_as(path, enforce_file_format=False)
    data = path.read_bytes()
    return len(data), hashlib.md5(data).hexdigest()


def _blocks(head: bytes, rest: IO[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    while True:
        block = rest.read(1 << 20)
        if not block:
            return
        yield block


@contextmanager
def cleanup(paths: list[Path]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
