"""The archive side of the sandbox's index: projects, subjects, experiments, scans, resources
and files, in SQLite (``index.sqlite``, WAL) with the files on disk as XNAT lays them out::

    archive/{project}/arc001/{label}/SCANS/{scan}/DICOM/{file}          (scan DICOM resource)
    archive/{project}/arc001/{label}/SCANS/{scan}/{resource}/{path}     (other scan resources)
    archive/{project}/arc001/{label}/RESOURCES/{resource}/{path}        (session resources)
    tmp/                                                                (request bodies, spooled)

One connection is shared behind a lock, so concurrent uploads serialize their short index updates
and cannot corrupt it; files are written outside the lock. ``store.Store`` adds the prearchive
and archiving on top.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xnatio.sandbox.access import Access
from xnatio.sandbox.pages import HttpError

_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


def check_label(value: str, kind: str) -> str:
    """XNAT IDs and labels are letters, digits, ``_`` and ``-`` (we also let ``.`` and ``+``
    through); anything else, or ``.``/``..``, is refused before it can become a path."""
    if not _LABEL.match(value) or value in {".", ".."}:
        raise HttpError(400, f"Invalid {kind} label: {value!r}")
    return value


SITE_ID = "XNAT"
UNASSIGNED = "Unassigned"
MSG_IN_PROGRESS = (
    "Session processing may already be in progress for this session. "
    "Concurrent modification is discouraged."
)

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


def now_text() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


class DataFolderInUse(ValueError):
    """The data folder's catalog is held by another sandbox server (a ValueError: the CLI
    turns it into one line)."""


class Catalog:
    """The SQLite index and the archive on disk. Thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        for sub in ("prearchive", "archive", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.tmp_path = str(self.root / "tmp")  # tmp_dir() as a string, for per-file names
        self._lock = threading.RLock()
        # (The timeout only matters for another process: this one's threads share one
        # connection under the lock. A second server waits that long for the first to stop.)
        self._db = sqlite3.connect(
            self.root / "index.sqlite", check_same_thread=False, isolation_level=None, timeout=2
        )
        self._db.row_factory = sqlite3.Row
        try:
            # One connection, one process: the database is held exclusively from its first
            # access, so a transaction is not a dozen fcntl calls on the file and its
            # shared-memory index (12 per imported file, strace; with WAL the index is then
            # kept in this process's memory).
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" not in str(exc):
                raise
            # Another server holds the folder: say so, and leave its files alone.
            raise DataFolderInUse(
                f"the sandbox data folder {self.root} is in use by another sandbox server:"
                " stop that one, or give this one another --data-dir"
            ) from None
        for leftover in (self.root / "tmp").iterdir():  # bodies of requests cut by a crash
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
        # Projects, users and roles share the index (and its lock): they survive a restart.
        self.access = Access(self._db, self._lock)
        # Archive destinations being written by an archiver (see store.Store.archive).
        self._dest_in_use: set[tuple[str, str]] = set()

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

    # -- archive catalog------------------------------------------------------------------------
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
        check_label(project, "project")
        check_label(label, "subject")
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
        check_label(label, "session")
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
                    now_text(),
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
        check_label(project, "project")
        check_label(label, "session")
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

    def record_files(
        self,
        e: Experiment,
        resource: str,
        files: list[tuple[str, str, int, str, str | None, str | None]],
        *,
        fmt: str | None = None,
        content: str | None = None,
    ) -> None:
        """``record_file`` for many files of ``resource`` whose resource rows exist already:
        (scan ID, path, size, md5, SOP Instance UID, series number) each, in one statement."""
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (e.id, scan, resource, path, size, md5, sop, series, fmt, content, None)
                    for scan, path, size, md5, sop, series in files
                ],
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

    def resource_ids(self, e: Experiment, scan_id: str | None = None) -> dict[tuple[str, str], int]:
        """{(scan ID, label): numeric resource ID} (XNAT's xnat_abstractresource_id; here the
        row's SQLite rowid, stable for the life of the index)."""
        sql, args = "SELECT rowid, scan_id, label FROM resources WHERE experiment_id=?", [e.id]
        if scan_id is not None:
            sql += " AND scan_id=?"
            args.append(scan_id)
        return {(r["scan_id"], r["label"]): int(r["rowid"]) for r in self._q(sql, tuple(args))}

    def resource_label(self, e: Experiment, scan_id: str, label_or_id: str) -> str:
        """The label of a resource named by label or numeric ID (``…/resources/{label|id}``);
        the argument itself when no resource has that numeric ID."""
        if label_or_id.isdigit():
            for (scan, label), rid in self.resource_ids(e, scan_id).items():
                if rid == int(label_or_id) and scan == scan_id:
                    return label
        return label_or_id

    def delete_scan(self, e: Experiment, scan_id: str) -> bool:
        """Remove a scan, its resources' index rows and its folder."""
        with self._lock:
            if (e.project, e.label) in self._dest_in_use:
                raise HttpError(409, MSG_IN_PROGRESS)
            cur = self._db.execute(
                "DELETE FROM scans WHERE experiment_id=? AND scan_id=?", (e.id, scan_id)
            )
            for table in ("files", "resources"):
                self._db.execute(
                    f"DELETE FROM {table} WHERE experiment_id=? AND scan_id=?", (e.id, scan_id)
                )
        if scan_id:
            shutil.rmtree(self.experiment_dir(e) / "SCANS" / scan_id, ignore_errors=True)
        return cur.rowcount > 0

    def resource_dir(self, e: Experiment, scan_id: str, resource: str) -> Path:
        check_label(resource, "resource")
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

    def archived_file_owner(self, e: Experiment, scan_id: str, name: str) -> str | None:
        """SOP Instance UID of the DICOM file already stored under ``name`` in a scan."""
        rows = self._q(
            "SELECT sop_uid FROM files WHERE experiment_id=? AND scan_id=? AND"
            " resource='DICOM' AND path=?",
            (e.id, scan_id, name),
        )
        return rows[0]["sop_uid"] if rows else None

    def delete_file(self, e: Experiment, scan_id: str, resource: str, path: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM files WHERE experiment_id=? AND scan_id=? AND resource=? AND path=?",
                (e.id, scan_id, resource, path),
            )
            return cur.rowcount > 0

    def finish_direct_sessions(self, idle_seconds: float) -> None:
        self._x(
            "UPDATE experiments SET direct=0 WHERE direct=1 AND lastmod < ?",
            (time.time() - idle_seconds,),
        )
