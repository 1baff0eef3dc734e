"""Secrets never leave the process: logs, errors, reports, --json and -v tracebacks.

Each test plants a distinctive secret and fails if it shows up anywhere it could leak.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import click
import pydicom
import pytest
from click.testing import CliRunner

from upload_helpers import PASSWORD, TEST_PROJECTS, USER, run_xio, xio_env
from xnatio import dicomheader, redact
from xnatio.archive import make_archive_stream
from xnatio.cli.main import XioGroup, cli, set_debug
from xnatio.errors import ServerError
from xnatio.models import DicomFile
from xnatio.progress import cli_logging
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session

SECRET = "Pa55-w0rd-do-not-leak-7431"


class _Owner:
    """Something that holds secrets, as an ``XnatClient`` does (weak-referenceable)."""


@pytest.fixture
def owner() -> Iterator[_Owner]:
    o = _Owner()
    yield o
    redact.forget(o)


def test_scrub_removes_held_values_and_credential_shapes(owner: _Owner) -> None:
    redact.hold(owner, SECRET)
    text = (
        f"login with {SECRET}; Authorization: Basic YWRtaW46c2VjcmV0; "
        "Cookie: JSESSIONID=ABCDEF0123;"
        " url https://alice:hunter2@xnat.example.org/data password=letmein token: tkn-123"
    )
    out = redact.scrub(text)
    for leaked in (SECRET, "YWRtaW46c2VjcmV0", "ABCDEF0123", "hunter2", "letmein", "tkn-123"):
        assert leaked not in out
    assert "https://alice:<hidden>@xnat.example.org/data" in out


def test_short_values_are_not_held(owner: _Owner) -> None:
    redact.hold(owner, "abc", "", None)
    assert redact.scrub("abc abcdef") == "abc abcdef"


def test_secrets_are_held_per_owner_and_forgotten() -> None:
    first, second = _Owner(), _Owner()
    redact.hold(first, SECRET)
    redact.hold(second, "another-secret-value")
    redact.forget(first)
    assert redact.scrub(f"{SECRET} another-secret-value") == f"{SECRET} <hidden>"
    del second  # an owner collected without closing holds nothing either
    gc.collect()
    assert "another-secret-value" not in redact.held()


def _log_through_cli_handler(caplog: pytest.LogCaptureFixture, threshold: int) -> str:
    """Log a secret (message, argument, traceback) the way xnatio's modules do, with the CLI's
    handler in place; everything the handler printed and the root logger's caplog received."""
    stream = io.StringIO()
    log = logging.getLogger("xnatio.some.module")
    with caplog.at_level(logging.DEBUG), cli_logging(stream) as handler:
        handler.threshold = threshold
        log.debug("sending %s to the server", SECRET)
        try:
            raise RuntimeError(f"server echoed {SECRET}")
        except RuntimeError:
            log.exception("request failed")
    return stream.getvalue() + caplog.text + "".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("threshold", [logging.DEBUG, logging.WARNING])
def test_every_xnatio_log_record_is_scrubbed_by_the_cli_handler(
    owner: _Owner, caplog: pytest.LogCaptureFixture, threshold: int
) -> None:
    """Whether or not the CLI prints a record (its threshold), the record is scrubbed before it
    propagates to the handlers of parent loggers (here pytest's caplog on the root logger)."""
    redact.hold(owner, SECRET)
    text = _log_through_cli_handler(caplog, threshold)
    assert SECRET not in text
    assert "<hidden>" in text and "RuntimeError" in text
    assert "sending <hidden> to the server" in caplog.text


def test_the_cli_handler_prints_only_from_its_threshold(
    owner: _Owner, caplog: pytest.LogCaptureFixture
) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.DEBUG), cli_logging(stream):
        logging.getLogger("xnatio.x").info("an info line")
        logging.getLogger("xnatio.x").warning("a warning line")
    assert stream.getvalue() == "warning: a warning line\n"


def test_the_library_leaves_other_loggers_alone(owner: _Owner) -> None:
    """The filter is on xnatio's handler only: an application's records are its own (it may put
    a ``SecretFilter`` on its handlers), and the handler is gone when the block ends."""
    redact.hold(owner, SECRET)
    app = logging.getLogger("some.application")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    collector = Collect()
    app.addHandler(collector)
    try:
        with cli_logging(io.StringIO()):
            app.warning("app says %s", SECRET)
        assert seen == [f"app says {SECRET}"]
        collector.addFilter(redact.SecretFilter())
        app.warning("app says %s", SECRET)
        assert seen[-1] == "app says <hidden>"
    finally:
        app.removeHandler(collector)
    assert logging.getLogger("xnatio").handlers == []


# -- archive member names ------------------------------------------------------------------------


def _dicom_file(path: Path) -> DicomFile:
    st = path.stat()
    return DicomFile(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        study_uid="1.2",
        series_uid="1.2.3",
        sop_instance_uid=f"1.2.3.{abs(hash(path)) % 10_000}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_number=1,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="PAT",
    )


@pytest.mark.parametrize("fmt", ["tar", "zip", "zip-deflated"])
def test_archive_member_names_are_relative_and_safe(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "etc" / "passwd"
    outside.parent.mkdir(parents=True)
    files = []
    for p in (
        root / "a" / "b" / "ok.dcm",
        root / "..dots..",
        root / "a" / "ctl\x01name",
        root / "a" / "back\\slash",
        outside,  # reached through a symlink, discovery can hand a path outside the root
    ):
        p.write_bytes(b"DICM" * 8)
        files.append(_dicom_file(p))
    stream = make_archive_stream(files, fmt, root=root)
    data = b"".join(stream)
    if fmt.startswith("zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    else:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            names = tf.getnames()
    assert len(names) == len(files)
    for name in names:
        assert not name.startswith("/") and not PurePosixPath(name).is_absolute()
        assert ".." not in PurePosixPath(name).parts
        assert not any(ord(c) < 32 for c in name)
    # Extracting with the strict filter of the standard library accepts every name.
    if fmt == "tar":
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            tf.extractall(tmp_path / "out", filter="data")
        assert sum(1 for p in (tmp_path / "out").rglob("*") if p.is_file()) == len(files)


# -- end to end: the real command against the local XNAT server --------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SandboxServer]:
    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}, projects=TEST_PROJECTS) as s:
        # Remember every JSESSION id the server hands out: they are secrets too.
        issued: list[str] = []
        real = s.auth.new_session

        def recording(user: str) -> str:
            sid = real(user)
            issued.append(sid)
            return sid

        s.auth.new_session = recording  # type: ignore[method-assign]
        s.issued = issued  # type: ignore[attr-defined]
        yield s


def leaks(text: str, server: SandboxServer) -> list[str]:
    found = [PASSWORD] if PASSWORD in text else []
    found += [sid for sid in server.issued if sid in text]  # type: ignore[attr-defined]
    return found


@pytest.mark.integration
def test_no_secret_in_logs_output_json_report_or_journal(
    server: SandboxServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = tmp_path / "exam"
    generate_session(root, series=2, instances=3, image_size=(32, 32))
    monkeypatch.setenv("XNAT_SERVER", server.url)
    monkeypatch.setenv("XNAT_USERNAME", USER)
    monkeypatch.setenv("XNAT_PASSWORD", PASSWORD)
    journal = tmp_path / "journal.sqlite"
    report = tmp_path / "report.json"
    # Faults that make every layer talk: a retried 503, and a session that expires while the
    # server imports (its idle timeout is shorter than the import): the client logs in again.
    server.set_knobs(fail_next=1, fail_status=503, fault_path="/data/services/import")
    server.set_knobs(session_timeout=0.2, per_file_ms=100)
    runner = CliRunner()
    with caplog.at_level(logging.DEBUG):
        r = runner.invoke(
            cli,
            [
                *("upload-dicom", "P", "S", "E", str(root), "-vv", "--json"),
                *("--report", str(report), "--journal", str(journal)),
            ],
        )
    assert r.exit_code == 0, r.output
    assert server.issued  # type: ignore[attr-defined]
    everything = "\n".join(
        [r.output, caplog.text, report.read_text(), journal.read_bytes().decode("latin-1")]
    )
    # The layers did talk (so there was something to leak): the retry and the new login.
    assert "retrying" in caplog.text and "logging in again" in caplog.text
    assert leaks(everything, server) == []


@pytest.mark.integration
def test_no_secret_in_errors_or_tracebacks(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "exam"
    generate_session(root, series=1, instances=2, image_size=(32, 32))
    monkeypatch.setenv("XNAT_SERVER", server.url)
    monkeypatch.setenv("XNAT_USERNAME", USER)
    runner = CliRunner()
    outputs = []
    # Wrong password, with -v (tracebacks shown): exit 3, one line, no secret.
    wrong = PASSWORD + "-wrong"
    monkeypatch.setenv("XNAT_PASSWORD", wrong)
    bad = runner.invoke(cli, ["upload-dicom", "P", "S", "E", str(root), "-v"])
    assert bad.exit_code == 3
    assert wrong not in bad.output
    outputs.append(bad.output)
    # Credentials in the server URL: refused without echoing them.
    monkeypatch.setenv("XNAT_PASSWORD", PASSWORD)
    url = server.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    inurl = runner.invoke(cli, ["verify", "P", "S", "E", str(root), "--server", url, "-v"])
    assert inurl.exit_code in (2, 3)
    outputs.append(inurl.output)
    # A server that dies mid-command: exit 4 or 1, a reason, no secret.
    server.stop()
    gone = runner.invoke(cli, ["upload-dicom", "P", "S", "E", str(root), "-v"])
    assert gone.exit_code in (1, 4)
    outputs.append(gone.output)
    for text in outputs:
        assert PASSWORD not in text and wrong not in text
        assert leaks(text, server) == []


@pytest.fixture
def spooling_exam(tmp_path: Path) -> Path:
    """A compressed tar export whose one odd file makes discovery spool it to disk.

    Members of a .tar.gz cannot seek back, so a file the fast header reader hands to pydicom is
    spooled: in memory up to ``dicomheader.MAX_HEADER``, on disk beyond. This file has a private
    element larger than that limit before its PatientID, so the fast reader gives up ("header
    longer than the read limit") and the spool rolls over to a temporary file.
    """
    root = tmp_path / "exam"
    session = generate_session(root, series=1, instances=3, image_size=(32, 32))
    odd = next(iter(session.instances.values()))
    ds = pydicom.dcmread(odd)
    block = ds.private_block(0x0009, "XNATIO TEST", create=True)
    block.add_new(0x01, "OB", bytes(dicomheader.MAX_HEADER + 2**20))
    ds.save_as(odd)
    archive = tmp_path / "exam.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        tf.add(root, arcname="exam")
    return archive


@pytest.fixture
def spools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[str, int]]:
    """Temporary files go to a private folder; every spool that rolls over to disk is recorded
    as (the path of its file, its mode)."""
    tmpdir = tmp_path / "private-tmp"
    tmpdir.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    rolled: list[tuple[str, int]] = []

    class RecordingSpool(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
        def rollover(self) -> None:
            super().rollover()
            fd = self._file.fileno()
            rolled.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_mode))

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", RecordingSpool)
    return rolled


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name a spool file")
def test_a_spooled_member_goes_to_a_private_temporary_file_that_is_removed(
    server: SandboxServer,
    spooling_exam: Path,
    spools: list[tuple[str, int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XNAT_SERVER", server.url)
    monkeypatch.setenv("XNAT_USERNAME", USER)
    monkeypatch.setenv("XNAT_PASSWORD", PASSWORD)
    r = CliRunner().invoke(cli, ["upload-dicom", "P", "S", "E", str(spooling_exam), "-q"])
    assert r.exit_code == 0, r.output
    # The odd member took the spool path, once, into the private folder, readable by us only.
    assert len(spools) == 1, spools
    path, mode = spools[0]
    assert path.startswith(str(tmp_path / "private-tmp") + "/")
    assert mode & 0o077 == 0
    assert list((tmp_path / "private-tmp").iterdir()) == []
    # And it was uploaded and verified like the others (the command verifies by default).
    assert len(list((tmp_path / "xnat").rglob("*.dcm"))) == 3


@pytest.mark.integration
def test_temporary_files_are_private_and_removed(
    server: SandboxServer, spooling_exam: Path, tmp_path: Path
) -> None:
    """Run the real command with an empty TMPDIR, on a compressed tar PATH whose odd member is
    spooled to disk (``spooling_exam``), once successfully and once failing: nothing is left
    behind."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(mode=0o700)
    env = xio_env(server.url, tmp_path / "home", {"TMPDIR": str(tmpdir)})
    ok = run_xio(["upload-dicom", "P", "S", "E", str(spooling_exam)], env)
    assert ok.returncode == 0, ok.stderr
    assert list(tmpdir.iterdir()) == []
    server.stop()
    failed = run_xio(["upload-dicom", "P", "S", "E2", str(spooling_exam)], env)
    assert failed.returncode == 4, failed.stderr
    assert list(tmpdir.iterdir()) == []
    journal = tmp_path / "home" / ".local/state/xnatio/journal.sqlite"
    assert journal.stat().st_mode & 0o077 == 0  # the journal names local paths: private
    assert PASSWORD not in ok.stdout + ok.stderr + failed.stdout + failed.stderr


def test_the_error_line_and_its_traceback_are_scrubbed(owner: _Owner) -> None:
    """The CLI edge scrubs what it prints for an error, whoever worded it: the one line, and with
    ``-v`` the traceback of chained foreign exceptions too."""
    redact.hold(owner, SECRET)

    @click.group(cls=XioGroup)
    def group() -> None:
        pass

    @group.command()
    @click.option("-v", "verbose", count=True)
    def fail(verbose: int) -> None:
        set_debug(click.get_current_context(), verbose)
        try:
            raise OSError(f"proxy refused https://alice:{SECRET}@xnat.example.org/")
        except OSError as exc:
            raise ServerError(f"the server echoed {SECRET} and password=hunter22") from exc

    for args in (["fail"], ["fail", "-v"]):
        r = CliRunner().invoke(group, args)
        assert r.exit_code == ServerError.exit_code
        assert SECRET not in r.output and "hunter22" not in r.output
        assert "error: the server echoed <hidden> and password=<hidden>" in r.output
    assert "Traceback" in r.output and "alice:<hidden>@" in r.output


def test_the_console_scripts_handler_scrubs_every_library_and_prints_once(
    owner: _Owner,
) -> None:
    """``main()`` owns its process: its handler on the root logger scrubs other libraries'
    records too, and the command's own ``cli_logging`` reuses it instead of printing twice."""
    redact.hold(owner, SECRET)
    stream = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers)
    with cli_logging(stream, logger_name="") as outer, cli_logging() as inner:
        assert inner is outer and outer in root.handlers
        logging.getLogger("urllib3.connectionpool").warning("retrying %s", SECRET)
        logging.getLogger("xnatio.transports").warning("batch failed for %s", SECRET)
    assert root.handlers == before
    assert stream.getvalue().splitlines() == [
        "warning: retrying <hidden>",
        "warning: batch failed for <hidden>",
    ]
