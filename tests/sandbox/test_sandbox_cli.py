"""`xio sandbox` as a user runs it: a real subprocess, a request, Ctrl-C, a clean exit."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from proc_helpers import reap
from xnatio.cli.main import cli

pytestmark = pytest.mark.integration


def test_help_has_an_example() -> None:
    result = CliRunner().invoke(cli, ["sandbox", "--help"])
    assert result.exit_code == 0
    assert "xio sandbox --data-dir" in result.output
    assert "--auto-archive" in result.output


def test_serves_until_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "xnatio", "sandbox", "--data-dir", str(tmp_path / "d"),
         "--port", "0", "--user", "u", "--password", "pw", "--auto-archive", "P"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)", first)
        assert m, first
        url = m.group(1)
        assert requests.get(url + "/data/JSESSION", auth=("u", "pw"), timeout=10).ok
        assert requests.get(url + "/_sandbox/knobs", timeout=10).json()[
            "auto_archive_projects"
        ] == ["P"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        rest = proc.stderr.read()
        assert "Traceback" not in rest
        assert "pw" not in first + rest  # the password is never printed
    finally:
        reap(proc)


def test_busy_port_is_a_usage_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = CliRunner().invoke(
            cli, ["sandbox", "--data-dir", str(tmp_path), "--port", str(port)]
        )
    assert result.exit_code == 2
    assert "cannot listen on 127.0.0.1" in result.output


def test_projects_users_and_context_path_from_the_command_line(tmp_path: Path) -> None:
    """--project creates projects owned by --user (a site admin); --add-user adds a user with no
    access; --context-path serves XNAT under /xnat; everything survives a restart."""
    args = [sys.executable, "-m", "xnatio", "sandbox", "--data-dir", str(tmp_path / "d"),
            "--port", "0", "--user", "u", "--password", "pw", "--project", "P",
            "--project", "Q", "--add-user", "alice:secret", "--context-path", "/xnat",
            "--auto-archive", "AA"]  # fmt: skip
    for run in range(2):
        proc = subprocess.Popen(args if run == 0 else args[:12], stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            m = re.search(r"(http://127\.0\.0\.1:\d+(/xnat)?)", first)
            assert m, first
            url = m.group(1)
            if run == 0:
                assert url.endswith("/xnat")
            projects = requests.get(
                url + "/data/projects", auth=("u", "pw"), params={"format": "json"}, timeout=10
            ).json()["ResultSet"]["Result"]
            assert [p["ID"] for p in projects] == ["AA", "P", "Q"]
            code = requests.get(url + "/data/projects/AA/prearchive_code", auth=("u", "pw"))
            assert code.text == "4"
            alice = requests.get(url + "/data/projects/P", auth=("alice", "secret"), timeout=10)
            assert alice.status_code == 404  # a user with no role does not see a private project
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
            assert "secret" not in first + proc.stderr.read()
        finally:
            reap(proc)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--add-user", "alice"], "--add-user wants NAME:PASSWORD"),
        (["--project", "bad/id"], "Invalid project ID"),
        (["--context-path", "/a/../b"], "Invalid context path"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path: Path, flag: list[str], message: str) -> None:
    result = CliRunner().invoke(
        cli, ["sandbox", "--data-dir", str(tmp_path / "d"), "--port", "0", *flag]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
