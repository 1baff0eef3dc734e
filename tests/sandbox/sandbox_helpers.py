"""Helpers for the sandbox tests: build archives of synthetic sessions, talk to the server."""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import requests

from upload_helpers import TEST_PROJECTS
from xnatio.sandbox import SandboxServer
from xnatio.synth import SyntheticSession, generate_session

__all__ = [
    "TEST_PROJECTS",
    "Unseekable",
    "client",
    "h3",
    "import_zip",
    "instance_files",
    "session",
    "zip_bytes",
]


def session(tmp_path: Path, series: int = 2, instances: int = 3, **kw: Any) -> SyntheticSession:
    return generate_session(
        tmp_path / "session", series=series, instances=instances, image_size=(32, 32), **kw
    )


def zip_bytes(files: dict[str, bytes | Path]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data.read_bytes() if isinstance(data, Path) else data)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes | Path], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            raw = data.read_bytes() if isinstance(data, Path) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def instance_files(s: SyntheticSession) -> dict[str, bytes | Path]:
    return {p.name: p for p in s.instances.values()}


def client(server: SandboxServer) -> requests.Session:
    http = requests.Session()
    http.auth = (server.username, server.password)
    return http


def h3(response: requests.Response) -> str:
    """The message of an XNAT HTML error page."""
    m = re.search(r"<h3>(.*?)</h3>", response.text, re.S)
    assert m, response.text
    return m.group(1)


def import_zip(
    http: requests.Session, server: SandboxServer, body: bytes, **params: str
) -> requests.Response:
    query = {"import-handler": "DICOM-zip", "inbody": "true", **params}
    return http.post(
        server.url + "/data/services/import",
        params=query,
        data=body,
        headers={"Content-Type": "application/zip"},
    )


class Unseekable(io.RawIOBase):
    """A sink zipfile cannot seek back in, so it writes data descriptors (flag bit 3) as
    streaming zip writers do; what was written is in ``buf``."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        return self.buf.write(b)
