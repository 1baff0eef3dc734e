"""upload-resource: files as is, directories as one streamed tar, clashes, overwrite, retries.

Integration tests talk to the sandbox over real HTTP and check the bytes XNAT stored on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import shutil
import subprocess
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from upload_helpers import TEST_PROJECTS
from xnatio.cli.main import cli
from xnatio.errors import UsageError
from xnatio.models import Outcome, ProgressEvent
from xnatio.resources import ResourceBody, SourceChangedError, collect_files, upload_resource

USER, PASSWORD = "admin", "admin-secret"


def make_tree(root: Path) -> dict[str, bytes]:
    """A small tree with a sub-folder, an empty file, a long and a non-ASCII name."""
    content = {
        "notes.txt": b"hello\n",
        "physio/resp.csv": os.urandom(70_000),
        "physio/empty.log": b"",
        "deep/" + "d" * 90 + "/" + "f" * 60 + ".bin": os.urandom(1000),
        "ünïcode name.txt": "grüße".encode(),
    }
    for rel, data in content.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return content


# --- unit: the streamed archive ------------------------------------------------------------------


def test_tar_stream_has_exact_length_and_round_trips(tmp_path: Path) -> None:
    content = make_tree(tmp_path / "src")
    body = ResourceBody(tmp_path / "src")
    assert body.archive and body.skipped == []
    assert sorted(name for name, _ in body.members) == sorted(content)
    data = b"".join(body)
    assert len(data) == len(body)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert got == content
    # the MD5 of every file as sent, for the read-back check
    assert body.md5 == md5s(content)


def test_names_that_look_like_archives_are_kept(tmp_path: Path) -> None:
    """XNAT unpacks a resource archive one level only: a nested .zip stays a .zip file, so the
    import service's .dcm renaming must not touch resource names."""
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "data.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    (tmp_path / "src" / "sub" / "old.tar.gz").write_bytes(b"not really")
    body = ResourceBody(tmp_path / "src")
    assert [name for name, _ in body.members] == ["data.zip", "sub/old.tar.gz"]
    with tarfile.open(fileobj=io.BytesIO(b"".join(body))) as tar:
        assert tar.getnames() == ["data.zip", "sub/old.tar.gz"]


def test_collect_skips_dir_links_and_special_files(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("a")
    (tmp_path / "loop").symlink_to(tmp_path)
    (tmp_path / "link.txt").symlink_to(tmp_path / "real" / "a.txt")
    os.mkfifo(tmp_path / "fifo")
    files, skipped = collect_files(tmp_path)
    assert [f.path.relative_to(tmp_path).as_posix() for f in files] == ["link.txt", "real/a.txt"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons == {
        "loop": "symbolic link to a directory (not followed)",
        "fifo": "not a regular file",
    }


@pytest.mark.parametrize("single", [False, True])
def test_file_that_changes_after_listing_is_an_error(tmp_path: Path, single: bool) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 5000)
    body = ResourceBody(tmp_path / "a.bin" if single else tmp_path)
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    with pytest.raises(SourceChangedError, match=r"changed after discovery \(size 5000 -> 10"):
        b"".join(body)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(SourceChangedError, match="no longer exists") as err:
        b"".join(body)
    assert err.value.file.path == tmp_path / "a.bin"


ANT_TAR_READER = textwrap.dedent(
    """
    import java.io.*;
    import java.nio.charset.StandardCharsets;
    import java.security.MessageDigest;
    import org.apache.tools.tar.*;

    public class ReadAntTar {
        public static void main(String[] args) throws Exception {
            try (TarInputStream in = new TarInputStream(new FileInputStream(args[0]))) {
                TarEntry e;
                while ((e = in.getNextEntry()) != null) {
                    ByteArrayOutputStream out = new ByteArrayOutputStream();
                    in.copyEntryContents(out);
                    StringBuilder hex = new StringBuilder();
                    for (byte b : MessageDigest.getInstance("MD5").digest(out.toByteArray()))
                        hex.append(String.format("%02x", b));
                    StringBuilder name = new StringBuilder();
                    for (byte b : e.getName().getBytes(StandardCharsets.UTF_8))
                        name.append(String.format("%02x", b));
                    System.out.println(hex + " " + name);
                }
            }
        }
    }
    """
)


def _ant_jar() -> Path | None:
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # the real home; the tests' HOME is temporary
    jars = sorted(home.glob(".m2/repository/org/apache/ant/ant/1.*/ant-1.*.jar"))
    return jars[-1] if jars else None


def test_ant_tarinputstream_reads_long_and_unicode_names(tmp_path: Path) -> None:
    """XNAT extracts a resource tar with Ant's TarInputStream (TarUtils): names over 100 bytes
    and non-ASCII names travel in PAX headers, decoded as UTF-8 whatever the server's charset."""
    jar = _ant_jar()
    if shutil.which("java") is None or jar is None:
        pytest.skip("needs Java and an Ant jar in the local Maven repository")
    content = make_tree(tmp_path / "src")
    out = tmp_path / "upload.tar"
    out.write_bytes(b"".join(ResourceBody(tmp_path / "src")))
    (tmp_path / "ReadAntTar.java").write_text(ANT_TAR_READER)
    run = subprocess.run(
        ["java", "-Dfile.encoding=ISO-8859-1", "-cp", str(jar), "ReadAntTar.java", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    got = {}
    for line in run.stdout.splitlines():
        digest, name = line.split(" ")
        got[bytes.fromhex(name).decode()] = digest
    assert got == md5s(content)


# --- integration: against the sandbox ------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server_module = pytest.importorskip("xnatio.sandbox.server")
    with server_module.SandboxServer(
        tmp_path_factory.mktemp("xnat"), users={USER: PASSWORD}, projects=TEST_PROJECTS
    ) as srv:
        e = srv.store.create_experiment(
            project="P", subject="S", label="E", uid=None, modality="MR", date=None
        )
        srv.store.upsert_scan(e, "3", modality="MR")
        yield srv


def stored(sandbox: Any, resource: str, scan: str = "") -> dict[str, str]:
    """MD5 of every file the server holds in a resource, read from its disk."""
    e = sandbox.store.experiment("P", "E")
    base = sandbox.store.resource_dir(e, scan, resource)
    return {
        p.relative_to(base).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(base.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def md5s(content: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.md5(v).hexdigest() for k, v in content.items()}


def xio(sandbox: Any, *args: str) -> Result:
    env = {"XNAT_SERVER": sandbox.url, "XNAT_USERNAME": USER, "XNAT_PASSWORD": PASSWORD}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.mark.integration
def test_directory_is_extracted_then_clash_then_overwrite(sandbox: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    content = make_tree(src)
    res = xio(sandbox, "upload-resource", "P", "S", "E", "PHYSIO", str(src), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["archive"] == "tar" and doc["success"] and doc["verified"]
    assert {f["outcome"] for f in doc["files"]} == {"verified"}
    assert stored(sandbox, "PHYSIO") == md5s(content)
    # one request carried the whole directory
    assert sum(n for k, n in sandbox.stats().items() if k.startswith("PUT ")) == 1

    # Again without --overwrite, one file changed: exit 1 naming it, nothing replaced; the
    # four identical files already there are fine. The summary is on stdout, as on success.
    (src / "notes.txt").write_bytes(b"changed\n")
    res = xio(sandbox, "upload-resource", "P", "S", "E", "PHYSIO", str(src))
    assert res.exit_code == 1
    assert "4 of them were already there with the same content." in res.stdout
    assert (
        "error: 1 file(s) already exist in P/S/E resource PHYSIO with other content" in res.stdout
    )
    assert res.stdout.endswith("\n  notes.txt\n")
    assert stored(sandbox, "PHYSIO")["notes.txt"] == hashlib.md5(b"hello\n").hexdigest()
    # Without the read-back nothing can be compared: every clash is a conflict.
    res = xio(sandbox, "upload-resource", "P", "S", "E", "PHYSIO", str(src), "--no-verify")
    assert res.exit_code == 1
    for name in content:
        assert f"  {name}\n" in res.stdout

    res = xio(sandbox, "upload-resource", "P", "S", "E", "PHYSIO", str(src), "--overwrite")
    assert res.exit_code == 0, res.output
    assert "Uploaded 5 file(s)" in res.stdout and "read back and checked" in res.stdout
    assert stored(sandbox, "PHYSIO")["notes.txt"] == hashlib.md5(b"changed\n").hexdigest()


@pytest.mark.integration
def test_single_file_and_scan_resource(sandbox: Any, tmp_path: Path) -> None:
    report = tmp_path / "report.pdf"
    report.write_bytes(os.urandom(123_457))
    res = xio(sandbox, "upload-resource", "P", "S", "E", "NOTES", str(report), "--scan", "3")
    assert res.exit_code == 0, res.output
    assert stored(sandbox, "NOTES", scan="3") == {
        "report.pdf": hashlib.md5(report.read_bytes()).hexdigest()
    }
    assert stored(sandbox, "NOTES") == {}
    res = xio(sandbox, "upload-resource", "P", "S", "E", "NOTES", str(report), "--scan", "3")
    assert res.exit_code == 0 and "already there with the same content" in res.stdout
    report.write_bytes(b"other")
    res = xio(sandbox, "upload-resource", "P", "S", "E", "NOTES", str(report), "--scan", "3")
    assert res.exit_code == 1 and res.stdout.endswith("\n  report.pdf\n")

    res = xio(sandbox, "upload-resource", "P", "S", "NOPE", "NOTES", str(report))
    assert res.exit_code == 1 and "Unable to find the specified experiment" in res.stderr

    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    res = xio(sandbox, "upload-resource", "P", "S", "E", "NOTES", str(empty))
    assert res.exit_code == 2 and "is empty" in res.stderr


@pytest.mark.integration
@pytest.mark.parametrize("fault", [{"reset_next": 1}, {"fail_next": 1, "fail_status": 503}])
def test_transient_failure_resends_the_whole_body(
    sandbox: Any, tmp_path: Path, fault: dict[str, int]
) -> None:
    from xnatio.xnat.client import XnatClient

    src = tmp_path / "src"
    content = make_tree(src)
    events: list[ProgressEvent] = []
    sandbox.set_knobs(fault_path="/data/projects/P/subjects/S/experiments/E/resources", **fault)
    with XnatClient(sandbox.url, username=USER, password=PASSWORD, sleep=lambda s: None) as c:
        result = upload_resource(c, "P", "S", "E", "PHYSIO", src, progress_callback=events.append)
    assert result.success, result.errors
    assert [f.outcome for f in result.files] == [Outcome.VERIFIED] * len(content)
    assert stored(sandbox, "PHYSIO") == md5s(content)
    # progress counts the bytes of the request body (tar headers included)
    assert events[-1].bytes_done == events[-1].bytes_total == result.bytes_sent
    assert result.bytes_sent > result.total_bytes == sum(len(v) for v in content.values())
    assert events[-1].current == events[-1].total == len(content)
    # the body was sent twice: the byte count went back to 0 once after the first attempt
    restarts = [i for i, e in enumerate(events) if i and e.bytes_done < events[i - 1].bytes_done]
    assert len(restarts) == 1


@pytest.mark.integration
def test_nested_archive_lands_as_a_file(sandbox: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        info = tarfile.TarInfo("inner.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"inner"))
    (src / "data.tar").write_bytes(inner.getvalue())
    (src / "a.txt").write_bytes(b"a")
    res = xio(sandbox, "upload-resource", "P", "S", "E", "NESTED", str(src))
    assert res.exit_code == 0, res.output
    assert stored(sandbox, "NESTED") == md5s({"a.txt": b"a", "data.tar": inner.getvalue()})


def test_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="holds no regular files"):
        upload_resource(None, "P", "S", "E", "R", tmp_path)  # type: ignore[arg-type]


def test_requests_sends_an_exact_content_length_not_chunked(tmp_path: Path) -> None:
    import requests

    make_tree(tmp_path / "src")
    tar = ResourceBody(tmp_path / "src")
    prepared = requests.Request("PUT", "http://127.0.0.1/x", data=tar).prepare()
    assert prepared.headers["Content-Length"] == str(len(b"".join(tar)))
    assert "Transfer-Encoding" not in prepared.headers
    one = ResourceBody(tmp_path / "src" / "notes.txt")
    prepared = requests.Request("PUT", "http://127.0.0.1/x", data=one).prepare()
    assert prepared.headers["Content-Length"] == "6"
    assert b"".join(one) == b"hello\n" and one.md5 == {
        "notes.txt": hashlib.md5(b"hello\n").hexdigest()
    }
