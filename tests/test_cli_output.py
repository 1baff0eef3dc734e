"""What a person sees: the real CLI's output, as a log (stderr a pipe), in help, in messages.

The log tests run ``python -m xnatio`` in a subprocess against the local XNAT-compatible server,
with stderr a pipe, as cron and CI run it.
"""

from __future__ import annotations

import io
import logging
import re
import ssl
import time
from pathlib import Path

import pytest

from upload_helpers import run_xio_stamped, self_signed_certificate
from xnatio.progress import CliLogHandler, TimestampedStream
from xnatio.sandbox import SandboxServer
from xnatio.synth import SyntheticSession, generate_session

# Local ISO 8601 to the second, with the UTC offset: 2026-11-30T05:01:02+01:00
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ")
PHASES = ("discover", "plan", "connect", "upload", "commit", "verify")


_xio = run_xio_stamped


def _env(server: SandboxServer, url: str | None = None) -> dict[str, str]:
    return {
        "XNAT_SERVER": url or server.url,
        "XNAT_USERNAME": server.username,
        "XNAT_PASSWORD": server.password,
    }


@pytest.fixture
def session(tmp_path: Path) -> SyntheticSession:
    return generate_session(tmp_path / "in", series=3, instances=10, image_size=(16, 16))


@pytest.mark.integration
def test_log_lines_are_timestamped_and_follow_the_interval_not_the_size(
    tmp_path: Path, session: SyntheticSession, xnat_server: SandboxServer
) -> None:
    # Slowed server: each file takes 60 ms, one batch at a time, so the upload lasts a few
    # seconds and the periodic lines have time to come.
    xnat_server.set_knobs(per_file_ms=60.0)
    interval = 0.5
    started = time.monotonic()
    proc = _xio(
        "upload-dicom",
        *("P", "S", "E", str(session.root)),
        *("--num-batches", "3", "--upload-workers", "1", "--log-interval", str(interval)),
        env=_env(xnat_server),
        home=tmp_path,
    )
    duration = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines, "a log shows progress"
    for line in lines:
        assert STAMP.match(line), line
    assert "\x1b[" not in proc.stderr
    text = [STAMP.sub("", ln) for ln in lines]
    seen = {ln.split(":", 1)[0] for ln in text}
    assert {"discover", "upload", "verify"} <= seen, text
    # One line at each phase change, one when a phase completes, the rest one per interval.
    bound = duration / interval + 2 * len(PHASES) + 1
    assert len(lines) <= bound, (len(lines), bound, text)
    # The summary is on stdout, not timestamped.
    assert proc.stdout.startswith("Uploaded 30 of 30 files"), proc.stdout


@pytest.mark.integration
def test_a_log_of_a_big_session_does_not_grow_with_its_size(
    tmp_path: Path, xnat_server: SandboxServer
) -> None:
    # 200 files in well under the default interval: a handful of lines, not ten per phase.
    big = generate_session(tmp_path / "big", series=4, instances=50, image_size=(8, 8))
    proc = _xio(
        "upload-dicom", *("P", "S", "BIG", str(big.root)), env=_env(xnat_server), home=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert all(STAMP.match(ln) for ln in lines), lines
    assert len(lines) <= 2 * len(PHASES) + 1, lines


def test_log_records_read_warning_not_the_logger_name() -> None:
    out = io.StringIO()
    handler = CliLogHandler(out)
    logger = logging.getLogger("xnatio.test_cli_output")
    logger.addHandler(handler)
    try:
        logger.warning("batch 3: retrying after HTTP 503")
        logger.error("batch 4 failed")
        handler.threshold = logging.INFO  # -v: who said it
        logger.warning("batch 5: retrying")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue().splitlines() == [
        "warning: batch 3: retrying after HTTP 503",
        "error: batch 4 failed",
        "WARNING xnatio.test_cli_output: batch 5: retrying",
    ]


def test_timestamped_stream_stamps_each_line_once() -> None:
    out = io.StringIO()
    stream = TimestampedStream(out)
    stream.write("upload: 1/3 ")
    stream.write("files\nverify: ")
    stream.write("done\n\n")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert all(STAMP.match(ln) for ln in lines), lines
    assert [STAMP.sub("", ln) for ln in lines] == ["upload: 1/3 files", "verify: done", ""]


@pytest.fixture
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.mark.integration
def test_no_verify_tls_is_one_warning_not_one_per_connection(
    tmp_path: Path,
    session: SyntheticSession,
    xnat_server: SandboxServer,
    certificate: tuple[Path, Path],
) -> None:
    # The sandbox behind TLS with a certificate for another host: only --no-verify-tls works.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    httpd = xnat_server._httpd
    assert httpd is not None
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    url = xnat_server.url.replace("http://", "https://", 1)
    proc = _xio(
        "upload-dicom",
        *("P", "S", "E", str(session.root), "--no-verify-tls", "--num-batches", "6"),
        env=_env(xnat_server, url),
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "InsecureRequestWarning" not in proc.stderr
    tls = [ln for ln in proc.stderr.splitlines() if "TLS certificate checking is off" in ln]
    assert len(tls) == 1, proc.stderr
    assert STAMP.sub("", tls[0]).startswith("warning: TLS certificate checking is off")


UPLOAD_SECTIONS = (
    "Target and source:",
    "Batching:",
    "Verification and resume:",
    "Server and credentials:",
    "DICOM C-STORE (--transport dicom-store):",
    "Output:",
)


def test_upload_help_lists_every_option_once_under_its_section() -> None:
    from click.testing import CliRunner

    from xnatio.cli.main import cli
    from xnatio.cli.upload import upload_dicom

    text = CliRunner().invoke(cli, ["upload-dicom", "--help-all"], terminal_width=100).output
    heads = [text.index(f"\n{title}\n") for title in UPLOAD_SECTIONS]
    assert heads == sorted(heads), "sections in their order"
    assert "Other options:" not in text, "every option has a section"
    assert "\nOptions:\n" not in text
    for param in upload_dicom.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("-"):
                assert opt in text, opt
    # Each option under the right heading: a sample from each.
    for title, option in zip(
        UPLOAD_SECTIONS,
        ("--transport", "--num-batches", "--journal", "--ca-bundle", "--dicom-host", "--json"),
        strict=True,
    ):
        start = text.index(f"\n{title}\n")
        nxt = [h for h in heads if h > start]
        assert option in text[start : (nxt[0] if nxt else len(text))], (title, option)
    assert "[env: XNAT_CA_BUNDLE]" in " ".join(text.split())


def test_each_command_lists_its_own_exit_codes() -> None:
    from click.testing import CliRunner

    from xnatio.cli.main import cli

    def epilog(*args: str) -> str:
        text = CliRunner().invoke(cli, [*args, "--help"], terminal_width=100).output
        return text[text.index("Exit codes") :]

    assert "resume" in epilog("upload-dicom")
    for command in (["login"], ["config", "show"], ["verify"], ["upload-resource"]):
        codes = epilog(*command)
        assert "resume" not in codes, command
        assert "130  interrupted (Ctrl-C)" in codes, command
    assert "  3  " not in epilog("config", "show")  # it never contacts the server
    assert "session was not found" in epilog("verify")


# --- messages -------------------------------------------------------------------------------


def test_synth_counts_every_file_it_wrote(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from xnatio.cli.main import cli

    out = tmp_path / "synth"
    extras = ("dicomdir", "txt", "duplicate", "truncated")
    r = CliRunner().invoke(
        cli,
        ["synth", str(out), "--series", "2", "--instances", "10"]
        + [arg for e in extras for arg in ("--extra", e)],
    )
    assert r.exit_code == 0, r.output
    on_disk = sum(1 for p in out.rglob("*") if p.is_file())
    assert on_disk == 24
    assert r.stdout.startswith(f"wrote {on_disk} files to {out}: 20 DICOM instances"), r.stdout
    assert "4 extra (dicomdir, duplicate, truncated, txt)" in r.stdout


@pytest.mark.integration
def test_a_skipped_duplicate_names_its_instance_in_json(
    tmp_path: Path, xnat_server: SandboxServer
) -> None:
    import json

    from click.testing import CliRunner

    from xnatio.cli.main import cli

    s = generate_session(tmp_path / "dup", series=1, instances=3, extras=("duplicate",))
    r = CliRunner().invoke(
        cli, ["upload-dicom", "P", "S", "DUP", str(s.root), "--json"], env=_env(xnat_server)
    )
    assert r.exit_code == 0, r.output
    skipped = json.loads(r.stdout)["files"]["skipped"]
    dup = [f for f in skipped if f["path"] == str(s.extras["duplicate"])]
    assert len(dup) == 1 and "duplicate of" in dup[0]["reason"]
    first_uid = next(iter(s.instances))  # the duplicate is a copy of the first instance
    assert dup[0]["sop_instance_uid"] == first_uid


@pytest.mark.integration
def test_verify_of_a_missing_session_says_so_without_a_finished_read_back_first(
    tmp_path: Path, session: SyntheticSession, xnat_server: SandboxServer
) -> None:
    from click.testing import CliRunner

    from xnatio.cli.main import cli

    r = CliRunner().invoke(
        cli, ["verify", "P", "S", "NOPE", str(session.root)], env=_env(xnat_server)
    )
    assert r.exit_code == 1
    assert "30/30 files" not in r.stderr and "MB/s" not in r.stderr, r.stderr
    # The summary is on stdout, as a successful one is.
    assert r.stdout.strip() == "verify: session P/S/NOPE not found on the server"


@pytest.mark.integration
def test_the_c_store_hint_names_the_real_path(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from pynetdicom import AE, StoragePresentationContexts, evt

    from xnatio.cli.main import cli

    s = generate_session(tmp_path / "my exam", series=1, instances=2, image_size=(8, 8))
    ae = AE(ae_title="XNAT")
    ae.supported_contexts = StoragePresentationContexts
    scp = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)]
    )
    try:
        r = CliRunner().invoke(
            cli,
            [
                *("upload-dicom", "P", "S", "E", str(s.root), "--transport", "dicom-store"),
                *("--dicom-host", "127.0.0.1", "--dicom-port", str(scp.server_address[1])),
            ],
        )
    finally:
        scp.shutdown()
    assert r.exit_code == 0, r.output
    assert f"`xio verify P S E '{s.root}' --wait-for 900`" in r.stderr, r.stderr


@pytest.mark.integration
def test_a_wrong_password_is_reported_before_discovery(
    session: SyntheticSession, xnat_server: SandboxServer
) -> None:
    from click.testing import CliRunner

    from xnatio.cli.main import cli

    env = {**_env(xnat_server), "XNAT_PASSWORD": "not-the-password"}
    r = CliRunner().invoke(cli, ["upload-dicom", "P", "S", "E", str(session.root)], env=env)
    assert r.exit_code == 3, r.output
    assert "discover:" not in r.stderr, r.stderr  # no header was read
    assert r.stderr.splitlines()[-1].startswith("error: "), r.stderr
    assert "not-the-password" not in r.output


def test_a_stalled_phase_still_shows_at_the_interval() -> None:
    # No events while the server imports: the heartbeat writes the latest numbers again once
    # an interval has passed without a line (and stops with the display).
    from xnatio.models import Phase, ProgressEvent
    from xnatio.progress import LogDisplay

    out = io.StringIO()
    display = LogDisplay(out, interval=0.05, heartbeat=True)
    display(ProgressEvent(Phase.COMMIT, 0, 0, "committing"))
    deadline = time.monotonic() + 30
    while out.getvalue().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    display.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and set(lines) == {"commit: committing"}, lines
    after = len(lines)
    time.sleep(0.2)
    assert len(out.getvalue().splitlines()) == after, "nothing after close"


@pytest.mark.parametrize("width", [80, 120])
def test_the_live_bar_keeps_its_width_and_place_at_80_and_120_columns(width: int) -> None:
    from rich.console import Console

    from xnatio.models import Phase, ProgressEvent
    from xnatio.progress import RichDisplay

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=width, no_color=True)
    with RichDisplay(console) as d:
        for i, failed in ((0, 0), (3, 0), (300, 1), (1199, 12), (1200, 12)):
            d(
                ProgressEvent(
                    Phase.UPLOAD,
                    i,
                    1200,
                    "uploading",
                    bytes_done=i * 132_000,
                    bytes_total=1200 * 132_000,
                    batches_total=42,
                    batches_done=i * 42 // 1200,
                    batches_failed=failed,
                )
            )
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    frames = [f for f in re.split(r"[\r\n]", plain) if f.startswith("upload ") and "files" in f]
    assert frames
    bar = max(10, min(30, width - 70))
    for frame in frames:
        assert len(frame.rstrip()) <= width, frame
        # description (8) and a space, then the bar, always this wide, then the figures
        assert frame[9 : 9 + bar].strip(" ━╸╺") == "", frame
        assert "━" in frame[9 : 9 + bar] or "╺" in frame[9 : 9 + bar], frame
        assert frame[9 + bar] == " " and frame[10 + bar].isdigit(), frame


# The real CLI in a pseudo-terminal at 80 and 120 columns: tests/test_live_display.py.
