"""Contract tests of the prearchive, its life cycle and the archive service against
``shared/xnat-api.md`` sections 3.1-3.4 and the archive rows of 1.5, over real HTTP, with an idle
interval of 1 s (``SandboxServer(idle_seconds=1)``) so the life cycle runs in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from contract_helpers import (
    ARCHIVE,
    DEST,
    as_user,
    eventually,
    files_of,
    send_zip,
    set_code,
    study,
    xnat,
)
from sandbox_helpers import client, h3

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration
__all__ = ["xnat"]  # the fixture

ARCHIVE_URI = "/data/archive/projects/P/subjects/S/experiments/E"


def held(
    server: SandboxServer, tmp_path: Path, name: str = "s", **kw: object
) -> tuple[str, list[str]]:
    """Files in a RECEIVING row the idle builder leaves alone (prevent_auto_commit)."""
    s = study(tmp_path, name, **kw)  # type: ignore[arg-type]
    r = send_zip(server, files_of(s), **DEST, prevent_auto_commit="true")
    assert r.status_code == 200, r.text
    return r.text.strip(), list(s.instances)


def archive(server: SandboxServer, src: str, **params: str) -> requests.Response:
    return client(server).post(
        server.url + ARCHIVE, params={"src": src, **params}, allow_redirects=False
    )


def statuses(server: SandboxServer) -> list[str]:
    return [s.status for s in server.prearchive_sessions("P")]


# -- 3.1 listing and polling -------------------------------------------------------------------
def test_poll_one_row_then_empty_once_archived(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.1 line 2: format=json → one row, an empty Result once gone (inferred).
    uri, _ = held(xnat, tmp_path)
    http = client(xnat)
    rows = http.get(xnat.url + uri, params={"format": "json"}).json()["ResultSet"]["Result"]
    assert [r["status"] for r in rows] == ["RECEIVING"]
    assert archive(xnat, uri).status_code == 200
    rows = http.get(xnat.url + uri, params={"format": "json"}).json()["ResultSet"]["Result"]
    assert rows == []


def test_session_xml_only_once_built(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.1 line 2: no format → the session XML, 404 until built.
    uri, _ = held(xnat, tmp_path)
    http = client(xnat)
    assert http.get(xnat.url + uri).status_code == 404
    assert http.post(xnat.url + uri, params={"action": "build"}).status_code == 200
    r = http.get(xnat.url + uri)
    assert r.status_code == 200 and "<xnat:" in r.text


def test_row_needs_edit_right_and_a_known_project(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.1 line 2: no edit right → 403; unknown project → 500 (PSR:104-112; PU:236-282).
    uri, _ = held(xnat, tmp_path)
    alice = as_user(xnat, "alice", "alice-secret")
    assert alice.get(xnat.url + uri).status_code == 403
    assert alice.post(xnat.url + uri, params={"action": "commit"}).status_code == 403
    ts_folder = uri.split("/projects/P/", 1)[1]
    assert (
        client(xnat).get(f"{xnat.url}/data/prearchive/projects/NOPE/{ts_folder}").status_code == 500
    )


def test_listing_shows_the_flags_of_the_request_that_created_the_row(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 3.1 line 1 (columns) + 1 "prevent_auto_commit, SOURCE, prevent_anon" row: stored
    # only by the request that creates the row; all values strings.
    set_code(xnat, "P", 4)
    s = study(tmp_path, instances=2)
    uids = list(s.instances)
    first = {"prevent_auto_commit": "true", "SOURCE": "desktop", "prevent_anon": "true"}
    send_zip(xnat, files_of(s, uids[:1]), **DEST, **first)
    send_zip(xnat, files_of(s, uids[1:]), **DEST, SOURCE="other")
    (row,) = (
        client(xnat).get(xnat.url + "/data/prearchive/projects/P").json()["ResultSet"]["Result"]
    )
    assert all(isinstance(v, str) for v in row.values())
    assert (row["autoarchive"], row["prevent_anon"], row["prevent_auto_commit"]) == (
        "AutoArchive",
        "true",
        "true",
    )
    assert row["SOURCE"] == "desktop"
    csv = client(xnat).get(xnat.url + "/data/prearchive/projects/P", params={"format": "csv"})
    header, line = csv.text.splitlines()
    assert header.split(",")[:2] == ["project", "timestamp"] and line.startswith("P,")


# -- 3.2 life cycle ----------------------------------------------------------------------------
def test_idle_builder_builds_then_leaves_ready_in_a_manual_project(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 3.2 lines 1-3: RECEIVING → (idle) QUEUED_BUILDING → BUILDING → READY; code 0: stays.
    assert send_zip(xnat, files_of(study(tmp_path)), **DEST).status_code == 200
    eventually(lambda: statuses(xnat) == ["READY"], "READY")
    assert xnat.archived_files("P", "S", "E") == {}


def test_idle_builder_auto_archives_by_project_code(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.2 line 3: archive when the project code ≥ 4; success deletes the row.
    set_code(xnat, "P", 4)
    s = study(tmp_path)
    send_zip(xnat, files_of(s), **DEST)
    eventually(lambda: xnat.archived_files("P", "S", "E"), "archived")
    assert set(xnat.archived_files("P", "S", "E")) == set(s.instances)
    assert xnat.prearchive_sessions("P") == []


@pytest.mark.parametrize("flag", [{"prevent_auto_commit": "true"}, {"SOURCE": "uploader"}])
def test_idle_builder_skips_prevent_auto_commit_and_source_uploader(
    xnat: SandboxServer, tmp_path: Path, flag: dict[str, str]
) -> None:
    # facts 3.2 line 2: not prevent_auto_commit, not SOURCE=uploader.
    set_code(xnat, "P", 4)
    send_zip(xnat, files_of(study(tmp_path)), **DEST, **flag)
    other = study(tmp_path, "o", seed=3)
    send_zip(xnat, files_of(other), PROJECT_ID="P", SUBJECT_ID="S", EXPT_LABEL="MARK")
    eventually(lambda: xnat.archived_files("P", "S", "MARK"), "the marker archived")
    assert statuses(xnat) == ["RECEIVING"]  # the builder has run, and skipped this row


def test_files_arriving_while_building_interrupt_the_build(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.2 line 4 + 3.2 line 3: BUILDING → RECEIVING_INTERRUPT; the build then leaves the
    # row RECEIVING without archiving it; the next idle pass builds and archives it all.
    set_code(xnat, "P", 4)
    xnat.set_knobs(build_ms=2500)
    s = study(tmp_path, instances=3)
    uids = list(s.instances)
    send_zip(xnat, files_of(s, uids[:2]), **DEST)
    eventually(lambda: statuses(xnat) == ["BUILDING"], "BUILDING")
    send_zip(xnat, files_of(s, uids[2:]), **DEST)
    assert statuses(xnat) == ["RECEIVING_INTERRUPT"]
    eventually(lambda: statuses(xnat) == ["RECEIVING"], "RECEIVING again")
    assert xnat.archived_files("P", "S", "E") == {}
    xnat.set_knobs(build_ms=0)
    eventually(lambda: xnat.archived_files("P", "S", "E"), "archived")
    assert set(xnat.archived_files("P", "S", "E")) == set(uids)


def test_idle_auto_archive_clash_leaves_conflict(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.5 last row + 3.2: the idle auto-archive merges; a clash → 409 → CONFLICT.
    s = study(tmp_path)
    assert send_zip(xnat, files_of(s), **DEST, dest="/archive").status_code == 200
    set_code(xnat, "P", 4)
    send_zip(xnat, files_of(s), **DEST)
    eventually(lambda: statuses(xnat) == ["CONFLICT"], "CONFLICT")


def test_idle_auto_archive_code_5_overwrites(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.5 last row: unless code 5.
    s = study(tmp_path)
    assert send_zip(xnat, files_of(s), **DEST, dest="/archive").status_code == 200
    set_code(xnat, "P", 5)
    send_zip(xnat, files_of(s), **DEST)
    eventually(lambda: xnat.prearchive_sessions("P") == [], "archived and removed")
    assert set(xnat.archived_files("P", "S", "E")) == set(s.instances)


def test_archive_failure_other_than_409_leaves_error(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.2 line 3: failure → CONFLICT for a 409 cause, else ERROR (PDB:1650-1662). A label
    # the archive cannot store (the sandbox's index refuses "!") fails with a 400.
    set_code(xnat, "P", 4)
    send_zip(xnat, files_of(study(tmp_path)), PROJECT_ID="P", SUBJECT_ID="S", EXPT_LABEL="bad!")
    eventually(lambda: statuses(xnat) == ["ERROR"], "ERROR")


# -- 3.3 prearchive actions --------------------------------------------------------------------
def test_build_answers_one_uri_without_crlf(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.3 line 2: build → 200 text/uri-list, one URI, no CRLF.
    uri, _ = held(xnat, tmp_path)
    r = client(xnat).post(xnat.url + uri, params={"action": "build"})
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/uri-list")
    assert r.text == uri


def test_commit_without_auto_archive_answers_the_prearchive_uri(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 3.3 line 3: not auto-archive → 200 text/uri-list, the prearchive URI; row READY.
    uri, _ = held(xnat, tmp_path)
    r = client(xnat).post(xnat.url + uri, params={"action": "commit"}, allow_redirects=False)
    assert (r.status_code, r.text) == (200, uri)
    assert statuses(xnat) == ["READY"]


def test_commit_with_auto_archive_is_301_text_plain_without_location(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 3.3 line 3: auto-archive → 301, body = archive URI as text/plain, no Location.
    uri, uids = held(xnat, tmp_path)
    set_code(xnat, "P", 4)
    r = client(xnat).post(xnat.url + uri, params={"action": "commit"}, allow_redirects=False)
    assert r.status_code == 301
    assert r.headers["Content-Type"].startswith("text/plain")
    assert "Location" not in r.headers
    assert r.text == ARCHIVE_URI
    assert set(xnat.archived_files("P", "S", "E")) == set(uids)


def test_action_as_a_json_body(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.3: body parameters (form/JSON) also work (PSR:221-231).
    uri, _ = held(xnat, tmp_path)
    r = client(xnat).post(xnat.url + uri, json={"action": "build"})
    assert (r.status_code, r.text) == (200, uri)
    assert statuses(xnat) == ["READY"]


def test_commit_with_aa_parameter_archives(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.2 line 3: else the AA/auto-archive parameter.
    uri, _ = held(xnat, tmp_path)
    r = client(xnat).post(xnat.url + uri, params={"action": "commit", "AA": "true"},
                          allow_redirects=False)  # fmt: skip
    assert (r.status_code, r.text) == (301, ARCHIVE_URI)


def test_commit_archive_failure_is_500_failed(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.3 line 3 + 1.5 "action=commit" row: merges; a clash → 500 "FAILED: …".
    s = study(tmp_path)
    assert send_zip(xnat, files_of(s), **DEST, dest="/archive").status_code == 200
    set_code(xnat, "P", 4)
    uri = send_zip(xnat, files_of(s), **DEST, prevent_auto_commit="true").text.strip()
    r = client(xnat).post(xnat.url + uri, params={"action": "commit"}, allow_redirects=False)
    assert (r.status_code, h3(r)) == (
        500,
        "FAILED: Session already exists with the same resources.",
    )
    assert statuses(xnat) == ["CONFLICT"]


def test_missing_row_commit_404_build_500(xnat: SandboxServer) -> None:
    # facts 3.3 line 1: missing row → 404 on commit/move, 500 on build.
    url = xnat.url + "/data/prearchive/projects/P/20200101_000000000/E"
    http = client(xnat)
    assert http.post(url, params={"action": "commit"}).status_code == 404
    assert http.post(url, params={"action": "build"}).status_code == 500


def test_move_answers_301_without_location(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.3 line 4: move&newProject=Q → 301 text/uri-list, no Location.
    uri, _ = held(xnat, tmp_path)
    r = client(xnat).post(xnat.url + uri, params={"action": "move", "newProject": "Q"},
                          allow_redirects=False)  # fmt: skip
    assert r.status_code == 301
    assert "Location" not in r.headers
    assert r.text.startswith("/data/prearchive/projects/Q/")
    assert [s.project for s in xnat.prearchive_sessions()] == ["Q"]


# -- 3.4 archive service -----------------------------------------------------------------------
def test_archive_service_200_uri_with_crlf(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.4 line 2: 200 text/uri-list "<archive URI>\r\n".
    uri, _ = held(xnat, tmp_path)
    r = archive(xnat, uri)
    assert (r.status_code, r.text) == (200, ARCHIVE_URI + "\r\n")
    assert r.headers["Content-Type"].startswith("text/uri-list")


def test_archive_service_303_when_asked_or_auto_archive_row(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 3.4 line 2: 303 to {siteUrl}/data/archive/… with redirect=true or an auto-archive row.
    uri, _ = held(xnat, tmp_path)
    r = archive(xnat, uri, redirect="true")
    assert r.status_code == 303
    assert r.headers["Location"] == xnat.url + ARCHIVE_URI
    set_code(xnat, "P", 4)
    other, _ = held(xnat, tmp_path, "o", seed=8)  # a new row: its code is 4
    r = archive(xnat, other, session="E2")
    assert r.status_code == 303
    assert r.headers["Location"].endswith("/data/archive/projects/P/subjects/S/experiments/E2")


def test_archive_service_errors(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.4 line 3: 404 "Unknown prearchive session."; 400 "Invalid src URI (…)";
    # 404 "{url} not found."; 403 without edit right ("Invalid permissions for new project.").
    http = client(xnat)
    r = http.post(xnat.url + ARCHIVE)
    assert (r.status_code, h3(r)) == (404, "Unknown prearchive session.")
    r = archive(xnat, ARCHIVE_URI)
    assert (r.status_code, h3(r)) == (400, f"Invalid src URI ({ARCHIVE_URI})")
    gone = "/data/prearchive/projects/P/20200101_000000000/E"
    r = archive(xnat, gone)
    assert (r.status_code, h3(r)) == (404, f"{gone} not found.")
    uri, _ = held(xnat, tmp_path)
    r = as_user(xnat, "alice", "alice-secret").post(xnat.url + ARCHIVE, params={"src": uri})
    assert (r.status_code, h3(r)) == (403, "Invalid permissions for new project.")


def test_archive_that_outlasts_the_timeout_is_500_and_completes(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 3.4 line 3 (and 3.3): > sessionArchiveTimeoutInterval → 500 "…did not complete
    # within the configured timeout interval."; the archive itself goes on (QBIC:140-170).
    uri, uids = held(xnat, tmp_path)
    xnat.set_knobs(archive_timeout_seconds=0.2, archive_ms=1000)
    r = archive(xnat, uri)
    assert r.status_code == 500
    assert h3(r) == (
        f"The session {uri.removeprefix('/data')} did not complete within the configured"
        " timeout interval."
    )
    # The archive goes on in the background: wait for all of it, not for its first file (the
    # files appear one by one while it runs).
    eventually(
        lambda: set(xnat.archived_files("P", "S", "E")) == set(uids),
        "every file archived after all",
        tries=1200,
    )


def test_archive_service_always_merges(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.5 "archive service, no overwrite" row: yes, it merges (Arch:123-124).
    s = study(tmp_path, instances=4)
    uids = list(s.instances)
    first = send_zip(xnat, files_of(s, uids[:2]), **DEST, prevent_auto_commit="true")
    assert archive(xnat, first.text.strip()).status_code == 200
    second = send_zip(xnat, files_of(s, uids[2:]), **DEST, prevent_auto_commit="true")
    assert archive(xnat, second.text.strip()).status_code == 200
    assert set(xnat.archived_files("P", "S", "E")) == set(uids)


@pytest.mark.parametrize("overwrite", ["append", "delete"])
def test_archive_service_clash_500_unless_append_or_delete(
    xnat: SandboxServer, tmp_path: Path, overwrite: str
) -> None:
    # facts 1.5 rows "archive service": a clash 409s (→ 500 "FAILED: …", facts 3.4) unless
    # overwrite=append|delete, which overwrite it.
    uri, uids = held(xnat, tmp_path)
    assert archive(xnat, uri).status_code == 200
    again, _ = held(xnat, tmp_path)
    r = archive(xnat, again)
    assert (r.status_code, h3(r)) == (
        500,
        "FAILED: Session already exists with the same resources.",
    )
    assert statuses(xnat) == ["CONFLICT"]
    r = archive(xnat, again, overwrite=overwrite)
    assert r.status_code == 200, r.text
    assert xnat.prearchive_sessions("P") == []
    assert set(xnat.archived_files("P", "S", "E")) == set(uids)


def test_another_study_into_an_existing_label_is_a_uid_error(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.5: merge 409s on another StudyInstanceUID (PSA:392-402).
    uri, _ = held(xnat, tmp_path)
    assert archive(xnat, uri).status_code == 200
    other, _ = held(xnat, tmp_path, "o", seed=11)
    r = archive(xnat, other, overwrite="delete")
    assert (r.status_code, h3(r)) == (
        500,
        "FAILED: Invalid modification of session UID via archive process.",
    )
    assert statuses(xnat) == ["CONFLICT"]


def test_dest_with_src_fails_and_leaves_error(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.4 line 4: dest+src → likely 500 + ERROR (inferred; the hardest answer).
    uri, _ = held(xnat, tmp_path)
    r = archive(xnat, uri, dest="/archive/projects/P/subjects/S/experiments/E")
    assert r.status_code == 500
    assert statuses(xnat) == ["ERROR"]
