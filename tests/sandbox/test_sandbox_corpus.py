"""pydicom's bundled test files (odd real-world objects) through the import service: every file is
either filed into a session or refused with one of XNAT's messages, never a server error."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from sandbox_helpers import client, zip_bytes

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration

REFUSALS = re.compile(
    r"<h3>(unable to read DICOM object .+|object .+ contains no SOP (Class|Instance) UID)</h3>"
)


def corpus() -> list[Path]:
    # The bundled folder itself: get_testdata_files() would also try (slow) downloads.
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in folder.iterdir() if p.is_file())


def test_bundled_files_are_filed_or_refused(xnat_server: SandboxServer) -> None:
    files = corpus()
    assert len(files) > 20
    http = client(xnat_server)
    accepted = {}
    for path in files:
        r = http.post(
            xnat_server.url + "/data/services/import",
            params={"import-handler": "DICOM-zip", "inbody": "true", "PROJECT_ID": "C"},
            data=zip_bytes({path.name: path}),
            headers={"Content-Type": "application/zip"},
        )
        assert r.status_code in (200, 400), (path.name, r.status_code, r.text)
        if r.status_code == 400:
            assert REFUSALS.search(r.text), (path.name, r.text)
        else:
            accepted[path.name] = path
    assert accepted  # most of the corpus is ordinary DICOM
    stored = {}
    for s in xnat_server.prearchive_sessions("C"):
        stored.update(xnat_server.prearchive_files(s))
    # Every accepted file is filed under its SOP Instance UID (duplicates share one).
    for name, path in accepted.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uid = str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)
        assert uid in stored, name
