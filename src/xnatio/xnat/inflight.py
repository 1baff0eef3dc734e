"""Cutting a request in flight: what lets a cancel stop a request whose answer has not come.

A streamed body checks the cancel event between chunks (:mod:`xnatio.transports.rest.bodies`),
but once the last byte is written the worker thread waits in ``recv`` for XNAT's answer, which
can take minutes (XNAT parses and stores every file before it answers, facts 1.3/1.7). A cancel
then has to wake that thread: :class:`InFlight` notes the connection each request of the calling
thread goes out on (the connection classes below tell it, through a thread-local set by
:meth:`xnatio.xnat.client.XnatClient.request`), and :meth:`InFlight.cut` shuts its socket down.
The waiting ``recv`` returns at once, urllib3 raises a connection error, and the caller, which
sees its cancel, stops; the broken connection is dropped from the pool, never reused.

The shutdown is the plain socket's (``socket.socket.shutdown``), also for TLS: ``SSLSocket``'s own
shutdown tears the TLS object down under the reading thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

Stopper = Callable[[], None]


class CancelScope(Protocol):
    """Where a request registers how to cut it (:class:`xnatio.coordinator.Coordinator`)."""

    def add_stopper(self, stop: Stopper) -> None: ...

    def remove_stopper(self, stop: Stopper) -> None: ...


class InFlight:
    """The connections one request of one thread went out on, and the way to cut them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: list[HTTPConnection] = []
        self._cut = False

    def track(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._connections.append(conn)
            cut = self._cut
        if cut:  # cancelled before the request went out: cut it at once
            _shut(conn)

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            connections = list(self._connections)
        for conn in connections:
            _shut(conn)


def _shut(conn: HTTPConnection) -> None:
    sock = conn.sock
    if sock is None:
        return
    with contextlib.suppress(OSError):  # already closed by the other side, or never connected
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()


@contextmanager
def cuttable(scope: CancelScope | None) -> Iterator[None]:
    """Within the block, a cancel of ``scope`` cuts the request this thread sends."""
    if scope is None:
        yield
        return
    inflight = InFlight()
    _current.inflight = inflight
    scope.add_stopper(inflight.cut)  # runs at once if already cancelled
    try:
        yield
    finally:
        _current.inflight = None
        scope.remove_stopper(inflight.cut)


def _track(conn: HTTPConnection) -> None:
    inflight: InFlight | None = getattr(_current, "inflight", None)
    if inflight is not None:
        inflight.track(conn)


def sending_socket() -> socket.socket | None:
    """The socket this thread's request is being sent on, while its body streams (None
    elsewhere): what :mod:`xnatio.transports.rest.wire` asks how much the peer acknowledged."""
    conn: HTTPConnection | None = getattr(_current, "sending", None)
    sock = conn.sock if conn is not None else None
    return sock if isinstance(sock, socket.socket) else None


@contextmanager
def _sending(conn: HTTPConnection) -> Iterator[None]:
    _track(conn)
    _current.sending = conn  # the body is iterated inside request(), in this thread
    try:
        yield
    finally:
        _current.sending = None


class _TrackedHTTPConnection(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        with _sending(self):
            super().request(*args, **kwargs)


class _TrackedHTTPSConnection(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        with _sending(self):
            super().request(*args, **kwargs)


class _TrackedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _TrackedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


_POOLS = {"http": _TrackedHTTPPool, "https": _TrackedHTTPSPool}


class CuttableAdapter(HTTPAdapter):
    """An :class:`HTTPAdapter` whose connections tell the request in flight about themselves."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager
