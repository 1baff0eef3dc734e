"""A small DICOM Upper Layer client (PS3.8) for an SCU that sends C-ECHO and C-STORE requests.

Why not pynetdicom's ``Association``: each one runs its own reactor thread that polls its socket
and event queue in a sleep loop (``dul.py``, ``association.py``), so tens of parallel associations
in one Python process spend the CPU polling. Here an association is one blocking socket used by one
thread; while it waits for the peer it holds no GIL and costs nothing. Only the SCU side of the
protocol is needed: A-ASSOCIATE (RQ/AC/RJ), P-DATA-TF, A-RELEASE and A-ABORT, with synchronous
operations (no Asynchronous Operations Window is proposed, so one request is outstanding at a time).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from xnatio.transports.dicom_store.pdu import (
    VERIFICATION,
    AcceptedContext,
    ProposedContext,
    Status,
    build_associate_rq,
    c_echo_rq,
    c_store_rq,
    parse_associate_ac,
    parse_command,
    text_value,
    us_value,
)

__all__ = [
    "CONTEXT_RESULTS",
    "VERIFICATION",
    "AcceptedContext",
    "Association",
    "AssociationLost",
    "AssociationRejected",
    "PeerUnreachable",
    "ProposedContext",
    "Status",
    "UpperLayerError",
    "connect",
    "open_association",
]

# Largest P-DATA-TF we send when the peer announces "no limit" (0): big enough that one PDU
# carries a typical image, small enough to bound the copy made per fragment.
UNLIMITED_SEND_PDU = 1 << 20

# The peer answers with small PDUs; anything larger than this is refused rather than buffered.
MAX_RECEIVE_PDU = 64 << 20

# Linux only: acknowledge at once instead of the delayed ACK (~40 ms), see _recv_exact.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)

# PS3.8 9.3.4 A-ASSOCIATE-RJ: (source, reason) -> meaning.
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "reserved",
    (3, 2): "temporary congestion",
    (3, 3): "local limit exceeded",
}
# PS3.8 9.3.3.2 presentation context results.
CONTEXT_RESULTS = {
    0: "accepted",
    1: "user rejection",
    2: "no reason (provider rejection)",
    3: "abstract syntax (SOP class) not supported",
    4: "transfer syntax not supported",
}
_ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognised PDU",
    2: "unexpected PDU",
    4: "unrecognised PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}


class UpperLayerError(Exception):
    """The association could not be used; ``str()`` is one sentence for the user."""


class PeerUnreachable(UpperLayerError):
    """No TCP connection: unknown host, port closed, or no answer."""


class AssociationRejected(UpperLayerError):
    def __init__(self, result: int, source: int, reason: int) -> None:
        self.result, self.source, self.reason = result, source, reason
        self.permanent = result == 1
        text = _REJECT_REASONS.get((source, reason), f"reason {reason}")
        self.why = f"{text} ({'permanent' if self.permanent else 'transient'})"
        super().__init__(f"the peer rejected the association: {self.why}")

    @property
    def bad_ae_title(self) -> bool:
        return self.source == 1 and self.reason in (3, 7)


class AssociationLost(UpperLayerError):
    """The association ended in the middle (A-ABORT, connection closed, timeout)."""


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class Association:
    """One established association; use :func:`open_association` to make one."""

    sock: socket.socket
    accepted: dict[int, AcceptedContext]
    refused: dict[int, tuple[str, int]]  # context id -> (abstract syntax, result)
    peer_max_pdu: int
    dimse_timeout: float
    network_timeout: float
    acse_timeout: float
    _message_id: int = 0
    _closed: bool = field(default=False)
    _sending: bool = field(default=False)
    _interrupted: bool = field(default=False)

    # -- framing ---------------------------------------------------------------------------
    def _send(self, data: bytes | bytearray | memoryview) -> None:
        self._sending = True
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self._drop()
            raise AssociationLost(f"the connection broke while sending ({_why(exc)})") from exc
        finally:
            self._sending = False

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                if _QUICKACK is not None:
                    self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                k = self.sock.recv_into(view[got:])
            except TimeoutError as exc:
                self._drop()
                raise AssociationLost("the peer did not answer in time") from exc
            except OSError as exc:
                self._lost_while_reading()
                raise AssociationLost(f"the connection broke ({_why(exc)})") from exc
            if k == 0:
                self._lost_while_reading()
                raise AssociationLost("the peer closed the connection")
            got += k
        return bytes(buf)

    def _recv_pdu(self, timeout: float) -> tuple[int, bytes]:
        self.sock.settimeout(timeout or None)
        head = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBI", head)
        if pdu_type not in range(1, 8):
            # Not a DICOM peer: an HTTP server on that port, say.
            self.abort()
            text = head.decode("ascii", "replace")
            raise AssociationLost(f"the peer does not speak DICOM (its answer starts {text!r})")
        if length > MAX_RECEIVE_PDU:
            self.abort()
            raise AssociationLost(f"the peer sent a PDU of {length} bytes, too large to accept")
        self.sock.settimeout(self.network_timeout or None)
        body = self._recv_exact(length) if length else b""
        if pdu_type == 0x07:
            self._drop()
            source, reason = (body[2], body[3]) if len(body) >= 4 else (0, 0)
            who = "the peer" if source == 0 else "the peer's DICOM layer"
            raise AssociationLost(
                f"{who} aborted the association ({_ABORT_REASONS.get(reason, 'reason unknown')})"
            )
        return pdu_type, body

    def _pdus(self, context_id: int, data: bytes, *, command: bool, last: bool) -> list[bytes]:
        """P-DATA-TF PDUs (header, payload, header, payload, ...) carrying ``data``.

        PS3.8 9.3.5: a PDV holds a fragment of either the command or the data set; the peer's
        maximum length bounds the whole variable field, the 6-byte PDV header included.
        """
        chunk = max((self.peer_max_pdu or UNLIMITED_SEND_PDU) - 6, 2)
        chunk -= chunk % 2  # fragments of an (even-length) data set stay even
        control = 0x01 if command else 0x00
        view = memoryview(data)
        out: list[bytes] = []
        for offset in range(0, max(len(view), 1), chunk):
            piece = view[offset : offset + chunk]
            flag = 0x02 if last and offset + chunk >= len(view) else 0x00
            out.append(
                struct.pack(
                    ">BBIIBB", 0x04, 0, len(piece) + 6, len(piece) + 2, context_id, control | flag
                )
            )
            out.append(bytes(piece))
        return out

    def _next_id(self) -> int:
        self._message_id = (self._message_id % 0xFFFF) + 1
        return self._message_id

    def _read_response(self) -> dict[int, bytes]:
        """Collect the command PDVs of the next response (no data set follows C-STORE/C-ECHO)."""
        command = bytearray()
        while True:
            pdu_type, body = self._recv_pdu(self.dimse_timeout)
            if pdu_type == 0x05:  # the peer asks to release in the middle of an operation
                self._send(struct.pack(">BBII", 0x06, 0, 4, 0))
                self._drop()
                raise AssociationLost("the peer released the association before answering")
            if pdu_type != 0x04:
                self.abort()
                raise AssociationLost(f"the peer sent an unexpected PDU (type {pdu_type})")
            offset = 0
            while offset + 6 <= len(body):
                length = struct.unpack_from(">I", body, offset)[0]
                control = body[offset + 5]
                fragment = body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x01:
                    command += fragment
                    if control & 0x02:
                        return parse_command(bytes(command))

    def _status(self, fields: dict[int, bytes], expected_field: int, message_id: int) -> Status:
        answered = fields.get(0x0100), fields.get(0x0120)  # Command Field, Message ID answered
        if answered != (us_value(expected_field), us_value(message_id)):
            self.abort()
            raise AssociationLost("the peer answered a different request than the one sent")
        raw = fields.get(0x0900, b"")
        if len(raw) != 2:
            self.abort()
            raise AssociationLost("the peer's response carries no status")
        return Status(
            struct.unpack("<H", raw)[0],
            text_value(fields.get(0x0902)),
            text_value(fields.get(0x0901)),
        )

    # -- services ---------------------------------------------------------------------------
    def c_echo(self, context_id: int) -> Status:
        msg_id = self._next_id()
        self._send(b"".join(self._pdus(context_id, c_echo_rq(msg_id), command=True, last=True)))
        return self._status(self._read_response(), 0x8030, msg_id)

    def c_store(
        self, context_id: int, sop_class: str, sop_instance: str, dataset: Iterable[bytes]
    ) -> Status:
        """Send one instance; ``dataset`` yields the encoded data set in pieces (no file meta).

        The command and the first data pieces leave in one write: with small images a C-STORE
        is then one system call and one round trip.
        """
        msg_id = self._next_id()
        command = c_store_rq(msg_id, sop_class, sop_instance)
        out = self._pdus(context_id, command, command=True, last=True)
        pending: bytes | None = None
        for piece in dataset:
            # Hold each piece back one step so that the last one goes out flagged as last.
            if pending is not None:
                out += self._pdus(context_id, pending, command=False, last=False)
                if len(out) >= 16:
                    self._send(b"".join(out))
                    out = []
            pending = piece
        out += self._pdus(context_id, pending or b"", command=False, last=True)
        self._send(b"".join(out))
        return self._status(self._read_response(), 0x8001, msg_id)

    def release(self) -> None:
        """A-RELEASE; a peer that does not answer in time is aborted (files already confirmed)."""
        if self._closed:
            return
        try:
            self._send(struct.pack(">BBII", 0x05, 0, 4, 0))
            while True:
                pdu_type, _ = self._recv_pdu(self.acse_timeout)
                if pdu_type == 0x06:
                    break
        except AssociationLost:
            pass
        self._drop()

    def abort(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0))
        self._drop()

    def interrupt(self) -> None:
        """From another thread (a cancel): wake the thread using this association at once.

        A blocked read returns end of data, so that thread gives up the association and sends
        A-ABORT itself (the write side stays open; two threads writing at once would interleave
        bytes). If that thread is sending, the write side is shut too: A-ABORT cannot follow half
        a PDU, the peer then sees the connection close.
        """
        self._interrupted = True
        how = socket.SHUT_RDWR if self._sending else socket.SHUT_RD
        with contextlib.suppress(OSError):
            self.sock.shutdown(how)

    def _lost_while_reading(self) -> None:
        # After interrupt() the socket stays open for the A-ABORT that abort() then sends.
        if not self._interrupted:
            self._drop()

    def _drop(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


def _why(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection, or PeerUnreachable saying which of DNS / refused / timeout it was."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PeerUnreachable(f"no such host {host!r} ({exc.strerror})") from exc
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout or None)
        try:
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        # The command PDU is tiny and must not wait for Nagle's algorithm.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    if isinstance(last, ConnectionRefusedError):
        raise PeerUnreachable(f"port {port} is closed on {host} (connection refused)")
    if isinstance(last, TimeoutError):
        raise PeerUnreachable(f"no answer from {host}:{port} within {timeout:g} s")
    raise PeerUnreachable(
        f"cannot connect to {host}:{port} ({_why(last) if last else 'no address'})"
    )


def open_association(
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str,
    contexts: list[ProposedContext],
    *,
    max_pdu: int = 0,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    on_connect: Callable[[Association], None] | None = None,
) -> Association:
    """Connect and negotiate; raises PeerUnreachable, AssociationRejected or AssociationLost.

    ``on_connect`` gets the association as soon as the TCP connection stands, before the
    negotiation, so that a cancel can interrupt a peer slow to answer the request.
    """
    if not 0 < len(contexts) <= 128:
        raise ValueError(f"an association carries 1-128 presentation contexts, not {len(contexts)}")
    sock = connect(host, port, network_timeout)
    assoc = Association(sock, {}, {}, 0, dimse_timeout, network_timeout, acse_timeout)
    if on_connect is not None:
        on_connect(assoc)
    assoc._send(build_associate_rq(called_aet, calling_aet, contexts, max_pdu))
    pdu_type, body = assoc._recv_pdu(acse_timeout)
    if pdu_type == 0x03 and len(body) >= 4:
        assoc._drop()
        raise AssociationRejected(body[1], body[2], body[3])
    if pdu_type != 0x02:
        assoc.abort()
        raise AssociationLost(f"the peer answered the association request with PDU {pdu_type}")
    proposed = {c.context_id: c for c in contexts}
    assoc.accepted, assoc.refused, assoc.peer_max_pdu = parse_associate_ac(body, proposed)
    return assoc
