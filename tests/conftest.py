"""Shared fixtures.

Every test runs with HOME and the XDG folders pointed at an empty temporary directory and the
XNAT_* variables removed, so a developer's own config, netrc or journal never leaks in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

# Tests never assert on time: Hypothesis's default 200 ms deadline per example is such an
# assertion, and it failed test_shard's partition property on a machine at load 59 (349 ms).
settings.register_profile("xnatio", deadline=None)
settings.load_profile("xnatio")

if TYPE_CHECKING:
    from xnatio.sandbox import SandboxServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--import-workers",
        type=int,
        default=0,
        help="Run every sandbox of the run with this many import worker processes, each taking "
        "every body it can (the server keeps none of its own).",
    )


@pytest.fixture(autouse=True)
def _sandbox_import_workers(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = request.config.getoption("--import-workers")
    if n:
        from xnatio.sandbox.server import SandboxServer
        from xnatio.sandbox.workers import ImportWorkers

        monkeypatch.setattr(SandboxServer, "default_import_workers", n)
        monkeypatch.setattr(ImportWorkers, "DEFAULT_HOME", 0)  # every body it can hand over


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var in list(os.environ):
        if var.startswith(("XNAT_", "XNATIO_")):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("NETRC", raising=False)  # else a developer's netrc file is read
    monkeypatch.setenv("NO_COLOR", "1")
    # Subprocess tests compare stderr lines as written; tests/test_cli_output.py turns the
    # timestamps of a log (stderr a pipe) back on.
    monkeypatch.setenv("XNATIO_LOG_TIMESTAMPS", "0")
    yield home


@pytest.fixture
def xnat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    """A started local XNAT (xnatio.sandbox) on an ephemeral port, with a fresh data dir.

    Login: ``xnat_server.username`` / ``xnat_server.password`` ("admin" / "admin-secret", a site
    admin); the projects of ``upload_helpers.TEST_PROJECTS`` exist;
    ``xnat_server.url``; ``xnat_server.set_knobs(...)`` for latency and faults.
    """
    from upload_helpers import TEST_PROJECTS
    from xnatio.sandbox import SandboxServer

    server = SandboxServer(
        tmp_path_factory.mktemp("xnat-data"),
        users={"admin": "admin-secret"},
        projects=TEST_PROJECTS,
    ).start()
    try:
        yield server
    finally:
        server.stop()
