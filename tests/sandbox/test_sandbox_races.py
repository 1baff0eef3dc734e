"""XNAT's concurrency behaviour, reproduced (facts §1): the same-file race and the archive races.

The races are made deterministic with the processing-time knobs: ``per_file_ms`` keeps a file
lock held, ``archive_ms`` keeps a session ARCHIVING while the second request arrives.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sandbox_helpers import client, h3, import_zip, session, zip_bytes

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration

DEST = {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}
RACE_MESSAGES = {
    "Unable to lock session for archiving.",
    "Duplicate archive attempt. Prearchive session already archiving.",
    "Session processing may already be in progress for this session. "
    "Concurrent modification is discouraged.",
}


def wait_for_status(server: SandboxServer, status: str) -> None:
    for _ in range(1000):
        if any(s.status == status for s in server.prearchive_sessions()):
            return
        time.sleep(0.01)
    raise AssertionError(f"no prearchive session reached {status}")


def test_same_file_sent_twice_at_once(xnat_server: SandboxServer, tmp_path: Path) -> None:
    s = session(tmp_path, series=1, instances=1)
    (path,) = s.instances.values()
    xnat_server.set_knobs(per_file_ms=1000)
    barrier = threading.Barrier(2)

    def send() -> requests.Response:
        http = client(xnat_server)
        barrier.wait()
        return http.post(
            xnat_server.url + "/data/services/import",
            params={"import-handler": "gradual-DICOM", "inbody": "true", **DEST},
            data=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: send(), range(2)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 400]
    loser = next(r for r in answers if r.status_code == 400)
    assert h3(loser) == "Concurrent file sends of the same data is not supported."


def test_concurrent_archiving_imports_race_then_retry_succeeds(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    s = session(tmp_path, series=2, instances=2)
    uids = list(s.instances)
    halves = [uids[:2], uids[2:]]
    xnat_server.set_knobs(per_file_ms=150, archive_ms=300)
    barrier = threading.Barrier(2)

    def send(part: list[str]) -> requests.Response:
        http = client(xnat_server)
        body = zip_bytes({u: s.instances[u] for u in part})
        barrier.wait()
        return import_zip(http, xnat_server, body, **DEST, dest="/archive")

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, halves))
    ok = [r for r in answers if r.status_code == 200]
    failed = [r for r in answers if r.status_code != 200]
    assert len(ok) == 1 and len(failed) == 1
    assert failed[0].status_code == 400
    assert h3(failed[0]) in RACE_MESSAGES | {"Session already exists, retry with overwrite enabled"}
    # xnatctl's answer to these: retry (with overwrite, since the session now exists).
    xnat_server.set_knobs(per_file_ms=0, archive_ms=0)
    loser = halves[answers.index(failed[0])]
    r = import_zip(
        client(xnat_server),
        xnat_server,
        zip_bytes({u: s.instances[u] for u in loser}),
        **DEST,
        dest="/archive",
        overwrite="append",
    )
    assert r.status_code == 200, r.text
    assert set(xnat_server.archived_files("P", "S", "E")) == set(uids)


def test_requests_against_a_session_being_archived(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    s = session(tmp_path, series=1, instances=2)
    uids = list(s.instances)
    http = client(xnat_server)
    r = import_zip(http, xnat_server, zip_bytes({uids[0]: s.instances[uids[0]]}), **DEST)
    uri = r.text.strip()
    xnat_server.set_knobs(archive_ms=3000)
    with ThreadPoolExecutor(1) as pool:
        archiving = pool.submit(
            http.post,
            xnat_server.url + "/data/services/archive",
            params={"src": uri.removeprefix("/data")},
        )
        wait_for_status(xnat_server, "ARCHIVING")
        other = client(xnat_server)
        second = other.post(
            xnat_server.url + "/data/services/archive", params={"src": uri.removeprefix("/data")}
        )
        commit = other.post(xnat_server.url + uri, params={"action": "commit"})
        more = import_zip(other, xnat_server, zip_bytes({uids[1]: s.instances[uids[1]]}), **DEST)
        assert archiving.result().status_code == 200
    assert second.status_code == 403
    assert h3(second) == "Operation already in progress on this prearchive entry."
    assert commit.status_code == 409
    assert h3(commit) == "session document locked"
    assert more.status_code == 400
    assert "Concurrent modification is discouraged." in h3(more)


def test_destination_in_use_is_423(xnat_server: SandboxServer, tmp_path: Path) -> None:
    http = client(xnat_server)
    uris = []
    for seed in (1, 2):  # two studies, two prearchive sessions, one destination
        s = session(tmp_path / str(seed), series=1, instances=1, seed=seed)
        body = zip_bytes({p.name: p for p in s.instances.values()})
        uris.append(import_zip(http, xnat_server, body, **DEST).text.strip())
    assert uris[0] != uris[1]
    xnat_server.set_knobs(archive_ms=3000)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            http.post,
            xnat_server.url + "/data/services/archive",
            params={"src": uris[0].removeprefix("/data")},
        )
        wait_for_status(xnat_server, "ARCHIVING")
        second = client(xnat_server).post(
            xnat_server.url + "/data/services/archive",
            params={"src": uris[1].removeprefix("/data"), "overwrite": "append"},
        )
        assert first.result().status_code == 200
    assert second.status_code == 423
    assert h3(second).endswith("Destination session in use.")
