"""xnatio is a guest in the process that imports it: the library leaves logging as it found it.

Secret redaction is a filter on the CLI's own handler (``xnatio.progress.cli_logging``); the
library never touches the root logger, its handlers or ``logging.getLogRecordFactory()``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from upload_helpers import TEST_PROJECTS, USER
from xnatio import redact
from xnatio.cli.main import cli
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session
from xnatio.xnat.client import XnatClient

# A password no other test uses: other tests' clients may be open (and holding theirs) meanwhile.
GUEST_PASSWORD = "Guest-only-password-5d1e"


# Runs in a fresh interpreter, so even what importing xnatio does is seen. An application sets up
# its logging first, then uses the library; afterwards its set-up must be exactly as it was.
APPLICATION = (
    textwrap.dedent(
        """
    import json, logging, sys

    app_handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(app_handler)
    logging.getLogger().setLevel(logging.ERROR)

    def snapshot():
        root = logging.getLogger()
        return {
            "root_handlers": [id(h) for h in root.handlers],
            "root_level": root.level,
            "root_filters": len(root.filters),
            "app_handler_filters": len(app_handler.filters),
            "app_handler_stream": id(app_handler.stream),
            "factory": id(logging.getLogRecordFactory()),
            "xnatio_handlers": len(logging.getLogger("xnatio").handlers),
            "xnatio_level": logging.getLogger("xnatio").level,
        }

    before = snapshot()
    from xnatio.uploaders import upload_dicom_parallel_rest
    from xnatio.xnat.client import XnatClient
    from xnatio import redact

    url, source = sys.argv[1], sys.argv[2]
    result = upload_dicom_parallel_rest(
        url, "@USER@", "@PASSWORD@", source_dir=source, project="P", subject="S",
        session="E", num_batches=2, upload_workers=2, archive_workers=1,
    )
    with XnatClient(url, username="@USER@", password="@PASSWORD@") as client:
        held_while_open = "@PASSWORD@" in redact.held()
    after = snapshot()
    print("RESULT " + json.dumps({
        "before": before, "after": after, "success": result.success,
        "files": result.total_files, "held_while_open": held_while_open,
        "held_after": redact.held(),
    }))
    """
    )
    .replace("@USER@", USER)
    .replace("@PASSWORD@", GUEST_PASSWORD)
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SandboxServer]:
    users = {USER: GUEST_PASSWORD}
    with SandboxServer(tmp_path / "xnat", users=users, projects=TEST_PROJECTS) as s:
        yield s


@pytest.mark.integration
def test_the_library_leaves_logging_as_it_found_it(server: SandboxServer, tmp_path: Path) -> None:
    source = tmp_path / "exam"
    generate_session(source, series=2, instances=2, image_size=(16, 16))
    proc = subprocess.run(
        [sys.executable, "-c", APPLICATION, server.url, str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["success"] and out["files"] == 4  # it did upload, through every layer
    assert out["after"] == out["before"]
    # A client holds its secrets while open and forgets them when it closes.
    assert out["held_while_open"] is True
    assert out["held_after"] == []
    # The server has the session: the upload was real.
    assert len(list((tmp_path / "xnat").rglob("*.dcm"))) >= 4


def _logging_state() -> tuple[object, ...]:
    root, own = logging.getLogger(), logging.getLogger("xnatio")
    return (
        list(root.handlers),
        root.level,
        list(root.filters),
        logging.getLogRecordFactory(),
        list(own.handlers),
        own.level,
    )


@pytest.mark.integration
def test_a_cli_command_restores_logging_when_it_ends(
    server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI installs its scrubbing handler for one command (``-vv`` lowers xnatio's level for
    that command only); an embedding program or a CliRunner test gets its logging back."""
    source = tmp_path / "exam"
    generate_session(source, series=1, instances=2, image_size=(16, 16))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XNAT_SERVER", server.url)
    monkeypatch.setenv("XNAT_USERNAME", USER)
    monkeypatch.setenv("XNAT_PASSWORD", GUEST_PASSWORD)
    before = _logging_state()
    r = CliRunner().invoke(cli, ["upload-dicom", "P", "S", "E", str(source), "-vv", "-q"])
    assert r.exit_code == 0, r.output
    assert _logging_state() == before
    assert GUEST_PASSWORD not in r.output
    # -vv printed xnatio's debug records through the CLI's handler (on the command's stderr).
    assert "DEBUG xnatio." in r.output
    assert GUEST_PASSWORD not in redact.held()  # every client the command opened was closed


@pytest.mark.integration
def test_a_closed_client_holds_no_secret(server: SandboxServer) -> None:
    client = XnatClient(server.url, username=USER, password=GUEST_PASSWORD)
    assert GUEST_PASSWORD in redact.held()
    client.login()
    session_id = client._jsession
    assert session_id and session_id in redact.held()
    client.close()
    assert GUEST_PASSWORD not in redact.held() and session_id not in redact.held()
