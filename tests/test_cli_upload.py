"""`xio upload-dicom` through the CLI: bad input, exit codes, output streams, and real uploads
to the local XNAT-compatible server (CliRunner, plus one real subprocess)."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from xnatio.archive import instance_file_name
from xnatio.cli.main import cli
from xnatio.sandbox import SandboxServer
from xnatio.synth import SyntheticSession, generate_session

PASSWORD = "s3cret-Pa55word-never-shown"
ANSI = "\x1b["

Invoke = Callable[..., Result]


@pytest.fixture
def cli_invoke() -> Invoke:
    """Run ``xio ARGS``; on an unexpected exit code print both streams and any traceback."""
    runner = CliRunner()

    def invoke(*args: object, exit_code: int = 0, env: dict[str, str] | None = None) -> Result:
        result = runner.invoke(cli, [str(a) for a in args], env=env)
        if result.exit_code != exit_code:
            print("stdout:", result.stdout, "stderr:", result.stderr, sep="\n")
            if result.exc_info and not isinstance(result.exception, SystemExit):
                traceback.print_exception(*result.exc_info)
            pytest.fail(f"exit code {result.exit_code}, expected {exit_code}")
        return result

    return invoke


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def session(tmp_path: Path) -> SyntheticSession:
    return generate_session(tmp_path / "in", series=2, instances=4, image_size=(32, 32))


@pytest.fixture
def nowhere_env() -> dict[str, str]:
    """Complete settings pointing at a port nobody listens on."""
    return {
        "XNAT_SERVER": f"http://127.0.0.1:{_closed_port()}",
        "XNAT_USERNAME": "admin",
        "XNAT_PASSWORD": PASSWORD,
    }


def _one_error_line(result: Result) -> str:
    """The error: exactly one line, the last on stderr (progress lines may precede it)."""
    lines = result.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return errors[0]


# -- bad input and configuration (no server needed) ---------------------------------------------


def test_help_has_examples_and_exit_codes(cli_invoke: Invoke) -> None:
    for flag in ("--help", "--help-all"):
        out = cli_invoke("upload-dicom", flag).stdout
        assert "Examples:" in out and "xio upload-dicom MYPROJ SUBJ01 SUBJ01_MR1" in out
        assert "Exit codes:" in out and "4  server unreachable" in out
        for option in ("--transport", "--dry-run", "--json", "--help-all"):
            assert option in out
    for option in ("--num-batches", "--dicom-port"):  # the rarely used: --help-all only
        assert option in out


def test_missing_path_is_one_line_exit_2(cli_invoke: Invoke, tmp_path: Path) -> None:
    r = cli_invoke("upload-dicom", "P", "S", "E", tmp_path / "nope", exit_code=2)
    assert _one_error_line(r) == f"error: {tmp_path / 'nope'} does not exist."


def test_empty_directory(cli_invoke: Invoke, tmp_path: Path, env: dict[str, str]) -> None:
    (tmp_path / "empty").mkdir()
    r = cli_invoke("upload-dicom", "P", "S", "E", tmp_path / "empty", exit_code=2, env=env)
    assert "is empty" in _one_error_line(r)


def test_no_dicom_at_all(cli_invoke: Invoke, tmp_path: Path, env: dict[str, str]) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    (d / "empty.dcm").write_bytes(b"")
    r = cli_invoke("upload-dicom", "P", "S", "E", d, "-q", exit_code=2, env=env)
    line = _one_error_line(r)
    assert line.startswith(f"error: No DICOM files found in {d}: looked at 2 files")


def test_mixed_studies_are_refused_with_names_and_counts(
    cli_invoke: Invoke, tmp_path: Path, env: dict[str, str]
) -> None:
    s = generate_session(
        tmp_path / "in", series=1, instances=3, image_size=(16, 16), extras=["second-study"]
    )
    r = cli_invoke("upload-dicom", "P", "S", "E", s.root, "-q", exit_code=2, env=env)
    line = _one_error_line(r)
    assert "holds 2 studies" in line
    assert f"{s.study_uid} (patient SYNTH001, 3 files)" in line
    assert f"{s.second_study_uid} (patient SYNTH001, 1 file)" in line
    assert "--allow-multiple-studies" in line


def test_no_server_configured(cli_invoke: Invoke, session: SyntheticSession) -> None:
    r = cli_invoke("upload-dicom", "P", "S", "E", session.root, exit_code=2)
    assert "no XNAT server given" in _one_error_line(r)


def test_no_password_is_exit_3_and_names_sources(
    cli_invoke: Invoke, session: SyntheticSession
) -> None:
    env = {"XNAT_SERVER": "http://127.0.0.1:9", "XNAT_USERNAME": "admin"}
    r = cli_invoke("upload-dicom", "P", "S", "E", session.root, exit_code=3, env=env)
    line = _one_error_line(r)
    assert "no password" in line and "XNAT_PASSWORD" in line


def test_unreachable_server_is_exit_4(
    cli_invoke: Invoke, session: SyntheticSession, nowhere_env: dict[str, str]
) -> None:
    r = cli_invoke(
        "upload-dicom", "P", "S", "E", session.root, "--retries", "0", exit_code=4, env=nowhere_env
    )
    assert PASSWORD not in r.output
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.output


def test_json_errors_still_give_a_result_on_stdout(
    cli_invoke: Invoke, session: SyntheticSession, nowhere_env: dict[str, str]
) -> None:
    args = ("upload-dicom", "P", "S", "E", session.root, "--retries", "0", "--json")
    r = cli_invoke(*args, exit_code=4, env=nowhere_env)
    result = json.loads(r.stdout)
    assert result["status"] == "error" and result["exit_code"] == 4
    assert r.stderr.strip().splitlines()[-1] == f"error: {result['error']}"


def test_quiet_and_verbose_do_not_outlive_the_command(cli_invoke: Invoke, tmp_path: Path) -> None:
    level = logging.getLogger("xnatio").level
    cli_invoke("upload-dicom", "P", "S", "E", tmp_path / "nope", "-q", exit_code=2)
    cli_invoke("upload-dicom", "P", "S", "E", tmp_path / "nope", "-vv", exit_code=2)
    assert logging.getLogger("xnatio").level == level


def test_verbose_shows_the_traceback(cli_invoke: Invoke, tmp_path: Path) -> None:
    r = cli_invoke("upload-dicom", "P", "S", "E", tmp_path / "nope", "-v", exit_code=2)
    assert "Traceback" in r.stderr


def test_password_flag_is_warned_about_and_never_shown(
    cli_invoke: Invoke, session: SyntheticSession
) -> None:
    env = {"XNAT_SERVER": f"http://127.0.0.1:{_closed_port()}", "XNAT_USERNAME": "admin"}
    r = cli_invoke(
        "upload-dicom",
        "P",
        "S",
        "E",
        session.root,
        "--password",
        PASSWORD,
        "--retries",
        "0",
        "-v",
        exit_code=4,
        env=env,
    )
    assert "process listings" in r.stderr
    assert PASSWORD not in r.output


def test_dry_run_prints_the_plan(cli_invoke: Invoke, session: SyntheticSession) -> None:
    r = cli_invoke("upload-dicom", "P", "S", "E", session.root, "--dry-run", "--json")
    plan = json.loads(r.stdout)
    assert plan["status"] == "dry-run"
    assert plan["totals"]["files"] == 8
    assert sum(b["files"] for b in plan["batches"]) == 8
    assert plan["studies"][0]["study_uid"] == session.study_uid
    text = cli_invoke("upload-dicom", "P", "S", "E", session.root, "--dry-run").stdout
    assert text.strip()


def test_dry_run_quiet_prints_the_plan_and_no_progress(
    cli_invoke: Invoke, session: SyntheticSession
) -> None:
    # The plan is the command's result (stdout); -q silences progress and logs (stderr) only.
    loud = cli_invoke("upload-dicom", "P", "S", "E", session.root, "--dry-run")
    quiet = cli_invoke("upload-dicom", "P", "S", "E", session.root, "--dry-run", "-q")
    assert quiet.stdout == loud.stdout and "8 DICOM files" in quiet.stdout
    assert loud.stderr and not quiet.stderr


# -- real uploads to the local XNAT-compatible server --------------------------------------------


@pytest.fixture
def sandbox(xnat_server: SandboxServer) -> SandboxServer:
    return xnat_server


@pytest.fixture
def env(sandbox: SandboxServer) -> dict[str, str]:
    return {
        "XNAT_SERVER": sandbox.url,
        "XNAT_USERNAME": sandbox.username,
        "XNAT_PASSWORD": sandbox.password,
    }


def _assert_landed(server: SandboxServer, s: SyntheticSession, where: tuple[str, str, str]) -> None:
    """Every instance of ``s`` is archived under ``where``, under the name xio sent it as (XNAT
    keeps it, facts 1.2; the bytes are XNAT's re-encoded copy, facts 1.7), and nothing else."""
    archived = server.archived_files(*where)
    assert set(archived) == set(s.instances)
    for sop_uid, path in s.instances.items():
        assert archived[sop_uid].name == instance_file_name(sop_uid), path


def _odd_names(s: SyntheticSession) -> dict[str, Path]:
    """Move three instances to names with spaces, non-ASCII letters, and a path > 100 chars."""
    uids = list(s.instances)[1:]  # the first one has a duplicate (extras): leave it be
    deep = s.root / ("a" * 60) / ("b" * 60)
    deep.mkdir(parents=True)
    targets = {
        uids[0]: s.root / "series with spaces" / "image 1.dcm",
        uids[1]: s.root / "ünïcødé" / "файл-снимок",
        uids[2]: deep / ("c" * 40),
    }
    for uid, target in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        s.instances[uid].rename(target)
        s.instances[uid] = target
    assert len(str(targets[uids[2]].relative_to(s.root))) > 100
    return targets


@pytest.mark.integration
def test_upload_lands_file_by_file_and_accounts_for_every_file(
    cli_invoke: Invoke, tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    s = generate_session(
        tmp_path / "in",
        series=3,
        instances=4,
        image_size=(32, 32),
        extras=["dicomdir", "txt", "duplicate", "truncated"],
    )
    _odd_names(s)
    r = cli_invoke("upload-dicom", "P", "S", "E", s.root, "--json", env=env)
    result = json.loads(r.stdout)
    assert result["status"] == "success" and result["exit_code"] == 0
    assert (result["project"], result["subject"], result["session"]) == ("P", "S", "E")
    assert result["totals"]["uploaded"] == 12 and result["totals"]["failed"] == 0
    skipped = {Path(f["path"]).name: f["reason"] for f in result["files"]["skipped"]}
    # One of the two copies of the duplicated instance is sent, the other skipped as a duplicate.
    twins = {"copy of first instance", next(iter(s.instances.values())).name}
    odd = set(skipped) - {"DICOMDIR", "notes.txt", "truncated.dcm"}
    assert len(odd) == 1 and odd <= twins, skipped
    assert "duplicate" in skipped[odd.pop()].lower()
    assert all(skipped.values())
    assert len(result["files"]["uploaded"]) == 12
    for path in s.instances.values():
        if path.name not in twins:
            assert str(path) in result["files"]["uploaded"]
    assert result["studies"][0]["study_uid"] == s.study_uid
    assert result["session_uri"].endswith("/experiments/E")
    _assert_landed(sandbox, s, ("P", "S", "E"))
    # Progress went to stderr as plain lines (not a terminal): no escape codes, no password.
    assert "upload:" in r.stderr
    assert ANSI not in r.output
    assert sandbox.password not in r.output


@pytest.mark.integration
def test_human_summary_and_csv_report(
    cli_invoke: Invoke, tmp_path: Path, session: SyntheticSession, env: dict[str, str]
) -> None:
    report = tmp_path / "outcome.csv"
    r = cli_invoke("upload-dicom", "P", "S", "E", session.root, "--report", report, env=env)
    assert r.stdout.startswith("Uploaded 8 of 8 files")
    assert "session: /data/archive/projects/P/subjects/S/experiments/E" in r.stdout
    rows = list(csv.DictReader(report.read_text(encoding="utf-8").splitlines()))
    assert sorted(row["sop_instance_uid"] for row in rows) == sorted(session.instances)
    assert {row["outcome"] for row in rows} == {"verified"}  # read back after the commit
    # stderr is no terminal here: plain progress lines, the read-back's like the upload's
    size = sum(p.stat().st_size for p in session.instances.values())
    verify = [ln for ln in r.stderr.splitlines() if ln.startswith("verify: ")]
    assert verify[0].startswith("verify: 0/8 files, 0 B/") and verify[0].endswith("E back")
    assert verify[-1].startswith(f"verify: 8/8 files, {size / 1000:.1f} kB/{size / 1000:.1f} kB")


@pytest.mark.integration
def test_quiet_prints_nothing_on_success(
    cli_invoke: Invoke, session: SyntheticSession, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    r = cli_invoke("upload-dicom", "P", "S", "E", session.root, "-q", env=env)
    assert (r.stdout, r.stderr) == ("", "")
    _assert_landed(sandbox, session, ("P", "S", "E"))
    # --json still prints the result (asked for explicitly); stderr stays silent.
    args = ("upload-dicom", "P", "S", "E", session.root, "-q", "--json", "--overwrite", "append")
    r = cli_invoke(*args, env=env)
    assert json.loads(r.stdout)["status"] == "success" and r.stderr == ""


@pytest.mark.integration
def test_dry_run_sends_nothing(
    cli_invoke: Invoke, session: SyntheticSession, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    r = cli_invoke("upload-dicom", "P", "S", "E", session.root, "--dry-run", env=env)
    assert "8" in r.stdout
    assert not any("import" in key for key in sandbox.stats())
    # With credentials it asks the server read-only questions (the pre-flight) and sends nothing.
    sent = [k for k in sandbox.stats() if k.split(" ")[0] in ("POST", "PUT")]
    assert sent == ["POST /data/JSESSION"]
    assert "pre-flight on" in r.stdout and "session E: new" in r.stdout
    assert sandbox.prearchive_sessions() == [] and sandbox.experiment_labels("P") == []


@pytest.mark.integration
def test_wrong_password_is_exit_3_and_never_shown(
    cli_invoke: Invoke, session: SyntheticSession, sandbox: SandboxServer
) -> None:
    wrong = "Wr0ng-pa55word-xyz"
    env = {"XNAT_SERVER": sandbox.url, "XNAT_USERNAME": "admin", "XNAT_PASSWORD": wrong}
    r = cli_invoke("upload-dicom", "P", "S", "E", session.root, exit_code=3, env=env)
    assert _one_error_line(r).startswith("error: ")
    assert wrong not in r.output and sandbox.password not in r.output


@pytest.mark.integration
def test_failed_batch_is_exit_1_with_reasons(
    cli_invoke: Invoke, session: SyntheticSession, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    # Every import request fails with 500 and no retries are allowed: all files fail.
    sandbox.set_knobs(fail_next=100, fail_status=500, fault_path="/data/services/import")
    r = cli_invoke(
        "upload-dicom", "P", "S", "E", session.root, "--retries", "0", exit_code=1, env=env
    )
    assert r.stdout.startswith("Upload failed: 0 of 8 files")
    assert "Failed files (8):" in r.stdout
    failed_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("  ") and "500" in ln]
    assert len(failed_lines) >= 8
    assert sandbox.archived_files("P", "S", "E") == {}


@pytest.mark.integration
def test_unreadable_file_is_skipped_and_the_rest_uploads(
    tmp_path: Path, session: SyntheticSession, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """Root reads files whatever their permissions, so under root the CLI runs in a child
    process without the capabilities that allow it (util-linux setpriv); it stays uid 0, so it
    can still use this machine's Python installation."""
    command = [sys.executable, "-m", "xnatio", "upload-dicom", "P", "S", "E"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop privileges")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    victim = next(iter(session.instances.values()))
    victim.chmod(0)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("XNAT")}
    child_env.update(env, HOME=str(tmp_path))
    try:
        proc = subprocess.run(
            [*command, str(session.root), "--json"],
            capture_output=True,
            text=True,
            env=child_env,
            timeout=120,
        )
    finally:
        victim.chmod(0o644)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [(f["path"], f["reason"]) for f in result["files"]["skipped"]] == [
        (str(victim), "not readable (permission denied)")
    ]
    assert result["totals"]["uploaded"] == 7
    archived = sandbox.archived_files("P", "S", "E")
    assert set(archived) == set(session.instances) - {victim.name}


@pytest.mark.integration
def test_real_subprocess_upload(
    tmp_path: Path, session: SyntheticSession, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """`python -m xnatio upload-dicom` as a user runs it: exit code, stdout JSON, what landed."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("XNAT")}
    child_env.update(env, HOME=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xnatio",
            "upload-dicom",
            "P",
            "S",
            "E",
            str(session.root),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "success"
    assert result["totals"]["uploaded"] == 8
    _assert_landed(sandbox, session, ("P", "S", "E"))
    assert ANSI not in proc.stderr
    assert sandbox.password not in proc.stdout + proc.stderr


@pytest.mark.integration
def test_dicom_store_transport_through_the_cli(
    cli_invoke: Invoke, session: SyntheticSession
) -> None:
    """--transport dicom-store reaches a real C-STORE SCP, with routing in Patient Comments."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    received: dict[str, str] = {}

    def on_store(event: Any) -> int:
        ds = event.dataset
        received[str(ds.SOPInstanceUID)] = str(ds.get("PatientComments", ""))
        return 0x0000

    ae = AE(ae_title="XNAT")
    ae.supported_contexts = StoragePresentationContexts
    scp = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = scp.server_address[1]
        r = cli_invoke(
            "upload-dicom",
            "P",
            "S",
            "E",
            session.root,
            "--json",
            "--transport",
            "dicom-store",
            "--dicom-host",
            "127.0.0.1",
            "--dicom-port",
            port,
        )
    finally:
        scp.shutdown()
    result = json.loads(r.stdout)
    assert result["transport"] == "dicom-store" and result["status"] == "success"
    assert set(received) == set(session.instances)
    assert all("Project:P" in c and "Session:E" in c for c in received.values())


@pytest.mark.integration
def test_archive_path_is_uploaded_as_is(
    cli_invoke: Invoke,
    tmp_path: Path,
    session: SyntheticSession,
    sandbox: SandboxServer,
    env: dict[str, str],
) -> None:
    archive = tmp_path / "exam.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in session.instances.values():
            zf.write(path, path.relative_to(session.root).as_posix())
    r = cli_invoke("upload-dicom", "P", "S", "E", archive, "--json", env=env)
    result = json.loads(r.stdout)
    assert result["totals"]["uploaded"] == 8 and result["batches"]["total"] == 1
    _assert_landed(sandbox, session, ("P", "S", "E"))


@pytest.mark.integration
def test_allow_multiple_studies_gives_each_study_its_own_session(
    cli_invoke: Invoke, tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    s = generate_session(
        tmp_path / "in", series=1, instances=3, image_size=(16, 16), extras=["second-study"]
    )
    args = ("upload-dicom", "P", "S", "E", s.root, "--allow-multiple-studies", "--json")
    result = json.loads(cli_invoke(*args, env=env).stdout)
    assert result["status"] == "success" and len(result["studies"]) == 2
    assert [u.rsplit("/", 1)[-1] for u in result["session_uris"]] == ["E", "E_2"]
    _assert_landed(sandbox, s, ("P", "S", "E"))
    second = s.extras["second-study"]
    assert set(sandbox.archived_files("P", "S", "E_2")) == {second.name}


@pytest.mark.integration
def test_direct_archive_not_yet_archived_is_pending_then_verify_waits(
    cli_invoke: Invoke, tmp_path: Path, sandbox: SandboxServer, env: dict[str, str]
) -> None:
    """XNAT archives a Direct-Archive upload only after its idle interval (facts 1.6): with the
    bound reached, the run says "sent, not yet archived" (exit 1, status "pending"); `xio verify
    --wait-for` then sees it land."""
    s = generate_session(tmp_path / "in", series=1, instances=3, image_size=(16, 16))
    sandbox.set_knobs(build_idle_seconds=600)
    args = ["upload-dicom", "P", "S", "E", s.root, "--direct-archive", "--archive-wait", "0.3"]
    r = cli_invoke(*args, "--json", exit_code=1, env=env)
    result = json.loads(r.stdout)
    assert result["status"] == "pending" and result["exit_code"] == 1
    assert result["totals"]["failed"] == 0 and len(result["pending"]) == 1
    assert result["pending"][0].startswith("/xapi/direct-archive/P/")
    # The same command again: nothing to send, it waits for the archive again (still pending).
    again = cli_invoke(*args, exit_code=1, env=env)
    assert "not yet archived" in again.stdout and "xio verify P S E PATH --wait-for" in again.stdout
    assert "waiting for XNAT to archive them" in again.stderr
    assert sandbox.stats()["POST /data/services/import"] == 1  # nothing sent twice
    # Now let XNAT's idle interval pass: verify waits for the experiment ...
    sandbox.set_knobs(build_idle_seconds=1)
    v = cli_invoke("verify", "P", "S", "E", s.root, "--wait-for", "60", env=env)
    assert "holds all 3 files" in v.stdout
    # ... and the upload command, run again, finds it archived and verifies it.
    done = cli_invoke(*args[:-2], "--archive-wait", "60", env=env)
    assert "verified on the server" in done.stdout
