"""The resume journal and the per-target run lock: an interrupted upload picks up where it stopped.

Where: ``--journal PATH`` > ``$XNATIO_JOURNAL`` > ``$XDG_STATE_HOME/xnatio/journal.sqlite`` >
``~/.local/state/xnatio/journal.sqlite``.

What it remembers, per upload *target* (server URL without credentials, project, subject,
session, transport) and *source root* (the PATH given, resolved): every file the server has
confirmed, identified by its fingerprint (path relative to the root, size, mtime in ns, SOP
Instance UID), plus whether the session was committed and under which URI. Only confirmations are
stored; a file is *pending* when no confirmed row has its exact fingerprint, so a file that changed
since it was sent (size, mtime or inode change time differ) is pending again and is sent again.

Files confirmed by an earlier run are reported as ``UPLOADED`` with the reason
``"sent by an earlier run (journal)"`` (and become ``VERIFIED`` when read-back finds them): they
are on the server, so counting them as skipped would make a resumed run look incomplete.

Durability: WAL mode (rollback mode on a network file system: :mod:`xnatio.fsinfo`), one short
transaction per confirmed batch, written as each batch is confirmed (not at the end), so ``kill
-9`` loses at most the batches in flight, and those are simply sent again (XNAT merges a re-sent
instance into the same file; ``overwrite=append``). ``synchronous=NORMAL`` survives a killed
process; a power cut can lose the last confirmations, which again only means re-sending.

A journal that stops taking writes mid-run (its disk fills, it turns read-only, its file system
errs) degrades instead of failing the upload: one warning line, later writes are dropped, and the
upload goes on. Nothing is lost by that: the journal only ever saves work, the server's read-back
decides what landed, and the next run asks the server what it holds before sending anything.

Housekeeping: uploads that were verified and not touched for 90 days are dropped when the journal
is opened. A journal that cannot be opened (unwritable folder, not a database) is a one-line
configuration error (exit 2), never a traceback.

The lock: ``fcntl.flock`` on ``<state dir>/xnatio/locks/<hash>.lock``, one folder per user
whatever ``--journal`` says (``$XNATIO_LOCK_DIR`` moves it), keyed on what names the session on
the server (:meth:`Target.lock_key`): the canonical server (scheme, host resolved, so
``localhost``/``127.0.0.1``/``::1`` are one; the port, default ports filled in; the context path),
project, subject and session, the labels case-folded (XNAT matches subject labels
case-insensitively, facts 3.5). Two runs of one session therefore exclude each other whatever URL
spelling or journal file they use. The kernel drops the lock when the holder dies (even by
``kill -9``), so a stale lock cannot block the next cron run.

A file whose copy on the server was found to differ from it (the server stores our bytes, and this
one differs: changed in place, or damaged there) is remembered in ``replace``: the next run sends
it again replacing the server's copy (``overwrite=delete``, facts 1.5) instead of finding it "on
the server" by name and never sending it. It is forgotten once a read-back verifies the session.
Likewise ``lost`` counts the runs in which a file was not found on the server after sending: the
second such run says that sending again will not help (the server drops it) instead of "the next
run sends it again" once more.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import ipaddress
import itertools
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from xnatio.config_file import user_home
from xnatio.errors import ConfigError, UsageError
from xnatio.fsinfo import filesystem_type, is_network_filesystem, under_scheduler
from xnatio.models import (
    DicomFile,
    FileOutcome,
    FileTable,
    Manifest,
    Origin,
    Outcome,
    SopIndex,
    file_path,
    table_row,
)
from xnatio.redact import printable

log = logging.getLogger(__name__)

JOURNAL_ENV = "XNATIO_JOURNAL"
KEEP_DAYS = 90.0  # verified uploads are forgotten after this long without a new run
EARLIER_RUN_REASON = "sent by an earlier run (journal)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    root TEXT NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    committed INTEGER NOT NULL DEFAULT 0,
    session_uri TEXT NOT NULL DEFAULT '',
    verified INTEGER NOT NULL DEFAULT 0,
    UNIQUE (target, root)
);
CREATE TABLE IF NOT EXISTS files (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    relpath TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL DEFAULT 0,
    sop_uid TEXT NOT NULL,
    batch INTEGER,
    confirmed_at REAL NOT NULL,
    PRIMARY KEY (run_id, relpath)
);
CREATE INDEX IF NOT EXISTS files_by_instance ON files (run_id, sop_uid);
CREATE TABLE IF NOT EXISTS replace (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    sop_uid TEXT NOT NULL,
    PRIMARY KEY (run_id, sop_uid)
);
CREATE TABLE IF NOT EXISTS lost (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    sop_uid TEXT NOT NULL,
    runs INTEGER NOT NULL,
    PRIMARY KEY (run_id, sop_uid)
);
"""
LOCK_DIR_ENV = "XNATIO_LOCK_DIR"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class LockedError(UsageError):
    """Another run holds the lock of the same target (exit code 2)."""


def default_journal_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(JOURNAL_ENV):
        return Path(env[JOURNAL_ENV]).expanduser()
    state = env.get("XDG_STATE_HOME")
    if not state:
        home = user_home(env)
        if home is None:
            raise ConfigError(
                f"no folder for the resume journal: HOME is not set and user {os.getuid()} has "
                f"no home directory; pass --journal FILE, or set {JOURNAL_ENV} or XDG_STATE_HOME"
            )
        state = str(home / ".local/state")
    return Path(state) / "xnatio" / "journal.sqlite"


def default_lock_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XNATIO_LOCK_DIR``, else ``locks`` in the per-user state folder (not next to the
    journal: two runs with different ``--journal`` files must still see each other's lock)."""
    env = os.environ if environ is None else environ
    if env.get(LOCK_DIR_ENV):
        return Path(env[LOCK_DIR_ENV]).expanduser()
    state = env.get("XDG_STATE_HOME")
    if not state:
        home = user_home(env)
        if home is None:  # no HOME and no passwd entry for this user
            raise ConfigError(
                f"no folder for the run locks: HOME is not set and user {os.getuid()} has no "
                f"home directory; set {LOCK_DIR_ENV}, XDG_STATE_HOME or HOME"
            )
        state = str(home / ".local/state")
    return Path(state) / "xnatio" / "locks"


def canonical_host(host: str) -> str:
    """One name per machine: loopback names and addresses -> ``loopback``; a name -> the lowest
    address it resolves to (so a DNS name and its address are one host); else the name."""
    host = host.strip("[]").lower().rstrip(".")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return "loopback"
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return "loopback"
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return host  # not resolvable now: the name itself is the best key there is
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        return host
    if all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        return "loopback"
    return addresses[0]


def canonical_server(url: str) -> str:
    """``https://user:pw@XNAT.example.org/xnat/`` -> ``https://<address>:443/xnat``: the server
    a URL reaches, whatever its spelling (see :func:`canonical_host`); never holds a secret."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        port = 0
    path = "/".join(p for p in parts.path.split("/") if p)
    return f"{scheme}://{canonical_host(parts.hostname or '')}:{port}/{path}".rstrip("/")


def strip_credentials(url: str) -> str:
    """``https://user:pw@Host:443/xnat/?q`` -> ``https://host:443/xnat``: a key, never a secret."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address keeps its brackets, or the port would merge into it
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True, slots=True)
class Target:
    """Where an upload goes. ``server`` never holds credentials (see :func:`strip_credentials`)."""

    server: str
    project: str
    subject: str
    session: str
    transport: str = "rest"

    @classmethod
    def rest(cls, server: str, project: str, subject: str, session: str) -> Target:
        return cls(strip_credentials(server), project, subject, session, "rest")

    @classmethod
    def dicom(
        cls, host: str, port: int, called_aet: str, project: str, subject: str, session: str
    ) -> Target:
        return cls(
            f"dicom://{host.lower()}:{port}/{called_aet}", project, subject, session, "dicom"
        )

    def key(self) -> str:
        return json.dumps(
            [self.server, self.project, self.subject, self.session, self.transport],
            separators=(",", ":"),
        )

    def digest(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()[:24]

    def describe(self) -> str:
        return f"{self.project}/{self.subject}/{self.session} on {self.server}"

    def lock_key(self) -> str:
        """What names this session on the server, for the run lock: the canonical server (REST:
        :func:`canonical_server`; C-STORE: the receiver's canonical host, port and called AE
        title) and the labels, case-folded (XNAT matches subject labels case-insensitively,
        facts 3.5; over-locking two spellings is harmless, uploading one session twice at once
        is not)."""
        if self.transport == "rest":
            server = canonical_server(self.server)
        else:
            parts = urlsplit(self.server)
            server = f"dicom://{canonical_host(parts.hostname or '')}:{parts.port}{parts.path}"
        labels = [x.casefold() for x in (self.project, self.subject, self.session)]
        return json.dumps([server, *labels], separators=(",", ":"))


def _as_table(files: Sequence[DicomFile]) -> FileTable:
    return files if isinstance(files, FileTable) else FileTable(files)


def relative_name(f: DicomFile, root: Path) -> str:
    """The file's stable name under the source root (the member name inside an archive).

    A name holding bytes that are not UTF-8 is kept with those bytes as ``\\xNN`` escapes
    (:func:`xnatio.redact.printable`): SQLite and the fingerprint take UTF-8 text only.
    """
    return _relative_name(f.fspath, f.member, str(root))


def _relative_name(fspath: str, member: str | None, root: str) -> str:
    """:func:`relative_name` of the file these fields name (no record needed)."""
    if member is not None:
        return printable(member)
    # The folder's part is worked out once per folder (Path.relative_to per file was most of
    # the journal's CPU at 100,000 files), then joined with the file's name.
    folder, name = os.path.split(fspath)
    prefix = _relative_folder(folder, root)
    return printable(prefix + name if prefix is not None else Path(fspath).as_posix())


@functools.lru_cache(maxsize=4096)
def _relative_folder(folder: str, root: str) -> str | None:
    """``folder`` under ``root`` as a POSIX prefix ("" or "a/b/"), None when outside it."""
    try:
        rel = Path(folder).relative_to(root).as_posix()
    except ValueError:
        return None
    return "" if rel == "." else rel + "/"


def manifest_fingerprint(manifest: Manifest) -> str:
    """SHA-256 over every file's relative name, size and mtime, in the order of the names.

    Read from the file table's columns, no record per file (issue 16 item 4: sorting 100,000
    records held ~35 MB that the process kept after). Discovery lists the files of a folder in
    name order, so the names are usually in order already: then nothing is held; else the
    positions are sorted by name (the names held once, as strings, while sorting).
    """
    files, root = manifest.files, str(manifest.root)

    def name(i: int) -> str:
        return _relative_name(files.fspath(i), files.member(i), root)

    def add(h: Any, i: int, name: str) -> None:
        h.update(f"{name}\0{files.size(i)}\0{files.mtime_ns(i)}\n".encode())

    n = len(files)
    h = hashlib.sha256()
    previous = ""
    for i in range(n):  # hashed in discovery order while that is the names' order
        current = name(i)
        if i and current < previous:
            names = [name(j) for j in range(n)]
            h = hashlib.sha256()
            for j in sorted(range(n), key=names.__getitem__):
                add(h, j, names[j])
            break
        add(h, i, current)
        previous = current
    return h.hexdigest()


class RunLock:
    """Exclusive per-session lock: a second run refuses (``LockedError``) or waits (``wait``).

    Keyed on :meth:`Target.lock_key` in one folder per user (:func:`default_lock_dir`, or
    ``directory``), whatever journal file each run uses."""

    def __init__(self, target: Target, directory: Path | None = None) -> None:
        key = hashlib.sha256(target.lock_key().encode()).hexdigest()[:24]
        self.path = (directory or default_lock_dir()) / f"{key}.lock"
        self.target = target
        self._fd: int | None = None

    def acquire(self, *, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the run lock {self.path} ({exc.strerror or exc}); make "
                f"{self.path.parent} writable, or choose another lock folder with {LOCK_DIR_ENV}"
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if not wait:
                    raise LockedError(
                        f"another xio run{holder} is uploading to {self.target.describe()}; "
                        "wait for it to finish or pass --wait"
                    ) from None
                if on_wait is not None:
                    on_wait(f"waiting for another xio run{holder} on {self.target.describe()}")
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(OSError):  # who holds it: a courtesy (a full disk, say)
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        return ""
    return f" (pid {text[0]}, started {text[1]})" if len(text) >= 2 else ""


# How long a journal write waits for another process's (upload-many's parallel studies,
# a job array's tasks sharing one journal) before the run goes on without the journal.
_BUSY_TIMEOUT_S = 30.0


def _set_mode(db: sqlite3.Connection, path: Path, within_s: float) -> None:
    """WAL on a local disk; rollback mode on a network file system, where WAL's shared-memory
    index cannot be shared between machines (https://sqlite.org/wal.html, "all processes using
    a database must be on the same host computer").

    The pragma is retried while another connection holds the file: SQLite answers it "database
    is locked" at once, without its busy handler, when another process is opening (or creating)
    the same journal at that moment; several processes starting together (a job array, parallel
    studies) met it.
    """
    fstype = filesystem_type(path)
    mode = "DELETE" if is_network_filesystem(fstype) else "WAL"
    if mode == "DELETE" and under_scheduler():
        log.warning(
            "the resume journal %s is on a network file system (%s), which this scheduler's "
            "tasks may share between nodes: give each node its own on local disk with "
            "%s=$TMPDIR/xnatio-journal.sqlite (docs/scale-out.md)",
            path,
            fstype,
            JOURNAL_ENV,
        )
    deadline = time.monotonic() + within_s
    pause = 0.01
    while True:
        try:
            db.execute(f"PRAGMA journal_mode={mode}")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


class Journal:
    """One SQLite file shared by every target; thread-safe (one connection, one write lock)."""

    def __init__(self, path: Path | None = None, *, keep_days: float = KEEP_DAYS) -> None:
        self.path = path if path is not None else default_journal_path()
        self._lock = threading.Lock()
        self._closed = False
        # Set by open_run: from then on a write that fails degrades the journal (see below)
        # instead of raising; before, a journal that cannot be used is a ConfigError (exit 2).
        self._in_run = False
        self.degraded = ""  # why writes are being dropped, once they are
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # isolation_level=None: autocommit; every write is its own explicit transaction.
            self._db = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
        except (OSError, sqlite3.Error) as exc:
            raise self._unusable(exc) from None
        try:
            with contextlib.suppress(OSError):  # the journal names local paths: keep it private
                os.chmod(self.path, 0o600)
            _set_mode(self._db, self.path, _BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._write():
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(files)")}
                if "ctime_ns" not in columns:  # a journal written before it was kept
                    self._db.execute(
                        "ALTER TABLE files ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0"
                    )
            self._prune(keep_days)
        except sqlite3.Error as exc:
            self._db.close()
            raise self._unusable(exc) from None

    def _unusable(self, exc: BaseException) -> ConfigError:
        why = getattr(exc, "strerror", None) or str(exc)
        fix = (
            "make it writable"
            if "readonly" in why
            else "free some space on its disk"
            if "full" in why or getattr(exc, "errno", None) == errno.ENOSPC
            else "move it away"
        )
        return ConfigError(
            f"cannot use the resume journal {self.path} ({why}); {fix}, or choose "
            f"another file with --journal FILE or {JOURNAL_ENV}"
        )

    def _prune(self, keep_days: float) -> None:
        """Forget uploads verified and untouched for ``keep_days``: the journal stays small."""
        cutoff = time.time() - keep_days * 86400
        with self._write() as db:
            old = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM runs WHERE verified = 1 AND updated < ?", (cutoff,)
                )
            ]
            for run_id in old:
                db.execute("DELETE FROM files WHERE run_id = ?", (run_id,))
                db.execute("DELETE FROM replace WHERE run_id = ?", (run_id,))
                db.execute("DELETE FROM lost WHERE run_id = ?", (run_id,))
                db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    def _write(self) -> _Txn:
        return _Txn(self)

    def _degrade(self, exc: BaseException) -> bool:
        """A write failed: during a run, drop this and every later write (True); else False."""
        if not self._in_run:
            return False
        if not self.degraded:
            self.degraded = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            log.warning(
                "the resume journal %s cannot be written (%s): going on without it; the "
                "server's read-back says what landed, and the next run asks the server what it "
                "holds before sending",
                self.path,
                self.degraded,
            )
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the database; later writes (a worker confirming a batch after Ctrl-C) are
        dropped: those files are simply sent again by the next run."""
        with self._lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(sqlite3.Error):  # a last checkpoint on a full disk
                    self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def lock(self, target: Target, directory: Path | None = None) -> RunLock:
        """The run lock of ``target``: in ``directory``, else the per-user lock folder (never
        next to this journal: see :class:`RunLock`)."""
        return RunLock(target, directory)

    def open_run(self, target: Target, manifest: Manifest, *, restart: bool = False) -> JournalRun:
        """The journal entry of (target, manifest root); ``restart`` forgets what it remembered."""
        # Resolved: the same source given as a relative path from another folder is the same.
        root = printable(str(Path(manifest.source_archive or manifest.root).resolve()))
        now = time.time()
        try:
            run = self._open_run(target, manifest, root, now, restart=restart)
        except sqlite3.Error as exc:  # e.g. a read-only journal file: exit 2, one line
            raise self._unusable(exc) from None
        self._in_run = True
        return run

    def _open_run(
        self, target: Target, manifest: Manifest, root: str, now: float, *, restart: bool
    ) -> JournalRun:
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM runs WHERE target = ? AND root = ?", (target.key(), root)
            ).fetchone()
            if row is not None and restart:
                db.execute("DELETE FROM files WHERE run_id = ?", (row[0],))
                db.execute("DELETE FROM replace WHERE run_id = ?", (row[0],))
                db.execute("DELETE FROM lost WHERE run_id = ?", (row[0],))
                db.execute("DELETE FROM runs WHERE id = ?", (row[0],))
                row = None
            if row is None:
                cur = db.execute(
                    "INSERT INTO runs (target, root, created, updated) VALUES (?, ?, ?, ?)",
                    (target.key(), root, now, now),
                )
                run_id = int(cur.lastrowid or 0)
            else:
                run_id = int(row[0])
                db.execute("UPDATE runs SET updated = ? WHERE id = ?", (now, run_id))
        return JournalRun(self, run_id, target, manifest)


def _write_failure(exc: BaseException | None) -> bool:
    """A failure of the journal's storage (disk full, read-only, I/O error, locked for too
    long), as opposed to a closed journal (``ProgrammingError``) or a bug."""
    if isinstance(exc, sqlite3.ProgrammingError):
        return False
    return isinstance(exc, sqlite3.DatabaseError | OSError)


class _DroppedWrites:
    """The connection a degraded journal's writes get: they go nowhere."""

    def execute(self, *args: object) -> _DroppedWrites:
        return self

    def executemany(self, *args: object) -> _DroppedWrites:
        return self


class _Txn:
    """``with`` block = one ``BEGIN IMMEDIATE`` ... ``COMMIT`` under the connection's lock.

    During a run, a storage failure (at BEGIN, in the block, or at COMMIT) is rolled back,
    degrades the journal (one warning) and is not raised; the block's writes, and all later
    ones, are dropped.
    """

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._db = journal._db
        self._dropped = False

    def __enter__(self) -> sqlite3.Connection:
        journal = self._journal
        journal._lock.acquire()
        if journal.degraded:
            self._dropped = True
            return cast(sqlite3.Connection, _DroppedWrites())
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            if _write_failure(exc) and journal._degrade(exc):
                self._dropped = True
                return cast(sqlite3.Connection, _DroppedWrites())
            journal._lock.release()
            raise
        return self._db

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        journal = self._journal
        try:
            if self._dropped:
                return _write_failure(e) and bool(journal.degraded)
            if et is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                return _write_failure(e) and journal._degrade(cast(BaseException, e))
            try:
                self._db.execute("COMMIT")
            except BaseException as exc:
                if not (_write_failure(exc) and journal._degrade(exc)):
                    raise
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            return False
        finally:
            journal._lock.release()


# What the journal holds of a confirmed file: size, mtime (ns), SOP Instance UID, ctime (ns).
_Row = tuple[int, int, str, int]


def _by_instance(rows: Mapping[str, _Row]) -> dict[str, int]:
    """SOP Instance UID -> size of each file an earlier run sent."""
    return {uid: size for size, _, uid, _ in rows.values()}


def _unchanged(row: _Row | None, f: DicomFile) -> bool:
    """The file is as it was when confirmed: same size, modification time and SOP Instance UID,
    and the same inode change time where both are known. Any write changes the ctime, also one
    that puts the modification time back (issue 13 item 2: such a change is invisible to size,
    time and, where XNAT rewrites every file, MD5). A rename keeps the file's name row apart
    (matched by SOP Instance UID instead, see :meth:`JournalRun.split`)."""
    if row is None or row[:3] != (f.size, f.mtime_ns, f.sop_instance_uid):
        return False
    return not (row[3] and f.ctime_ns and row[3] != f.ctime_ns)


class JournalRun:
    """What the journal knows about one (target, source) pair; the transports report into it."""

    def __init__(self, journal: Journal, run_id: int, target: Target, manifest: Manifest) -> None:
        self.journal = journal
        self.run_id = run_id
        self.target = target
        self.manifest = manifest
        self._root = manifest.root
        # Outcomes name files by file_path (or the member name inside an archive); they are
        # found by their SOP Instance UID (models.SopIndex over the manifest's own column: no
        # record or string per file, issue 16 item 4) and the name is checked (:meth:`_file_of`).
        # Made when the first outcome arrives, not here: opening the run is on the way to the
        # first request (issue 16).
        self._by_uid: SopIndex | None = None
        self._index_lock = threading.Lock()
        self._by_name: dict[str, int] | None = None  # built only if ever needed
        # A view's position of each row of its columns (-1: not in it), for outcomes that
        # carry their row (:meth:`_position_of`); built only if the manifest is a view.
        self._by_row: array[int] | None = None
        # Positions of the manifest's files this run recorded as confirmed (1 byte a file): the
        # outcomes of a whole send, recorded again after it as a safety net (``only_new``), are
        # not written (nor made into records) a second time.
        self._recorded = bytearray(len(manifest.files))
        # Files an earlier run found different on the server (:meth:`mark_different`): if this
        # run's read-back finds them different again, replacing them did not help.
        self.different_before = self._to_replace()

    def _confirmed_rows(self) -> dict[str, _Row]:
        try:
            with self.journal._lock:
                rows = self.journal._db.execute(
                    "SELECT relpath, size, mtime_ns, sop_uid, ctime_ns FROM files WHERE run_id = ?",
                    (self.run_id,),
                ).fetchall()
        except sqlite3.Error as exc:  # its storage failed: knows nothing, the server decides
            if not (_write_failure(exc) and self.journal._degrade(exc)):
                raise
            return {}
        return {r[0]: (int(r[1]), int(r[2]), str(r[3]), int(r[4])) for r in rows}

    def split(self, files: Sequence[DicomFile] | None = None) -> tuple[FileTable, FileTable]:
        """``(confirmed earlier, still to send)``; a changed file (size/mtime/UID) is to send.

        A file is the same file as one an earlier run sent when it has the same name under the
        source, or, renamed or moved since within the same source, the same SOP Instance UID
        and size (its identity; a rename does not send it twice). Both are views of the
        manifest's file table (no record held per file, issue 16 item 4)."""
        rows = self._confirmed_rows()
        stale = self._to_replace()
        table = self.manifest.files if files is None else _as_table(files)
        if not rows and not stale:  # a first run: nothing to look up per file
            return table.take(()), table
        by_uid = _by_instance(rows)
        done: list[int] = []
        todo: list[int] = []
        for i, f in enumerate(table):
            row = rows.get(relative_name(f, self._root))
            if f.sop_instance_uid in stale:
                todo.append(i)  # the server's copy differs: sent again, replacing it
            elif _unchanged(row, f):
                done.append(i)
            elif row is None and by_uid.get(f.sop_instance_uid) == f.size:
                done.append(i)  # renamed or moved since the earlier run sent it
            else:
                todo.append(i)
        return table.take(done), table.take(todo)

    def changed_since_sent(self, files: Sequence[DicomFile]) -> list[DicomFile]:
        """Files an earlier run sent (by name) whose size, mtime or SOP Instance UID differ now,
        and files whose copy on the server was found to differ (:meth:`mark_different`)."""
        rows = self._confirmed_rows()
        stale = self._to_replace()
        if not rows and not stale:  # a first run: nothing was sent, nothing differs
            return []
        out = []
        for f in files:
            row = rows.get(relative_name(f, self._root))
            if f.sop_instance_uid in stale or (row is not None and not _unchanged(row, f)):
                out.append(f)
        return out

    def _read(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (one ``?``: this run's id); none when the journal is closed or its
        storage failed (degraded, as :meth:`_confirmed_rows`: the server decides)."""
        try:
            with self.journal._lock:
                if self.journal.closed:
                    return []
                return list(self.journal._db.execute(sql, (self.run_id,)).fetchall())
        except sqlite3.Error as exc:
            if not (_write_failure(exc) and self.journal._degrade(exc)):
                raise
            return []

    def _to_replace(self) -> set[str]:
        return {str(r[0]) for r in self._read("SELECT sop_uid FROM replace WHERE run_id = ?")}

    def mark_different(self, files: Iterable[DicomFile]) -> None:
        """The server's copy of these differs from the local file: the next run sends them
        again replacing it, rather than finding them on the server by name (and the journal
        does not forget that they changed)."""
        uids = [(self.run_id, f.sop_instance_uid) for f in files]
        with self.journal._write() as db:
            db.executemany("INSERT OR IGNORE INTO replace (run_id, sop_uid) VALUES (?, ?)", uids)

    def record_confirmed(self, files: Iterable[DicomFile], *, batch: int | None = None) -> int:
        """One transaction per call; marks the session uncommitted (new files need a commit).

        Rows are made while SQLite inserts them: a 50,000-file batch is never held as 50,000
        row tuples (tens of MB at the peak otherwise).
        """
        root = self._root
        return self._record(
            (
                (relative_name(f, root), f.size, f.mtime_ns, f.sop_instance_uid, f.ctime_ns)
                for f in files
            ),
            batch,
        )

    def _record_positions(self, positions: Iterable[int], batch: int | None) -> int:
        """:meth:`record_confirmed` of the manifest's files at ``positions``, read from its
        columns: no record made per file."""
        files, root = self.manifest.files, str(self._root)
        return self._record(
            (
                (
                    _relative_name(files.fspath(i), files.member(i), root),
                    files.size(i),
                    files.mtime_ns(i),
                    files.sop_instance_uid(i),
                    files.ctime_ns(i),
                )
                for i in positions
            ),
            batch,
        )

    def _record(self, fields: Iterator[tuple[str, int, int, str, int]], batch: int | None) -> int:
        """Insert (name, size, mtime, SOP Instance UID, ctime) rows, made as SQLite takes them."""
        now = time.time()
        first = next(fields, None)
        if first is None or self.journal.closed:
            return 0
        count = 0

        def rows() -> Iterator[tuple[object, ...]]:
            nonlocal count
            for name, size, mtime_ns, uid, ctime_ns in itertools.chain((first,), fields):
                count += 1
                yield (self.run_id, name, size, mtime_ns, uid, batch, now, ctime_ns)

        try:
            self._insert(rows(), now)
        except sqlite3.ProgrammingError:
            if self.journal.closed:  # closed meanwhile (Ctrl-C): dropped, sent again next run
                return 0
            raise
        return count

    def _insert(self, rows: Iterable[tuple[object, ...]], now: float) -> None:
        with self.journal._write() as db:
            db.executemany(
                "INSERT OR REPLACE INTO files "
                "(run_id, relpath, size, mtime_ns, sop_uid, batch, confirmed_at, ctime_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute(
                "UPDATE runs SET committed = 0, verified = 0, updated = ? WHERE id = ?",
                (now, self.run_id),
            )

    def record_outcomes(self, outcomes: Sequence[FileOutcome], *, only_new: bool = False) -> int:
        """The transports' ``on_confirmed`` hook: remember every UPLOADED/VERIFIED outcome.

        ``only_new``: skip the files this run has recorded already (the safety net after a
        send, when the hook has seen each batch's outcomes: re-writing 100,000 rows cost ~3 s
        and held a record per file at the peak, issue 16 item 4). Positions are collected first
        (8 bytes a file), records made one at a time as SQLite takes the rows."""
        positions = array("q")
        batch: int | None = None
        recorded = self._recorded
        for o in outcomes:
            if o.outcome not in (Outcome.UPLOADED, Outcome.VERIFIED):
                continue
            at = self._position_of(o)
            if at is not None and not (only_new and recorded[at]):
                positions.append(at)
                batch = o.batch if o.batch is not None else batch
        count = self._record_positions(positions, batch)
        for at in positions:
            recorded[at] = 1
        return count

    def _uid_index(self) -> SopIndex:
        with self._index_lock:  # outcomes arrive from worker threads
            if self._by_uid is None:
                files = self.manifest.files
                index = SopIndex(files, len(files))
                for i in range(len(files)):
                    uid = files.sop_instance_uid(i)
                    if index.get(uid) is None:
                        index.add(uid, i)
                self._by_uid = index
            return self._by_uid

    def _position_of(self, o: FileOutcome) -> int | None:
        """The position in the manifest of the file ``o`` is the outcome of (None: not one).

        An outcome the transports made from a row of the manifest's own columns
        (:func:`xnatio.models.row_outcome`) is that row's file: found by its row, with no UID or
        name decoded (finding them by UID and name took a quarter of the samples of a profile of
        the client on loopback: docs/performance.md, "journal"). Any other by UID, then by name."""
        files = self.manifest.files
        made_from = table_row(o)
        if made_from is not None and files.holds(o):
            row = made_from[1]
            if not files.is_view:
                return row if row < len(files) else None
            with self._index_lock:
                if self._by_row is None:
                    rows = files.rows()  # (a view's own array of rows: not copied)
                    by_row = array("q", [-1]) * (max(rows, default=-1) + 1)
                    for position, r in enumerate(rows):
                        by_row[r] = position
                    self._by_row = by_row
            by_row = self._by_row
            return by_row[row] if row < len(by_row) and by_row[row] >= 0 else None
        at = self._uid_index().get(o.sop_instance_uid)
        if at is not None:
            member = files.member(at)
            if o.path == files.name_of(at) or (member is not None and o.path == member):
                return at
        if self._by_name is None:  # an outcome without (or with another file's) instance UID
            by_name: dict[str, int] = {}
            for i, g in enumerate(files):
                by_name[g.fspath] = i
                if g.member is not None:
                    by_name[g.member] = i
                    by_name[file_path(g)] = i
            self._by_name = by_name
        return self._by_name.get(o.path)

    def on_confirmed(self, outcomes: Sequence[FileOutcome]) -> None:
        """A transport hook (called from worker threads) for outcomes the server confirmed."""
        self.record_outcomes(outcomes)

    def forget(self, files: Iterable[DicomFile]) -> None:
        """Read-back did not find these: the next run sends them again."""
        gone = list(files)
        names = [(self.run_id, relative_name(f, self._root)) for f in gone]
        # By instance too: a file renamed since it was confirmed is known by its SOP UID.
        uids = [(self.run_id, f.sop_instance_uid) for f in gone]
        with self.journal._write() as db:
            db.executemany("DELETE FROM files WHERE run_id = ? AND relpath = ?", names)
            db.executemany("DELETE FROM files WHERE run_id = ? AND sop_uid = ?", uids)
            db.execute("UPDATE runs SET verified = 0 WHERE id = ?", (self.run_id,))

    def _flag(self, column: str) -> tuple[int, str]:
        try:
            with self.journal._lock:
                row = self.journal._db.execute(
                    f"SELECT {column}, session_uri FROM runs WHERE id = ?", (self.run_id,)
                ).fetchone()
        except sqlite3.Error as exc:
            if not (_write_failure(exc) and self.journal._degrade(exc)):
                raise
            return (0, "")
        return (int(row[0]), str(row[1])) if row else (0, "")

    @property
    def committed(self) -> bool:
        return bool(self._flag("committed")[0])

    @property
    def verified(self) -> bool:
        return bool(self._flag("verified")[0])

    @property
    def session_uri(self) -> str:
        return self._flag("committed")[1]

    def record_fingerprint(self) -> None:
        """Remember the fingerprint of this run's manifest (:func:`manifest_fingerprint`).
        Written once the files are sent, not when the run opens: it sorts and hashes every
        file's name and is needed by no decision before sending."""
        fp = manifest_fingerprint(self.manifest)
        with self.journal._write() as db:
            db.execute("UPDATE runs SET fingerprint = ? WHERE id = ?", (fp, self.run_id))

    def record_session_uri(self, uri: str) -> None:
        with self.journal._write() as db:
            db.execute("UPDATE runs SET session_uri = ? WHERE id = ?", (uri, self.run_id))

    def record_commit(self, uri: str = "") -> None:
        with self.journal._write() as db:
            db.execute(
                "UPDATE runs SET committed = 1, session_uri = CASE WHEN ? = '' THEN session_uri "
                "ELSE ? END, updated = ? WHERE id = ?",
                (uri, uri, time.time(), self.run_id),
            )

    def record_verified(self) -> None:
        """The read-back found every file, the same: nothing is left to replace either."""
        with self.journal._write() as db:
            db.execute(
                "UPDATE runs SET verified = 1, updated = ? WHERE id = ?", (time.time(), self.run_id)
            )
            db.execute("DELETE FROM replace WHERE run_id = ?", (self.run_id,))
            db.execute("DELETE FROM lost WHERE run_id = ?", (self.run_id,))

    def record_lost(self, files: Sequence[DicomFile]) -> dict[str, int]:
        """Count one more run in which these were sent and not found on the server; returns,
        per SOP Instance UID, in how many runs that happened (cleared once verified)."""
        uids = [(self.run_id, f.sop_instance_uid) for f in files]
        with self.journal._write() as db:
            db.executemany(
                "INSERT INTO lost (run_id, sop_uid, runs) VALUES (?, ?, 1) "
                "ON CONFLICT (run_id, sop_uid) DO UPDATE SET runs = runs + 1",
                uids,
            )
        rows = self._read("SELECT sop_uid, runs FROM lost WHERE run_id = ?")
        return {str(r[0]): int(r[1]) for r in rows}

    def earlier_outcomes(self, files: Iterable[DicomFile]) -> list[FileOutcome]:
        return [
            FileOutcome(
                path=file_path(f),
                outcome=Outcome.UPLOADED,
                reason=EARLIER_RUN_REASON,
                sop_instance_uid=f.sop_instance_uid,
                series_uid=f.series_uid,
                size=f.size,
                origin=Origin.JOURNAL,
            )
            for f in files
        ]
