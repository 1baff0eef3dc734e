"""A loopback TCP relay that notes when the first import request leaves the client.

Issue 16 item 4 asks that "the first import body leaves within 3 s of launch at any size". The
client cannot be trusted to time itself, and the sandbox (another engineer's server, in another
process) keeps no request clock, so the harness puts this relay between the two: the client is
given the relay's URL, every byte is forwarded unchanged, and the moment the first chunk that
starts an import request (``POST …/services/import`` or ``/data/services/import``, facts 1.1)
passes through is kept. It runs in the harness's process: its CPU and memory are not the
client's.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

_CHUNK = 1 << 20
_IMPORT = b"/services/import"


class FirstImportRelay:
    """Forward ``127.0.0.1:<port>`` to ``upstream``; ``first_import_at`` is the
    :func:`time.perf_counter` of the first import request's first bytes (None before)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.first_import_at: float | None = None
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="bench-relay", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FirstImportRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
            self._sockets.clear()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                if upstream and self.first_import_at is None and data[:5] == b"POST ":
                    line = data[: data.find(b"\r\n")] if b"\r\n" in data[:4096] else data[:4096]
                    if _IMPORT in line:
                        self.first_import_at = time.perf_counter()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
