"""Helpers shared by the resume, verify, fault and security tests (not a test module)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import requests

from xnatio.archive import instance_file_name
from xnatio.discover import discover
from xnatio.models import DicomFile, Manifest, ProgressCallback, UploadResult
from xnatio.pipeline import ResumeOptions, resumable_rest_upload
from xnatio.plan import RestPlanner
from xnatio.retry import RetryPolicy
from xnatio.sandbox import SandboxServer
from xnatio.transports.rest import RestTarget
from xnatio.verify import read_session, verify_session
from xnatio.xnat.client import XnatClient

USER, PASSWORD = "admin", "Adm1n-Sandbox-Secret-9c2e"

# The projects the tests upload into: a project exists on XNAT (and on the sandbox) only once
# created, and an upload to a missing one lands in Unassigned (facts 1.2).
TEST_PROJECTS = ("P", "P1", "PRJ", "PROJ", "Q", "C", "BENCH", "DEMO")


def import_tar(
    url: str,
    files: Iterable[DicomFile],
    project: str = "P",
    subject: str = "S",
    session: str = "E",
) -> requests.Response:
    """Send ``files`` in one DICOM-zip (tar) request straight into the archive, as a script would
    without xnatio: the way tests put a known state on the server."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for f in files:
            # XNAT keeps the uploaded file name (facts 1.2): the one xnatio's archives use.
            tf.add(f.path, arcname=f"{f.series_number}/{instance_file_name(f.sop_instance_uid)}")
    resp = requests.post(
        url + "/data/services/import",
        params={
            "import-handler": "DICOM-zip",
            "PROJECT_ID": project,
            "SUBJECT_ID": subject,
            "EXPT_LABEL": session,
            "dest": f"/archive/projects/{project}/subjects/{subject}/experiments/{session}",
            "overwrite": "append",
            "inbody": "true",
        },
        data=buf.getvalue(),
        headers={"Content-Type": "application/x-tar"},
        auth=(USER, PASSWORD),
        timeout=60,
    )
    resp.raise_for_status()
    return resp


def xio_env(server_url: str, home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XNAT_", "XNATIO_", "XDG_"))}
    env.update(
        HOME=str(home),
        XNAT_SERVER=server_url,
        XNAT_USERNAME=USER,
        XNAT_PASSWORD=PASSWORD,
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
        XNATIO_LOG_TIMESTAMPS="0",  # stderr lines compared as written (see test_cli_output)
    )
    env.update(extra or {})
    return env


def xio_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "xnatio", *args]


def run_xio(
    args: Sequence[str], env: Mapping[str, str], timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        xio_command(args), env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def upload(
    server_url: str,
    root: Path,
    journal: Path,
    *,
    restart: bool = False,
    overwrite: str = "none",
    batches: int = 4,
    workers: int = 1,
    retry: RetryPolicy | None = None,
    timeout: float = 60.0,
    progress_callback: ProgressCallback | None = None,
) -> UploadResult:
    """One resumable REST upload of ``root`` to P/S/E, as ``xio upload-dicom`` runs it."""
    manifest = discover(root)
    target = RestTarget(
        project="P",
        subject="S",
        session="E",
        num_batches=batches,
        upload_workers=workers,
        archive_workers=1,
        overwrite=overwrite,
    )
    retry = retry or RetryPolicy(retries=3, base=0.01, cap=0.05)
    with XnatClient(
        server_url, username=USER, password=PASSWORD, retry=retry, timeout=timeout
    ) as client:
        return resumable_rest_upload(
            client,
            manifest,
            target,
            options=ResumeOptions(journal=journal, restart=restart),
            retry=retry,
            progress_callback=progress_callback,
            # N batches even for a small session (the planner sends small ones whole).
            planner=RestPlanner(single_max_files=0, single_max_bytes=0),
        )


def imported(server: SandboxServer) -> int:
    return server.stats().get("files_imported", 0)


def assert_each_file_once(server: SandboxServer, manifest: Manifest) -> None:
    """The archived session P/S/E holds every local instance, each exactly once."""
    with XnatClient(server.url, username=USER, password=PASSWORD) as client:
        scans = read_session(client, "P", "S", "E")
    assert scans is not None
    names = [(s.id, f.name) for s in scans for f in s.files]
    assert len(names) == len(set(names)) == len(manifest.files)
    archived = server.archived_files("P", "S", "E")
    assert set(archived) == {f.sop_instance_uid for f in manifest.files}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SandboxProcess:
    """The local XNAT server as its own process (``xio sandbox``), so it can really be killed
    and restarted: every connection dies with it, as with a real server restart."""

    def __init__(self, data_dir: Path, port: int | None = None, *args: str) -> None:
        self.data_dir, self.port, self.args = data_dir, port or free_port(), args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SandboxProcess:
        where = ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        projects = [arg for project in TEST_PROJECTS for arg in ("--project", project)]
        login = ["--user", USER, "--password", PASSWORD]
        cmd = xio_command(["sandbox", *where, *login, *projects, *self.args])
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=xio_env("", Path("/"))
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + "/_sandbox/stats", timeout=1).raise_for_status()
                return self
            except requests.RequestException:
                if self.proc.poll() is not None:
                    raise RuntimeError("the sandbox process exited") from None
                time.sleep(0.05)
        raise RuntimeError("the sandbox process did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stats(self) -> dict[str, int]:
        data = requests.get(self.url + "/_sandbox/stats", timeout=5).json()
        return {k: v for k, v in data.items() if isinstance(v, int)}

    def set_knobs(self, **knobs: object) -> None:
        requests.post(self.url + "/_sandbox/knobs", json=knobs, timeout=5).raise_for_status()


def assert_server_holds_each_once(url: str, manifest: Manifest) -> None:
    """Over REST only: the session holds every local instance (by name), nothing twice."""
    with XnatClient(url, username=USER, password=PASSWORD) as client:
        scans = read_session(client, "P", "S", "E")
        assert scans is not None
        report = verify_session(client, "P", "S", "E", manifest.files)
    assert sum(len(s.files) for s in scans) == len(manifest.files)
    assert report.ok and not any(s.extra for s in report.series)


def big_session(root: Path, files: int = 120, series: int = 3, side: int = 680) -> Path:
    """``files`` instances of about ``side``² × 2 bytes each (120 × 680² ≈ 111 MB: above the
    planner's one-request limits, so the upload is cut into batches), made by cloning one
    synthetic image under new UIDs (fast)."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from xnatio.synth import generate_session

    seed = generate_session(root / "seed", series=1, instances=1, image_size=(side, side))
    template = dcmread(next(iter(seed.instances.values())))
    series_uids = [generate_uid() for _ in range(series)]
    for i in range(files):
        s = i % series
        template.SeriesInstanceUID = series_uids[s]
        template.SeriesNumber = s + 1
        template.InstanceNumber = i // series + 1
        uid = generate_uid()
        template.SOPInstanceUID = uid
        template.file_meta.MediaStorageSOPInstanceUID = uid
        out = root / "exam" / f"S{s + 1:03d}" / f"{uid}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        template.save_as(out, enforce_file_format=True)
    shutil.rmtree(root / "seed")
    return root / "exam"


def journal_rows(journal: Path) -> int:
    """Files the journal holds as confirmed (read with a plain SQLite connection)."""
    import sqlite3

    if not journal.exists():
        return 0
    db = sqlite3.connect(journal)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return int(db.execute("SELECT count(*) FROM files").fetchone()[0])
    except sqlite3.OperationalError:  # the first run has not created its tables yet
        return 0
    finally:
        db.close()


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def run_xio_stamped(
    *args: str, env: Mapping[str, str], home: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``xio ARGS`` as cron runs it: this process's environment without XNAT settings, ``env``
    and ``home`` on top, and log timestamps on (conftest turns them off for other tests)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("XNAT")}
    child_env.update(env, HOME=str(home))
    child_env.pop("XNATIO_LOG_TIMESTAMPS", None)
    return subprocess.run(
        [sys.executable, "-m", "xnatio", *args],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=timeout,
    )


def self_signed_certificate(folder: Path, host: str = "other.example.org") -> tuple[Path, Path]:
    """(certificate, key) of a self-signed TLS certificate for ``host``, made with openssl in
    ``folder``; the calling test is skipped when openssl is not installed."""
    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", f"/CN={host}", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
