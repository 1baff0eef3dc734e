"""The sandbox end to end: import a DICOM zip, read it back, log in with a JSESSION."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import requests
from sandbox_helpers import client, h3, import_zip, instance_files, session, zip_bytes

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration


def test_zip_import_to_archive_reads_back_with_md5(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    s = session(tmp_path)
    http = client(xnat_server)
    r = import_zip(
        http,
        xnat_server,
        zip_bytes(instance_files(s)),
        PROJECT_ID="P1",
        SUBJECT_ID="S1",
        EXPT_LABEL="E1",
        dest="/archive",
    )
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/uri-list")
    assert r.text == "/data/archive/projects/P1/subjects/S1/experiments/E1\r\n"

    base = xnat_server.url + "/data/projects/P1/subjects/S1/experiments/E1"
    doc = http.get(base, params={"format": "json"}).json()
    fields = doc["items"][0]["data_fields"]
    assert (fields["label"], fields["project"], fields["UID"]) == ("E1", "P1", s.study_uid)
    scans = http.get(base + "/scans", params={"format": "json"}).json()["ResultSet"]["Result"]
    assert sorted(row["ID"] for row in scans) == ["1", "2"]

    seen = {}
    for number in ("1", "2"):
        rows = http.get(
            f"{base}/scans/{number}/resources/DICOM/files", params={"format": "json"}
        ).json()["ResultSet"]["Result"]
        for row in rows:
            data = http.get(xnat_server.url + row["URI"]).content
            assert row["Size"] == str(len(data))
            assert row["digest"] == hashlib.md5(data).hexdigest()
            seen[row["Name"]] = row["digest"]
    # The digest is the MD5 of the stored file, which XNAT re-encodes and anonymizes on
    # receipt, so it is not the uploaded file's (facts 1.7).
    assert set(seen) == {p.name for p in s.instances.values()}
    assert set(xnat_server.archived_files("P1", "S1", "E1")) == set(s.instances)


def test_missing_experiment_is_404_with_xnat_message(xnat_server: SandboxServer) -> None:
    r = client(xnat_server).get(
        xnat_server.url + "/data/projects/P1/subjects/S1/experiments/NOPE",
        params={"format": "json"},
    )
    assert r.status_code == 404
    assert h3(r) == "Unable to find the specified experiment."


def test_jsession_login_and_logout(xnat_server: SandboxServer) -> None:
    r = requests.post(
        xnat_server.url + "/data/JSESSION", auth=(xnat_server.username, xnat_server.password)
    )
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    token = r.text
    assert len(token) == 32 and int(token, 16) >= 0
    cookies = {"JSESSIONID": token}
    assert requests.get(xnat_server.url + "/data/projects", cookies=cookies).status_code == 200
    assert requests.delete(xnat_server.url + "/data/JSESSION", cookies=cookies).status_code == 200
    assert requests.get(xnat_server.url + "/data/projects", cookies=cookies).status_code == 401


def test_wrong_password_gets_401_with_realm(xnat_server: SandboxServer) -> None:
    r = requests.get(xnat_server.url + "/data/projects", auth=("admin", "wrong"))
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="XNAT"'  # facts 2: the site ID
