"""Import workers: the sandbox's import bodies read, framed, walked, written and hashed in other
processes, so the server can use more than one core (issue 16 item 2).

Why. The server is one Python process: on loopback it is the bottleneck at about one core, its
request threads queued for the GIL behind the two that import (``slots.py``,
``docs/performance.md`` "server5"). The work of an imported file splits in two
(``importer.EntryFeed`` and ``importer.DicomImport``):

- *the body's half*: the socket reads, the HTTP chunk framing, the zip or tar framing, the
  header walk, the stored bytes (facts 1.7), the write and its MD5 — most of the CPU, and it
  needs nothing but the body and the temp folder;
- *the catalog's half*: routing (facts 1.2), the row, the file's name, XNAT's file lock, the
  record, then the build and archive of the request (facts 1.1, 1.5) — small, and it needs the
  server's state (logins, knobs, rows, locks, the SQLite catalog), which stays in one process.

How. With ``--import-workers N`` the server starts N worker processes (``main``). A raw
DICOM-zip body (zip, tar, tgz) that the request's thread has not read is handed over whole: the
connection's socket and a fresh socket pair go to a worker with ``SCM_RIGHTS``, with the body
bytes already in the connection's buffer. The worker reads the body, and for each file asks the
server process for its ``Claim`` over the pair, writes the file, and settles it (one round trip
per file: a settle needs no answer); one thread of the server process answers every worker's
claims (``_Desk``). When the body ends the worker says how, and the request's thread builds,
archives and answers as before. No file's bytes cross the process boundary. The server process
keeps one body of its own at a time (``ImportWorkers.choose``).

What it must not change: the answers, the stored bytes and the catalog are those of an import
in the request's thread — the same code does each half, in the same order, under the same file
lock. Requests the workers do not take, and why: a multipart body (spooled to a file by the
request's thread), gradual-DICOM (one file per request: nothing to spread), a body a knob will
cut (``reset_next``) or throttle (``bandwidth_mbps``) — those knobs live in the server's body
reader. A client that pipelines requests on one connection is not served by workers either: HTTP
clients in this field do not (the worker would read past the body).
"""

from __future__ import annotations

import contextlib
import io
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from xnatio.sandbox.bodies import DRAIN_LIMIT, RECV_BUFFER, BodyReader, ConnectionAborted
from xnatio.sandbox.dicom import DicomHeader
from xnatio.sandbox.importer import Claim, DicomImport, EntryFeed, FullReader, iter_entries
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.slots import Slots


@dataclass(frozen=True)
class Body:
    """What a worker needs to read one import body and feed its entries."""

    buffered: bytes  # the body's first bytes, already in the server's connection buffer
    length: int | None  # Content-Length, or None when chunked
    chunked: bool
    kind: str  # "zip", "tar" or "tgz"
    tmp_path: str
    ignore_unparsable: bool
    sleepy: bool  # a knob that sleeps is on (the feed then takes no slot)
    timeout: float | None  # the connection's read timeout


@dataclass(frozen=True)
class Ended:
    """How a worker's feed ended: ``how`` is "done", "failed" (an HTTP error of the body's
    half: ``status``, ``message``, ``headers``), "refused" (a claim or settle raised in the
    server: its own exception stands), "aborted" (the client went away) or "crashed"."""

    how: str
    files_written: int = 0
    last_error: str | None = None
    status: int = 0
    message: str = ""
    headers: dict[str, str] | None = None
    bytes_read: int = 0
    complete: bool = False  # the body was read to its end (else the connection is closed)


# A worker's command (not ``-m``: under ``__main__`` the records it sends would not unpickle).
_WORKER = "import sys; from xnatio.sandbox.workers import main; sys.exit(main(sys.argv))"


class WorkerLost(Exception):
    """The worker serving a request went away (it crashed, or the server is stopping)."""


# -- the server's side -----------------------------------------------------------------------
class ImportWorkers:
    """``n`` worker processes (``main``, started as ``_WORKER``), each taking any number of
    import bodies at once in threads, with its own import slots."""

    # Bodies the server process imports itself before it hands any to a worker (``choose``).
    DEFAULT_HOME = 1

    def __init__(self, n: int, home: int | None = None) -> None:
        self.n = n
        self.home = self.DEFAULT_HOME if home is None else home
        self._home = 0  # bodies the server process is importing itself
        self._procs: list[subprocess.Popen[bytes]] = []
        self._controls: list[socket.socket] = []
        self._busy: list[int] = []
        self._lock = threading.Lock()
        self.desk: _Desk | None = None
        self.handed = 0  # bodies handed over (for tests and the harness)

    def start(self) -> ImportWorkers:
        self.desk = _Desk()
        for _ in range(self.n):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            env = dict(os.environ)
            # The worker imports this very package, wherever it was imported from.
            src = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
            proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            self._procs.append(proc)
            self._controls.append(mine)
            self._busy.append(0)
        return self

    def stop(self) -> None:
        """Close the workers' control sockets (each worker exits when it sees that), then wait
        for them; bodies still being read are cut (their requests end as the server stops)."""
        for control in self._controls:
            control.close()
        if self.desk is not None:
            self.desk.stop()
            self.desk = None
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs, self._controls, self._busy = [], [], []

    @contextmanager
    def choose(self) -> Iterator[int | None]:
        """The worker for a body (the least busy one still running), or None: the request's
        thread imports it. The server process keeps ``home`` bodies of its own at a time (1 by
        default): one body alone gains nothing from a worker, whose claims then cross between
        processes (one tar sent by curl: 8.5 and 7.9 s in the thread, 11.1 and 10.3 s in a
        worker, docs/performance.md "both"); the bodies that arrive while it has them go to
        the workers."""
        with self._lock:
            alive = [i for i, proc in enumerate(self._procs) if proc.poll() is None]
            if alive and self._home >= self.home:
                chosen: int | None = min(alive, key=self._busy.__getitem__)
            else:
                chosen = None
                self._home += 1
        try:
            yield chosen
        finally:
            if chosen is None:
                with self._lock:
                    self._home -= 1

    def hand_off(
        self, i: int, sock: socket.socket, body: Body
    ) -> tuple[Connection, Callable[[], None]]:
        """Give ``sock``'s body to worker ``i`` (``choose``); returns the request's end of the
        pair and what to call when the request is over."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            if i >= len(self._controls):
                mine.close()
                theirs.close()
                raise WorkerLost("the import workers are stopped")
            try:
                socket.send_fds(self._controls[i], [b"body"], [sock.fileno(), theirs.fileno()])
            except OSError:
                mine.close()
                raise WorkerLost("an import worker is gone") from None
            finally:
                theirs.close()
            self._busy[i] += 1
            self.handed += 1
        conn = Connection(mine.detach())

        def done() -> None:
            conn.close()
            with self._lock:
                if i < len(self._busy):
                    self._busy[i] -= 1

        try:
            conn.send(body)
        except OSError:
            done()
            raise WorkerLost("an import worker is gone") from None
        return conn, done


class _Case:
    """One request's claims as the desk answers them (``_Desk``)."""

    def __init__(self, job: DicomImport, conn: Connection) -> None:
        self.job = job
        self.conn = conn
        self.refused: BaseException | None = None  # what a claim or settle raised here
        self.result: Future[tuple[Ended, BaseException | None]] = Future()

    def answer(self, msg: tuple[Any, ...]) -> Ended | None:
        """Act on one message from the worker; its ``Ended`` when the feed is over."""
        op = msg[0]
        if op == "claim":
            if self.refused is not None:
                self.conn.send(("raise",))
                return None
            try:
                claim = self.job.claim(msg[1], msg[2])
            except Exception as exc:  # (the worker stops; this exception is the answer)
                self.refused = exc
                self.conn.send(("raise",))
                return None
            self.conn.send(("ok", claim))
        elif op == "settle":
            if self.refused is None:
                try:
                    self.job.settle(msg[1], msg[2])
                except Exception as exc:
                    self.refused = exc
        elif op == "abandon":
            self.job.abandon()
        elif op == "end":
            ended: Ended = msg[1]
            return ended
        else:  # pragma: no cover - a bug in this module
            raise RuntimeError(f"unknown message from an import worker: {op!r}")
        return None


class _Desk:
    """The one thread of the server process that answers every worker's claims, whichever
    request they are for (a selector over the requests' socket pairs).

    Measured against a thread per request blocked on its pair (the request's own thread, which
    now waits for the result): the server process's CPU over xio's 15,000-file upload in 42
    requests fell from 4.7-4.9 s to 3.8 s (docs/performance.md "both")."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._new: list[_Case] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="import-claims")
        self._thread.start()

    def serve(self, job: DicomImport, conn: Connection) -> tuple[Ended, BaseException | None]:
        """Answer ``conn``'s claims for ``job`` until its feed ends; how it ended, and the
        exception a claim or settle raised here, if one did (the request's answer then)."""
        case = _Case(job, conn)
        with self._lock:
            if self._stopping:
                raise WorkerLost("the import workers are stopped")
            self._new.append(case)
        self._wake_w.send(b"+")
        return case.result.result()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake_w.send(b".")
        self._thread.join(timeout=10)
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()

    def _run(self) -> None:
        cases: dict[int, _Case] = {}
        while True:
            for key, _ in self._sel.select():
                case: _Case | None = key.data
                if case is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    with self._lock:
                        new, self._new, stopping = self._new, [], self._stopping
                    for c in new:
                        cases[c.conn.fileno()] = c
                        self._sel.register(c.conn.fileno(), selectors.EVENT_READ, c)
                    if stopping:
                        for c in cases.values():
                            c.result.set_exception(WorkerLost("the server is stopping"))
                        return
                    continue
                try:
                    ended = case.answer(case.conn.recv())
                except (EOFError, OSError):
                    ended = None
                    error: BaseException | None = WorkerLost("the import worker went away")
                except BaseException as exc:  # a bug: the request answers 500 with it
                    ended, error = None, exc
                else:
                    if ended is None:
                        continue
                    error = None
                self._sel.unregister(key.fd)
                del cases[key.fd]
                if error is not None:
                    case.result.set_exception(error)
                else:
                    assert ended is not None
                    case.result.set_result((ended, case.refused))


def import_elsewhere(
    job: DicomImport,
    workers: ImportWorkers,
    worker: int,
    sock: socket.socket,
    reader: BodyReader,
    body: Body,
) -> list[str]:
    """Run ``job`` with its body's half in ``worker``; the answer's URIs, as ``job.run`` gives
    them, or its error. ``reader`` (the request's own body reader, untouched) is told what the
    worker read, so the connection is kept or closed as it would be."""
    done: Callable[[], None] | None = None
    try:
        try:
            conn, done = workers.hand_off(worker, sock, body)
            if workers.desk is None:
                raise WorkerLost("the import workers are stopped")
            ended, refused = workers.desk.serve(job, conn)
        except BaseException:
            # Some of the body may have been read: the connection cannot be kept.
            reader.read_elsewhere(0, complete=False)
            raise
        reader.read_elsewhere(ended.bytes_read, complete=ended.complete)
        job.files_written = ended.files_written
        if refused is not None:
            raise refused
        if ended.how == "done":
            return job.conclude(ended.files_written, ended.last_error)
        if ended.how == "failed":
            raise HttpError(ended.status, ended.message, ended.headers or {})
        if ended.how == "aborted":
            raise ConnectionAborted(ended.message)
        raise RuntimeError(f"import worker failed: {ended.message}")
    finally:
        if done is not None:
            done()
        job.close()


# -- the worker's side -----------------------------------------------------------------------
class _Refused(Exception):
    """The server refused a claim; its exception is the request's answer."""


class RemotePlacer:
    """A ``Placer`` that asks the server process's claim desk (``_Desk``)."""

    def __init__(self, conn: Connection, sleepy: bool) -> None:
        self._conn = conn
        self._sleepy = sleepy

    def claim(self, name: str, h: DicomHeader) -> Claim | None:
        self._conn.send(("claim", name, h))
        reply = self._conn.recv()
        if reply[0] != "ok":
            raise _Refused()
        claim: Claim | None = reply[1]
        if claim is not None:
            self._sleepy = claim.per_file_ms > 0
        return claim

    def settle(self, size: int, md5: str) -> None:
        self._conn.send(("settle", size, md5))

    def abandon(self) -> None:
        self._conn.send(("abandon",))

    def sleepy(self) -> bool:
        return self._sleepy


class _Buffered(io.RawIOBase):
    """The connection's body: first the bytes the server had already buffered, then the socket."""

    def __init__(self, first: bytes, sock: socket.socket) -> None:
        self._first = memoryview(first)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._first:
            n = min(len(b), len(self._first))
            b[:n] = self._first[:n]
            self._first = self._first[n:]
            return n
        return self._sock.recv_into(b)


def _feed(client: socket.socket, conn: Connection, slots: Slots) -> None:
    body: Body = conn.recv()
    client.settimeout(body.timeout)
    reader = BodyReader(
        io.BufferedReader(_Buffered(body.buffered, client), RECV_BUFFER),
        length=body.length,
        chunked=body.chunked,
        throttle=lambda n: None,
    )
    feed = EntryFeed(RemotePlacer(conn, body.sleepy), body.tmp_path, slots, body.ignore_unparsable)
    ended: Ended
    try:
        feed.run(iter_entries(FullReader(reader), body.kind, Path(body.tmp_path)))
        last = feed.last_error
        ended = Ended("done", feed.files_written, None if last is None else str(last))
    except _Refused:
        ended = Ended("refused", feed.files_written)
    except HttpError as exc:
        ended = Ended("failed", feed.files_written, None, exc.status, exc.message, exc.headers)
    except (ConnectionAborted, OSError) as exc:
        conn.send(("end", Ended("aborted", feed.files_written, message=str(exc))))
        return
    complete = False
    with contextlib.suppress(ConnectionAborted, HttpError, OSError):
        complete = reader.drain(DRAIN_LIMIT)
    conn.send(
        (
            "end",
            Ended(
                ended.how,
                ended.files_written,
                ended.last_error,
                ended.status,
                ended.message,
                ended.headers,
                reader.bytes_read,
                complete,
            ),
        )
    )


def _serve(client_fd: int, pair_fd: int, slots: Slots) -> None:
    client = socket.socket(fileno=client_fd)
    conn = Connection(pair_fd)
    try:
        _feed(client, conn, slots)
    except (EOFError, OSError):  # the server's side went away (it is stopping)
        pass
    except Exception:  # a bug: the request answers 500 with it, the worker goes on
        with contextlib.suppress(OSError):
            conn.send(("end", Ended("crashed", message=traceback.format_exc(limit=5))))
    finally:
        client.close()
        conn.close()


def main(argv: list[str]) -> int:
    """A worker (``_WORKER``): take bodies from the control socket (fd ``argv[1]``) until it
    closes."""
    # Ctrl-C in a terminal reaches the whole process group; the server stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=int(argv[1]))
    slots = Slots()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 16, 2)
        except OSError:
            return 0
        if not msg:
            for fd in fds:
                os.close(fd)
            return 0
        client_fd, pair_fd = fds
        threading.Thread(
            target=_serve, args=(client_fd, pair_fd, slots), daemon=True, name="import"
        ).start()
