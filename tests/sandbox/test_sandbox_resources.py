"""Resources (facts §5) and the read-back shapes of scan resources (facts §4)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sandbox_helpers import client, import_zip, instance_files, session, tar_bytes, zip_bytes

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration

EXP = "/data/projects/P/subjects/S/experiments/E"


@pytest.fixture
def archived(xnat_server: SandboxServer, tmp_path: Path) -> SandboxServer:
    body = zip_bytes(instance_files(session(tmp_path, series=1, instances=2)))
    r = import_zip(
        client(xnat_server),
        xnat_server,
        body,
        PROJECT_ID="P",
        SUBJECT_ID="S",
        EXPT_LABEL="E",
        dest="/archive",
    )
    assert r.status_code == 200
    return xnat_server


def files(server: SandboxServer, path: str) -> dict[str, dict[str, str]]:
    rows = client(server).get(server.url + path, params={"format": "json"}).json()
    return {row["Name"]: row for row in rows["ResultSet"]["Result"]}


def test_put_file_duplicates_and_overwrite(archived: SandboxServer) -> None:
    http = client(archived)
    url = archived.url + EXP + "/resources/NOTES/files/a/notes.txt"
    assert http.put(url, params={"inbody": "true"}, data=b"one").text == ""
    r = http.put(url, params={"inbody": "true"}, data=b"two")
    assert r.status_code == 200
    assert r.json() == {"duplicates": ["a/notes.txt"]}
    assert http.get(url).content == b"one"
    assert http.put(url, params={"inbody": "true", "overwrite": "true"}, data=b"two").ok
    assert http.get(url).content == b"two"
    row = files(archived, EXP + "/resources/NOTES/files")["notes.txt"]
    assert row["Size"] == "3" and row["digest"] == hashlib.md5(b"two").hexdigest()


def test_empty_resource_is_listed(archived: SandboxServer) -> None:
    http = client(archived)
    assert http.put(archived.url + EXP + "/resources/EMPTY", params={"format": "TXT"}).ok
    rows = http.get(archived.url + EXP + "/resources", params={"format": "json"}).json()
    (row,) = rows["ResultSet"]["Result"]
    assert (row["label"], row["format"], row["file_count"]) == ("EMPTY", "TXT", "0")
    assert files(archived, EXP + "/resources/EMPTY/files") == {}


def test_put_without_body_is_400(archived: SandboxServer) -> None:
    r = client(archived).put(archived.url + EXP + "/resources/NOTES/files/x.txt")
    assert r.status_code == 400


def test_extract_zip_and_tar_into_scan_resource(archived: SandboxServer) -> None:
    http = client(archived)
    base = archived.url + EXP + "/scans/1/resources/SNAP/files/"
    z = zip_bytes({"a.png": b"A", "d/b.png": b"BB"})
    assert http.put(base + "s.zip", params={"extract": "true"}, data=z).status_code == 200
    t = tar_bytes({"c.png": b"CCC"})
    assert http.post(base + "t.tar", params={"extract": "true"}, data=t).status_code == 200
    got = files(archived, EXP + "/scans/1/resources/SNAP/files")
    assert {k: v["Size"] for k, v in got.items()} == {"a.png": "1", "b.png": "2", "c.png": "3"}
    resources = http.get(
        archived.url + EXP + "/scans/1/resources", params={"format": "json"}
    ).json()["ResultSet"]["Result"]
    by_label = {row["label"]: row for row in resources}
    assert (by_label["SNAP"]["file_count"], by_label["SNAP"]["file_size"]) == ("3", "6")
    assert by_label["DICOM"]["file_count"] == "2"


def test_extract_writes_nested_archives_out_as_files(archived: SandboxServer) -> None:
    inner = tar_bytes({"inner.txt": b"inner"})
    z = zip_bytes({"a.txt": b"a", "data.tar": inner})
    url = archived.url + EXP + "/resources/NESTED/files/up.zip"
    assert client(archived).put(url, params={"extract": "true"}, data=z).status_code == 200
    got = files(archived, EXP + "/resources/NESTED/files")
    assert {k: v["digest"] for k, v in got.items()} == {
        "a.txt": hashlib.md5(b"a").hexdigest(),
        "data.tar": hashlib.md5(inner).hexdigest(),
    }


def test_multipart_resource_upload(archived: SandboxServer) -> None:
    http = client(archived)
    r = http.post(
        archived.url + EXP + "/resources/EXTRA/files",
        files={"file": ("report.pdf", b"%PDF-1.4")},
    )
    assert r.status_code == 200
    assert files(archived, EXP + "/resources/EXTRA/files")["report.pdf"]["Size"] == "8"


def test_subject_put_created_then_existing(xnat_server: SandboxServer) -> None:
    http = client(xnat_server)
    assert http.put(xnat_server.url + "/data/projects/P/subjects/NEW").status_code == 201
    assert http.put(xnat_server.url + "/data/projects/P/subjects/NEW").status_code == 200


def test_scans_download_as_zip(archived: SandboxServer) -> None:
    import io
    import zipfile

    r = client(archived).get(archived.url + EXP + "/scans/ALL/files", params={"format": "zip"})
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        got = {n: hashlib.md5(zf.read(n)).hexdigest() for n in zf.namelist()}
    want = {
        f"E/scans/{f.scan_id}/resources/DICOM/files/{f.name}": f.md5
        for f in archived.archived_files("P", "S", "E").values()
    }
    assert got == want
    assert not list((archived.data_dir / "tmp").iterdir())  # the temporary zip is gone


def test_inbody_resource_rules(archived: SandboxServer) -> None:
    http = client(archived)
    base = archived.url + EXP + "/resources/R/files"
    r = http.put(base, params={"inbody": "true"}, data=b"x")
    assert r.status_code == 406  # no file name in the URI
    r = http.put(base + "/a.txt", params={"inbody": "true"}, files={"f": ("a.txt", b"x")})
    assert r.status_code == 406  # in-body must not be multipart
