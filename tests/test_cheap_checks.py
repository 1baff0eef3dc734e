"""Cheap checks before the expensive walk (issue 17): the library pipeline logs in and takes the
run lock of the session *before* discovery, so a wrong password, a server that is down or another
run on the same session is reported at once, not after reading 50,000 headers.

Discovery always reports its start (a DISCOVER event at 0), so "no DISCOVER event" proves the walk
never began. Every test here is fast: one small session, no upload completes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from xnatio.cli.main import cli
from xnatio.errors import AuthError
from xnatio.journal import LockedError, RunLock, Target
from xnatio.models import Phase, ProgressEvent
from xnatio.pipeline import UploadOptions, upload
from xnatio.settings import Secret, Settings
from xnatio.synth import generate_session

if TYPE_CHECKING:
    from xnatio.sandbox import SandboxServer

PROJECT, SUBJECT, SESSION = "PROJ", "SUBJ01", "SESS01"


@pytest.fixture
def session(tmp_path: Path) -> Path:
    root = tmp_path / "dicom"
    generate_session(root, series=1, instances=3, image_size=(8, 8))
    return root


def _options(path: Path, tmp_path: Path, transport: str = "rest") -> UploadOptions:
    return UploadOptions(
        project=PROJECT,
        subject=SUBJECT,
        session=SESSION,
        path=path,
        transport=transport,
        journal=tmp_path / "journal.sqlite",
        lock_dir=tmp_path / "locks",
    )


def _phases(events: list[ProgressEvent]) -> set[Phase]:
    return {e.phase for e in events}


def test_a_locked_session_is_refused_before_discovery_dicom_store(
    session: Path, tmp_path: Path
) -> None:
    """C-STORE, no server needed: the lock is taken before any header is read."""
    opts = _options(session, tmp_path, "dicom-store")
    settings = Settings(dicom_host="127.0.0.1", dicom_port=1, dicom_called_aet="XNAT")
    other = RunLock(Target.dicom("127.0.0.1", 1, "XNAT", PROJECT, SUBJECT, SESSION), opts.lock_dir)
    other.acquire()
    events: list[ProgressEvent] = []
    try:
        with pytest.raises(LockedError, match="another xio run"):
            upload(settings=settings, options=opts, progress=events.append)
    finally:
        other.release()
    assert Phase.DISCOVER not in _phases(events)


@pytest.mark.integration
def test_rest_login_and_lock_come_before_discovery(
    xnat_server: SandboxServer, session: Path, tmp_path: Path
) -> None:
    opts = _options(session, tmp_path)
    good = Settings(
        server=xnat_server.url,
        username=xnat_server.username,
        password=Secret(xnat_server.password),
    )
    # A wrong password: refused at the login, nothing discovered.
    events: list[ProgressEvent] = []
    bad = Settings(server=xnat_server.url, username="admin", password=Secret("wrong"))
    with pytest.raises(AuthError):
        upload(settings=bad, options=opts, progress=events.append)
    assert Phase.DISCOVER not in _phases(events)
    assert Phase.CONNECT in _phases(events)  # "logging in to ..." was shown first

    # Another run holds the session (another spelling of the same server and labels).
    same = Target.rest(
        xnat_server.url.replace("127.0.0.1", "localhost"), PROJECT, SUBJECT.lower(), SESSION
    )
    other = RunLock(same, opts.lock_dir)
    other.acquire()
    events.clear()
    try:
        with pytest.raises(LockedError):
            upload(settings=good, options=opts, progress=events.append)
    finally:
        other.release()
    assert Phase.DISCOVER not in _phases(events)

    # Free again: the same call uploads, and releases its lock at the end.
    events.clear()
    result = upload(settings=good, options=opts, progress=events.append)
    assert result.success and len(result.uploaded) == 3
    # One connect phase, finished before discovery (a display draws a row per phase change:
    # a second "connect" after discovery would be a second row saying the same).
    phases = [e.phase for e in events]
    assert Phase.CONNECT not in phases[phases.index(Phase.DISCOVER) :]
    assert [(e.current, e.total) for e in events if e.phase is Phase.CONNECT][-1] == (1, 1)
    again = RunLock(same, opts.lock_dir)
    again.acquire()  # not held any more
    again.release()


@pytest.mark.integration
def test_cli_reports_a_locked_session_before_discovery(
    xnat_server: SandboxServer, session: Path, tmp_path: Path
) -> None:
    """`xio upload-dicom` goes through the same order: exit 2, one line, no discovery line."""
    lock_dir = tmp_path / "locks"
    other = RunLock(Target.rest(xnat_server.url, PROJECT, SUBJECT, SESSION), lock_dir)
    other.acquire()
    env = {
        "XNAT_SERVER": xnat_server.url,
        "XNAT_USERNAME": xnat_server.username,
        "XNAT_PASSWORD": xnat_server.password,
        "XNATIO_LOCK_DIR": str(lock_dir),
    }
    try:
        res = CliRunner().invoke(
            cli, ["upload-dicom", PROJECT, SUBJECT, SESSION, str(session)], env=env
        )
    finally:
        other.release()
    assert res.exit_code == 2, res.output
    assert "another xio run" in res.stderr
    assert "reading DICOM headers" not in res.stderr
    assert "logging in to" in res.stderr


@pytest.mark.integration
def test_python_api_logs_in_before_discovery(
    xnat_server: SandboxServer, session: Path, tmp_path: Path
) -> None:
    from xnatio.uploaders import upload_dicom_parallel_rest

    events: list[ProgressEvent] = []
    with pytest.raises(AuthError):
        upload_dicom_parallel_rest(
            xnat_server.url,
            "admin",
            "wrong",
            source_dir=session,
            project=PROJECT,
            subject=SUBJECT,
            session=SESSION,
            progress_callback=events.append,
            journal=tmp_path / "journal.sqlite",
        )
    assert Phase.DISCOVER not in _phases(events)


def test_a_missing_path_is_reported_before_anything_else(tmp_path: Path) -> None:
    """No server, no credentials: the path is the first thing checked."""
    from xnatio.errors import UsageError

    opts = _options(tmp_path / "nope", tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        upload(settings=Settings(), options=opts)


@pytest.mark.integration
def test_a_project_alias_is_locked_under_its_id_too(
    xnat_server: SandboxServer, session: Path, tmp_path: Path
) -> None:
    """Locked before discovery under the alias given; after the pre-flight resolved it (facts
    2), under the project's ID too: a run given the ID and one given the alias exclude each
    other."""
    xnat_server.access.create_project("PROJ01", aliases=("ALIAS1",), owner="admin")
    opts = dataclasses.replace(_options(session, tmp_path), project="ALIAS1")
    settings = Settings(
        server=xnat_server.url,
        username=xnat_server.username,
        password=Secret(xnat_server.password),
    )
    other = RunLock(Target.rest(xnat_server.url, "PROJ01", SUBJECT, SESSION), opts.lock_dir)
    other.acquire()
    try:
        with pytest.raises(LockedError, match="PROJ01"):
            upload(settings=settings, options=opts)
    finally:
        other.release()
    result = upload(settings=settings, options=opts)
    assert result.success and result.project == "PROJ01"


@pytest.mark.integration
def test_upload_many_logs_in_and_locks_before_the_walk(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    """The walk (here: reading a plan file that is not UTF-8, which fails at once) comes after
    the run lock and the login: they are what the user hears about."""
    from xnatio.many.ledger import Ledger

    plan = tmp_path / "plan.csv"
    plan.write_bytes(b"\xff\xfe not a plan")
    state = tmp_path / "state"
    args = ["upload-many", str(plan), "--state-dir", str(state)]
    env = {"XNAT_SERVER": xnat_server.url, "XNAT_USERNAME": "admin", "XNAT_PASSWORD": "wrong"}
    res = CliRunner().invoke(cli, args, env=env)
    assert res.exit_code == 3, res.output  # the login, not "plan ... is not UTF-8" (exit 2)
    assert "not UTF-8" not in res.output

    env["XNAT_PASSWORD"] = xnat_server.password
    ledger = Ledger(state)
    ledger.ensure()
    with ledger.run_lock().held():
        res = CliRunner().invoke(cli, args, env=env)
    assert res.exit_code == 2 and "not UTF-8" not in res.output, res.output
    res = CliRunner().invoke(cli, args, env=env)  # free: now the plan file is read
    assert res.exit_code == 2 and "not UTF-8" in res.output, res.output
