"""POST /data/services/import over real HTTP: formats, bodies, parameters and their errors
(facts §1)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import requests
from sandbox_helpers import (
    Unseekable,
    client,
    h3,
    import_zip,
    instance_files,
    session,
    tar_bytes,
    zip_bytes,
)

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration

IMPORT = "/data/services/import"
DEST = {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}


def post(server: SandboxServer, body: bytes, ctype: str, **params: str) -> requests.Response:
    query = {"import-handler": "DICOM-zip", "inbody": "true", **DEST, **params}
    return client(server).post(
        server.url + IMPORT, params=query, data=body, headers={"Content-Type": ctype}
    )


@pytest.mark.parametrize(
    ("ctype", "mode"),
    [("application/zip", "zip"), ("application/x-tar", "w"), ("application/x-gtar", "w:gz")],
)
def test_raw_body_formats_by_content_type(
    xnat_server: SandboxServer, tmp_path: Path, ctype: str, mode: str
) -> None:
    s = session(tmp_path, series=1, instances=2)
    files = instance_files(s)
    body = zip_bytes(files) if mode == "zip" else tar_bytes(files, mode)
    r = post(xnat_server, body, ctype)
    assert r.status_code == 200, r.text
    (uri,) = r.text.split("\r\n")[:-1]
    assert uri.startswith("/data/prearchive/projects/P/") and uri.endswith("/E")
    (prearc,) = xnat_server.prearchive_sessions("P")
    assert set(xnat_server.prearchive_files(prearc)) == set(s.instances)


@pytest.mark.parametrize(
    "ctype", ["application/x-gzip", "application/octet-stream", "application/x-bzip2"]
)
def test_other_content_types_are_unsupported(xnat_server: SandboxServer, ctype: str) -> None:
    r = post(xnat_server, b"PK\x03\x04 whatever", ctype)
    assert r.status_code == 400
    assert h3(r).startswith("Unsupported format")


def test_chunked_body_is_accepted(xnat_server: SandboxServer, tmp_path: Path) -> None:
    s = session(tmp_path, series=1, instances=3)
    body = zip_bytes(instance_files(s))

    def chunks():  # a generator makes requests send Transfer-Encoding: chunked
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = client(xnat_server).post(
        xnat_server.url + IMPORT,
        params={"import-handler": "DICOM-zip", "inbody": "true", **DEST},
        data=chunks(),
        headers={"Content-Type": "application/zip"},
    )
    assert r.status_code == 200, r.text
    (prearc,) = xnat_server.prearchive_sessions("P")
    assert len(xnat_server.prearchive_files(prearc)) == 3


def test_multipart_by_part_filename_with_form_fields(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    s = session(tmp_path, series=1, instances=2)
    body = tar_bytes(instance_files(s), "w:gz")
    r = client(xnat_server).post(
        xnat_server.url + IMPORT,
        data={"import-handler": "DICOM-zip", "project": "P", "subject": "S", "session": "E"},
        files={"file": ("upload.tgz", body, "application/octet-stream")},
    )
    assert r.status_code == 200, r.text
    assert "/prearchive/projects/P/" in r.text


def test_multipart_with_two_files_is_refused(xnat_server: SandboxServer, tmp_path: Path) -> None:
    body = zip_bytes({"a": b"x"})
    r = client(xnat_server).post(
        xnat_server.url + IMPORT,
        params={"import-handler": "DICOM-zip", **DEST},
        files={"a": ("a.zip", body), "b": ("b.zip", body)},
    )
    assert r.status_code == 400
    assert h3(r) == "Importer is limited to one uploaded resource at a time."


def test_multipart_unknown_extension_and_case_sensitivity(xnat_server: SandboxServer) -> None:
    r = client(xnat_server).post(
        xnat_server.url + IMPORT,
        params={"import-handler": "DICOM-zip", **DEST},
        files={"file": ("UPLOAD.ZIP", zip_bytes({"a": b"x"}))},
    )
    assert r.status_code == 400
    assert "Unsupported format" in h3(r)


def test_inbody_with_multipart_content_type_is_500(xnat_server: SandboxServer) -> None:
    # facts 1.1: 406 is set, then the Importer meets a null file list → 500 (inferred).
    r = post(xnat_server, b"--b\r\n\r\n--b--\r\n", "multipart/form-data; boundary=b")
    assert r.status_code == 500


def test_unknown_import_handler_is_404(xnat_server: SandboxServer) -> None:
    r = post(xnat_server, b"", "application/zip", **{"import-handler": "NOPE"})
    assert r.status_code == 404
    assert h3(r) == "Unknown importer implementation specified: NOPE"


@pytest.mark.parametrize("dest", ["/nowhere", "/archive/project/P", "/prearchive/projects"])
def test_malformed_dest(xnat_server: SandboxServer, dest: str) -> None:
    r = post(xnat_server, zip_bytes({"a": b"x"}), "application/zip", dest=dest)
    assert r.status_code == 400
    assert h3(r) == "Parameter dest format error"


def test_nested_archives_and_directory_entries(xnat_server: SandboxServer, tmp_path: Path) -> None:
    s = session(tmp_path, series=2, instances=2)
    uids = list(s.instances)
    inner_tar = tar_bytes({f"deep/{uids[0]}": s.instances[uids[0]]})
    inner_zip = zip_bytes({uids[1]: s.instances[uids[1]], "sub/inner.tar": inner_tar})
    files: dict[str, bytes | Path] = {f"d/{u}": s.instances[u] for u in uids[2:]}
    files["d/nested.zip"] = inner_zip
    files["d/empty/"] = b""  # a directory entry
    r = post(xnat_server, zip_bytes(files), "application/zip", dest="/archive")
    assert r.status_code == 200, r.text
    assert set(xnat_server.archived_files("P", "S", "E")) == set(uids)


def test_dicomdir_refused_without_ignore_unparsable(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    s = session(tmp_path, series=1, instances=2, extras=["dicomdir"])
    files = {"DICOMDIR": s.extras["dicomdir"]}
    r = post(xnat_server, zip_bytes(files), "application/zip")
    assert r.status_code == 400
    assert h3(r) == "object DICOMDIR contains no SOP Class UID"


def test_partial_write_then_ignore_unparsable(xnat_server: SandboxServer, tmp_path: Path) -> None:
    s = session(tmp_path, series=1, instances=4, extras=["txt"])
    uids = list(s.instances)
    files: dict[str, bytes | Path] = {u: s.instances[u] for u in uids[:2]}
    files["notes.txt"] = s.extras["txt"]
    files.update({u: s.instances[u] for u in uids[2:]})
    r = post(xnat_server, zip_bytes(files), "application/zip")
    assert r.status_code == 400
    assert h3(r) == "unable to read DICOM object notes.txt"
    (prearc,) = xnat_server.prearchive_sessions("P")
    assert set(xnat_server.prearchive_files(prearc)) == set(uids[:2])  # written before the bad one

    r = post(xnat_server, zip_bytes(files), "application/zip", **{"Ignore-Unparsable": "true"})
    assert r.status_code == 200, r.text
    assert set(xnat_server.prearchive_files(prearc)) == set(uids)  # same session, merged


def test_nothing_parsable_returns_last_error_even_when_ignoring(
    xnat_server: SandboxServer,
) -> None:
    files: dict[str, bytes | Path] = {"a.txt": b"hello", "b.txt": b"world"}
    r = post(xnat_server, zip_bytes(files), "application/zip", **{"Ignore-Unparsable": "true"})
    assert r.status_code == 400
    assert h3(r) == "unable to read DICOM object b.txt"


def test_empty_archive_gives_empty_uri_list(xnat_server: SandboxServer) -> None:
    r = post(xnat_server, zip_bytes({}), "application/zip")
    assert r.status_code == 200
    assert r.text == ""


def test_requests_merge_into_one_prearchive_session(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    s = session(tmp_path, series=2, instances=2)
    uids = list(s.instances)
    first = post(xnat_server, zip_bytes({u: s.instances[u] for u in uids[:2]}), "application/zip")
    second = post(xnat_server, zip_bytes({u: s.instances[u] for u in uids[2:]}), "application/zip")
    assert first.status_code == second.status_code == 200
    assert first.text == second.text
    (prearc,) = xnat_server.prearchive_sessions("P")
    assert prearc.status == "RECEIVING"  # no dest: waits for the idle timer
    assert set(xnat_server.prearchive_files(prearc)) == set(uids)
    folder = xnat_server.data_dir / "prearchive" / "P" / prearc.timestamp / "E" / "SCANS"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2"]  # by Series Number


def test_routing_from_dicom_headers_without_project(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    s = session(tmp_path, series=1, instances=1)
    r = client(xnat_server).post(
        xnat_server.url + IMPORT,
        params={"import-handler": "DICOM-zip", "inbody": "true"},
        data=zip_bytes(instance_files(s)),
        headers={"Content-Type": "application/zip"},
    )
    assert r.status_code == 200
    assert r.text.startswith("/data/prearchive/projects/Unassigned/")
    (prearc,) = xnat_server.prearchive_sessions("Unassigned")
    assert prearc.name == s.patient_id


def test_gradual_dicom_one_file_per_request_and_format_txt(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    s = session(tmp_path, series=1, instances=3)
    http = client(xnat_server)
    answers = set()
    for path in s.instances.values():
        r = http.post(
            xnat_server.url + IMPORT,
            params={"import-handler": "gradual-DICOM", "inbody": "true", "format": "txt", **DEST},
            data=path.read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/plain")
        answers.add(r.text)
    assert len(answers) == 1
    (prearc,) = xnat_server.prearchive_sessions("P")
    got = xnat_server.prearchive_files(prearc)
    assert set(got) == set(s.instances)
    # facts 1.7: the stored file is re-encoded (and site-anonymized); its MD5 is the stored one.
    for uid, f in got.items():
        assert f.md5 == hashlib.md5(f.path.read_bytes()).hexdigest()
        assert f.md5 != hashlib.md5(s.instances[uid].read_bytes()).hexdigest()


def test_direct_archive_row_and_its_fallback(xnat_server: SandboxServer, tmp_path: Path) -> None:
    # facts 1.6: the answer is the xapi URI; the experiment appears only after the idle interval
    # (tests/sandbox/test_contract_direct_archive.py follows it to the end).
    s = session(tmp_path, series=1, instances=2)
    uids = list(s.instances)
    for uid in uids:
        r = post(
            xnat_server,
            zip_bytes({uid: s.instances[uid]}),
            "application/zip",
            **{"Direct-Archive": "true"},
        )
        assert r.text == f"/xapi/direct-archive/P/{s.study_uid}/E\r\n"  # same ongoing row
    assert xnat_server.archived_files("P", "S", "E") == {}
    assert xnat_server.prearchive_sessions("P") == []
    assert xnat_server.store is not None
    row = xnat_server.store.get_direct("P", s.study_uid, "E")
    assert row is not None
    assert set(xnat_server.prearchive_files(row)) == set(uids)

    # A pre-created (empty) session, or an archive folder that already exists, makes
    # Direct-Archive fall back to the prearchive.
    http = client(xnat_server)
    url = xnat_server.url + "/data/projects/P/subjects/S/experiments/E2"
    assert http.put(url, params={"xsiType": "xnat:mrSessionData"}).status_code == 201
    assert http.put(url).status_code == 200
    for label in ("E2",):
        other = session(tmp_path / label, series=1, instances=1, seed=7)
        r = post(
            xnat_server,
            zip_bytes(instance_files(other)),
            "application/zip",
            EXPT_LABEL=label,
            **{"Direct-Archive": "true"},
        )
        assert r.text.startswith("/data/prearchive/projects/P/"), label


def test_delete_experiment(xnat_server: SandboxServer, tmp_path: Path) -> None:
    s = session(tmp_path, series=1, instances=1)
    post(xnat_server, zip_bytes(instance_files(s)), "application/zip", dest="/archive")
    url = xnat_server.url + "/data/projects/P/subjects/S/experiments/E"
    http = client(xnat_server)
    assert http.delete(url).status_code == 200
    assert http.get(url, params={"format": "json"}).status_code == 404
    assert not (xnat_server.data_dir / "archive" / "P" / "arc001" / "E").exists()


def test_in_request_archive_merge_and_overwrite(xnat_server: SandboxServer, tmp_path: Path) -> None:
    # facts 1.5: no overwrite merges only auto-archive-coded rows; "none" (any value) merges;
    # append refuses a clash (identical bytes too); delete overwrites. facts 1.4: any in-request
    # archive failure is 400 "unable to archive for the Prearchive session", row CONFLICT.
    s = session(tmp_path, series=1, instances=3)
    uids = list(s.instances)
    http = client(xnat_server)
    one = zip_bytes({uids[0]: s.instances[uids[0]]})
    assert import_zip(http, xnat_server, one, **DEST, dest="/archive").status_code == 200
    two = zip_bytes({uids[1]: s.instances[uids[1]]})
    r = import_zip(http, xnat_server, two, **DEST, dest="/archive")
    assert r.status_code == 400
    assert h3(r) == "unable to archive for the Prearchive session"
    (left,) = xnat_server.prearchive_sessions("P")
    assert left.status == "CONFLICT"
    r = import_zip(http, xnat_server, two, **DEST, dest="/archive", overwrite="none")
    assert r.status_code == 200, r.text
    three = zip_bytes({uids[2]: s.instances[uids[2]]})
    r = import_zip(http, xnat_server, three, **DEST, dest="/archive", overwrite="append")
    assert r.status_code == 200
    assert set(xnat_server.archived_files("P", "S", "E")) == set(uids)
    r = import_zip(http, xnat_server, one, **DEST, dest="/archive", overwrite="append")
    assert (r.status_code, h3(r)) == (400, "unable to archive for the Prearchive session")
    assert [x.status for x in xnat_server.prearchive_sessions("P")] == ["CONFLICT"]
    r = import_zip(http, xnat_server, one, **DEST, dest="/archive", overwrite="delete")
    assert r.status_code == 200, r.text
    assert xnat_server.prearchive_sessions("P") == []
    assert set(xnat_server.archived_files("P", "S", "E")) == set(uids)


@pytest.mark.parametrize("direct", ["true", "false"])
def test_nameless_gradual_files_and_name_clashes_keep_every_instance(
    xnat_server: SandboxServer, tmp_path: Path, direct: str
) -> None:
    s = session(tmp_path, series=1, instances=4)
    uids = list(s.instances)
    http = client(xnat_server)
    params = {"import-handler": "gradual-DICOM", "inbody": "true", "Direct-Archive": direct}
    for uid in uids[:2]:  # raw bodies carry no file name
        r = http.post(
            xnat_server.url + IMPORT,
            params={**params, **DEST},
            data=s.instances[uid].read_bytes(),
            headers={"Content-Type": "application/dicom"},
        )
        assert r.status_code == 200, r.text
    for uid in uids[2:]:  # two different instances under one uploaded name
        r = post(
            xnat_server,
            zip_bytes({"same-name.dcm": s.instances[uid]}),
            "application/zip",
            **{"Direct-Archive": direct},
        )
        assert r.status_code == 200, r.text
    assert xnat_server.store is not None
    if direct == "true":
        row = xnat_server.store.get_direct("P", s.study_uid, "E")
        assert row is not None
        stored = xnat_server.prearchive_files(row)
    else:
        (prearc,) = xnat_server.prearchive_sessions("P")
        stored = xnat_server.prearchive_files(prearc)
    assert set(stored) == set(uids)
    assert len({f.name for f in stored.values()}) == 4


@pytest.mark.parametrize(
    ("param", "value", "where"),
    [
        ("PROJECT_ID", "..", "/data/prearchive/projects/Unassigned/"),
        ("EXPT_LABEL", "../../x", "/data/archive/projects/P/subjects/S/experiments/______x"),
        ("SUBJECT_ID", "a/b", "/data/archive/projects/P/subjects/a_b/experiments/E"),
    ],
)
def test_labels_that_could_escape_the_data_dir_are_cleaned(
    xnat_server: SandboxServer, tmp_path: Path, param: str, value: str, where: str
) -> None:
    # facts 1.2: an unknown project → Unassigned, 200; facts 3.5: labels cleaned at archive.
    s = session(tmp_path, series=1, instances=1)
    r = post(xnat_server, zip_bytes(instance_files(s)), "application/zip", **{param: value},
             dest="/archive" if param != "PROJECT_ID" else "/prearchive")  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.text.startswith(where)
    assert not (xnat_server.data_dir.parent / "x").exists()
    assert not (xnat_server.data_dir / "x").exists()


def descriptor_zip(files: dict[str, Path], method: int) -> bytes:
    out = Unseekable()
    with zipfile.ZipFile(out, "w", compression=method) as zf:
        for name, path in files.items():
            zf.writestr(name, path.read_bytes())
    return out.buf.getvalue()


def test_zip_read_like_zipinputstream(xnat_server: SandboxServer, tmp_path: Path) -> None:
    s = session(tmp_path, series=1, instances=2)
    files = {p.name: p for p in s.instances.values()}
    # DEFLATED entries with data descriptors: fine.
    r = post(xnat_server, descriptor_zip(files, zipfile.ZIP_DEFLATED), "application/zip")
    assert r.status_code == 200, r.text
    (prearc,) = xnat_server.prearchive_sessions("P")
    assert set(xnat_server.prearchive_files(prearc)) == set(s.instances)
    # STORED entries with data descriptors: java.util.zip.ZipInputStream refuses them.
    r = post(xnat_server, descriptor_zip(files, zipfile.ZIP_STORED), "application/zip")
    assert r.status_code == 400
    assert "only DEFLATED entries can have EXT descriptor" in h3(r)
    # Not a zip at all: ZipInputStream finds no entries, so nothing is imported (200, empty).
    r = post(xnat_server, b"this is not a zip file", "application/zip")
    assert (r.status_code, r.text) == (200, "")


def test_zip_entry_with_a_bad_crc_is_refused(xnat_server: SandboxServer, tmp_path: Path) -> None:
    s = session(tmp_path, series=1, instances=1)
    (path,) = s.instances.values()
    body = bytearray(zip_bytes({"a.dcm": path}))
    body[14] ^= 0xFF  # the CRC-32 field of the first local header
    r = post(xnat_server, bytes(body), "application/zip")
    # ZipInputStream checks the CRC while the importer reads the entry: an I/O error on that
    # object, 400 "unable to read DICOM object NAME" (facts 1.1, 1.4: GDI:431-435).
    assert r.status_code == 400
    assert h3(r) == "unable to read DICOM object a.dcm"
