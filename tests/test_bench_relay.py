"""The harness's first-import relay (benchmarks/relay.py): bytes pass unchanged both ways, and
only an import request (``POST /data/services/import``, facts 1.1) sets the time it notes."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.relay import FirstImportRelay  # noqa: E402


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(b"got " + self.path.encode())

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self._answer(self.rfile.read(length)[::-1])

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_relay_forwards_and_notes_only_the_first_import_request(
    echo: ThreadingHTTPServer,
) -> None:
    port = int(echo.server_address[1])
    with FirstImportRelay("127.0.0.1", port) as relay, requests.Session() as http:
        got = http.get(f"{relay.url}/data/projects", timeout=10)
        assert got.text == "got /data/projects"
        body = bytes(range(256)) * 4096  # 1 MiB: several chunks through the relay
        posted = http.post(f"{relay.url}/data/projects/P/files", data=body, timeout=10)
        assert posted.content == body[::-1]
        assert relay.first_import_at is None  # neither was an import request
        answer = http.post(f"{relay.url}/data/services/import?inbody=true", data=b"x", timeout=10)
        assert answer.content == b"x"
        first = relay.first_import_at
        assert first is not None
        http.post(f"{relay.url}/data/services/import", data=b"y", timeout=10)
        assert relay.first_import_at == first  # the first one is kept
