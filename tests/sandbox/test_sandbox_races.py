"""XNAT's concurrency behaviour, reproduced (facts 1.2, 1.4, 3.3, 3.4): the same-file race, the
skipped in-request build, files lost to an archive in progress and the archive races.

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
MSG_IN_PROGRESS = (
    "Session processing may already be in progress for this session. "
    "Concurrent modification is discouraged."
)


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


def test_concurrent_archiving_imports_skip_the_build_of_a_busy_row(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.3: DICOM-zip's in-request build is skipped while another request writes to the
    # row → 200 with an empty body, nothing archived by that request (DZI:126-128, 231-255).
    s = session(tmp_path, series=2, instances=2)
    uids = list(s.instances)
    halves = [uids[:2], uids[2:]]
    # Each request writes its files for 2 s: the other one's request, released by the same
    # barrier, lands within that window even on a loaded machine (with 300 ms per file it
    # sometimes arrived after the first had built: both answered with the session).
    xnat_server.set_knobs(per_file_ms=1000)
    barrier = threading.Barrier(2)

    def send(part: list[str]) -> requests.Response:
        http = client(xnat_server)
        body = zip_bytes({u: s.instances[u] for u in part})
        barrier.wait()
        return import_zip(http, xnat_server, body, **DEST, dest="/archive")

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(send, halves))
    assert [r.status_code for r in answers] == [200, 200]
    assert sorted(r.text for r in answers) == [
        "",
        "/data/archive/projects/P/subjects/S/experiments/E\r\n",
    ]
    assert set(xnat_server.archived_files("P", "S", "E")) == set(uids)
    assert xnat_server.prearchive_sessions("P") == []


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
    # facts 1.2: a file arriving during ARCHIVING is accepted into the row's folder, which the
    # archiver then deletes: 200, and the file is lost (PSA:652-664; PDB:996-1002).
    assert more.status_code == 200
    assert more.text == uri + "\r\n"
    assert set(xnat_server.archived_files("P", "S", "E")) == {uids[0]}
    assert xnat_server.prearchive_sessions("P") == []


def test_destination_in_use_fails_the_archive(xnat_server: SandboxServer, tmp_path: Path) -> None:
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
    # facts 3.4: an archiver failure is 500 "FAILED: …"; the row is then CONFLICT (a 409 cause).
    assert second.status_code == 500
    assert h3(second) == "FAILED: " + MSG_IN_PROGRESS
    assert [r.status for r in xnat_server.prearchive_sessions("P")] == ["CONFLICT"]
