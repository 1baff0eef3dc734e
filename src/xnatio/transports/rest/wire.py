"""What the server has received of a streamed body: the bytes the peer's TCP acknowledged.

Counting a body's bytes as they are handed to the socket counts what the kernel took, not what
the server got: a socket takes megabytes ahead of the link (Linux grows the send buffer up to
``tcp_wmem``'s maximum, 4 MiB by default), so with a capped link the bar reached 100 % within
seconds and sat there while the server was still receiving (issue 17). So a body counts a chunk
only as the peer acknowledges it. On Linux ``ioctl(fd, SIOCOUTQ)`` (the same number as
``TIOCOUTQ``) answers ``write_seq - snd_una`` for a TCP socket: the bytes written to it that
the peer has not acknowledged yet (``tcp_ioctl`` in the kernel's ``net/ipv4/tcp.c``, tcp(7)).
Acknowledged = handed − that. What the peer acknowledged is in its kernel's receive buffer or
already read by the server, so the count is never ahead of what the server has read by more than
that receive buffer (the in-flight window; on loopback it is what the server's reads leave in
it). One ``ioctl`` per 64 KiB chunk: nothing to measure.

The HTTP headers and chunked framing ahead of the body bytes make the count lag by a few hundred
bytes, never lead. Over TLS the queue holds records (plaintext plus ~0.2 % overhead): the same.
Where ``SIOCOUTQ`` is not available (not Linux, or a socket urllib3 wraps for TLS inside a TLS
proxy), bytes are counted as handed, as before: ahead by at most the socket's send buffer.

A body is mapped from wire bytes (what TCP acknowledges: tar, zip or deflated zip bytes) to
payload bytes (the files' own sizes, what progress and ETA count, also when compressed) by the
marks it leaves for every chunk it hands out: (wire bytes so far, payload bytes so far),
interpolated within a chunk.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from xnatio.xnat.inflight import sending_socket

try:  # Linux: SIOCOUTQ == TIOCOUTQ (0x5411); elsewhere the ioctl means something else
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ if sys.platform.startswith("linux") else None
except ImportError:  # pragma: no cover - Windows
    _OUTQ = None

# After its last byte is handed out, a body waits (polling this often) while the peer
# acknowledges the rest, so the count reaches 100 % as the server reads, not when its answer
# comes. It stops waiting once the server answers (an error before it read everything; plain
# HTTP only), or the queue has not moved for DRAIN_IDLE seconds (urllib3's read timeout takes
# over from there): a wait that only shapes the display, never an error of its own.
DRAIN_POLL = 0.05
DRAIN_IDLE = 5.0


def limit_unsent(sock: socket.socket | None, nbytes: int) -> bool:
    """Let ``sock`` queue at most about ``nbytes`` it has not sent yet (0: the system's
    default, no limit unless ``net.ipv4.tcp_notsent_lowat`` sets one); False where unknown.

    ``TCP_NOTSENT_LOWAT`` (Linux 3.12+, macOS): a blocking ``send`` waits while the bytes written
    but not yet sent reach ``nbytes`` (``tcp_stream_memory_free`` in the kernel's
    ``net/ipv4/tcp.c``, tcp(7)), whatever the send buffer's size; bytes in flight are not
    limited, so the link stays as full as before. Without it a socket takes megabytes ahead of
    a slow link (the send buffer autotunes), all of them stored bytes when ``--compress auto``
    has not decided yet (:mod:`xnatio.compress`).
    """
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is None or sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, nbytes)
    except (OSError, ValueError):  # closed, or not a TCP socket
        return False
    return True


def unacknowledged(sock: socket.socket | None) -> int | None:
    """Bytes written to ``sock`` that its peer has not acknowledged; None when unknown."""
    if _OUTQ is None or sock is None:
        return None
    try:
        answer = fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0")
    except (OSError, ValueError):  # closed, or not a TCP socket
        return None
    return int(struct.unpack("i", answer)[0])


class AckedBytes:
    """One pass of a body over one socket: handed bytes, acknowledged bytes, payload marks."""

    def __init__(
        self,
        socket_of: Callable[[], socket.socket | None] = sending_socket,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._socket_of = socket_of
        self._bound: socket.socket | None = None
        self._was_bound = False
        self._clock = clock
        self._marks: deque[tuple[int, int]] = deque([(0, 0)])  # (wire end, payload end)
        self._produced = 0
        self.handed = 0

    def produced(self, nbytes: int, payload_end: int) -> None:
        """A chunk of ``nbytes`` is handed out; with it, ``payload_end`` payload bytes are."""
        self._produced += nbytes
        self._marks.append((self._produced, payload_end))

    def end(self, payload: int) -> None:
        """The last chunk is handed out: its end is the whole payload."""
        self._marks[-1] = (self._produced, payload)

    def bind(self) -> None:
        """Keep the socket of this thread's request (called in the sending thread, as the pass
        starts): :meth:`acknowledged` and :meth:`limit_unsent` may then be asked from any
        thread (``--compress auto`` reads every body's count and lifts or sets the limit,
        :class:`xnatio.compress.Compression`)."""
        self._bound = self._socket_of()
        self._was_bound = True

    def _socket(self) -> socket.socket | None:
        if self._was_bound:  # never another thread's request socket
            return self._bound
        return self._socket_of()

    def limit_unsent(self, nbytes: int) -> bool:
        """Keep the socket's unsent queue near ``nbytes``, 0: no limit (:func:`limit_unsent`)."""
        return limit_unsent(self._socket(), nbytes)

    def was_handed(self, nbytes: int) -> None:
        """The socket took ``nbytes`` more (``sendall`` returned)."""
        self.handed += nbytes

    def acknowledged(self) -> int:
        """Wire bytes the peer acknowledged (or, where that is unknown, handed)."""
        outq = unacknowledged(self._socket())
        if outq is None:
            return self.handed
        return max(0, self.handed - outq)

    def payload_at(self, wire: int) -> int:
        """Payload bytes carried by the first ``wire`` bytes (interpolated within a chunk)."""
        marks = self._marks
        while len(marks) >= 2 and marks[1][0] <= wire:
            marks.popleft()  # never asked again: acknowledged bytes only grow
        w0, p0 = marks[0]
        if len(marks) == 1 or wire <= w0:
            return p0
        w1, p1 = marks[1]
        return p0 + (p1 - p0) * (wire - w0) // (w1 - w0)

    def drain(self, report: Callable[[], None], cancel: threading.Event) -> str:
        """Wait while the peer acknowledges what is still queued, calling ``report`` as it does.

        Returns why it stopped: ``"acknowledged"`` (all of it, or the queue cannot be read),
        ``"answered"`` (the server answered or closed: readable), ``"still"`` (the queue stood
        still for :data:`DRAIN_IDLE` seconds) or ``"cancelled"``.
        """
        sock = self._socket()
        # Over TLS 1.3 the server sends session tickets after the handshake: a readable socket
        # is no answer there, and only the queue standing still (or the connection closing)
        # ends the wait.
        answer_shows = not isinstance(sock, ssl.SSLSocket)
        last, since = -1, self._clock()
        while not cancel.is_set():
            outq = unacknowledged(sock)
            if not outq:  # 0: all acknowledged; None: unknown (or closed)
                return "acknowledged"
            report()
            now = self._clock()
            if outq != last:
                last, since = outq, now
            elif now - since >= DRAIN_IDLE:
                return "still"
            assert sock is not None  # unacknowledged() answered
            try:
                readable, _, _ = select.select([sock] if answer_shows else [], [], [], DRAIN_POLL)
            except (OSError, ValueError):
                return "answered"  # closed under us
            if readable:
                return "answered"
        return "cancelled"
