"""Import workers (``--import-workers``, ``sandbox/workers.py``): a raw import body read, framed,
written and hashed in another process, the catalog's half in the request's thread.

The rule under test is that nothing a client can see changes: every case runs the same requests
against a server without workers and one with two, over real HTTP, and compares the answers,
the catalog and the stored bytes. The whole sandbox suite also runs against workers with
``pytest --import-workers 2`` (``tests/conftest.py``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from sandbox_helpers import TEST_PROJECTS, h3, instance_files, session, tar_bytes, zip_bytes

from upload_helpers import self_signed_certificate
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session

pytestmark = pytest.mark.integration

USERS = {"u": "p"}
DEST = {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}
IMPORT = "/data/services/import"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[SandboxServer, SandboxServer]]:
    """(a server without workers, one with two that take every body it can hand over), each
    on its own data dir."""
    plain = SandboxServer(
        tmp_path / "plain", users=USERS, projects=TEST_PROJECTS, import_workers=0
    ).start()
    workers = SandboxServer(
        tmp_path / "workers", users=USERS, projects=TEST_PROJECTS, import_workers=2
    ).start()
    assert workers.workers is not None
    workers.workers.home = 0  # (by default the server keeps one body of its own at a time)
    try:
        yield plain, workers
    finally:
        plain.stop()
        workers.stop()


def post(server: SandboxServer, body: Any, content_type: str, **params: str) -> requests.Response:
    return requests.post(
        server.url + IMPORT,
        params={"import-handler": "DICOM-zip", **DEST, **params},
        data=body,
        headers={"Content-Type": content_type},
        auth=("u", "p"),
        timeout=60,
    )


def chunks(data: bytes, size: int = 40_000) -> Iterator[bytes]:
    """A chunked body (``requests`` sends an iterator with Transfer-Encoding: chunked)."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def state(server: SandboxServer) -> list[tuple[Any, ...]]:
    """What a client could see of the prearchive: each row and each of its stored files (name,
    size, MD5 of the stored bytes as read back from disk, and the catalog's record)."""
    rows = []
    for s in sorted(server.prearchive_sessions(), key=lambda s: (s.project, s.name, s.tag)):
        files = []
        for key, rec in sorted(server.prearchive_files(s).items()):
            stored = Path(rec.path).read_bytes()
            files.append((key, rec.name, rec.size, rec.md5, hashlib.md5(stored).hexdigest()))
        rows.append((s.project, s.name, s.subject, s.tag, s.status, s.direct, files))
    return rows


def answer(r: requests.Response) -> tuple[int, str]:
    """The answer without what differs by server (the prearchive folder's timestamp)."""
    text = r.text
    for part in text.split("/"):
        if len(part) == 18 and part[:8].isdigit() and part[8] == "_":
            text = text.replace(part, "TIMESTAMP")
    return r.status_code, h3(r) if r.status_code >= 400 else text


def both(
    pair: tuple[SandboxServer, SandboxServer], send: Callable[[SandboxServer], Any]
) -> tuple[Any, Any]:
    plain, workers = pair
    return send(plain), send(workers)


def test_tar_and_chunked_zip_bodies_are_imported_by_a_worker_as_in_the_thread(
    pair: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    files = instance_files(session(tmp_path, series=2, instances=4))
    tar, zipped = tar_bytes(files), zip_bytes(files)

    def send(server: SandboxServer) -> list[tuple[int, str]]:
        return [
            answer(post(server, tar, "application/x-tar")),
            answer(post(server, chunks(zipped), "application/zip", EXPT_LABEL="E2")),
            answer(post(server, tar_bytes(files, "w:gz"), "application/x-gtar", EXPT_LABEL="E3")),
        ]

    plain_answers, worker_answers = both(pair, send)
    assert plain_answers == worker_answers
    assert [code for code, _ in worker_answers] == [200, 200, 200]
    plain, workers = pair
    assert state(plain) == state(workers)
    assert len(state(workers)) == 3 and all(len(row[-1]) == 8 for row in state(workers))
    assert workers.workers is not None and workers.workers.handed == 3
    assert plain.workers is None


def test_an_archiving_import_builds_and_archives_after_the_worker_is_done(
    pair: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    files = instance_files(session(tmp_path, series=1, instances=3))

    def send(server: SandboxServer) -> tuple[tuple[int, str], list[str]]:
        r = post(server, tar_bytes(files), "application/x-tar", dest="/archive/projects/P")
        return answer(r), sorted(
            (rec.name, rec.size, rec.md5) for rec in server.archived_files("P", "S", "E").values()
        )

    plain_result, worker_result = both(pair, send)
    assert plain_result == worker_result
    assert plain_result[0][0] == 200 and len(plain_result[1]) == 3


def test_a_bad_entry_answers_400_and_keeps_the_files_before_it(
    pair: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    good = list(instance_files(session(tmp_path, series=1, instances=4)).items())
    body = dict(good[:2])
    body["junk.dcm"] = b"not a DICOM file" * 100
    body.update(good[2:])

    def send(server: SandboxServer) -> list[tuple[int, str]]:
        return [
            answer(post(server, tar_bytes(body), "application/x-tar")),
            answer(
                post(
                    server,
                    tar_bytes(body),
                    "application/x-tar",
                    EXPT_LABEL="E2",
                    **{"Ignore-Unparsable": "true"},
                )
            ),
            answer(post(server, tar_bytes({"junk.dcm": b"x" * 300}), "application/x-tar")),
        ]

    plain_answers, worker_answers = both(pair, send)
    assert plain_answers == worker_answers
    assert [code for code, _ in worker_answers] == [400, 200, 400]
    plain, workers = pair
    assert state(plain) == state(workers)
    # E: the two files before the bad one (XNAT's partial write); E2: all four.
    assert sorted(len(row[-1]) for row in state(workers)) == [2, 4]


def test_a_refused_claim_is_the_answer_and_the_server_goes_on(
    pair: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    """The same file sent twice at once: the second request's claim of it is refused in the
    server process (XNAT's file lock, facts 1.4), and that refusal is the worker's answer."""
    (path,) = session(tmp_path, series=1, instances=1).instances.values()
    body = tar_bytes({path.name: path})

    def send(server: SandboxServer) -> list[tuple[int, str]]:
        server.set_knobs(per_file_ms=800)
        barrier = threading.Barrier(2)

        def one(_: int) -> tuple[int, str]:
            barrier.wait()
            return answer(post(server, body, "application/x-tar"))

        with ThreadPoolExecutor(2) as pool:
            answers = sorted(pool.map(one, range(2)))
        server.set_knobs(per_file_ms=0)
        return [*answers, answer(post(server, body, "application/x-tar", EXPT_LABEL="E2"))]

    plain_answers, worker_answers = both(pair, send)
    assert plain_answers == worker_answers
    assert worker_answers[1] == (400, "Concurrent file sends of the same data is not supported.")
    assert worker_answers[0][0] == 200 and worker_answers[2][0] == 200


def test_the_connection_is_kept_after_a_worker_read_its_body(
    pair: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    _, workers = pair
    files = instance_files(session(tmp_path, series=1, instances=2))
    conn = http.client.HTTPConnection("127.0.0.1", workers.port, timeout=30)
    auth = "Basic " + __import__("base64").b64encode(b"u:p").decode()
    sock_ids = []
    for label in ("E1", "E2"):
        body = tar_bytes(files)
        conn.request(
            "POST",
            f"{IMPORT}?PROJECT_ID=P&SUBJECT_ID=S&EXPT_LABEL={label}",
            body=body,
            headers={"Content-Type": "application/x-tar", "Authorization": auth},
        )
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
        assert conn.sock is not None
        sock_ids.append(conn.sock.getsockname())
    conn.request("GET", "/data/prearchive/projects/P?format=json", headers={"Authorization": auth})
    r = conn.getresponse()
    assert r.status == 200
    r.read()
    assert sock_ids[0] == sock_ids[1] == conn.sock.getsockname()  # one connection throughout
    conn.close()
    assert workers.workers is not None and workers.workers.handed == 2


def test_a_body_cut_off_keeps_the_entries_before_the_cut(
    pair: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    # Files larger than the tar reader's 64 KiB blocks, so the cut falls after whole entries.
    big = generate_session(tmp_path / "big", series=1, instances=6, image_size=(256, 256))
    files = instance_files(big)
    body = tar_bytes(files)
    cut = body[: len(body) * 2 // 3]

    def send(server: SandboxServer) -> list[Any]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(
                (
                    f"POST {IMPORT}?PROJECT_ID=P&SUBJECT_ID=S&EXPT_LABEL=E HTTP/1.1\r\n"
                    f"Host: x\r\nAuthorization: Basic dTpw\r\n"
                    f"Content-Type: application/x-tar\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + cut
            )
            s.shutdown(socket.SHUT_WR)
            s.settimeout(30)
            assert s.recv(1000) == b""  # no answer to a body that never ended
        # The server goes on serving.
        ok = post(server, tar_bytes(files), "application/x-tar", EXPT_LABEL="E2")
        return [ok.status_code, state(server)]

    plain_result, worker_result = both(pair, send)
    assert plain_result == worker_result
    assert worker_result[0] == 200
    counts = sorted(len(row[-1]) for row in worker_result[1])
    assert counts[-1] == 6 and 0 < counts[0] < 6


def test_bodies_the_workers_do_not_take_stay_in_the_request_thread(
    pair: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    _, workers = pair
    files = instance_files(session(tmp_path, series=1, instances=2))
    (one,) = list(files.values())[:1]
    assert isinstance(one, Path)
    http = requests.Session()
    http.auth = ("u", "p")
    # Multipart (spooled by the request's thread), gradual-DICOM, a body under the bandwidth cap.
    r = http.post(
        workers.url + IMPORT,
        params=DEST,
        files={"file": ("s.zip", zip_bytes(files), "application/zip")},
    )
    assert r.status_code == 200
    r = http.post(
        workers.url + IMPORT,
        params={"import-handler": "gradual-DICOM", "inbody": "true", **DEST},
        data=one.read_bytes(),
        headers={"Content-Type": "application/dicom"},
    )
    assert r.status_code == 200
    workers.set_knobs(bandwidth_mbps=1000)
    assert post(workers, tar_bytes(files), "application/x-tar", EXPT_LABEL="E2").status_code == 200
    assert workers.workers is not None and workers.workers.handed == 0
    workers.set_knobs(bandwidth_mbps=0)
    assert post(workers, tar_bytes(files), "application/x-tar", EXPT_LABEL="E3").status_code == 200
    assert workers.workers.handed == 1


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_a_tls_connection_is_imported_in_the_request_thread(
    pair: tuple[SandboxServer, SandboxServer], tmp_path: Path
) -> None:
    """A worker reads the socket's bytes as they arrive: over TLS they are not the body."""
    _, workers = pair
    cert, key = self_signed_certificate(tmp_path, "localhost")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    assert workers._httpd is not None
    workers._httpd.socket = context.wrap_socket(workers._httpd.socket, server_side=True)
    files = instance_files(session(tmp_path, series=1, instances=3))
    r = requests.post(
        workers.url.replace("http://", "https://", 1) + IMPORT,
        params=DEST,
        data=tar_bytes(files),
        headers={"Content-Type": "application/x-tar"},
        auth=("u", "p"),
        timeout=60,
        verify=False,
    )
    assert r.status_code == 200, r.text
    assert workers.workers is not None and workers.workers.handed == 0
    (row,) = workers.prearchive_sessions()
    assert len(workers.prearchive_files(row)) == 3


@contextmanager
def one_server(tmp_path: Path, home: int) -> Iterator[SandboxServer]:
    """A started server with two import workers that keep ``home`` bodies in the server
    process."""
    with SandboxServer(
        tmp_path / "d", users=USERS, projects=TEST_PROJECTS, import_workers=2
    ) as server:
        assert server.workers is not None
        server.workers.home = home
        yield server


def test_a_worker_that_dies_fails_its_request_and_the_others_take_over(
    tmp_path: Path,
) -> None:
    files = instance_files(session(tmp_path, series=1, instances=3))
    with one_server(tmp_path, home=0) as server:
        assert server.workers is not None
        procs = list(server.workers._procs)
        server.set_knobs(per_file_ms=3000)  # the first file's write waits under its lock
        result: list[requests.Response] = []
        t = threading.Thread(
            target=lambda: result.append(post(server, tar_bytes(files), "application/x-tar"))
        )
        t.start()
        deadline = time.monotonic() + 30
        while server.workers._busy == [0, 0] and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = server.workers._busy.index(1)
        os.kill(procs[busy].pid, signal.SIGKILL)
        t.join(30)
        assert result and result[0].status_code == 500
        server.set_knobs(per_file_ms=0)
        # The dead worker is passed over; the live one takes the next bodies.
        for label in ("E2", "E3"):
            r = post(server, tar_bytes(files), "application/x-tar", EXPT_LABEL=label)
            assert r.status_code == 200, r.text
        assert server.workers.handed == 3
        procs[1 - busy].kill()
        procs[1 - busy].wait()
        # No worker left: the request's thread imports.
        r = post(server, tar_bytes(files), "application/x-tar", EXPT_LABEL="E4")
        assert r.status_code == 200 and server.workers.handed == 3
    assert all(p.poll() is not None for p in procs)


def test_stop_ends_the_workers_even_with_a_body_in_flight(tmp_path: Path) -> None:
    files = instance_files(session(tmp_path, series=1, instances=2))
    server = SandboxServer(
        tmp_path / "d", users=USERS, projects=TEST_PROJECTS, import_workers=2
    ).start()
    assert server.workers is not None
    server.workers.home = 0
    procs = list(server.workers._procs)
    body = tar_bytes(files)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(
        (
            f"POST {IMPORT}?PROJECT_ID=P&SUBJECT_ID=S&EXPT_LABEL=E HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Basic dTpw\r\nContent-Type: application/x-tar\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body[:1000]  # then nothing more: the worker waits for the rest
    )
    deadline = time.monotonic() + 30
    while server.workers.handed == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.workers.handed == 1
    began = time.monotonic()
    server.stop()
    assert all(p.poll() is not None for p in procs)
    assert time.monotonic() - began < 20
    s.close()


def test_the_server_imports_one_body_itself_and_hands_over_those_that_come_meanwhile(
    tmp_path: Path,
) -> None:
    files = instance_files(session(tmp_path, series=1, instances=2))
    # (1 is the default; pytest --import-workers sets 0)
    with one_server(tmp_path, home=1) as server:
        assert server.workers is not None
        # One at a time: each in the request's thread.
        for label in ("E1", "E2"):
            assert post(server, tar_bytes(files), "application/x-tar", EXPT_LABEL=label).ok
        assert server.workers.handed == 0
        # The first holds the server's own turn (its files' writes wait 1 s each); the two
        # sent meanwhile go to the workers.
        server.set_knobs(per_file_ms=1000)
        first = threading.Thread(
            target=lambda: post(server, tar_bytes(files), "application/x-tar", EXPT_LABEL="E3")
        )
        first.start()
        deadline = time.monotonic() + 30
        while server.workers._home == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with ThreadPoolExecutor(2) as pool:
            codes = list(
                pool.map(
                    lambda label: (
                        post(
                            server, tar_bytes(files), "application/x-tar", EXPT_LABEL=label
                        ).status_code
                    ),
                    ["E4", "E5"],
                )
            )
        first.join(30)
        assert codes == [200, 200]
        assert server.workers.handed == 2
        assert (
            sorted(len(server.prearchive_files(s)) for s in server.prearchive_sessions()) == [2] * 5
        )


def test_xio_sandbox_serves_imports_with_workers(tmp_path: Path) -> None:
    """``xio sandbox --import-workers 2``: its worker processes run and take an upload."""
    files = instance_files(session(tmp_path, series=1, instances=3))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xnatio",
            "sandbox",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            "0",
            "--user",
            "u",
            "--password",
            "p",
            "--project",
            "P",
            "--import-workers",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "listening on" in line, line
        url = line.split("listening on", 1)[1].strip()
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 2
        r = requests.post(
            url + IMPORT,
            params=DEST,
            data=tar_bytes(files),
            headers={"Content-Type": "application/x-tar"},
            auth=("u", "p"),
            timeout=60,
        )
        assert r.status_code == 200, r.text
        r = requests.get(url + "/_sandbox/stats", timeout=10)
        assert r.json()["files_imported"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None
        proc.stderr.close()
    for pid in children:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )
