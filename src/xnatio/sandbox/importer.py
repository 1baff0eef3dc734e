"""``POST /data/services/import``: DICOM-zip and gradual-DICOM, as XNAT's Importer does them.

The body is read entry by entry as it arrives; nested archives are opened too, directory entries
skipped. Each entry's header decides its row (project, StudyInstanceUID, label, facts 1.2) and
its scan folder (Series Number). Every file is stored as XNAT stores it (facts 1.7): regenerated
file meta, the header re-encoded after the default site anonymization script, the rest verbatim;
the catalog MD5 is the stored file's, computed as the file is written (``fastdicom`` builds the
stored bytes of ordinary files; pydicom does the rest). Entries written before a bad one stay
(XNAT's partial write); ``Ignore-Unparsable`` skips bad entries instead. Every data error is a
400 (facts 1.4).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import itertools
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
from typing import IO, Protocol

from xnatio.sandbox import fastdicom
from xnatio.sandbox.dicom import (
    HEAD_BYTES,
    DicomHeader,
    SiteScript,
    Unparsable,
    namer_file_name,
    read_header,
    reencode,
    requested_file_name,
    scan_dir,
)
from xnatio.sandbox.knobs import KnobBox
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.slots import Slots
from xnatio.sandbox.store import (
    AUTO_ARCHIVE,
    AUTO_ARCHIVE_OVERWRITE,
    MANUAL,
    UNASSIGNED,
    ArchiveFailure,
    PrearcSession,
    Store,
)
from xnatio.sandbox.tarstream import iter_tar_stream, tar_files
from xnatio.sandbox.zipstream import ZipStreamError, iter_zip_stream
from xnatio.xnat.labels import clean_label

IMPORT_PATH = "/data/services/import"
TAR_BLOCK = 1 << 16
# Temp names of stored files: unique in the process, and across processes (import workers) by
# the pid (cheaper than a uuid4 per file; the temp folder is emptied at start, catalog.Catalog).
_TMP_NAMES = itertools.count()
HANDLERS = {"DICOM-zip", "gradual-DICOM", "SI"}
# A body of these types selects gradual-DICOM when no handler is named (Imp:238-244).
GRADUAL_TYPES = {"application/dicom", "application/x-mirc", "application/x-mirc-dicom"}
MSG_ARCHIVE_FAILED = "unable to archive for the Prearchive session"  # DZI:257-259, facts 1.4

# Raw bodies are named "upload" + the type's extension (facts 1.1: RU:70-81); DICOM-zip picks the
# reader from that name. Types without a reader get a name no reader takes ("Unsupported format").
RAW_NAMES = {
    "application/zip": "upload.zip",
    "application/x-tar": "upload.tar",
    "application/xar": "upload.xar",
    "application/x-gtar": "upload.tgz",
    "application/x-gzip": "upload.gz",
    "application/octet-stream": "upload.bin",
    "application/dicom": "upload.dcm",
}

_DEST = re.compile(
    r"^/(?P<kind>prearchive|archive)"
    r"(?:/projects/(?P<project>[^/]+)"
    r"(?:/subjects/(?P<subject>[^/]+)(?:/experiments/(?P<label>[^/]+))?)?)?/?$"
)


def archive_kind(name: str) -> str | None:
    """'zip', 'tar' or 'tgz' from a file name, case-sensitively as XNAT does (``.zip``/``.zar``
    ZIP, ``.tar``/``.xar`` TAR, ``.tgz``/``.tar.gz`` gzipped TAR; facts 1.1, Format.java:8-29);
    else None."""
    if name.endswith((".zip", ".zar")):
        return "zip"
    if name.endswith((".tar", ".xar")):
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
    commit: bool = False
    auto_archive: bool = False
    overwrite_files: bool = False
    prevent_anon: bool = False
    source: str = ""

    @classmethod
    def from_params(cls, p: dict[str, str], content_type: str = "") -> ImportParams:
        default = "gradual-DICOM" if content_type in GRADUAL_TYPES else "DICOM-zip"
        handler = p.get("import-handler") or default
        if handler not in HANDLERS:
            raise HttpError(404, f"Unknown importer implementation specified: {handler}")
        zipish = handler != "gradual-DICOM"

        def first(*values: str | None) -> str | None:
            return next((v for v in values if v), None)

        dest = parse_dest(p["dest"]) if p.get("dest") else None
        d = dest or Dest("prearchive")
        if zipish:
            # DICOM-zip: dest values override; lower-case project/subject/session win over the
            # upper-case keys (facts 1, DZI:92-107).
            project = first(d.project, p.get("project"), p.get("PROJECT_ID"))
            subject = first(d.subject, p.get("subject"), p.get("SUBJECT_ID"))
            label = first(d.label, p.get("session"), p.get("EXPT_LABEL"))
        else:
            # gradual-DICOM: only the upper-case keys, and dest's project if there is no
            # PROJECT_ID (GDI:155, 217-255; PU:569-576).
            project = first(p.get("PROJECT_ID"), d.project)
            subject = first(p.get("SUBJECT_ID"))
            label = first(p.get("EXPT_LABEL"))
        return cls(
            handler=handler,
            project=project,
            subject=subject,
            label=label,
            dest=dest,
            # Any value at all (even "none") turns merging on (facts 1.5, Imp:470-473).
            overwrite=p.get("overwrite"),
            direct_archive=truthy(p.get("Direct-Archive")),
            # action=commit implies Ignore-Unparsable (facts 1.1, Imp:165-169).
            ignore_unparsable=truthy(p.get("Ignore-Unparsable")) or p.get("action") == "commit",
            prevent_auto_commit=truthy(p.get("prevent_auto_commit")),
            rename=truthy(p.get("rename")),
            commit=p.get("action") == "commit",
            auto_archive=truthy(p.get("AA")) or truthy(p.get("auto-archive")),
            overwrite_files=truthy(p.get("overwrite_files")),
            prevent_anon=truthy(p.get("prevent_anon")),
            source=p.get("SOURCE", ""),
        )


class FullReader:
    """A file-like view of a request body whose ``read(n)`` returns n bytes unless at the end
    (a socket read may return fewer)."""

    def __init__(self, source: object) -> None:
        self._source = source
        self.name = "upload"

    @property
    def will_be_cut(self) -> bool:
        """The body's connection is to be reset part-way (knob ``reset_next``)."""
        return bool(getattr(self._source, "will_be_cut", False))

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
        elif kind == "tar" and isinstance(source, FullReader) and not source.will_be_cut:
            # A plain tar body: read as tarfile's stream mode reads it, without its copies
            # (tarstream); tarfile itself for anything but plain members.
            for member_name, body_member in iter_tar_stream(source, TAR_BLOCK):
                yield from entries(member_name, body_member)
        else:
            with _open_tar(source, kind) as tf:
                for member_name, member_stream in tar_files(tf):
                    yield from entries(member_name, member_stream)
    except (ZipStreamError, tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        # java.util.zip's own message, as a client error (facts 1.4: every data error is 400).
        raise HttpError(400, str(exc) or "unable to read DICOM object upload") from None


def _open_tar(source: Path | FullReader, kind: str) -> tarfile.TarFile:
    if isinstance(source, Path):
        return tarfile.open(source, "r:gz" if kind == "tgz" else "r:")
    mode = "r|gz" if kind == "tgz" else "r|"  # stream mode: no seeking back
    # tarfile's stream reads its input in ``bufsize`` blocks (10 KB by default: every 10 KB a
    # trip through the body reader and its bandwidth throttle) and copies what is left of a
    # block at every read, so a larger block costs more: 64 KB measured best (0.11 ms per
    # 167 KB member against 0.42 ms at 10 KB and 0.86 ms at 1 MB).
    # A body the reset_next knob will cut is read in tar's own 10 KB records, as before, so the
    # cut falls between the same entries (those read before it stay, facts 1.1).
    block = tarfile.RECORDSIZE if source.will_be_cut else TAR_BLOCK
    return tarfile.open(  # type: ignore[call-overload,no-any-return]
        fileobj=source, mode=mode, bufsize=block
    )


def _maybe_nested(name: str, stream: IO[bytes], tmp_dir: Path) -> Iterator[tuple[str, IO[bytes]]]:
    inner = archive_kind(name)
    if inner is None:
        yield name, stream
        return
    # Read straight out of the outer entry, front to back, as XNAT nests its input streams.
    yield from iter_entries(FullReader(stream), inner, tmp_dir)


_NO_SLOTS = Slots(0)


@dataclass(frozen=True)
class Claim:
    """Where one file goes and how it is stored, as its request decided (``DicomImport.claim``).

    The request holds the file's lock (XNAT's PrearcFileLock) from the claim until the file is
    settled or abandoned, so the write happens under it wherever it runs (this process or an
    import worker, ``workers.py``)."""

    target: str
    script: SiteScript | None
    disk_full: bool  # the disk_full knob took this file: drained, then 400
    per_file_ms: float  # the per_file_ms knob, slept before the write (under the lock)
    reencode: bool  # the header is re-encoded (the site script, or the reencode knob)


class Placer(Protocol):
    """The side of an import that decides where each file goes and records it: the request's
    ``DicomImport`` in the server process, or its stand-in in an import worker."""

    def claim(self, name: str, h: DicomHeader) -> Claim | None:
        """The file's claim (its lock taken), or None: the file is read and dropped."""

    def settle(self, size: int, md5: str) -> None:
        """Record the claimed file as stored and let go of its lock."""

    def abandon(self) -> None:
        """Let go of the claimed file's lock without recording it (the write failed)."""

    def sleepy(self) -> bool:
        """Whether a knob that sleeps is on (then files are imported without a slot)."""


class EntryFeed:
    """The per-file half of an import: each entry's header read, its claim asked of the
    ``placer``, the file stored as XNAT stores it (facts 1.7) and settled. It needs the body and
    the temp folder, nothing of the catalog, so it runs where the body is read: the request's
    thread, or an import worker process (``workers.py``)."""

    def __init__(
        self, placer: Placer, tmp_path: str, slots: Slots, ignore_unparsable: bool
    ) -> None:
        self.placer = placer
        self.tmp_path = tmp_path
        # The import slots (``slots.py``): each file's work is done holding one, so the
        # request threads take turns instead of all contending for the GIL.
        self.slots = slots
        self.ignore_unparsable = ignore_unparsable
        self.files_written = 0
        self.last_error: Unparsable | None = None

    def run(self, entries: Iterator[tuple[str, IO[bytes]]]) -> None:
        for name, stream in entries:
            try:
                if self.placer.sleepy():
                    # The knobs that sleep (in the body reads, per file) stand for a link or a
                    # server's own cost: taken in parallel, as XNAT's threads would, not in
                    # turns (measured: turns made rest-latency's upload 15 % slower).
                    self._one(name, stream)
                else:
                    with self.slots.slot():
                        self._one(name, stream)
            except Unparsable as err:
                if not self.ignore_unparsable:
                    raise HttpError(400, str(err)) from None
                self.last_error = err
            except ZipStreamError:  # found while reading the entry's bytes
                raise HttpError(400, f"unable to read DICOM object {name}") from None

    def _one(self, name: str, stream: IO[bytes]) -> None:
        head = _read_fully(stream, HEAD_BYTES)
        fast = fastdicom.parse(head, whole=len(head) < HEAD_BYTES)
        if fast is not None:  # an ordinary file: the same result without pydicom's parse
            self._place(name, fast.header, head, stream, fast)
            self.files_written += 1
            return
        spooled: Path | None = None
        try:
            try:
                h = read_header(head, name)
            except Unparsable:
                if len(head) < HEAD_BYTES:
                    raise
                # A header longer than the head: spool the entry and parse the whole file.
                spooled = Path(self.tmp_path) / f"entry-{uuid.uuid4().hex}"
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

    def _place(
        self,
        name: str,
        h: DicomHeader,
        head: bytes,
        rest: IO[bytes],
        fast: fastdicom.FastFile | None = None,
    ) -> None:
        claim = self.placer.claim(name, h)
        if claim is None:  # read, not stored (a rejected series, facts 1.3)
            _drain(rest)
            return
        try:
            size, md5 = write_file(claim, self.tmp_path, name, head, rest, fast, self.slots)
        except BaseException:
            self.placer.abandon()
            raise
        self.placer.settle(size, md5)


class DicomImport:
    """One import request's work. ``run`` returns the URIs for the text/uri-list answer
    (possibly none: a 200 with an empty body, facts 1.3).

    Its ``claim``/``settle``/``abandon`` are the catalog's half of each file (routing, the row,
    the name, the file lock, the record); ``EntryFeed`` is the body's half. ``run`` does both in
    the request's thread; with import workers the feed runs in a worker and asks for claims over
    a pipe (``workers.py``), then ``conclude`` builds and archives here."""

    def __init__(
        self,
        store: Store,
        knobs: KnobBox,
        params: ImportParams,
        path: str,
        user: str | None = None,
        site_anon: bool = True,
        slots: Slots | None = None,
    ) -> None:
        self.store = store
        # The server's import slots (``slots``) for the feed; None: no turns.
        self.slots = slots or _NO_SLOTS
        self.site_anon = site_anon
        self.knobs = knobs
        self.p = params
        self.path = path
        self.user = user
        self.writer_of: set[int] = set()
        self.sessions: dict[int, PrearcSession] = {}
        # The rows this request writes to by (project, StudyInstanceUID, label, direct), and the
        # folder of each (row, scan): a later file of the same row takes ``Store.touch_row``
        # (one statement) instead of ``session_for_file`` (a transaction of four).
        self._rows: dict[tuple[str, str, str, bool], PrearcSession] = {}
        self._folders: dict[tuple[int, str], str] = {}
        # The claimed file: its lock and what its record needs.
        self._held: tuple[contextlib.ExitStack, int, str, str, DicomHeader] | None = None
        self.files_written = 0
        # Series a series import filter drops (knob reject_series, facts 1.3), per request.
        self.rejected_series = set(knobs.get().reject_series)
        # The destination project named by the request, if the user may read it (facts 1.2).
        self.project = store.readable_project(user, params.project)

    # -- the request -----------------------------------------------------------------------
    def run(self, entries: Iterator[tuple[str, IO[bytes]]]) -> list[str]:
        feed = EntryFeed(self, self.store.tmp_path, self.slots, self.p.ignore_unparsable)
        try:
            try:
                feed.run(entries)
            finally:
                self.files_written = feed.files_written
            return self.conclude(feed.files_written, feed.last_error)
        finally:
            self.close()

    def conclude(self, files_written: int, last_error: Exception | str | None) -> list[str]:
        """After the last entry: a 400 if nothing was stored and an entry was unparsable
        (``Ignore-Unparsable``), else build and archive as asked (``_finish``)."""
        self.files_written = files_written
        if files_written == 0 and last_error is not None:
            raise HttpError(400, str(last_error))
        return self._finish()

    def close(self) -> None:
        """The request is over: a claimed file's lock is let go, its rows' writers released."""
        self.abandon()
        self.store.release_writers(self.writer_of)

    def _finish(self) -> list[str]:
        """Build (any ``dest``, ``action=commit``) and archive (``dest=/archive…``, or
        ``action=commit`` with ``AA``) in the request — DICOM-zip only (facts 1.1, DZI:92-136);
        gradual-DICOM never builds (GDI:155). Direct-Archive rows answer their xapi URI."""
        uris: list[str] = []
        zipish = self.p.handler != "gradual-DICOM"
        dest = self.p.dest
        build = zipish and (dest is not None or self.p.commit)
        archive = zipish and (
            (dest is not None and dest.kind == "archive") or (self.p.commit and self.p.auto_archive)
        )
        for sid, s in self.sessions.items():
            if s.direct:
                uris.append(s.direct_uri)
                continue
            if not build:
                uris.append(s.external_url)
                continue
            # This request is done writing; the build is skipped — and nothing archived — if
            # another request is writing to the row (DZI:231-255; PRH:68-71 *(inferred)*).
            self.store.release_writers({sid})
            self.writer_of.discard(sid)
            if self.store.other_writers(sid, set()):
                continue
            built = self.store.build(self.store.get_prearc_by_id(sid) or s)
            if built.status != "READY":
                continue
            if not archive:
                uris.append(built.external_url)
                continue
            uris.append(self._archive(built))
        return list(dict.fromkeys(uris))

    def _archive(self, s: PrearcSession) -> str:
        """Archive in the request with the merge/overwrite rules of facts 1.5; any failure is
        400 "unable to archive for the Prearchive session", cause dropped (DZI:257-259)."""
        overwrite = self.p.overwrite
        code = s.code
        if overwrite is None:
            merge = code != MANUAL  # DZI:264-268; GDI:687-702
            replace = self.p.overwrite_files or code == AUTO_ARCHIVE_OVERWRITE  # PS:116-137
        elif overwrite in ("delete", "override"):
            merge, replace = True, True  # Imp:464-469; PSA:616-625
        else:  # append, none, anything else: merge, clashes refused (Imp:470-473)
            merge = True
            replace = self.p.overwrite_files or code == AUTO_ARCHIVE_OVERWRITE
        if not self.store.can_edit(self.user, s.project):
            # Read access put the files here; archiving needs edit (PU:236-252 *(inferred)*).
            self.store.mark_failed(s, 403)
            raise HttpError(400, MSG_ARCHIVE_FAILED)
        try:
            e = self.store.archive(
                s,
                merge=merge,
                overwrite=replace,
                subject=self.p.subject,
                label=self.p.label,
                delay=self._archive_delay,
            )
        except ArchiveFailure:
            raise HttpError(400, MSG_ARCHIVE_FAILED) from None
        except HttpError:
            raise HttpError(400, MSG_ARCHIVE_FAILED) from None
        return e.archive_uri

    def _archive_delay(self) -> None:
        ms = self.knobs.get().archive_ms
        if ms > 0:
            time.sleep(ms / 1000)

    # -- one file: the catalog's half ------------------------------------------------------
    def sleepy(self) -> bool:
        live = self.knobs.live
        return live.bandwidth_mbps > 0 or live.per_file_ms > 0

    def claim(self, name: str, h: DicomHeader) -> Claim | None:
        """Route the file (facts 1.2), find or make its row, name it, take its lock; None when
        a series filter drops it (facts 1.3). A second claim of a file being written is XNAT's
        400 "Concurrent file sends" (``Store.file_lock``)."""
        self.abandon()  # (a claim not settled: its lock is let go first)
        if h.series_number in self.rejected_series:
            return None
        project, subject, label = self._identity(h)
        scan = scan_dir(h)
        open_row = functools.partial(
            self.store.session_for_file,
            project=project,
            tag=h.study_uid,
            name=label,
            subject=subject,
            scan_date=h.study_date,
            prevent_auto_commit=self.p.prevent_auto_commit,
            prevent_anon=self.p.prevent_anon,
            source=self.p.source,
            # Looked up only when the file creates the row (its code is the project's then).
            code=lambda: self._row_code(project, h),
            writer_of=self.writer_of,
        )
        s: PrearcSession | None = None
        # Direct-Archive: off without a project, and falls back to the prearchive when the
        # label's archive folder exists or the DA row left RECEIVING (facts 1.6, GDI:269-278).
        if (
            self.p.direct_archive
            and project != UNASSIGNED
            and self.store.experiment(project, clean_label(label)) is None
            and not (self.store.root / "archive" / project / "arc001" / clean_label(label)).exists()
        ):
            s = self._row(open_row, (project, h.study_uid, label, True))
        if s is None:
            s = self._row(open_row, (project, h.study_uid, label, False))
            assert s is not None
        self.sessions.setdefault(s.id, s)
        file_name = self._file_name(s, scan, name, h)
        folder = self._folders.get((s.id, scan))
        if folder is None:
            folder = str(self.store.prearc_dir(s) / "SCANS" / scan / "DICOM")
            self._folders[(s.id, scan)] = folder
        script = None
        if self.site_anon and not self.p.prevent_anon:
            script = SiteScript(None if project == UNASSIGNED else project, subject, label)
        lock = contextlib.ExitStack()
        lock.enter_context(self.store.file_lock(s.id, scan + "/" + file_name))
        self._held = (lock, s.id, scan, file_name, h)
        try:
            # The knobs as the write meets them, under the lock (``write_file``).
            disk_full = self.knobs.disk_full_for(self.path)
            live = self.knobs.live
        except BaseException:
            self.abandon()
            raise
        return Claim(
            target=os.path.join(folder, file_name),
            script=script,
            disk_full=disk_full,
            per_file_ms=live.per_file_ms,
            reencode=live.reencode or script is not None,
        )

    def settle(self, size: int, md5: str) -> None:
        assert self._held is not None, "settle without a claim"
        lock, sid, scan, file_name, h = self._held
        self._held = None
        with lock:
            self.store.record_prearc_file(
                sid,
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

    def abandon(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held[0].close()

    def _route_project(self, h: DicomHeader) -> str:
        """The request's project if readable, else DICOM routing (``Project:`` in the comment
        fields, then Study Description, then Accession Number, each only if readable), else
        Unassigned (facts 1.2 and 6)."""
        if self.project is not None:
            return self.project
        for candidate in (h.routing.get("project"), h.study_description, h.accession_number):
            found = self.store.readable_project(self.user, candidate)
            if found is not None:
                return found
        return UNASSIGNED

    def _identity(self, h: DicomHeader) -> tuple[str, str, str]:
        """(project, subject, label): label = EXPT_LABEL, else ``Session:``/Patient ID, else
        ``dicom_upload``; subject = SUBJECT_ID, else ``Subject:``/Patient Name (GDI:216-255).
        Labels are kept as sent here; XNAT cleans them at archive time (facts 3.5)."""
        project = self._route_project(h)
        label = self.p.label or h.routing.get("session") or h.patient_id or "dicom_upload"
        subject = self.p.subject or h.routing.get("subject") or h.patient_name or label
        return project, subject, label

    def _row_code(self, project: str, h: DicomHeader) -> int:
        """A new row's auto-archive code: DICOM ``AA:`` or the project's code now (facts 3.2)."""
        if h.routing.get("aa", "").lower() == "true" and project != UNASSIGNED:
            return AUTO_ARCHIVE
        return self.store.project_code(project, self.knobs.get().auto_archive_projects)

    def _row(
        self,
        open_row: functools.partial[PrearcSession | None],
        key: tuple[str, str, str, bool],
    ) -> PrearcSession | None:
        """The row of ``key`` for this file: ``Store.touch_row`` when this request already
        writes to it, else ``Store.session_for_file`` (``open_row``), which finds or creates
        it; None when a Direct-Archive row must fall back to the prearchive (facts 1.6)."""
        known = self._rows.get(key)
        if known is not None and known.id in self.writer_of and self.store.touch_row(known):
            return known
        s: PrearcSession | None = open_row(direct=key[3])
        if known is not None:  # gone or changed: its folders too (SQLite may reuse its id)
            self._folders = {k: v for k, v in self._folders.items() if k[0] != known.id}
        if s is None:
            self._rows.pop(key, None)
        else:
            self._rows[key] = s
        return s

    def _file_name(self, s: PrearcSession, scan: str, name: str, h: DicomHeader) -> str:
        """The uploaded name, unless ``rename=true`` or another SOP instance holds it in the
        scan (then XNAT's template name) (facts 1.2, GDI:630-659)."""
        wanted = None if self.p.rename else requested_file_name(name)
        if wanted is None:
            return namer_file_name(h)
        owner = self.store.prearc_file_owner(s.id, scan, wanted)
        if owner is not None and owner != h.sop_uid:
            return namer_file_name(h)
        return wanted


def write_file(
    claim: Claim,
    tmp_path: str,
    name: str,
    head: bytes,
    rest: IO[bytes],
    fast: fastdicom.FastFile | None = None,
    slots: Slots = _NO_SLOTS,
) -> tuple[int, str]:
    """Receive head + rest, then store it re-encoded (facts 1.7) at the claim's target; returns
    (size, md5) of the stored file.

    Runs under the claim's file lock, like XNAT's write (+ anonymization): ``per_file_ms`` is
    spent here, which is also what makes the same-file race observable. I/O failures, a full
    disk and anonymization failures are all 400 "unable to read DICOM object NAME" (facts 1.4:
    GDI:385, 403-411, 431-435) — XNAT never answers 507.
    """
    failed = Unparsable(f"unable to read DICOM object {name}")
    if claim.disk_full:
        _drain(rest)
        raise failed
    if claim.per_file_ms > 0:
        with slots.paused():  # (set mid-request): a slot is never held in a sleep
            time.sleep(claim.per_file_ms / 1000)
    script = claim.script
    if fast is not None:
        # The stored bytes built from the header walk (fastdicom), written and hashed in one
        # pass; None when it cannot say what pydicom would write: the path below decides.
        prefix = fast.stored_prefix(script) if claim.reencode else fast.head[: fast.rest_at]
        if prefix is not None:
            tail = memoryview(head)[fast.rest_at :]  # (written and hashed, not copied)
            return _write_direct(tmp_path, claim.target, name, prefix, tail, rest)
    # Short temp names: the stored name may be up to 255 bytes itself.
    tmp = Path(tmp_path)
    received = tmp / f"in-{uuid.uuid4().hex}"
    stored = tmp / f"st-{uuid.uuid4().hex}"
    try:
        with received.open("wb") as out:
            for block in _blocks(head, rest):
                out.write(block)
        if claim.reencode:
            try:
                size, digest = reencode(str(received), str(stored), script)
            except Exception:  # unreadable header, I/O: both a 400 (GDI:431-435)
                raise failed from None
        else:
            size, digest = _size_md5(received)
            os.replace(received, stored)
        os.makedirs(os.path.dirname(claim.target), exist_ok=True)
        os.replace(stored, claim.target)
        return size, digest
    except OSError:
        raise failed from None
    finally:
        received.unlink(missing_ok=True)
        stored.unlink(missing_ok=True)


def _write_direct(
    tmp_path: str, target: str, name: str, prefix: bytes, tail: bytes | memoryview, rest: IO[bytes]
) -> tuple[int, str]:
    """Store ``prefix`` + ``tail`` + the rest of the entry at ``target`` (through a temp file,
    renamed into place), hashing as it writes; returns (size, md5)."""
    stored = os.path.join(tmp_path, f"st-{os.getpid()}-{next(_TMP_NAMES)}")
    md5 = hashlib.md5(prefix)
    size = len(prefix)
    moved = False
    try:
        # One writev per MiB, not a buffered write per piece: an ordinary file is then one
        # system call (three before), each of which let go of the GIL to a waiting thread.
        fd = os.open(stored, _NEW_FILE, 0o666)
        try:
            pending: list[bytes | memoryview] = [prefix]
            held = len(prefix)
            for block in _blocks(tail, rest):
                md5.update(block)  # (hashlib lets go of the GIL for large blocks)
                size += len(block)
                pending.append(block)
                held += len(block)
                if held >= _WRITE_AT:
                    _write_all(fd, pending)
                    held = 0
            _write_all(fd, pending)
        finally:
            os.close(fd)
        try:
            os.replace(stored, target)
        except FileNotFoundError:  # the scan's first file (or its folder was removed)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(stored, target)
        moved = True
        return size, md5.hexdigest()
    except OSError:
        raise Unparsable(f"unable to read DICOM object {name}") from None
    finally:
        if not moved:  # (an unlink that finds nothing costs a system call per file)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stored)


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
_WRITE_AT = 1 << 20  # bytes gathered before a writev: memory stays bounded for any file size


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """Write ``parts`` in order with as few ``writev`` calls as the kernel allows (a short
    write is continued), and empty the list."""
    while parts:
        batch = parts[:_IOV_MAX]
        done = os.writev(fd, batch)
        if done == 0 and any(len(p) for p in batch):
            raise OSError(errno.EIO, "the file took none of the bytes written")
        while parts and done >= len(parts[0]):
            done -= len(parts.pop(0))
        if done:
            parts[0] = memoryview(parts[0])[done:]


_IOV_MAX = 512  # (at most this many pieces per call; Linux allows 1024)


def _read_fully(stream: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end: an inflating reader may return short reads,
    which must not be taken for the whole header (issue 11 item 10)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        block = stream.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _drain(stream: IO[bytes]) -> None:
    while stream.read(1 << 20):
        pass


def _size_md5(path: Path) -> tuple[int, str]:
    md5 = hashlib.md5()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            md5.update(block)
            size += len(block)
    return size, md5.hexdigest()


def _blocks(head: bytes | memoryview, rest: IO[bytes]) -> Iterator[bytes | memoryview]:
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
