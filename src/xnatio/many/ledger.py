"""The state folder of ``xio upload-many`` (the *ledger*): what every study has become.

Layout (``--state-dir``, default ``$XDG_STATE_HOME/xnatio/many`` or
``~/.local/state/xnatio/many``; ``$XNATIO_STATE_DIR`` overrides the default)::

    STATE/studies/<key>.json      one small JSON file per study (key: a hash of the server URL,
                                   the project and the StudyInstanceUID)
    STATE/locks/run-<shard>.lock  the run lock of one shard ("all" without sharding)

Why files and not a database: the folder may sit on a shared (NFS) file system that several
nodes of a Slurm array or a Kubernetes Job use at once. SQLite's locking, and its WAL mode in
particular, does not work across NFS clients; a file per study with **one writer** (the run
that owns the study: every study is in exactly one shard) needs no lock at all. Each write goes
to a temporary file in the same folder, is flushed, and replaces the old file with
``os.replace`` (atomic on POSIX and on NFS), so a reader on any node sees the old record or the
new one, never half of one, and a ``kill -9`` leaves at most a stray ``.tmp`` file (ignored,
removed by the next run). ``xio status`` just reads every file.

Files are written 0600 and the folder 0700: records name patients (Patient ID, labels, folders).

The run lock stops two overlapping runs of the same shard (a cron job that outlasts its
interval). It is a file created with ``O_CREAT|O_EXCL`` (atomic on NFSv3 and later), holding the
holder's host, pid and start time; the holder touches it every :data:`HEARTBEAT_SECONDS`.
Stale rule, valid across hosts: a lock whose holder is on *this* host and no longer runs is
stale at once; a lock of another host is stale when it has not been touched for
:data:`STALE_SECONDS` (its holder died, or its node went away). A stale lock is taken over with
one line saying whose it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from xnatio.errors import ConfigError, UsageError
from xnatio.journal import strip_credentials

log = logging.getLogger(__name__)

STATE_ENV = "XNATIO_STATE_DIR"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0  # a lock untouched this long (20 heartbeats) belongs to a dead run

# What a study can be in the ledger.
PLANNED = "planned"  # seen, not sent yet
SENDING = "sending"  # a run is sending it (or died while it was)
VERIFIED = "verified"  # sent, committed and read back
FAILED = "failed"  # the last run failed; a later run retries it after a backoff
QUARANTINED = "quarantined"  # failed --max-attempts runs; left out until --retry-quarantined
WAITING = "waiting"  # deliberately not sent yet: still being written, or its labels are wrong
STATES = (PLANNED, SENDING, VERIFIED, FAILED, QUARANTINED, WAITING)


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(STATE_ENV):
        return Path(env[STATE_ENV]).expanduser()
    state = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local/state")
    return Path(state) / "xnatio" / "many"


def study_key(server: str, project: str, study_uid: str) -> str:
    """The file name of a study's record: stable, and the same on every node."""
    text = "\n".join((strip_credentials(server), project, study_uid))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(kw_only=True)
class StudyRecord:
    """One study in the ledger (the JSON file holds exactly these fields)."""

    key: str
    server: str
    study_uid: str
    project: str
    subject: str
    session: str
    state: str = PLANNED
    patient_id: str = ""
    study_date: str = ""
    attempts: int = 0  # failed runs in a row
    last_error: str = ""
    reason: str = ""  # why it waits, or what the last run did
    files: int = 0
    bytes: int = 0
    fingerprint: str = ""  # of the files last sent and verified (see runner.files_fingerprint)
    session_uri: str = ""
    folders: list[str] = field(default_factory=list)
    first_seen: float = 0.0
    updated: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    verified_at: float = 0.0
    next_attempt: float = 0.0  # a failed study is not retried before this time
    host: str = ""
    shard: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}  # newer writers may add fields
        record = cls(**values)
        if record.state not in STATES:
            raise ValueError(f"unknown state {record.state!r}")
        return record


class Ledger:
    """The state folder: read any record, write the records this run owns.

    ``clock`` (default ``time.time``) stamps every write; tests pass their own.
    """

    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path if path is not None else default_state_dir()
        self.clock = clock
        self.studies_dir = self.path / "studies"
        self.locks_dir = self.path / "locks"
        self.host = socket.gethostname()

    def ensure(self) -> Ledger:
        """Create the folder (0700); a folder that cannot be written is one line, exit 2."""
        try:
            for d in (self.path, self.studies_dir, self.locks_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.studies_dir / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"cannot use the state folder {self.path} ({exc.strerror or exc}); "
                "choose another with --state-dir DIR"
            ) from None
        return self

    def file_of(self, key: str) -> Path:
        return self.studies_dir / f"{key}.json"

    def get(self, key: str) -> StudyRecord | None:
        try:
            text = self.file_of(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.file_of(key)} ({exc.strerror or exc})") from None
        try:
            return StudyRecord.from_dict(json.loads(text))
        except (ValueError, TypeError) as exc:
            # A record damaged by hand: the study is treated as new (never as verified), so it
            # is sent again into the same session, which the server read-back makes harmless.
            log.warning("ignoring the unreadable ledger record %s (%s)", self.file_of(key), exc)
            return None

    def put(self, record: StudyRecord) -> None:
        """Write ``record`` atomically: temp file in the same folder, fsync, os.replace; 0600."""
        record.updated = self.clock()
        target = self.file_of(record.key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        data = record.to_json().encode("utf-8")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ConfigError(
                f"cannot write the ledger record {target} ({exc.strerror or exc})"
            ) from None

    def records(self) -> list[StudyRecord]:
        """Every record in the folder (any shard's), oldest first."""
        out: list[StudyRecord] = []
        if not self.studies_dir.is_dir():
            return out
        for path in sorted(self.studies_dir.glob("*.json")):
            record = self.get(path.stem)
            if record is not None:
                out.append(record)
        out.sort(key=lambda r: (r.first_seen, r.key))
        return out

    def clean_temp_files(self, older_than: float = STALE_SECONDS) -> None:
        """Remove ``.tmp`` files a killed writer left (only old ones: another node may be
        writing a fresh one right now)."""
        now = time.time()
        for tmp in self.studies_dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > older_than:
                    tmp.unlink()

    def run_lock(self, shard: str = "all") -> RunLock:
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in shard) or "all"
        return RunLock(self.locks_dir / f"run-{safe}.lock", host=self.host)


class RunLockedError(UsageError):
    """Another run of the same state folder and shard is going on (exit 2)."""


class RunLock:
    """The run lock of one state folder and shard; see the module docstring for the rules."""

    def __init__(
        self,
        path: Path,
        *,
        host: str | None = None,
        stale_seconds: float = STALE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.path = path
        self.host = host or socket.gethostname()
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str = ""  # whose stale lock this run took over, if any

    def _create(self) -> bool:
        body = json.dumps(
            {"host": self.host, "pid": os.getpid(), "started": time.time(), "token": self.token}
        ).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def is_stale(self, holder: Mapping[str, Any]) -> bool:
        """Its holder is gone: dead on this host, or silent for ``stale_seconds`` elsewhere."""
        if holder.get("host") == self.host and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False  # gone meanwhile: the next create attempt tells
        return age > self.stale_seconds

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            holder = self.holder()
            if not self.is_stale(holder):
                who = _describe(holder)
                raise RunLockedError(
                    f"another xio upload-many run{who} is using {self.path.parent.parent} "
                    "for the same shard; it goes on, and this run stops (the next one picks up "
                    "what is left)"
                )
            # Move the stale lock aside under a unique name (atomic), then create ours.
            aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, aside)
                self.took_over = _describe(aside_holder := _read_json(aside)) or " (unknown)"
                log.warning("took over the stale run lock of a run%s", _describe(aside_holder))
                with contextlib.suppress(OSError):
                    aside.unlink()
        raise RunLockedError(f"could not take the run lock {self.path}; try again")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_seconds):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="xio-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holder().get("token") == self.token:
            with contextlib.suppress(OSError):
                self.path.unlink()

    @contextlib.contextmanager
    def held(self) -> Iterator[RunLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return ""
    started = holder.get("started")
    when = (
        time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, (int, float))
        else ""
    )
    return f" (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{when})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process of that pid: alive
    return True
