"""Contract tests of Direct-Archive against ``shared/xnat-api.md`` section 1.6, over real HTTP,
with an idle interval of 1 s so the delayed experiment appears in seconds."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from contract_helpers import DEST, as_user, eventually, files_of, send_zip, study, xnat
from sandbox_helpers import client

from xnatio.sandbox import SandboxServer
from xnatio.synth import SyntheticSession

pytestmark = pytest.mark.integration
__all__ = ["xnat"]  # the fixture

DA = {"Direct-Archive": "true"}


def send_da(server: SandboxServer, s: SyntheticSession, **params: str) -> str:
    r = send_zip(server, files_of(s), **{**DEST, **DA, **params})
    assert r.status_code == 200, r.text
    return r.text.strip()


def test_answer_is_the_xapi_uri_and_the_experiment_comes_after_the_idle_interval(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.6 lines 2-3: 200 /xapi/direct-archive/{P}/{UID}/{label}; GET → 200 JSON while
    # the DA row exists; the experiment appears only once the row was idle; then GET → 404.
    s = study(tmp_path)
    uri = send_da(xnat, s)
    assert uri == f"/xapi/direct-archive/P/{s.study_uid}/E"
    http = client(xnat)
    r = http.get(xnat.url + uri)
    if r.status_code == 200:  # the row may already be archived on a slow machine
        assert r.json()["tag"] == s.study_uid and r.json()["project"] == "P"
    # Archiving goes on in the background (files appear one by one, the row goes last): wait
    # for the whole end state, not its first sign.
    eventually(
        lambda: (
            set(xnat.archived_files("P", "S", "E")) == set(s.instances)
            and http.get(xnat.url + uri).status_code == 404
        ),
        "the whole experiment archived and the row gone",
        tries=1200,
    )
    assert xnat.prearchive_sessions("P") == []


def test_pending_row_is_not_an_experiment(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.6 line 3: nothing in the archive before the idle builder takes the row.
    xnat.set_knobs(build_idle_seconds=300)
    s = study(tmp_path)
    uri = send_da(xnat, s)
    http = client(xnat)
    assert http.get(xnat.url + uri).json()["status"] == "RECEIVING"
    assert http.get(xnat.url + "/data/projects/P/experiments/E", params={"format": "json"}
                    ).status_code == 404  # fmt: skip
    assert xnat.archived_files("P", "S", "E") == {}


def test_post_archives_now_and_needs_edit(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.6 line 2: POST the URI → archive now; 403 without edit right.
    xnat.set_knobs(build_idle_seconds=300)
    s = study(tmp_path)
    uri = send_da(xnat, s)
    http = client(xnat)
    r = http.put(xnat.url + "/data/projects/P/users/Collaborators/alice")
    assert r.status_code == 200, r.text
    alice = as_user(xnat, "alice", "alice-secret")
    assert alice.post(xnat.url + uri).status_code == 403
    assert http.post(xnat.url + uri).status_code == 200
    assert set(xnat.archived_files("P", "S", "E")) == set(s.instances)
    assert http.get(xnat.url + uri).status_code == 404


def test_falls_back_without_a_project(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.6 line 1: no project → the prearchive (Unassigned, Direct-Archive off, 1.2).
    r = send_zip(xnat, files_of(study(tmp_path)), PROJECT_ID="NOPE", EXPT_LABEL="E", **DA)
    assert r.text.startswith("/data/prearchive/projects/Unassigned/")


def test_falls_back_when_the_label_exists(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.6 line 1: the label's archive folder exists → the prearchive.
    first = study(tmp_path, "a")
    assert send_zip(xnat, files_of(first), **DEST, dest="/archive").status_code == 200
    uri = send_da(xnat, study(tmp_path, "b", seed=6))
    assert uri.startswith("/data/prearchive/projects/P/")


def test_falls_back_when_the_row_left_receiving(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.6 line 1: the DA row left RECEIVING (here: being archived) → the prearchive.
    xnat.set_knobs(build_idle_seconds=300, archive_ms=1500)
    s = study(tmp_path, instances=3)
    uids = list(s.instances)
    uri = send_zip(xnat, files_of(s, uids[:2]), **DEST, **DA).text.strip()
    http = client(xnat)
    poster = threading.Thread(target=lambda: client(xnat).post(xnat.url + uri))
    poster.start()
    eventually(lambda: '"ARCHIVING"' in http.get(xnat.url + uri).text, "ARCHIVING", 200)
    late = send_zip(xnat, files_of(s, uids[2:]), **DEST, **DA).text.strip()
    poster.join()
    assert late.startswith("/data/prearchive/projects/P/")


def test_failure_moves_the_row_to_the_prearchive_as_error(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.6 line 4: a failure moves the row to the prearchive (ERROR); an existing label
    # fails so, as DA never merges (inferred).
    xnat.set_knobs(build_idle_seconds=300)
    s = study(tmp_path)
    uri = send_da(xnat, s)
    http = client(xnat)
    url = xnat.url + "/data/projects/P/subjects/S/experiments/E"
    assert http.put(url, params={"xsiType": "xnat:mrSessionData"}).status_code == 201
    http.post(xnat.url + uri)
    (row,) = xnat.prearchive_sessions("P")
    assert (row.status, row.name) == ("ERROR", "E")
    assert set(xnat.prearchive_files(row)) == set(s.instances)
    assert http.get(xnat.url + uri).status_code == 404
