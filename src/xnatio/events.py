"""The one progress counter both transports feed: files, bytes and batches done, as events.

REST counts a batch's payload bytes as the server receives them (acknowledged by its TCP,
:mod:`xnatio.transports.rest.wire`), with the wire bytes (compressed, when the body is) beside
them, its files as in flight while its request is out and as done when XNAT confirms them;
C-STORE counts each file (and its bytes) as its C-STORE response arrives; both count a batch (a
request, an association) when it ends, failed or not. Subscribers (:mod:`xnatio.progress`) only
ever see :class:`~xnatio.models.ProgressEvent` s, whichever transport sent them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from xnatio.models import Phase, ProgressCallback, ProgressEvent

THROTTLE = 0.1  # seconds between events that only move the byte count (~10 per second)


class ProgressCounter:
    """Thread-safe counters behind the UPLOAD events of one transfer.

    An update that only moves bytes is told at most every :data:`THROTTLE` seconds; one that
    counts files, ends a batch or carries a message is always told. Events are emitted under the
    lock, so subscribers see them in order, one at a time. Bytes may go backwards (a retried
    body takes back what its failed pass counted).
    """

    def __init__(
        self,
        callback: ProgressCallback | None,
        *,
        files_total: int,
        bytes_total: int,
        batches_total: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        self._clock = clock
        self._last = 0.0
        self.files_total = files_total
        self.bytes_total = bytes_total
        self.batches_total = batches_total
        self.files_done = self.bytes_done = self.batches_done = self.batches_failed = 0
        self.wire_done = self.files_in_flight = 0

    def phase(self, phase: Phase, current: int, total: int, message: str = "") -> None:
        """Tell another phase's step (connect, commit, done) with the counts so far."""
        if self._callback is not None:
            self._callback(self._event(phase, current, total, message))

    def update(
        self,
        *,
        nbytes: int = 0,
        wire: int = 0,
        files: int = 0,
        in_flight: int = 0,
        batch_done: bool = False,
        failed: bool = False,
        message: str = "",
        force: bool = False,
    ) -> None:
        """Count ``nbytes`` more payload bytes and ``wire`` more bytes on the wire (negative:
        taken back), ``files`` more files confirmed, ``in_flight`` more (or, negative, fewer)
        files whose request is out, and a batch that ended (``failed`` or not); tell the UPLOAD
        event (``force``: even within the throttle, e.g. a body's last count, which no other
        update may follow until the server answers)."""
        with self._lock:
            self.bytes_done += nbytes
            self.wire_done += wire
            self.files_done += files
            self.files_in_flight += in_flight
            if batch_done:
                self.batches_done += 1
                self.batches_failed += int(failed)
            now = self._clock()
            if (
                not (batch_done or files or in_flight or message or force)
                and now - self._last < THROTTLE
            ):
                return
            self._last = now
            if self._callback is not None:
                self._callback(
                    self._event(Phase.UPLOAD, self.files_done, self.files_total, message)
                )

    def _event(self, phase: Phase, current: int, total: int, message: str) -> ProgressEvent:
        return ProgressEvent(
            phase=phase,
            current=current,
            total=total,
            message=message,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            batches_done=self.batches_done,
            batches_failed=self.batches_failed,
            batches_total=self.batches_total,
            files_in_flight=self.files_in_flight,
            wire_bytes=self.wire_done,
        )
