"""Pre-flight and HTTP edges end to end: ``xio upload-dicom`` against the local XNAT (real HTTP).

Each refusal exits 2 (or 4 for TLS) with one line, and no DICOM byte reaches the server: the
sandbox's statistics show no import request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner, Result

from upload_helpers import PASSWORD as ADMIN_PASSWORD
from upload_helpers import import_tar
from xnatio.cli.main import cli
from xnatio.discover import discover
from xnatio.sandbox import SandboxServer
from xnatio.synth import SyntheticSession, generate_session

pytestmark = pytest.mark.integration

Invoke = Callable[..., Result]


@pytest.fixture
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    """Admin ``admin``; project P (bob: collaborator, reads only; carol: member); project
    PROJ01 with alias ALIAS1."""
    server = SandboxServer(
        tmp_path_factory.mktemp("xnat"),
        users={"admin": ADMIN_PASSWORD, "bob": "bob-pw", "carol": "carol-pw"},
        projects=("P",),
    ).start()
    access = server.access
    access.set_role("P", "bob", "collaborator")
    access.set_role("P", "carol", "member")
    access.create_project("PROJ01", aliases=("ALIAS1",), owner="admin")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def study(tmp_path: Path) -> SyntheticSession:
    return generate_session(tmp_path / "a", series=1, instances=3, image_size=(16, 16))


@pytest.fixture
def other_study(tmp_path: Path) -> SyntheticSession:
    return generate_session(tmp_path / "b", series=1, instances=2, image_size=(16, 16), seed=7)


def env_for(url: str, user: str = "admin") -> dict[str, str]:
    password = ADMIN_PASSWORD if user == "admin" else f"{user}-pw"
    return {"XNAT_SERVER": url, "XNAT_USERNAME": user, "XNAT_PASSWORD": password}


def archived(url: str, study: SyntheticSession, subject: str = "S", session: str = "E") -> None:
    """Put ``study`` in the archive as another client would (one DICOM-zip import into dest)."""
    import_tar(url, discover(study.root).files, "P", subject, session)


def preflight_of(r: Result) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(r.stdout)["preflight"]
    return found


@pytest.fixture
def xio() -> Invoke:
    runner = CliRunner()

    def invoke(*args: object, exit_code: int = 0, env: dict[str, str]) -> Result:
        result = runner.invoke(cli, [str(a) for a in args], env=env)
        assert result.exit_code == exit_code, result.output
        assert "Traceback" not in result.output
        return result

    return invoke


def error_line(result: Result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def nothing_sent(server: SandboxServer) -> bool:
    return not any("import" in key for key in server.stats())


# -- labels, projects, rights ------------------------------------------------------------------


def test_a_label_xnat_would_clean_is_refused(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession
) -> None:
    r = xio("upload-dicom", "P", "S", "MR.1", study.root, exit_code=2, env=env_for(sandbox.url))
    assert "XNAT would archive session label 'MR.1' as 'MR_1'" in error_line(r)
    assert "discover" not in r.stderr  # refused before the (possibly long) discovery
    assert nothing_sent(sandbox)


def test_an_unknown_project_is_refused(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession
) -> None:
    r = xio("upload-dicom", "NOPE", "S", "E", study.root, exit_code=2, env=env_for(sandbox.url))
    assert "project NOPE does not exist" in error_line(r)
    assert nothing_sent(sandbox) and sandbox.prearchive_sessions() == []


def test_a_project_the_user_may_only_read_is_refused(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession
) -> None:
    env = env_for(sandbox.url, "bob")
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=2, env=env)
    assert "user bob may not create subjects (xnat:subjectData) in project P" in error_line(r)
    assert nothing_sent(sandbox)


def test_a_member_passes_and_an_alias_resolves_to_the_project_id(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession
) -> None:
    dry = (study.root, "--dry-run", "--json")
    r = xio("upload-dicom", "P", "S", "E", *dry, env=env_for(sandbox.url, "carol"))
    assert preflight_of(r)["project"] == "P"
    found = preflight_of(xio("upload-dicom", "ALIAS1", "S", "E", *dry, env=env_for(sandbox.url)))
    assert found["project"] == "PROJ01"
    assert found["notes"] == ["project ALIAS1 is an alias of PROJ01: using PROJ01"]
    assert nothing_sent(sandbox)


def test_a_subject_under_another_case_keeps_its_spelling(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession, other_study: SyntheticSession
) -> None:
    archived(sandbox.url, study, subject="Sub01", session="E1")
    r = xio(
        "upload-dicom",
        "P",
        "SUB01",
        "E2",
        other_study.root,
        "--dry-run",
        "--json",
        env=env_for(sandbox.url),
    )
    found = preflight_of(r)
    assert found["subject"] == "Sub01" and found["subject_exists"] is True
    assert found["notes"][0].startswith("subject SUB01 exists as Sub01")


def test_another_study_under_an_existing_label_is_refused_before_sending(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession, other_study: SyntheticSession
) -> None:
    archived(sandbox.url, study)
    env = env_for(sandbox.url)
    before = sandbox.stats().get("POST /data/services/import", 0)
    for extra in ((), ("--overwrite", "append")):
        r = xio("upload-dicom", "P", "S", "E", other_study.root, *extra, exit_code=2, env=env)
        line = error_line(r)
        assert "session E in project P already holds another study" in line
        assert "another session label" in line
    assert sandbox.stats().get("POST /data/services/import", 0) == before
    # The same study goes on (the send converges on what the session holds).
    r = xio("upload-dicom", "P", "S", "E", study.root, "--dry-run", "--json", env=env)
    (session,) = preflight_of(r)["sessions"]
    assert session["exists"] is True and session["same_study"] is True


def test_dry_run_checks_the_server_when_it_can(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession
) -> None:
    r = xio(
        "upload-dicom", "P", "S", "E", study.root, "--dry-run", "--json", env=env_for(sandbox.url)
    )
    found = preflight_of(r)
    assert found["project"] == "P" and found["sessions"][0]["exists"] is False
    r = xio(
        "upload-dicom",
        "NOPE",
        "S",
        "E",
        study.root,
        "--dry-run",
        exit_code=2,
        env=env_for(sandbox.url),
    )
    assert "project NOPE does not exist" in error_line(r)
    # Without credentials: the labels only.
    r = xio("upload-dicom", "P", "S", "E.1", study.root, "--dry-run", exit_code=2, env={})
    assert "as 'E_1'" in error_line(r)
    assert nothing_sent(sandbox)


# -- HTTP in front of XNAT ---------------------------------------------------------------------


@pytest.fixture
def under_xnat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    server = SandboxServer(
        tmp_path_factory.mktemp("ctx"),
        users={"admin": ADMIN_PASSWORD},
        projects=("P",),
        context_path="/xnat",
    ).start()
    try:
        yield server
    finally:
        server.stop()


def test_a_context_path_works_for_every_request(
    xio: Invoke, under_xnat: SandboxServer, study: SyntheticSession
) -> None:
    root = under_xnat.root_url.rstrip("/")
    assert under_xnat.url == root + "/xnat"
    r = xio(
        "upload-dicom",
        "P",
        "S",
        "E",
        study.root,
        "--dry-run",
        "--json",
        env=env_for(root + "/xnat"),
    )
    assert preflight_of(r)["server"] == root + "/xnat"
    # Login, project, rights, subjects, session: every request went under /xnat.
    asked = [k for k in under_xnat.stats() if k.startswith(("GET ", "POST ", "DELETE "))]
    assert len(asked) >= 5
    # Without it, the root is not XNAT: one line that says how to fix it.
    r = xio("upload-dicom", "P", "S", "E2", study.root, exit_code=2, env=env_for(root))
    line = error_line(r)
    assert "is not an XNAT server" in line and "context path" in line


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_each_redirect_kind_at_login_is_an_error_naming_the_url(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession, status: int
) -> None:
    sandbox.set_knobs(
        redirect_status=status, redirect_to="https://proxy.example.org", fault_path="/data"
    )
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=2, env=env_for(sandbox.url))
    assert error_line(r) == (
        f"error: POST {sandbox.url}/data/JSESSION was redirected (HTTP {status}) to "
        "https://proxy.example.org/data/JSESSION; not followed: check --server (XNAT's own "
        "address and context path)"
    )


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirected_import_is_never_taken_as_success(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession, status: int
) -> None:
    """Issue 11 item 9: a 3xx on import was taken as a URI list ("archived as </html>")."""
    sandbox.set_knobs(
        redirect_status=status,
        redirect_to="https://proxy.example.org",
        fault_path="/data/services/import",
    )
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=1, env=env_for(sandbox.url))
    assert (
        f"batch 1: POST {sandbox.url}/data/services/import was redirected (HTTP {status}) to "
        "https://proxy.example.org/data/services/import" in r.stdout
    )
    assert "archived as" not in r.output and "</html>" not in r.output
    assert sandbox.experiment_labels("P") == []


def test_a_login_page_answering_200_is_an_error(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession
) -> None:
    sandbox.set_knobs(login_page=True, fault_path="/data/services/import")
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=1, env=env_for(sandbox.url))
    assert f"POST {sandbox.url}/data/services/import answered an HTML page" in r.stdout
    # A single sign-on front that sends every request to its login page: caught at login.
    sandbox.set_knobs(login_page=False, redirect_status=302, redirect_to="", fault_path="/data")
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=2, env=env_for(sandbox.url))
    assert "a login page answered" in error_line(r)


def test_https_to_the_http_port_says_the_server_answered_plain_http(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession
) -> None:
    url = sandbox.url.replace("http://", "https://")
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=4, env=env_for(url))
    line = error_line(r)
    assert "answered plain HTTP" in line and "use --server http://" in line
    assert "--ca-bundle" not in line


# -- the session cap and the lockout (facts 2) -------------------------------------------------


@pytest.fixture
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    """XNAT's limits, made small: 1 session per user, a lock after 2 failed logins."""
    server = SandboxServer(
        tmp_path_factory.mktemp("cap"),
        users={"admin": ADMIN_PASSWORD},
        projects=("P",),
        max_sessions=1,
        max_failed_logins=2,
    ).start()
    try:
        yield server
    finally:
        server.stop()


def test_one_session_per_run_and_the_cap_says_what_to_do(
    xio: Invoke, capped: SandboxServer, study: SyntheticSession
) -> None:
    # A run logs in once and ends its session (the pre-flight's dozen requests use one session).
    xio("upload-dicom", "P", "S", "E", study.root, "--dry-run", env=env_for(capped.url))
    xio("upload-dicom", "P", "S", "E", study.root, "--dry-run", env=env_for(capped.url))
    # Another client holds the only session now: XNAT refuses new logins, keeps the old one.
    held = requests.get(f"{capped.url}/data/projects", auth=("admin", ADMIN_PASSWORD), timeout=10)
    assert held.status_code == 200
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=3, env=env_for(capped.url))
    line = error_line(r)
    assert "reached XNAT's limit of open sessions" in line and "Wait" in line


def test_a_locked_account_says_what_to_do(
    xio: Invoke, capped: SandboxServer, study: SyntheticSession
) -> None:
    wrong = {**env_for(capped.url), "XNAT_PASSWORD": "wrong"}
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=3, env=wrong)
    assert "refused the credentials of user 'admin'" in error_line(r)
    xio("upload-dicom", "P", "S", "E", study.root, exit_code=3, env=wrong)  # the 2nd locks it
    # Now even the right password is refused, and the line says why.
    r = xio("upload-dicom", "P", "S", "E", study.root, exit_code=3, env=env_for(capped.url))
    assert "the account is locked" in error_line(r) and "an hour" in error_line(r)
    assert nothing_sent(capped)


def test_dicom_store_is_checked_too_before_any_association(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession
) -> None:
    """With XNAT's address and credentials known, C-STORE gets the same pre-flight: an unknown
    project would route the files to Unassigned (facts 6)."""
    args = ("--transport", "dicom-store", "--dicom-host", "127.0.0.1", "--dicom-port", "9")
    r = xio(
        "upload-dicom", "NOPE", "S", "E", study.root, *args, exit_code=2, env=env_for(sandbox.url)
    )
    assert "project NOPE does not exist" in error_line(r)
    r = xio(
        "upload-dicom", "P", "S", "E.1", study.root, *args, exit_code=2, env=env_for(sandbox.url)
    )
    assert "as 'E_1'" in error_line(r)


# -- whole uploads through what the pre-flight resolved -----------------------------------------


def test_whole_upload_under_a_context_path(
    xio: Invoke, under_xnat: SandboxServer, study: SyntheticSession
) -> None:
    """Issue 11 item 9: ``--server http://host:port/xnat`` failed with "/xnat/data/JSESSION was
    not found". Send, commit and read-back all go under the context path."""
    r = xio("upload-dicom", "P", "S", "E", study.root, "--json", env=env_for(under_xnat.url))
    assert json.loads(r.stdout)["status"] == "success"
    assert under_xnat.experiment_labels("P") == ["E"]


def test_whole_upload_through_an_alias_and_another_case_of_the_subject(
    xio: Invoke, sandbox: SandboxServer, study: SyntheticSession, other_study: SyntheticSession
) -> None:
    env = env_for(sandbox.url)
    r = xio("upload-dicom", "ALIAS1", "Sub01", "E1", study.root, "--json", env=env)
    assert "project ALIAS1 is an alias of PROJ01: using PROJ01" in r.stderr
    assert json.loads(r.stdout)["status"] == "success"
    r = xio("upload-dicom", "PROJ01", "SUB01", "E2", other_study.root, "--json", env=env)
    assert "subject SUB01 exists as Sub01" in r.stderr
    assert json.loads(r.stdout)["status"] == "success"
    assert sorted(sandbox.experiment_labels("PROJ01")) == ["E1", "E2"]
    store = sandbox.store
    assert store is not None and [s["label"] for s in store.subjects("PROJ01")] == ["Sub01"]


def test_a_whole_upload_uses_one_xnat_session(
    xio: Invoke, capped: SandboxServer, study: SyntheticSession
) -> None:
    """facts 2: 1000 sessions per user; xio keeps ONE for the run (pre-flight, send, commit,
    read-back), here under a cap of 1."""
    r = xio("upload-dicom", "P", "S", "E", study.root, "--json", env=env_for(capped.url))
    assert json.loads(r.stdout)["status"] == "success"
