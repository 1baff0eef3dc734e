"""The sandbox's prearchive and archiver, with XNAT's concurrency rules, on top of the catalog.

On disk, under the data dir::

    prearchive/{project}/{yyyyMMdd_HHmmssSSS}/{folder}/SCANS/{scan}/DICOM/{file}

The in-memory locks reproduce XNAT's concurrency behaviour (section 1 of the facts file):
per-file locks inside a prearchive session, "writers" of a session (requests that are adding
files to it), sessions being archived, and archive destinations in use. Contention on them is
*reported as XNAT reports it*, never waited out, so clients can be tested against it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xnatio.sandbox.catalog import (
    MSG_IN_PROGRESS,
    SITE_ID,
    UNASSIGNED,
    Catalog,
    Experiment,
    FileRecord,
    check_label,
    now_text,
    xsi_types,
)
from xnatio.sandbox.pages import HttpError

__all__ = [
    "SITE_ID",
    "UNASSIGNED",
    "Experiment",
    "FileRecord",
    "PrearcSession",
    "Store",
    "xsi_types",
]

# Prearchive statuses (PrearcUtils.PrearcStatus) that still accept files.
RECEIVABLE = {"RECEIVING", "READY", "RECEIVING_INTERRUPT", "ERROR", "CONFLICT"}

# The race messages of XNAT's archiver (PrearcSessionArchiver / PrearcDatabase); see facts §1.
MSG_DUPLICATE = "Duplicate archive attempt. Prearchive session already archiving."
MSG_UNABLE_TO_LOCK = "Unable to lock session for archiving."
MSG_IN_USE = "Unable to archive: the destination session is locked. Destination session in use."
MSG_EXISTS = "Session already exists, retry with overwrite enabled"
MSG_OPERATION = "Operation already in progress on this prearchive entry."
MSG_CONCURRENT_FILE = "Concurrent file sends of the same data is not supported."


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


class Store(Catalog):
    """Prearchive + archiver on the catalog, with XNAT's concurrency rules. Thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        # Sessions that were mid-archive when the process died are put back to READY.
        self._x("UPDATE prearc SET status='READY' WHERE status='ARCHIVING'")
        self._file_locks: set[tuple[int, str]] = set()
        self._writers: dict[int, int] = {}
        self._archiving: set[int] = set()
        self._last_ts = ""

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
        check_label(project, "project")
        check_label(name, "session")
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
                        now_text(),
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
        check_label(new_project, "project")
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
