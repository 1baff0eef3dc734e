"""Prearchive listing, build/commit/move/delete, /data/services/archive, restart (facts §3)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sandbox_helpers import (
    TEST_PROJECTS,
    client,
    h3,
    import_zip,
    instance_files,
    session,
    zip_bytes,
)

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration

DEST = {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}
ROW_FIELDS = {
    "project", "timestamp", "lastmod", "uploaded", "subject", "folderName", "name", "tag",
    "status", "url", "autoarchive", "prevent_auto_commit",
}  # fmt: skip


def upload_batches(server: SandboxServer, tmp_path: Path) -> tuple[str, list[str]]:
    """The Desktop Client pattern: batches with prevent_auto_commit, same URI every time."""
    s = session(tmp_path, series=2, instances=2)
    uids = list(s.instances)
    http = client(server)
    uris = set()
    for part in (uids[:2], uids[2:]):
        r = import_zip(
            http,
            server,
            zip_bytes({u: s.instances[u] for u in part}),
            **DEST,
            prevent_auto_commit="true",
        )
        assert r.status_code == 200, r.text
        uris.add(r.text.strip())
    (uri,) = uris
    return uri, uids


def test_listing_rows(xnat_server: SandboxServer, tmp_path: Path) -> None:
    uri, _ = upload_batches(xnat_server, tmp_path)
    rows = (
        client(xnat_server)
        .get(xnat_server.url + "/data/prearchive/projects/P", params={"format": "json"})
        .json()["ResultSet"]["Result"]
    )
    (row,) = rows
    assert set(row) >= ROW_FIELDS
    assert all(isinstance(v, str) for v in row.values())
    assert row["url"] == uri.removeprefix("/data")
    assert (row["status"], row["prevent_auto_commit"], row["name"]) == ("RECEIVING", "true", "E")


def test_commit_then_archive_service(xnat_server: SandboxServer, tmp_path: Path) -> None:
    uri, uids = upload_batches(xnat_server, tmp_path)
    http = client(xnat_server)
    r = http.post(xnat_server.url + uri, params={"action": "commit"})
    assert r.status_code == 200
    assert r.text.strip() == uri
    (s,) = xnat_server.prearchive_sessions("P")
    assert s.status == "READY"

    src = uri.removeprefix("/data")
    # Parameters as a form body (xnatctl does this) count like query parameters.
    r = http.post(xnat_server.url + "/data/services/archive", data={"src": src})
    assert r.status_code == 200, r.text
    assert r.text == "/data/archive/projects/P/subjects/S/experiments/E\r\n"
    assert set(xnat_server.archived_files("P", "S", "E")) == set(uids)
    assert xnat_server.prearchive_sessions("P") == []
    r = http.post(xnat_server.url + "/data/services/archive", params={"src": src})
    assert r.status_code == 404


def test_an_archived_session_is_never_seen_without_its_files(
    xnat_server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an archive moves the files, the new session is not in the archive yet: it appears
    with its scans and files at once (a reader counting files met it empty once)."""
    import os

    from xnatio.sandbox import store as store_module

    _, uids = upload_batches(xnat_server, tmp_path)
    (s,) = xnat_server.prearchive_sessions("P")
    store = xnat_server._store()
    seen: list[object] = []
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        seen.append(store.experiment("P", "E"))  # what a reader sees during the moves
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.os, "replace", replace)
    store.archive(s, merge=True, overwrite=False)
    monkeypatch.undo()
    assert len(seen) == len(uids)
    assert seen == [None] * len(uids)
    assert set(xnat_server.archived_files("P", "S", "E")) == set(uids)


def test_commit_in_auto_archive_project_answers_301(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    xnat_server.set_knobs(auto_archive_projects=["P"])
    uri, uids = upload_batches(xnat_server, tmp_path)
    r = client(xnat_server).post(
        xnat_server.url + uri, params={"action": "commit"}, allow_redirects=False
    )
    # facts 3.3: 301, text/plain body = the archive URI, no Location header (PSR:403-435).
    assert r.status_code == 301
    archive_uri = "/data/archive/projects/P/subjects/S/experiments/E"
    assert "Location" not in r.headers
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.text == archive_uri
    assert set(xnat_server.archived_files("P", "S", "E")) == set(uids)


def test_archive_service_renames_and_refuses_existing(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    uri, _ = upload_batches(xnat_server, tmp_path)
    http = client(xnat_server)
    src = uri.removeprefix("/data")
    r = http.post(
        xnat_server.url + "/data/services/archive",
        params={"src": src, "subject": "S9", "session": "E9"},
    )
    assert r.text == "/data/archive/projects/P/subjects/S9/experiments/E9\r\n"
    # The same files again into that session: it merges (facts 1.5), but they clash — 500
    # "FAILED: …" (facts 3.4), the row CONFLICT — unless overwrite=append|delete.
    uri2, _ = upload_batches(xnat_server, tmp_path / "again")
    params = {"src": uri2.removeprefix("/data"), "session": "E9", "subject": "s9"}
    r = http.post(xnat_server.url + "/data/services/archive", params=params)
    assert r.status_code == 500
    assert h3(r) == "FAILED: Session already exists with the same resources."
    assert [s.status for s in xnat_server.prearchive_sessions("P")] == ["CONFLICT"]
    r = http.post(
        xnat_server.url + "/data/services/archive", params={**params, "overwrite": "delete"}
    )
    assert r.status_code == 200
    # the subject matched case-insensitively: the URI shows the existing spelling (facts 3.5)
    assert r.text == "/data/archive/projects/P/subjects/S9/experiments/E9\r\n"


def test_move_and_delete(xnat_server: SandboxServer, tmp_path: Path) -> None:
    uri, _ = upload_batches(xnat_server, tmp_path)
    http = client(xnat_server)
    r = http.post(
        xnat_server.url + uri, params={"action": "move", "newProject": "Q"}, allow_redirects=False
    )
    assert r.status_code == 301  # facts 3.3: move → 301 text/uri-list, no Location
    assert "Location" not in r.headers
    moved = r.text
    assert moved.startswith("/data/prearchive/projects/Q/")
    assert http.delete(xnat_server.url + moved).status_code == 200
    assert xnat_server.prearchive_sessions() == []
    assert http.delete(xnat_server.url + moved).status_code == 404


def test_idle_timer_builds_receiving_sessions(xnat_server: SandboxServer, tmp_path: Path) -> None:
    import time

    xnat_server.set_knobs(build_idle_seconds=0.0, auto_archive_projects=["P"])
    s = session(tmp_path, series=1, instances=1)
    r = import_zip(client(xnat_server), xnat_server, zip_bytes(instance_files(s)), **DEST)
    assert r.status_code == 200
    for _ in range(50):  # the sweeper runs once a second
        if xnat_server.archived_files("P", "S", "E"):
            break
        time.sleep(0.1)
    assert set(xnat_server.archived_files("P", "S", "E")) == set(s.instances)


def test_state_survives_a_restart(tmp_path: Path) -> None:
    s = session(tmp_path, series=1, instances=2)
    data = tmp_path / "data"
    with SandboxServer(data, users={"u": "p"}, projects=TEST_PROJECTS) as server:
        http = client(server)
        r = import_zip(http, server, zip_bytes(instance_files(s)), **DEST, dest="/archive")
        assert r.status_code == 200
        before = server.archived_files("P", "S", "E")
    with SandboxServer(data, users={"u": "p"}, projects=TEST_PROJECTS) as server:
        assert server.archived_files("P", "S", "E") == before
        http = client(server)
        r = http.get(
            server.url + "/data/projects/P/subjects/S/experiments/E/scans/1/resources/DICOM/files",
            params={"format": "json"},
        )
        assert {row["digest"] for row in r.json()["ResultSet"]["Result"]} == {
            f.md5 for f in before.values()
        }
