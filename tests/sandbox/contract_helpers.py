"""Shared set-up of the import/prearchive/Direct-Archive contract tests (facts 1 and 3).

A sandbox with two private projects (P, Q), a site admin (``admin``), an ordinary user with no
role (``alice``) and a short idle interval, so the life cycle of facts 3.2 runs in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sandbox_helpers import client, zip_bytes

from xnatio.sandbox import SandboxServer
from xnatio.synth import SyntheticSession, generate_session

IMPORT = "/data/services/import"
ARCHIVE = "/data/services/archive"
DEST = {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}


@pytest.fixture
def xnat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    server = SandboxServer(
        tmp_path_factory.mktemp("contract-data"),
        users={"admin": "admin-secret", "alice": "alice-secret"},
        projects=["P", "Q"],
        idle_seconds=1,
    ).start()
    try:
        yield server
    finally:
        server.stop()


def as_user(server: SandboxServer, user: str, password: str) -> requests.Session:
    http = requests.Session()
    http.auth = (user, password)
    return http


def study(tmp_path: Path, name: str = "s", **kw: Any) -> SyntheticSession:
    kw.setdefault("series", 1)
    kw.setdefault("instances", 2)
    return generate_session(tmp_path / name, image_size=(32, 32), **kw)


def files_of(s: SyntheticSession, uids: list[str] | None = None) -> dict[str, bytes | Path]:
    return {u: s.instances[u] for u in (uids if uids is not None else list(s.instances))}


def send_zip(
    server: SandboxServer,
    files: dict[str, bytes | Path],
    http: requests.Session | None = None,
    **params: str,
) -> requests.Response:
    query = {"import-handler": "DICOM-zip", **params}
    return (http or client(server)).post(
        server.url + IMPORT,
        params=query,
        data=zip_bytes(files),
        headers={"Content-Type": "application/zip"},
    )


def set_code(server: SandboxServer, project: str, code: int) -> None:
    r = client(server).put(f"{server.url}/data/projects/{project}/prearchive_code/{code}")
    assert r.status_code == 200, r.text


def eventually(check: Callable[[], Any], what: str, tries: int = 300) -> Any:
    """Poll ``check`` (every 0.05 s) until it returns something truthy; never asserts on time
    itself, only that the state is reached at all."""
    for _ in range(tries):
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"never reached: {what}")
