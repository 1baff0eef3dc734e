"""`xio demo`: synthesise, serve, upload through the upload-dicom code path, read back."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from upload_helpers import TEST_PROJECTS
from xnatio.archive import instance_file_name
from xnatio.cli.demo import DEMO_PROJECT, DEMO_SESSION, DEMO_SUBJECT, read_back
from xnatio.cli.main import cli
from xnatio.discover import discover
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session


@pytest.fixture
def own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo's temporary folder goes under tmp_path, so we can see it is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.integration
def test_demo_uploads_and_reads_back_every_instance(own_tmp: Path) -> None:
    args = ["demo", "--files", "12", "--series", "2", "--latency-ms", "0", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["status"] == "success" and result["exit_code"] == 0
    assert result["totals"]["uploaded"] == 12
    assert result["read_back"] == {
        "ok": True,
        "found": True,
        "scans": 2,
        "files_on_server": 12,
        "expected": 12,
        "verified": 12,
        "problems": [],
    }
    assert list(own_tmp.glob("xnatio-demo-*")) == []  # removed afterwards
    assert not (Path.home() / ".local" / "state" / "xnatio").exists()  # journal was in there too


@pytest.mark.integration
def test_demo_keep_keeps_the_data(own_tmp: Path) -> None:
    r = CliRunner().invoke(cli, ["demo", "--files", "4", "--series", "1", "--keep"])
    assert r.exit_code == 0, r.output
    kept = list(own_tmp.glob("xnatio-demo-*"))
    assert len(kept) == 1 and f"kept {kept[0]}" in r.stderr
    assert len(list((kept[0] / "session").rglob("*"))) == 5  # S001/ and 4 instances
    assert r.stdout.startswith("Uploaded 4 of 4 files")
    assert "verified on the server" in r.stdout  # the upload's own REST read-back
    # the server's index
    assert "4 of 4 instances there in their series under the name xio sent" in r.stdout


@pytest.mark.integration
def test_read_back_finds_what_is_missing(tmp_path: Path) -> None:
    """The demo's check fails when the session is not on the server (nothing uploaded), and
    names the instance that is missing when only part of it landed."""
    s = generate_session(tmp_path / "in", series=1, instances=2, image_size=(16, 16))
    manifest = discover(s.root)
    with SandboxServer(tmp_path / "server", users={"u": "pw"}, projects=TEST_PROJECTS) as server:
        check = read_back(server, manifest)
        assert not check.ok and not check.found
        assert "not on the server" in check.text()
        # Upload one of the two instances only, straight into the demo's archive destination.
        first = manifest.files[0]
        body = io.BytesIO()
        with tarfile.open(fileobj=body, mode="w") as tar:
            tar.add(first.path, arcname=instance_file_name(first.sop_instance_uid))
        r = requests.post(
            f"{server.url}/data/services/import",
            params={
                "import-handler": "DICOM-zip",
                "inbody": "true",
                "dest": f"/archive/projects/{DEMO_PROJECT}/subjects/{DEMO_SUBJECT}"
                f"/experiments/{DEMO_SESSION}",
            },
            data=body.getvalue(),
            headers={"Content-Type": "application/x-tar"},
            auth=("u", "pw"),
            timeout=30,
        )
        assert r.status_code == 200, r.text
        check = read_back(server, manifest)
    assert check.found and not check.ok
    assert (check.expected, check.verified, check.files_on_server) == (2, 1, 1)
    assert check.problems == [f"{manifest.files[1].path}: not on the server"]


@pytest.mark.integration
def test_demo_as_a_real_process_quiet(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XNAT")}
    env.update(HOME=str(tmp_path), TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "xnatio", "demo", "--files", "6", "--series", "2", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert list(tmp_path.glob("xnatio-demo-*")) == []


def test_demo_without_a_usable_temporary_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    r = CliRunner().invoke(cli, ["demo", "--files", "2", "--series", "1"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"error: cannot create a temporary folder in {tmp_path}/missing")
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""
