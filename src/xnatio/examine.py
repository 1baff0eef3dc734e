"""What discovery learns of one file, and the worker processes that learn it in parallel.

:func:`examine` opens one candidate file and reads its header (:mod:`xnatio.dicomheader`); it
never raises for a bad file. Its answer is a plain tuple (cheap to make, to send between
processes and to keep): a file to send is :data:`Found`, anything else :data:`Skip`, told apart
by length.

:class:`Workers` examines a list of paths in worker processes and yields the answers in the
order of the paths, exactly as examining them one after the other would
(:func:`xnatio.discover.discover` uses it above a few thousand files). The header walk is Python,
so threads cannot run it on more than one core; processes can. Each worker is
``python -c "from xnatio.examine import serve; serve()"``: this module imports nothing heavy, so a
worker starts in about a tenth of a second while the parent walks the folders. Chunk ``i`` of
the paths goes to worker ``i % n``, two chunks ahead of the answer awaited from it; each worker
answers its chunks in order, one frame each, and the parent reads them in path order (a worker
holds two chunks, not its share of the paths). While the folders are walked, the workers are
fed as the paths come (:meth:`Workers.feed`) and the answers already there are taken
(:meth:`Workers.ready`), so the workers never wait for the walk to end. Frames are ``marshal``
data between two processes
of the same interpreter (no code, only strings and ints), each preceded by its length. A chunk's
answer is its results as columns (:func:`pack`: the skipped files, then one column per field of
the files found), which the parent appends to its file table in one call
(``FileTable.add_many``), not file by file (issue 16 item 4).

Failures: a worker that cannot be started, dies, or answers garbage costs one warning line; the
chunks it has not answered are examined in the parent, so every file is still examined once and
the manifest is the same. Ctrl-C (or any exception in the caller) stops every worker: they run
in their own session (the terminal's Ctrl-C does not reach them, so they print no traceback) and
are killed and reaped when the parent stops reading; a worker whose parent died is stopped by the
broken pipe of its next answer.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import queue
import select
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Protocol

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the pipe keeps its default size
    fcntl = None  # type: ignore[assignment]

from xnatio.dicomheader import (
    MEDIA_STORAGE_DIRECTORY,
    HeaderFields,
    NotDicom,
    read_header_fd,
    read_header_stream,
)

log = logging.getLogger(__name__)

# (size, mtime_ns, ctime_ns, SOP Class UID, SOP Instance UID, Study Instance UID,
#  Series Instance UID, Series Number, Transfer Syntax UID, Patient ID); ctime_ns is 0 inside an
# archive (see DicomFile.ctime_ns).
Found = tuple[int, int, int, str, str, str, str, int | None, str, str]
# (one-sentence reason, size)
Skip = tuple[str, int]
Result = Found | Skip
# The results of a chunk of files as columns (what a worker answers; issue 16 item 4): the
# skipped ones as (position in the chunk, reason, size), then each field of Found, in its order,
# for the files found (the others), in the chunk's order.
Packed = tuple[
    list[tuple[int, str, int]],
    Sequence[int],
    Sequence[int],
    Sequence[int],
    Sequence[str],
    Sequence[str],
    Sequence[str],
    Sequence[str],
    Sequence[int | None],
    Sequence[str],
    Sequence[str],
]
_FIELDS = 10  # of Found

_intern = sys.intern


def found(size: int, mtime_ns: int, ctime_ns: int, h: HeaderFields) -> Found:
    # Interned: a session shares a few study/series/class values across all its files (and a
    # worker's answer then holds each once: marshal writes a shared string once per frame).
    return (
        size,
        mtime_ns,
        ctime_ns,
        _intern(h.sop_class_uid),
        h.sop_instance_uid,
        _intern(h.study_uid),
        _intern(h.series_uid),
        h.series_number,
        _intern(h.transfer_syntax_uid),
        _intern(h.patient_id),
    )


_KINDS = (
    (stat.S_ISFIFO, "FIFO (named pipe)"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def not_regular_reason(mode: int) -> str:
    """Why a file of ``mode`` (not a regular file, not a folder) is skipped."""
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return f"not a regular file: {kind}"


def unsendable(h: HeaderFields) -> str:
    """Why XNAT would reject this object, or '' when it can be sent."""
    if MEDIA_STORAGE_DIRECTORY in (h.media_sop_class_uid, h.sop_class_uid):
        return "DICOMDIR (a media directory index, not an image)"
    # XNAT's importer rejects objects without these: "object {name} contains no SOP Class UID".
    if not h.sop_class_uid:
        return "DICOM object without a SOP Class UID (XNAT rejects it)"
    if not h.sop_instance_uid:
        return "DICOM object without a SOP Instance UID (XNAT rejects it)"
    if not h.study_uid:
        return "DICOM object without a Study Instance UID"
    return ""


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def examine(path: str) -> Result:
    """Open one candidate file and read its header; never raises for a bad file."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except PermissionError:
        return ("not readable (permission denied)", 0)
    except FileNotFoundError:
        return ("removed while discovery was running", 0)
    except OSError as exc:
        return (f"not readable ({exc.strerror})", 0)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for a FIFO or device since the walk
            return (not_regular_reason(st.st_mode), 0)
        if st.st_size == 0:
            return ("empty file (0 bytes)", 0)
        try:
            fields = read_header_fd(fd)
        except NotDicom as exc:
            return (str(exc), st.st_size)
        except OSError as exc:
            return (f"not readable ({exc.strerror})", st.st_size)
        reason = unsendable(fields)
        if reason:
            return (reason, st.st_size)
        return found(st.st_size, st.st_mtime_ns, st.st_ctime_ns, fields)
    finally:
        os.close(fd)


def examine_stream(fp: IO[bytes], size: int, mtime_ns: int) -> Result:
    """:func:`examine` for an archive member (no inode change time)."""
    try:
        fields = read_header_stream(fp)
    except NotDicom as exc:
        return (str(exc), size)
    reason = unsendable(fields)
    if reason:
        return (reason, size)
    return found(size, mtime_ns, 0, fields)


def pack(results: Sequence[Result]) -> Packed:
    """The results of a chunk as columns (:data:`Packed`): the parent appends a chunk's files to
    its table in one call (FileTable.add_many), not one by one."""
    skips = [(i, r[0], r[1]) for i, r in enumerate(results) if len(r) == 2]
    found = [r for r in results if len(r) != 2] if skips else results
    columns = tuple(zip(*found, strict=True)) if found else ((),) * _FIELDS
    return (skips, *columns)  # type: ignore[return-value]


def _is_packed(value: object, expected: int) -> bool:
    """Whether a worker's answer has the shape of :data:`Packed` for ``expected`` files."""
    if not isinstance(value, tuple) or len(value) != 1 + _FIELDS:
        return False
    skips, *columns = value
    if not isinstance(skips, list) or not all(isinstance(c, tuple) for c in columns):
        return False
    found = expected - len(skips)
    positions = [s[0] for s in skips if isinstance(s, tuple) and len(s) == 3]
    return (
        len(positions) == len(skips)
        and positions == sorted(set(positions))
        and all(0 <= at < expected for at in positions)
        and all(len(c) == found for c in columns)
    )


# -- worker processes ----------------------------------------------------------------------------

_LEN = 8  # bytes of a frame's length


def _write_frame(out: IO[bytes], data: bytes) -> None:
    frame = memoryview(len(data).to_bytes(_LEN, "little") + data)
    while frame:  # an unbuffered pipe (the parent's ends) may take part of it at a time
        frame = frame[out.write(frame) or 0 :]
    out.flush()


def _read_exactly(src: IO[bytes], n: int) -> bytes | None:
    parts = []
    while n:
        part = src.read(n)
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_frame(src: IO[bytes]) -> bytes | None:
    head = _read_exactly(src, _LEN)
    return None if head is None else _read_exactly(src, int.from_bytes(head, "little"))


def serve(src: IO[bytes] | None = None, out: IO[bytes] | None = None) -> None:
    """A worker: answer each frame (a chunk of paths) with one frame (the list of their
    :func:`examine` results), in order, until the input ends. A thread reads the input as it
    comes, so the parent's writes never wait on this worker's answers (no deadlock whatever
    the frames' sizes)."""
    src = src if src is not None else sys.stdin.buffer
    out = out if out is not None else sys.stdout.buffer
    frames: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                frame = _read_frame(src)
                frames.put(frame)
                if frame is None:
                    return
        except OSError:
            frames.put(None)

    threading.Thread(target=read, name="xnatio-examine-input", daemon=True).start()
    try:
        while (frame := frames.get()) is not None:
            answer = pack([examine(p) for p in marshal.loads(frame)])
            _write_frame(out, marshal.dumps(answer))  # type: ignore[arg-type]  # tuples of columns
    except BrokenPipeError:  # the parent stopped reading (Ctrl-C, an error): nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())


WORKER_COMMAND = ("-c", "from xnatio.examine import serve; serve()")
_AHEAD = 2  # chunks sent to a worker ahead of the one whose answer is awaited
# While the folders are walked, a worker is sent up to this many chunks not answered yet (the
# answers already there are taken after each folder: Workers.ready), and answers them into a
# pipe made this big (1 MiB: the most Linux gives an unprivileged process by default,
# /proc/sys/fs/pipe-max-size), about 14 answers of 500 files.
_WALK_AHEAD = 12
_PIPE_SIZE = 1 << 20


class Paths(Protocol):
    """The paths to examine: a list of strings, or discovery's compact list of them."""

    def __getitem__(self, i: int, /) -> str: ...

    def __len__(self) -> int: ...


def part(paths: Paths, start: int, stop: int) -> list[str]:
    """``paths[start:stop]`` as a list of strings: by the range (``slice``, a few C-level passes)
    from discovery's compact list (models.SplitStrings), not a call per path."""
    take: Callable[[int, int], list[str]] | None = getattr(paths, "slice", None)
    return take(start, stop) if take is not None else [paths[j] for j in range(start, stop)]


class _Worker:
    def __init__(self, command: Sequence[str]) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (read if it fails; never blocks)
        env = dict(os.environ)
        # The worker imports the same xnatio as this process, whatever sys.path says.
        package_dir = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_dir, env.get("PYTHONPATH", "")) if p
        )
        self.proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            bufsize=0,  # unbuffered: what select() says of the pipe is all there is (_waiting)
            env=env,
            close_fds=True,
            start_new_session=True,  # Ctrl-C in the terminal is the parent's to handle
        )
        self.alive = True
        # Room for a few answers in the pipe (Linux: 64 KB, about one answer, by default), so
        # that the worker goes on while the parent is still walking the folders; and for the
        # chunks sent ahead (~50 KB each): with 64 KB the parent's writes waited on the worker's
        # input thread, which waits for the interpreter lock the header walk holds (0.3-0.5 s
        # of the parent's time at 100,000 files, issue 16 item 4).
        if getattr(fcntl, "F_SETPIPE_SZ", None):
            for pipe in (self.proc.stdout, self.proc.stdin):
                with contextlib.suppress(OSError):
                    if pipe is not None:
                        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)

    def why(self) -> str:
        """The worker's last line on stderr, or its exit status."""
        with contextlib.suppress(OSError):
            self.stderr.seek(0)
            lines = self.stderr.read()[-4000:].decode(errors="replace").strip().splitlines()
            if lines:
                return lines[-1]
        code = self.proc.poll()
        return f"exit status {code}" if code is not None else "no answer"

    def stop(self) -> None:
        proc = self.proc
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        self.stderr.close()


def _waiting(w: _Worker) -> bool:
    """Whether ``w`` has written something the parent has not read yet (an answer, or its end):
    its output is read unbuffered, so the pipe holds all there is (POSIX; elsewhere: never)."""
    out = w.proc.stdout
    if out is None or os.name != "posix":
        return False
    try:
        return bool(select.select([out], [], [], 0)[0])
    except (OSError, ValueError):
        return False


class Workers:
    """``n`` worker processes, started at once (they import while the caller walks); see the
    module docstring. Use as a context manager: leaving it kills and reaps every worker."""

    def __init__(self, n: int, command: Sequence[str] | None = None) -> None:
        self.command = list(command) if command is not None else [sys.executable, *WORKER_COMMAND]
        self.workers: list[_Worker] = []
        try:
            for _ in range(n):
                self.workers.append(_Worker(self.command))
        except OSError as exc:
            log.warning(
                "could not start a discovery worker (%s): reading the headers in this process",
                exc.strerror or exc,
            )
        self._next = 0  # the first chunk not sent yet
        self._answered = 0  # the first chunk whose answer has not been taken yet
        # The chunks sent and not answered yet, as the strings sent (see _part).
        self._sent: dict[int, list[str]] = {}

    @property
    def answered(self) -> int:
        """How many chunks have been answered (and taken) so far."""
        return self._answered

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        while self.workers:
            self.workers.pop().stop()

    def feed(self, paths: Paths, chunk: int) -> None:
        """Send the workers the whole chunks of ``paths`` so far (a list the caller is still
        growing: the walk), up to :data:`_WALK_AHEAD` each not answered yet, so that they read
        headers while the folders are walked; :meth:`ready` and :meth:`examine` then go on
        from there (same ``chunk``)."""
        n = len(self.workers)
        whole = len(paths) // chunk
        while n and self._next < whole and self._next - self._answered < _WALK_AHEAD * n:
            self._send(paths, chunk, self._next, None)
            self._next += 1

    def ready(self, paths: Paths, chunk: int) -> Iterator[tuple[list[str], Packed]]:
        """The chunks fed so far whose answers are already waiting, in order, as
        :meth:`examine` gives them; none that would make the caller wait for a worker. During
        the walk the caller takes them (its file table grows meanwhile), so the workers are
        fed on and never wait for the walk to end (a worker's output pipe holds ~14 answers:
        the walk of 100,000 files lists 200 chunks; issue 16 item 4)."""
        n = len(self.workers)
        while self._answered < self._next:
            i = self._answered
            w = self.workers[i % n]
            if not w.alive or not _waiting(w):
                return  # examine() takes it (or reads its files here, if the worker failed)
            packed = self._answer(w, chunk)  # fed chunks are whole
            names = self._part(paths, chunk, i)
            if packed is None:  # it failed: this process reads them
                packed = pack([examine(p) for p in names])
            self._answered += 1
            yield names, packed

    def _part(self, paths: Paths, chunk: int, i: int) -> list[str]:
        """Chunk ``i`` as strings: the very list sent, while in flight (made once; the caller
        keeps the paths compactly: issue 16 item 4)."""
        if i in self._sent:
            return self._sent.pop(i)
        return part(paths, i * chunk, min((i + 1) * chunk, len(paths)))

    def _send(self, paths: Paths, chunk: int, i: int, chunks: int | None) -> None:
        """Chunk ``i`` to its worker (``i % n``); its input closed after its last chunk (of
        ``chunks``, when known)."""
        n = len(self.workers)
        w = self.workers[i % n]
        if not w.alive:
            return
        stdin = w.proc.stdin
        assert stdin is not None
        names = self._sent[i] = self._part(paths, chunk, i)
        try:
            _write_frame(stdin, marshal.dumps(names))
            if chunks is not None and i + n >= chunks:
                stdin.close()
        except OSError:
            self._failed(w)

    def examine(
        self, paths: Paths, chunk: int, report: Callable[[int], None]
    ) -> Iterator[tuple[list[str], Packed]]:
        """Each chunk of ``paths`` (as strings) with the :func:`pack` of its :func:`examine`
        results, in order; ``report(done)`` after each chunk."""
        total = len(paths)
        chunks = -(-total // chunk)
        workers = self.workers
        n = len(workers)
        # A worker fed during the walk whose chunks are all sent: its input ends now.
        for k, w in enumerate(workers):
            last = k + (chunks - 1 - k) // n * n if k < chunks else -1
            if w.alive and last < self._next and w.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    w.proc.stdin.close()

        # Each worker holds the chunk it reads and the next one (no more: its memory stays
        # that of a chunk, not of its share of the paths), or what it was fed during the walk.
        def top_up(upto: int) -> None:
            while n and self._next < min(chunks, upto):
                self._send(paths, chunk, self._next, chunks)
                self._next += 1

        top_up(self._answered + _AHEAD * n)
        done = min(total, self._answered * chunk)  # the chunks :meth:`ready` gave
        for i in range(self._answered, chunks):
            packed: Packed | None = None
            if n and workers[i % n].alive:
                packed = self._answer(workers[i % n], min(chunk, total - i * chunk))
            top_up(i + 1 + _AHEAD * n)
            names = self._part(paths, chunk, i)
            if packed is None:  # no worker, or it failed: this process reads them
                packed = pack([examine(p) for p in names])
            self._answered = i + 1
            yield names, packed
            done += len(names)
            report(done)

    def _answer(self, w: _Worker, expected: int) -> Packed | None:
        assert w.proc.stdout is not None
        try:
            frame = _read_frame(w.proc.stdout)
        except OSError:
            frame = None
        if frame is None:  # it died: its stderr or exit status says why
            self._failed(w)
            return None
        try:
            packed = marshal.loads(frame)
        except (ValueError, EOFError, TypeError):
            packed = None
        if _is_packed(packed, expected):
            return packed  # type: ignore[no-any-return]
        self._failed(w, "an answer that could not be read")
        return None

    def _failed(self, w: _Worker, why: str = "") -> None:
        if not w.alive:
            return
        w.alive = False
        with contextlib.suppress(OSError):
            w.proc.kill()  # answered garbage, or died: either way it is done
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(timeout=5)  # its stderr is complete once it has exited
        log.warning(
            "a discovery worker stopped (%s): reading its share of the headers in this process",
            why or w.why(),
        )
