"""Import slots: at most a few request threads do an imported file's work at once.

Why. The sandbox serves every connection in its own thread, and a client that uploads in 42
parallel batches keeps 42 of them importing at once. Each file's work lets go of the GIL ten
times or so (socket reads, the write, MD5, open, rename, SQLite), and with 42 threads waiting
for it every release is a hand-over to another thread: a futex wake-up and a context switch.
Measured on the benchmark's 15,000-file upload in 42 tars over 42 connections: 9 to 14 context
switches per file, ``futex`` and the scheduler 10-17 % of the server's CPU, and one tar sent by
curl (one thread) about 30 % cheaper per GB. With two slots the other threads sleep in the slot
queue, one wake-up per file, and the two that work overlap one's GIL-free MD5 and writes with
the other's Python. Measured against none, alternating: the context switches halve, the server's
CPU per GB falls by 3-6 %, the client's time does not change (docs/performance.md, "server5").

What it must not change. The slots order work, they never refuse it nor change what is done:
every file is imported by its own request's thread as before, in the same order within a
request, with the same locks, answers and errors. Two rules keep them from ever holding anyone
up for long:

- *patience*: a thread waits for a slot at most ``patience`` seconds, then imports without
  one (as every thread did before). A slot holder that blocks — a slow client's body, a link
  scenario's kernel queue — therefore delays the others by that much at most, and no wait
  can form a cycle (nothing waits for a slot without a deadline);
- no slot is held through the knobs' deliberate sleeps: while ``per_file_ms`` or
  ``bandwidth_mbps`` is on the importer takes none (a simulated server or link cost stays
  parallel across requests, as in XNAT's own request threads; with turns, ``rest-latency``'s
  upload was 15 % slower), and a ``per_file_ms`` set mid-request is slept with the slot let go
  (``Slots.paused``).

Waiters are served first come, first served: a release hands the slot straight to the
longest waiter (no barging by the thread that just let go, which would starve the others into
their patience).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Two: one thread's Python overlaps the other's GIL-free work (MD5, writes, socket copies);
# measured against 1, 3, 4 and none in docs/performance.md ("server5").
DEFAULT_SLOTS = 2
# How long a thread waits for a slot before it imports without one. A slot is held for one
# file (about 1 ms of work on loopback), so 42 threads in turn wait some 20 ms; a holder
# stuck on a slow body costs each waiter this much at most.
DEFAULT_PATIENCE_S = 0.05


class Slots:
    """``n`` slots handed out in arrival order; ``n`` <= 0 means no limit (every ``slot()``
    goes ahead at once)."""

    def __init__(self, n: int = DEFAULT_SLOTS, patience: float = DEFAULT_PATIENCE_S) -> None:
        self.n = n
        self.patience = patience
        self._free = max(0, n)
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()
        self._local = threading.local()
        # Counts for tests and the harness: slots given at once, after a wait, and waits that
        # ran out of patience (the file was imported without a slot).
        self.granted = 0
        self.handed_over = 0
        self.impatient = 0

    def held(self) -> bool:
        """Whether the calling thread holds a slot."""
        return bool(getattr(self._local, "held", False))

    def acquire(self) -> bool:
        """Take a slot, waiting in turn at most ``patience`` s; False: none (go ahead anyway)."""
        if self.n <= 0:
            return False
        with self._mutex:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                self.granted += 1
                self._local.held = True
                return True
            baton = threading.Lock()
            baton.acquire()
            self._waiters.append(baton)
        if baton.acquire(timeout=self.patience):
            self._local.held = True
            return True  # handed over by release()
        with self._mutex:
            try:
                self._waiters.remove(baton)
            except ValueError:  # handed over just as the wait ended: it is ours
                self._local.held = True
                return True
            self.impatient += 1
            return False

    def release(self) -> None:
        """Give the calling thread's slot to the longest waiter, or back to the pool."""
        self._local.held = False
        with self._mutex:
            if self._waiters:
                self.handed_over += 1
                self._waiters.popleft().release()
            else:
                self._free += 1

    def slot(self) -> _Hold:
        """Hold a slot (if one came within the patience) for the block; ``as`` gives whether.
        A thread that holds one already keeps it (no second slot)."""
        return _Hold(self)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Let go of the calling thread's slot for the block (a deliberate sleep), then take
        one again (within the patience, as ever); a thread without a slot just runs it."""
        if not self.held():
            yield
            return
        self.release()
        try:
            yield
        finally:
            self.acquire()


class _Hold:
    """``Slots.slot()``'s block: a class, not a generator context, as it is entered once per
    imported file (the generator's frames were 3 % of the server's Python time)."""

    __slots__ = ("_mine", "_slots")

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self._mine = False

    def __enter__(self) -> bool:
        if self._slots.held():
            return True  # the holder's own slot: let go by the holder, not here
        self._mine = True
        return self._slots.acquire()

    def __exit__(self, *exc: object) -> None:
        if self._mine and self._slots.held():  # (``paused`` may have ended without one)
            self._slots.release()
