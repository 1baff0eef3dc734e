"""The sandbox's persistent state: a SQLite index plus files on disk, laid out as XNAT does.

On disk, under the data dir::

    prearchive/{project}/{yyyyMMdd_HHmmssSSS}/{folder}/SCANS/{scan}/DICOM/{file}
    archive/{project}/arc001/{label}/SCANS/{scan}/DICOM/{file}          (scan DICOM resource)
    archive/{project}/arc001/{label}/SCANS/{scan}/{resource}/{path}     (other scan resources)
    archive/{project}/arc001/{label}/RESOURCES/{resource}/{path}        (session resources)
    tmp/                                                                (request bodies, spooled)

The index (``index.sqlite``, WAL) survives restarts; one connection is shared behind a lock, so
concurrent uploads serialize their short index updates and cannot corrupt it. Files are written
outside the lock. The in-memory locks reproduce XNAT's concurrency behaviour (section 1 of the
facts file): per-file locks inside a prearchive session, "writers" of a session (requests that
are adding files to it), sessions being archived, and archive destinations in use. Contention on
them is *reported as XNAT reports it*, never waited out, so clients can be tested against it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xnatio.sandbox.pages import HttpError

SITE_ID = "XNAT"
UNASSIGNED = "Unassigned"

# Prearchive statuses (PrearcUtils.PrearcStatus) that still accept files.
RECEIVABLE = {"RECEIVING", "READY", "RECEIVING_INTERRUPT", "ERROR", "CONFLICT"}

# The race messages of XNAT's archiver (PrearcSessionArchiver / PrearcDatabase); see facts §1.
MSG_DUPLICATE = "Duplicate archive attempt. Prearchive session already archiving."
MSG_UNABLE_TO_LOCK = "Unable to lock session for archiving."
MSG_IN_USE = "Unable to archive: the destination session is locked. Destination session in use."
MSG_IN_PROGRESS = (
    "Session processing may already be in progress for this session. "
    "Concurrent modification is discouraged."
)
MSG_EXISTS = "Session already exists, retry with overwrite enabled"
MSG_OPERATION = "Operation already in progress on this prearchive entry."
MSG_CONCURRENT_FILE = "Concurrent file sends of the same data is not supported."

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prearc (
    id INTEGER PRIMARY KEY, project TEXT NOT NULL, timestamp TEXT NOT NULL,
    folder TEXT NOT NULL, tag TEXT NOT NULL, name TEXT NOT NULL, subject TEXT NOT NULL,
    status TEXT NOT NULL, uploaded TEXT NOT NULL, lastmod REAL NOT NULL, scan_date TEXT,
    prevent_auto_commit INTEGER NOT NULL DEFAULT 0, autoarchive TEXT, source TEXT,
    visit TEXT, protocol TEXT, UNIQUE (project, timestamp, folder));
CREATE TABLE IF NOT EXISTS prearc_files (
    session_id INTEGER NOT NULL, scan TEXT NOT NULL, name TEXT NOT NULL, sop_uid TEXT,
    sop_class TEXT, series_uid TEXT, series_number TEXT, series_description TEXT,
    modality TEXT, study_date TEXT, size INTEGER NOT NULL, md5 TEXT NOT NULL,
    PRIMARY KEY (session_id, scan, name));
CREATE TABLE IF NOT EXISTS subjects (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, label TEXT NOT NULL, UNIQUE (project, label));
CREATE TABLE IF NOT EXISTS experiments (
    id TEXT PRIMARY KEY, project TEXT NOT NULL, subject_id TEXT NOT NULL, label TEXT NOT NULL,
    uid TEXT, modality TEXT, xsi_type TEXT NOT NULL, date TEXT, direct INTEGER NOT NULL DEFAULT 0,
    lastmod REAL NOT NULL DEFAULT 0, inserted TEXT, UNIQUE (project, label));
CREATE TABLE IF NOT EXISTS scans (
    experiment_id TEXT NOT NULL, scan_id TEXT NOT NULL, type TEXT, series_description TEXT,
    modality TEXT, uid TEXT, xsi_type TEXT NOT NULL, PRIMARY KEY (experiment_id, scan_id));
CREATE TABLE IF NOT EXISTS files (
    experiment_id TEXT NOT NULL, scan_id TEXT NOT NULL, resource TEXT NOT NULL,
    path TEXT NOT NULL, size INTEGER NOT NULL, md5 TEXT NOT NULL, sop_uid TEXT,
    series_number TEXT, format TEXT, content TEXT, tags TEXT,
    PRIMARY KEY (experiment_id, scan_id, resource, path));
CREATE TABLE IF NOT EXISTS resources (
    experiment_id TEXT NOT NULL, scan_id TEXT NOT NULL, label TEXT NOT NULL, format TEXT,
    content TEXT, tags TEXT, PRIMARY KEY (experiment_id, scan_id, label));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_SESSION_TYPES = {"MR": "mr", "CT": "ct", "PT": "pet", "US": "us", "CR": "cr", "DX": "dx"}


def xsi_types(modality: str | None) -> tuple[str, str]:
    """(session xsiType, scan xsiType) for a DICOM Modality, as XNAT's default mapping does."""
    short = _SESSION_TYPES.get((modality or "").upper())
    if short is None:
        return "xnat:otherDicomSessionData", "xnat:otherDicomScanData"
    return f"xnat:{short}SessionData", f"xnat:{short}ScanData"


@dataclass(frozen=True)
class FileRecord:
    """One archived file, as ``SandboxServer.archived_files`` returns it."""

    name: str
    size: int
    md5: str
    series_number: str
    scan_id: str
    path: Path


@dataclass(frozen=True)
class PrearcSession:
    id: int
    project: str
    timestamp: str
    folder: str
    tag: str
    name: str
    subject: str
    status: str
    uploaded: str
    lastmod: float
    scan_date: str | None
    prevent_auto_commit: bool
    autoarchive: str | None

    @property
    def url(self) -> str:
        """XNAT's prearchive URL (no ``/data``), as in the listing's ``url`` field."""
        return f"/prearchive/projects/{self.project}/{self.timestamp}/{self.folder}"

    @property
    def external_url(self) -> str:
        return "/data" + self.url


@dataclass(frozen=True)
class Experiment:
    id: str
    project: str
    subject_id: str
    subject_label: str
    label: str
    uid: str | None
    modality: str | None
    xsi_type: str
    date: str | None
    direct: bool
    inserted: str | None

    @property
    def archive_uri(self) -> str:
        return (
            f"/data/archive/projects/{self.project}/subjects/{self.subject_label}"
            f"/experiments/{self.label}"
        )


def _now_text() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


class Store:
    """SQLite index + on-disk layout + XNAT's concurrency rules. Thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        for sub in ("prearchive", "archive", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for leftover in (self.root / "tmp").iterdir():  # bodies of requests cut by a crash
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "index.sqlite", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # Sessions that were mid-archive when the process died are put back to READY.
        self._db.execute("UPDATE prearc SET status='READY' WHERE status='ARCHIVING'")
        self._file_locks: set[tuple[int, str]] = set()
        self._writers: dict[int, int] = {}
        self._archiving: set[int] = set()
        self._dest_in_use: set[tuple[str, str]] = set()
        self._last_ts = ""

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers ---------------------------------------------------------------------------
    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _x(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _next_id(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
            value = (row["value"] if row else 0) + 1
            self._db.execute("INSERT OR REPLACE INTO counters VALUES (?, ?)", (name, value))
            return int(value)

    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    # -- prearchive ------------------------------------------------------------------------
    @staticmethod
    def _prearc(row: sqlite3.Row) -> PrearcSession:
        return PrearcSession(
            id=row["id"],
            project=row["project"],
            timestamp=row["timestamp"],
            folder=row["folder"],
            tag=row["tag"],
            name=row["name"],
            subject=row["subject"],
            status=row["status"],
            uploaded=row["uploaded"],
            lastmod=row["lastmod"],
            scan_date=row["scan_date"],
            prevent_auto_commit=bool(row["prevent_auto_commit"]),
            autoarchive=row["autoarchive"],
        )

    def prearc_dir(self, s: PrearcSession) -> Path:
        return self.root / "prearchive" / s.project / s.timestamp / s.folder

    def _new_timestamp(self, project: str) -> str:
        # yyyyMMdd_HHmmssSSS, unique per server (XNAT's PrearcUtils.makeTimestamp).
        while True:
            ts = dt.datetime.now().strftime("%Y%m%d_%H%M%S%f")[:-3]
            if ts != self._last_ts:
                self._last_ts = ts
                return ts
            time.sleep(0.001)

    def session_for_file(
        self,
        *,
        project: str,
        tag: str,
        name: str,
        subject: str,
        scan_date: str | None,
        prevent_auto_commit: bool,
        autoarchive: str | None,
        writer_of: set[int],
    ) -> PrearcSession:
        """Find or create the prearchive session (project, StudyInstanceUID, label) for a file.

        The calling request becomes a *writer* of the session (``writer_of`` collects the ids; the
        request calls ``release_writers`` at its end). A session being archived refuses files
        with XNAT's "Concurrent modification is discouraged" conflict (wrapped as 400).
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM prearc WHERE project=? AND tag=? AND name=? ORDER BY id DESC",
                (project, tag, name),
            ).fetchone()
            now = time.time()
            if row is not None and (row["status"] == "ARCHIVING" or row["id"] in self._archiving):
                raise HttpError(400, MSG_IN_PROGRESS)
            if row is None or row["status"] not in RECEIVABLE:
                ts = self._new_timestamp(project)
                db.execute(
                    "INSERT INTO prearc (project, timestamp, folder, tag, name, subject, status,"
                    " uploaded, lastmod, scan_date, prevent_auto_commit, autoarchive)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        project,
                        ts,
                        name,
                        tag,
                        name,
                        subject,
                        "RECEIVING",
                        _now_text(),
                        now,
                        scan_date,
                        int(prevent_auto_commit),
                        autoarchive,
                    ),
                )
                row = db.execute(
                    "SELECT * FROM prearc WHERE project=? AND timestamp=? AND folder=?",
                    (project, ts, name),
                ).fetchone()
            elif row["id"] not in writer_of:
                db.execute(
                    "UPDATE prearc SET status='RECEIVING', lastmod=?,"
                    " prevent_auto_commit=MAX(prevent_auto_commit, ?) WHERE id=?",
                    (now, int(prevent_auto_commit), row["id"]),
                )
                row = db.execute("SELECT * FROM prearc WHERE id=?", (row["id"],)).fetchone()
            if row["id"] not in writer_of:
                writer_of.add(row["id"])
                self._writers[row["id"]] = self._writers.get(row["id"], 0) + 1
            return self._prearc(row)

    def release_writers(self, ids: set[int]) -> None:
        with self._lock:
            now = time.time()
            for sid in ids:
                left = self._writers.get(sid, 0) - 1
                if left > 0:
                    self._writers[sid] = left
                else:
                    self._writers.pop(sid, None)
                self._db.execute("UPDATE prearc SET lastmod=? WHERE id=?", (now, sid))

    @contextmanager
    def file_lock(self, session_id: int, key: str) -> Iterator[None]:
        """XNAT's PrearcFileLock: a second concurrent write of the same file fails with 400."""
        with self._lock:
            if (session_id, key) in self._file_locks:
                raise HttpError(400, MSG_CONCURRENT_FILE)
            self._file_locks.add((session_id, key))
        try:
            yield
        finally:
            with self._lock:
                self._file_locks.discard((session_id, key))

    def prearc_file_owner(self, session_id: int, scan: str, name: str) -> str | None:
        rows = self._q(
            "SELECT sop_uid FROM prearc_files WHERE session_id=? AND scan=? AND name=?",
            (session_id, scan, name),
        )
        return rows[0]["sop_uid"] if rows else None

    def record_prearc_file(self, session_id: int, scan: str, name: str, **meta: Any) -> None:
        self._x(
            "INSERT OR REPLACE INTO prearc_files (session_id, scan, name, sop_uid, sop_class,"
            " series_uid, series_number, series_description, modality, study_date, size, md5)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                session_id,
                scan,
                name,
                meta.get("sop_uid"),
                meta.get("sop_class"),
                meta.get("series_uid"),
                meta.get("series_number"),
                meta.get("series_description"),
                meta.get("modality"),
                meta.get("study_date"),
                meta["size"],
                meta["md5"],
            ),
        )

    def get_prearc(self, project: str, timestamp: str, folder: str) -> PrearcSession | None:
        rows = self._q(
            "SELECT * FROM prearc WHERE project=? AND timestamp=? AND folder=?",
            (project, timestamp, folder),
        )
        return self._prearc(rows[0]) if rows else None

    def get_prearc_by_id(self, sid: int) -> PrearcSession | None:
        rows = self._q("SELECT * FROM prearc WHERE id=?", (sid,))
        return self._prearc(rows[0]) if rows else None

    def list_prearc(self, project: str | None = None) -> list[PrearcSession]:
        if project is None:
            rows = self._q("SELECT * FROM prearc ORDER BY id")
        else:
            rows = self._q("SELECT * FROM prearc WHERE project=? ORDER BY id", (project,))
        return [self._prearc(r) for r in rows]

    def prearc_files(self, sid: int) -> list[sqlite3.Row]:
        return self._q("SELECT * FROM prearc_files WHERE session_id=? ORDER BY scan, name", (sid,))

    def is_busy(self, sid: int) -> bool:
        with self._lock:
            return sid in self._archiving or self._writers.get(sid, 0) > 0

    def build(self, s: PrearcSession) -> PrearcSession:
        """RECEIVING → BUILDING → READY (the session XML is "built"; here: status only)."""
        self._x(
            "UPDATE prearc SET status='READY', lastmod=? WHERE id=? AND status != 'ARCHIVING'",
            (time.time(), s.id),
        )
        return self.get_prearc_by_id(s.id) or s

    def delete_prearc(self, s: PrearcSession) -> None:
        with self._lock:
            if s.id in self._archiving or self._writers.get(s.id):
                raise HttpError(403, MSG_OPERATION)
            self._db.execute("DELETE FROM prearc_files WHERE session_id=?", (s.id,))
            self._db.execute("DELETE FROM prearc WHERE id=?", (s.id,))
        self._remove_prearc_dir(s)

    def _remove_prearc_dir(self, s: PrearcSession) -> None:
        folder = self.prearc_dir(s)
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # the timestamp folder, when it is empty

    def move_prearc(self, s: PrearcSession, new_project: str) -> PrearcSession:
        with self._lock:
            if s.id in self._archiving or self._writers.get(s.id):
                raise HttpError(409, "session document locked")
            src = self.prearc_dir(s)
            self._db.execute("UPDATE prearc SET project=? WHERE id=?", (new_project, s.id))
            moved = self.get_prearc_by_id(s.id)
            assert moved is not None
            dst = self.prearc_dir(moved)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                os.replace(src, dst)
            return moved

    # -- archive ---------------------------------------------------------------------------
    @staticmethod
    def _experiment(row: sqlite3.Row) -> Experiment:
        return Experiment(
            id=row["id"],
            project=row["project"],
            subject_id=row["subject_id"],
            subject_label=row["subject_label"],
            label=row["label"],
            uid=row["uid"],
            modality=row["modality"],
            xsi_type=row["xsi_type"],
            date=row["date"],
            direct=bool(row["direct"]),
            inserted=row["inserted"],
        )

    _EXP_SELECT = (
        "SELECT e.*, s.label AS subject_label FROM experiments e JOIN subjects s"
        " ON s.id = e.subject_id"
    )

    def experiment(self, project: str, label_or_id: str) -> Experiment | None:
        rows = self._q(
            self._EXP_SELECT + " WHERE e.project=? AND (e.label=? OR e.id=?)",
            (project, label_or_id, label_or_id),
        )
        return self._experiment(rows[0]) if rows else None

    def experiment_by_id(self, eid: str) -> Experiment | None:
        rows = self._q(self._EXP_SELECT + " WHERE e.id=?", (eid,))
        return self._experiment(rows[0]) if rows else None

    def experiments(
        self, project: str | None = None, subject: str | None = None
    ) -> list[Experiment]:
        sql, args = self._EXP_SELECT + " WHERE 1=1", []
        if project is not None:
            sql += " AND e.project=?"
            args.append(project)
        if subject is not None:
            sql += " AND (s.label=? OR s.id=?)"
            args += [subject, subject]
        return [self._experiment(r) for r in self._q(sql + " ORDER BY e.id", tuple(args))]

    def subject(self, project: str, label_or_id: str) -> sqlite3.Row | None:
        rows = self._q(
            "SELECT * FROM subjects WHERE project=? AND (label=? OR id=?)",
            (project, label_or_id, label_or_id),
        )
        return rows[0] if rows else None

    def subjects(self, project: str) -> list[sqlite3.Row]:
        return self._q("SELECT * FROM subjects WHERE project=? ORDER BY id", (project,))

    def projects(self) -> list[str]:
        rows = self._q(
            "SELECT project FROM subjects UNION SELECT project FROM prearc"
            " WHERE project != ? ORDER BY 1",
            (UNASSIGNED,),
        )
        return [r[0] for r in rows]

    def put_subject(self, project: str, label: str) -> tuple[str, bool]:
        """Create the subject if missing; returns (subject ID, created)."""
        with self._lock:
            row = self.subject(project, label)
            if row is not None:
                return row["id"], False
            sid = f"{SITE_ID}_S{self._next_id('subject'):05d}"
            self._db.execute("INSERT INTO subjects VALUES (?,?,?)", (sid, project, label))
            return sid, True

    def experiment_dir(self, e: Experiment) -> Path:
        return self.root / "archive" / e.project / "arc001" / e.label

    def create_experiment(
        self,
        *,
        project: str,
        subject: str,
        label: str,
        uid: str | None,
        modality: str | None,
        date: str | None,
        direct: bool = False,
    ) -> Experiment:
        with self._lock:
            subject_id, _ = self.put_subject(project, subject)
            eid = f"{SITE_ID}_E{self._next_id('experiment'):05d}"
            self._db.execute(
                "INSERT INTO experiments (id, project, subject_id, label, uid, modality, xsi_type,"
                " date, direct, lastmod, inserted) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    eid,
                    project,
                    subject_id,
                    label,
                    uid,
                    modality,
                    xsi_types(modality)[0],
                    date,
                    int(direct),
                    time.time(),
                    _now_text(),
                ),
            )
            e = self.experiment_by_id(eid)
            assert e is not None
            return e

    def delete_experiment(self, e: Experiment) -> None:
        """Remove a session, its index rows and its archive folder."""
        with self._lock:
            if (e.project, e.label) in self._dest_in_use:
                raise HttpError(409, MSG_IN_PROGRESS)
            for table in ("files", "scans", "resources"):
                self._db.execute(f"DELETE FROM {table} WHERE experiment_id=?", (e.id,))
            self._db.execute("DELETE FROM experiments WHERE id=?", (e.id,))
        shutil.rmtree(self.experiment_dir(e), ignore_errors=True)

    def direct_archive_target(
        self,
        *,
        project: str,
        tag: str,
        label: str,
        subject: str,
        modality: str | None,
        date: str | None,
    ) -> Experiment | None:
        """The experiment a Direct-Archive upload writes into, or None to fall back.

        XNAT falls back to the prearchive when the archive folder of the session already exists
        (or the session was pre-created) unless it is its own ongoing direct-archive session.
        """
        with self._lock:
            e = self.experiment(project, label)
            if e is None:
                if (self.root / "archive" / project / "arc001" / label).exists():
                    return None
                return self.create_experiment(
                    project=project,
                    subject=subject,
                    label=label,
                    uid=tag,
                    modality=modality,
                    date=date,
                    direct=True,
                )
            if e.direct and e.uid == tag:
                self._x("UPDATE experiments SET lastmod=? WHERE id=?", (time.time(), e.id))
                return e
            return None

    def upsert_scan(self, e: Experiment, scan_id: str, **meta: Any) -> None:
        _, scan_xsi = xsi_types(meta.get("modality") or e.modality)
        self._x(
            "INSERT OR IGNORE INTO scans VALUES (?,?,?,?,?,?,?)",
            (
                e.id,
                scan_id,
                meta.get("type") or meta.get("series_description") or "",
                meta.get("series_description") or "",
                meta.get("modality") or e.modality,
                meta.get("uid"),
                scan_xsi,
            ),
        )

    def record_file(
        self,
        e: Experiment,
        *,
        scan_id: str,
        resource: str,
        path: str,
        size: int,
        md5: str,
        sop_uid: str | None = None,
        series_number: str | None = None,
        fmt: str | None = None,
        content: str | None = None,
        tags: str | None = None,
    ) -> None:
        self.create_resource(
            e, scan_id, resource, fmt if resource != "DICOM" else "DICOM", content, None
        )
        self._x(
            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (e.id, scan_id, resource, path, size, md5, sop_uid, series_number, fmt, content, tags),
        )

    def create_resource(
        self,
        e: Experiment,
        scan_id: str,
        label: str,
        fmt: str | None = None,
        content: str | None = None,
        tags: str | None = None,
    ) -> None:
        """An (empty) resource record; files recorded later belong to it."""
        self._x(
            "INSERT OR IGNORE INTO resources VALUES (?,?,?,?,?,?)",
            (e.id, scan_id, label, fmt, content, tags),
        )

    def resource_labels(self, e: Experiment, scan_id: str) -> list[sqlite3.Row]:
        # Files recorded by an index older than the resources table count too.
        return self._q(
            "SELECT label, format, content, tags FROM resources WHERE experiment_id=?"
            " AND scan_id=? UNION SELECT DISTINCT resource, format, content, NULL FROM files"
            " WHERE experiment_id=? AND scan_id=? AND resource NOT IN"
            " (SELECT label FROM resources WHERE experiment_id=? AND scan_id=?)",
            (e.id, scan_id) * 3,
        )

    def resource_dir(self, e: Experiment, scan_id: str, resource: str) -> Path:
        base = self.experiment_dir(e)
        if scan_id:
            return base / "SCANS" / scan_id / resource
        return base / "RESOURCES" / resource

    def scans(self, e: Experiment) -> list[sqlite3.Row]:
        return self._q(
            "SELECT * FROM scans WHERE experiment_id=? ORDER BY CAST(scan_id AS INTEGER), scan_id",
            (e.id,),
        )

    def files(
        self, e: Experiment, scan_id: str | None = None, resource: str | None = None
    ) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM files WHERE experiment_id=?", [e.id]
        if scan_id is not None:
            sql += " AND scan_id=?"
            args.append(scan_id)
        if resource is not None:
            sql += " AND resource=?"
            args.append(resource)
        return self._q(sql + " ORDER BY scan_id, resource, path", tuple(args))

    def delete_file(self, e: Experiment, scan_id: str, resource: str, path: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM files WHERE experiment_id=? AND scan_id=? AND resource=? AND path=?",
                (e.id, scan_id, resource, path),
            )
            return cur.rowcount > 0

    def archive(
        self,
        s: PrearcSession,
        *,
        project: str | None = None,
        subject: str | None = None,
        label: str | None = None,
        overwrite: str | None = None,
        wrapped: bool,
        delay: Callable[[], None] = lambda: None,
    ) -> Experiment:
        """Move a prearchive session into the archive, with XNAT's race behaviour.

        ``wrapped``: the import service wraps archiver failures as 400 (facts §1);
        ``/data/services/archive`` answers 403/409/423 directly (facts §3).
        ``overwrite``: None = no merge; ``delete``/``override`` replace clashing files; any other
        value (``append``, ``none``, …) merges but refuses to change an existing file.
        """

        def fail(status: int, message: str) -> HttpError:
            return HttpError(400 if wrapped else status, message)

        project = project or s.project
        if project == UNASSIGNED:
            raise HttpError(400, "Cannot archive a session that is not assigned to a project.")
        with self._lock:
            current = self.get_prearc_by_id(s.id)
            if current is None:
                # Archived (and removed) by a concurrent request meanwhile.
                if overwrite is None:
                    raise fail(409, MSG_EXISTS)
                done = self.experiment(project, label or s.name)
                if done is None:
                    raise HttpError(404, "Unable to find the specified prearchive session.")
                return done
            if s.id in self._archiving or current.status == "ARCHIVING":
                raise fail(403, MSG_DUPLICATE if wrapped else MSG_OPERATION)
            if self._writers.get(s.id, 0) > 0:
                # Another request is still adding files to this session.
                raise fail(409, MSG_UNABLE_TO_LOCK if wrapped else MSG_IN_PROGRESS)
            label = label or current.name
            subject = subject or current.subject or label
            dest = (project, label)
            if dest in self._dest_in_use:
                raise fail(423, MSG_IN_USE)
            existing = self.experiment(project, label)
            if existing is not None and not existing.direct and overwrite is None:
                # XNAT marks the prearchive entry CONFLICT; it still accepts files and retries.
                self._db.execute("UPDATE prearc SET status='CONFLICT' WHERE id=?", (s.id,))
                raise fail(409, MSG_EXISTS)
            self._archiving.add(s.id)
            self._dest_in_use.add(dest)
            self._db.execute("UPDATE prearc SET status='ARCHIVING' WHERE id=?", (s.id,))
        try:
            delay()
            return self._move_to_archive(current, project, subject, label, overwrite, wrapped)
        except BaseException:
            self._x("UPDATE prearc SET status='READY' WHERE id=?", (s.id,))
            raise
        finally:
            with self._lock:
                self._archiving.discard(s.id)
                self._dest_in_use.discard(dest)

    def _move_to_archive(
        self,
        s: PrearcSession,
        project: str,
        subject: str,
        label: str,
        overwrite: str | None,
        wrapped: bool,
    ) -> Experiment:
        rows = self.prearc_files(s.id)
        first = rows[0] if rows else None
        e = self.experiment(project, label)
        if e is not None and overwrite not in ("delete", "override"):
            # Merging without permission to replace: an existing file must not change.
            for r in rows:
                clash = self._q(
                    "SELECT md5 FROM files WHERE experiment_id=? AND scan_id=? AND"
                    " resource='DICOM' AND path=?",
                    (e.id, r["scan"], r["name"]),
                )
                if clash and clash[0]["md5"] != r["md5"]:
                    raise HttpError(
                        400 if wrapped else 409,
                        f"Unable to merge: file {r['name']} of scan {r['scan']} already exists"
                        " with different content; retry with overwrite=delete",
                    )
        if e is None:
            e = self.create_experiment(
                project=project,
                subject=subject,
                label=label,
                uid=s.tag,
                modality=first["modality"] if first else None,
                date=s.scan_date,
            )
        src_root = self.prearc_dir(s)
        for r in rows:
            dst_dir = self.resource_dir(e, r["scan"], "DICOM")
            dst_dir.mkdir(parents=True, exist_ok=True)
            src = src_root / "SCANS" / r["scan"] / "DICOM" / r["name"]
            if src.exists():
                os.replace(src, dst_dir / r["name"])
            self.upsert_scan(
                e,
                r["scan"],
                series_description=r["series_description"],
                modality=r["modality"],
                uid=r["series_uid"],
            )
            self.record_file(
                e,
                scan_id=r["scan"],
                resource="DICOM",
                path=r["name"],
                size=r["size"],
                md5=r["md5"],
                sop_uid=r["sop_uid"],
                series_number=r["series_number"],
                fmt="DICOM",
                content="RAW",
            )
        with self._lock:
            self._db.execute("DELETE FROM prearc_files WHERE session_id=?", (s.id,))
            self._db.execute("DELETE FROM prearc WHERE id=?", (s.id,))
        self._remove_prearc_dir(s)
        return e

    # -- background ------------------------------------------------------------------------
    def idle_receiving(self, idle_seconds: float) -> list[PrearcSession]:
        cutoff = time.time() - idle_seconds
        rows = self._q(
            "SELECT * FROM prearc WHERE status='RECEIVING' AND prevent_auto_commit=0"
            " AND lastmod < ?",
            (cutoff,),
        )
        return [self._prearc(r) for r in rows if not self.is_busy(r["id"])]

    def finish_direct_sessions(self, idle_seconds: float) -> None:
        self._x(
            "UPDATE experiments SET direct=0 WHERE direct=1 AND lastmod < ?",
            (time.time() - idle_seconds,),
        )
