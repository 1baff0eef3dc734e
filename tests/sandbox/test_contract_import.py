"""Contract tests of ``POST /data/services/import`` against ``shared/xnat-api.md`` section 1 (and
the label rules of 3.5), over real HTTP. Each test cites the facts line it pins."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
import requests
from contract_helpers import (
    DEST,
    IMPORT,
    as_user,
    files_of,
    send_zip,
    set_code,
    study,
    xnat,
)
from pydicom import dcmread
from sandbox_helpers import client, h3, tar_bytes, zip_bytes

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration
__all__ = ["xnat"]  # the fixture

STREAMING = (
    "In-body File posts must include the file directly as the body of the message. In this"
    " case, the request entity size is {} but the media type is not application/zip"
    " (i.e. streaming compressed upload)."
)


def raw(server: SandboxServer, body: object, ctype: str | None, **params: str) -> requests.Response:
    headers = {"Content-Type": ctype} if ctype is not None else {}
    return client(server).post(
        server.url + IMPORT, params={**DEST, **params}, data=body, headers=headers
    )


def chunks(body: bytes, size: int = 1000):  # type: ignore[no-untyped-def]
    for i in range(0, len(body), size):  # a generator: requests sends it chunked
        yield body[i : i + size]


# -- 1.1 body ----------------------------------------------------------------------------------
def test_listed_content_type_is_in_body_without_inbody(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.1 line 1: raw in-body when the Content-Type is in XNAT's list (RU:36-67).
    s = study(tmp_path)
    r = raw(xnat, zip_bytes(files_of(s)), "application/zip")
    assert r.status_code == 200, r.text
    assert r.text.startswith("/data/prearchive/projects/P/")


def test_content_type_with_a_parameter_is_not_in_body(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.1 line 1: exact match, a "; param" suffix defeats it (inferred) → 1.1 line 4.
    r = raw(xnat, zip_bytes(files_of(study(tmp_path))), "application/zip; charset=binary")
    assert (r.status_code, h3(r)) == (400, "Unable to identify upload format.")


@pytest.mark.parametrize("ctype", ["application/gzip", None])
def test_unlisted_or_missing_type_cannot_be_identified(
    xnat: SandboxServer, tmp_path: Path, ctype: str | None
) -> None:
    # facts 1.1 line 4: neither in-body nor multipart → 400 (SR:1302-1305; Imp:199-202).
    r = raw(xnat, zip_bytes(files_of(study(tmp_path))), ctype)
    assert (r.status_code, h3(r)) == (400, "Unable to identify upload format.")


def test_multipart_with_inbody_is_500(xnat: SandboxServer) -> None:
    # facts 1.1 line 2: 406 set, then a null file list → 500 (inferred) (SR:1254-1256; Imp:161).
    r = raw(xnat, b"--b\r\n\r\n--b--\r\n", "multipart/form-data; boundary=b", inbody="true")
    assert r.status_code == 500


def test_chunked_non_zip_is_refused_chunked_zip_accepted(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.1 line 3: unknown size (chunked) and a type other than application/zip → 400.
    s = study(tmp_path)
    r = raw(xnat, chunks(tar_bytes(files_of(s))), "application/x-tar")
    assert (r.status_code, h3(r)) == (400, STREAMING.format(-1))
    r = raw(xnat, chunks(zip_bytes(files_of(s))), "application/zip")
    assert r.status_code == 200, r.text
    assert r.text.startswith("/data/prearchive/projects/P/")


def test_empty_non_zip_body_is_refused(xnat: SandboxServer) -> None:
    # facts 1.1 line 3: size 0 and not application/zip → 400 with "size is 0".
    r = raw(xnat, b"", "application/x-tar", inbody="true")
    assert (r.status_code, h3(r)) == (400, STREAMING.format(0))


@pytest.mark.parametrize(
    ("ctype", "mode"), [("application/x-gtar", "w:gz"), ("application/xar", "w")]
)
def test_gtar_is_gzipped_tar_and_xar_is_tar(
    xnat: SandboxServer, tmp_path: Path, ctype: str, mode: str
) -> None:
    # facts 1.1 line 5: application/x-gtar → gzip'd TAR, application/xar → TAR (Format.java).
    s = study(tmp_path)
    r = raw(xnat, tar_bytes(files_of(s), mode), ctype)
    assert r.status_code == 200, r.text
    (row,) = xnat.prearchive_sessions("P")
    assert set(xnat.prearchive_files(row)) == set(s.instances)


@pytest.mark.parametrize(
    "ctype", ["application/x-gzip", "application/octet-stream", "application/dicom"]
)
def test_types_without_a_zip_or_tar_name_are_unsupported_for_dicom_zip(
    xnat: SandboxServer, ctype: str
) -> None:
    # facts 1.1 line 5: the reader is picked by the name upload.EXT → "Unsupported format UNKNOWN".
    r = raw(xnat, b"PK\x03\x04 whatever", ctype, **{"import-handler": "DICOM-zip"})
    assert (r.status_code, h3(r)) == (400, "Unsupported format UNKNOWN")


def test_application_dicom_selects_gradual_dicom(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1 "Handler": a body typed application/dicom selects gradual-DICOM (Imp:238-244).
    s = study(tmp_path)
    for path in s.instances.values():
        r = raw(xnat, path.read_bytes(), "application/dicom")
        assert r.status_code == 200, r.text
    (row,) = xnat.prearchive_sessions("P")
    stored = xnat.prearchive_files(row)
    assert set(stored) == set(s.instances)
    assert row.status == "RECEIVING"  # gradual-DICOM never builds (facts 1, dest row)
    # The raw body's name is upload.dcm (facts 1.1 line 5): kept by the first instance only.
    first = next(iter(s.instances))
    assert stored[first].name == "upload.dcm"
    assert all(f.name.startswith(s.study_uid + "-") for u, f in stored.items() if u != first)


def test_more_than_one_file_part_is_refused(xnat: SandboxServer) -> None:
    # facts 1.1 line 4: multipart with >1 file part → 400 (Imp:231-235).
    body = zip_bytes({"a": b"x"})
    r = client(xnat).post(
        xnat.url + IMPORT, params=DEST, files={"a": ("a.zip", body), "b": ("b.zip", body)}
    )
    assert (r.status_code, h3(r)) == (
        400,
        "Importer is limited to one uploaded resource at a time.",
    )


def test_entries_must_be_dicom(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.1 line 6: all else must be DICOM → 400 "unable to read DICOM object NAME".
    files = files_of(study(tmp_path))
    files["notes.txt"] = b"not dicom"
    r = send_zip(xnat, files, **DEST)
    assert (r.status_code, h3(r)) == (400, "unable to read DICOM object notes.txt")


def test_dicom_zip_dest_overrides_the_upper_case_keys(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1 "dest" row: DICOM-zip: /archive… also archives; dest overrides PROJECT_ID/SUBJECT_ID.
    r = send_zip(xnat, files_of(study(tmp_path)), PROJECT_ID="Q", SUBJECT_ID="X", EXPT_LABEL="Y",
                 dest="/archive/projects/P/subjects/S2/experiments/E2")  # fmt: skip
    assert r.text == "/data/archive/projects/P/subjects/S2/experiments/E2\r\n"


def test_gradual_dicom_takes_only_the_project_of_dest(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1 "dest" row: gradual-DICOM uses only dest's project; no build, no archive.
    s = study(tmp_path, instances=1)
    (path,) = s.instances.values()
    r = client(xnat).post(
        xnat.url + IMPORT,
        params={"import-handler": "gradual-DICOM", "EXPT_LABEL": "G",
                "dest": "/archive/projects/P/subjects/S9/experiments/E9"},
        data=path.read_bytes(),
        headers={"Content-Type": "application/dicom"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.text.startswith("/data/prearchive/projects/P/") and r.text.endswith("/G\r\n")
    assert [x.status for x in xnat.prearchive_sessions("P")] == ["RECEIVING"]


# -- 1.2 where the files go --------------------------------------------------------------------
def test_unknown_project_goes_to_unassigned_with_200(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.2 line 1: unknown project → Unassigned, still 200 with its prearchive URI.
    r = send_zip(xnat, files_of(study(tmp_path)), PROJECT_ID="NOPE", EXPT_LABEL="E")
    assert r.status_code == 200, r.text
    assert r.text.startswith("/data/prearchive/projects/Unassigned/")
    assert r.text.endswith("/E\r\n")


def test_unreadable_project_goes_to_unassigned(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.2 line 1: a private project the user cannot read → Unassigned (GDI:607-628).
    alice = as_user(xnat, "alice", "alice-secret")
    r = send_zip(xnat, files_of(study(tmp_path)), http=alice, **DEST)
    assert r.status_code == 200, r.text
    assert r.text.startswith("/data/prearchive/projects/Unassigned/")
    assert xnat.prearchive_sessions("P") == []


def test_read_access_files_into_the_project_but_archiving_needs_edit(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.2 line 1: readable is enough for the files to go to the project; write access is
    # checked only by later operations (inferred): the in-request archive then fails (1.4).
    assert client(xnat).put(xnat.url + "/data/projects/P/users/Collaborators/alice").ok
    alice = as_user(xnat, "alice", "alice-secret")
    s = study(tmp_path)
    r = send_zip(xnat, files_of(s), http=alice, **DEST)
    assert r.status_code == 200 and r.text.startswith("/data/prearchive/projects/P/")
    r = send_zip(xnat, files_of(s), http=alice, **DEST, dest="/archive")
    assert (r.status_code, h3(r)) == (400, "unable to archive for the Prearchive session")
    assert [x.status for x in xnat.prearchive_sessions("P")] == ["ERROR"]
    assert xnat.archived_files("P", "S", "E") == {}


def test_unassigned_cannot_be_archived(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 3.4: "Cannot archive sessions from the Unassigned folder."
    uri = send_zip(xnat, files_of(study(tmp_path)), PROJECT_ID="NOPE").text.strip()
    r = client(xnat).post(xnat.url + "/data/services/archive", params={"src": uri})
    assert (r.status_code, h3(r)) == (400, "Cannot archive sessions from the Unassigned folder.")


def test_label_defaults_to_patient_id(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.2 line 2: label = EXPT_LABEL, else Patient ID; folder = label.
    s = study(tmp_path, patient_id="PID.7")
    r = send_zip(xnat, files_of(s), PROJECT_ID="P")
    assert r.text.endswith("/PID.7\r\n")


def test_row_key_is_project_study_label(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.2 line 3: batches of one study+label share a row; another study → another row.
    a = study(tmp_path, "a", instances=4)
    uids = list(a.instances)
    one = send_zip(xnat, files_of(a, uids[:2]), **DEST).text
    two = send_zip(xnat, files_of(a, uids[2:]), **DEST).text
    assert one == two
    other = send_zip(xnat, files_of(study(tmp_path, "b", seed=9)), **DEST).text
    assert other != one
    assert len(xnat.prearchive_sessions("P")) == 2


def test_rows_in_other_states_are_reused_as_receiving(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.2 line 4: READY, CONFLICT… → RECEIVING, same row (PDB:2089-2118).
    s = study(tmp_path, instances=3)
    uids = list(s.instances)
    uri = send_zip(xnat, files_of(s, uids[:1]), **DEST, prevent_auto_commit="true").text.strip()
    r = client(xnat).post(xnat.url + uri, params={"action": "build"})
    assert r.status_code == 200
    assert [x.status for x in xnat.prearchive_sessions("P")] == ["READY"]
    again = send_zip(xnat, files_of(s, uids[1:]), **DEST).text.strip()
    assert again == uri
    (row,) = xnat.prearchive_sessions("P")
    assert row.status == "RECEIVING"
    assert set(xnat.prearchive_files(row)) == set(uids)


def test_file_names_kept_unless_taken_or_rename(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.2 "rename" row: the uploaded name is kept unless another SOP instance holds it;
    # rename=true names every file by XNAT's template (GDI:630-659).
    s = study(tmp_path, instances=3)
    uids = list(s.instances)
    send_zip(xnat, {"keep.dcm": s.instances[uids[0]]}, **DEST)
    send_zip(xnat, {"keep.dcm": s.instances[uids[1]]}, **DEST)
    send_zip(xnat, {"other.dcm": s.instances[uids[2]]}, **DEST, rename="true")
    (row,) = xnat.prearchive_sessions("P")
    names = {u: f.name for u, f in xnat.prearchive_files(row).items()}
    assert names[uids[0]] == "keep.dcm"
    assert names[uids[1]].startswith(s.study_uid + "-") and names[uids[1]].endswith(".dcm")
    assert names[uids[2]].startswith(s.study_uid + "-")


# -- 1.3 success -------------------------------------------------------------------------------
def test_uri_list_with_crlf_and_format_txt_without(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.3 line 1: text/uri-list, CRLF after each URI (also with format=json); format=txt
    # → text/plain and a single URI without CRLF (Imp:333-348).
    s = study(tmp_path)
    r = send_zip(xnat, files_of(s), **DEST, format="json")
    assert r.headers["Content-Type"].startswith("text/uri-list")
    assert r.text.endswith("\r\n") and r.text.count("\r\n") == 1
    r = send_zip(xnat, files_of(s), **DEST, format="txt")
    assert r.headers["Content-Type"].startswith("text/plain")
    assert "\r\n" not in r.text and r.text.startswith("/data/prearchive/projects/P/")


def test_empty_archive_answers_200_with_empty_body(xnat: SandboxServer) -> None:
    # facts 1.3 line 3: 200 with an empty body when nothing was filed.
    r = send_zip(xnat, {}, **DEST)
    assert (r.status_code, r.text) == (200, "")


def test_dest_prearchive_leaves_ready_even_when_auto_archive(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.3 line 4: dest=/prearchive builds in the request and leaves the row READY, even in
    # an auto-archive project; the idle builder only takes RECEIVING rows.
    set_code(xnat, "P", 4)
    r = send_zip(xnat, files_of(study(tmp_path)), **DEST, dest="/prearchive")
    assert r.status_code == 200
    assert [x.status for x in xnat.prearchive_sessions("P")] == ["READY"]
    assert xnat.archived_files("P", "S", "E") == {}


def test_dest_archive_answers_the_archive_uri(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.3 line 2: after in-request archiving, the archive URI of the subject label.
    r = send_zip(xnat, files_of(study(tmp_path)), **DEST, dest="/archive")
    assert r.text == "/data/archive/projects/P/subjects/S/experiments/E\r\n"


# -- 1.4 errors --------------------------------------------------------------------------------
def test_unknown_handler_is_404(xnat: SandboxServer) -> None:
    # facts 1 "Handler": unknown → 404 (IHA:127-131).
    r = send_zip(xnat, {}, **DEST, **{"import-handler": "NOPE"})
    assert (r.status_code, h3(r)) == (404, "Unknown importer implementation specified: NOPE")


def test_disk_full_is_400_not_507(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.4 line 1: I/O and disk-full failures are 400 "unable to read DICOM object NAME".
    xnat.set_knobs(disk_full=True)
    r = send_zip(xnat, {"one.dcm": next(iter(study(tmp_path).instances.values()))}, **DEST)
    assert (r.status_code, h3(r)) == (400, "unable to read DICOM object one.dcm")


def test_in_request_archive_failure_drops_the_cause(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.4 line 1: any failure of the in-request archive → 400 "unable to archive for the
    # Prearchive session", cause dropped; the row CONFLICT when the cause was a 409.
    a, b = study(tmp_path, "a"), study(tmp_path, "b", seed=5)
    assert send_zip(xnat, files_of(a), **DEST, dest="/archive").status_code == 200
    # another StudyInstanceUID into the existing label: 409 UID modification, wrapped
    r = send_zip(xnat, files_of(b), **DEST, dest="/archive", overwrite="append")
    assert (r.status_code, h3(r)) == (400, "unable to archive for the Prearchive session")
    assert [x.status for x in xnat.prearchive_sessions("P")] == ["CONFLICT"]


# -- 1.5 merge and overwrite (import rows) -----------------------------------------------------
def test_import_without_overwrite_merges_only_auto_archive_coded_rows(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.5 row 1: merge only if the row's code ≠ Manual; clashes 409 unless code 5.
    s = study(tmp_path, instances=3)
    uids = list(s.instances)
    assert send_zip(xnat, files_of(s, uids[:1]), **DEST, dest="/archive").status_code == 200
    r = send_zip(xnat, files_of(s, uids[1:2]), **DEST, dest="/archive")
    assert r.status_code == 400  # code 0: no merge ("Session already exists…", wrapped)
    client(xnat).delete(xnat.url + xnat.prearchive_sessions("P")[0].external_url)
    set_code(xnat, "P", 4)
    assert send_zip(xnat, files_of(s, uids[1:2]), **DEST, dest="/archive").status_code == 200
    r = send_zip(xnat, files_of(s, uids[:1]), **DEST, dest="/archive")  # a clash, code 4
    assert r.status_code == 400
    client(xnat).delete(xnat.url + xnat.prearchive_sessions("P")[0].external_url)
    set_code(xnat, "P", 5)
    assert send_zip(xnat, files_of(s, uids[:1]), **DEST, dest="/archive").status_code == 200
    assert set(xnat.archived_files("P", "S", "E")) == set(uids[:2])


def test_import_append_refuses_identical_bytes_overwrite_files_allows(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.5 "Clash" + rows 2 and 1: append refuses an incoming SOP Instance UID already
    # archived, identical bytes included; overwrite_files=true overwrites.
    s = study(tmp_path)
    assert send_zip(xnat, files_of(s), **DEST, dest="/archive").status_code == 200
    r = send_zip(xnat, files_of(s), **DEST, dest="/archive", overwrite="append")
    assert (r.status_code, h3(r)) == (400, "unable to archive for the Prearchive session")
    r = send_zip(
        xnat, files_of(s), **DEST, dest="/archive", overwrite="append", overwrite_files="true"
    )
    assert r.status_code == 200, r.text
    assert set(xnat.archived_files("P", "S", "E")) == set(s.instances)


def test_import_delete_and_override_overwrite(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.5 row 3: delete/override overwrite clashing files (Imp:464-469).
    s = study(tmp_path)
    assert send_zip(xnat, files_of(s), **DEST, dest="/archive").status_code == 200
    for value in ("delete", "override"):
        r = send_zip(xnat, files_of(s), **DEST, dest="/archive", overwrite=value)
        assert r.status_code == 200, (value, r.text)
    assert len(xnat.archived_files("P", "S", "E")) == len(s.instances)


def test_import_overwrite_is_not_stored_on_the_row(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.5 last line: the import's overwrite only matters for in-request archiving.
    s = study(tmp_path)
    assert send_zip(xnat, files_of(s), **DEST, dest="/archive").status_code == 200
    uri = send_zip(xnat, files_of(s), **DEST, overwrite="delete").text.strip()
    r = client(xnat).post(xnat.url + "/data/services/archive", params={"src": uri})
    assert (r.status_code, h3(r)) == (
        500,
        "FAILED: Session already exists with the same resources.",
    )


# -- 1.7 stored bytes --------------------------------------------------------------------------
def test_stored_files_are_re_encoded_and_site_anonymized(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 1.7: regenerated file meta + re-encoded head; the default site script sets
    # (0008,1030)=project, (0010,0010)=subject, (0010,0020)=session; UIDs and pixels untouched;
    # catalog digest = MD5 of the stored file.
    s = study(tmp_path)
    r = send_zip(
        xnat, files_of(s), PROJECT_ID="P", SUBJECT_ID="Sx", EXPT_LABEL="Ex", dest="/archive"
    )
    assert r.status_code == 200, r.text
    for uid, rec in xnat.archived_files("P", "Sx", "Ex").items():
        stored, sent = rec.path.read_bytes(), s.instances[uid].read_bytes()
        assert rec.md5 == hashlib.md5(stored).hexdigest() != hashlib.md5(sent).hexdigest()
        a, b = dcmread(io.BytesIO(sent)), dcmread(io.BytesIO(stored))
        assert (str(b.PatientName), b.PatientID, b.StudyDescription) == ("Sx", "Ex", "P")
        assert b.file_meta.ImplementationClassUID == "1.2.40.0.13.1.1"
        assert (b.SOPInstanceUID, b.SeriesInstanceUID, b.StudyInstanceUID) == (
            a.SOPInstanceUID,
            a.SeriesInstanceUID,
            a.StudyInstanceUID,
        )
        assert b.PixelData == a.PixelData


def test_prevent_anon_and_no_site_anon_keep_the_header(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.7: the script runs unless prevent_anon=true; re-encoding happens regardless.
    s = study(tmp_path)
    send_zip(xnat, files_of(s), **DEST, dest="/archive", prevent_anon="true")
    xnat.site_anon = False  # what xio sandbox --no-site-anon starts with
    send_zip(xnat, files_of(s), PROJECT_ID="P", SUBJECT_ID="S", EXPT_LABEL="E2", dest="/archive")
    for label in ("E", "E2"):
        for uid, rec in xnat.archived_files("P", "S", label).items():
            a, b = dcmread(s.instances[uid]), dcmread(rec.path)
            assert (b.PatientName, b.PatientID) == (a.PatientName, a.PatientID)
            assert b.file_meta.ImplementationClassUID == "1.2.40.0.13.1.1"


def test_unassigned_files_keep_their_study_description(xnat: SandboxServer, tmp_path: Path) -> None:
    # facts 1.7: (0008,1030) := project "unless Unassigned".
    s = study(tmp_path)
    send_zip(xnat, files_of(s), PROJECT_ID="NOPE", EXPT_LABEL="E")
    (row,) = xnat.prearchive_sessions("Unassigned")
    for uid, rec in xnat.prearchive_files(row).items():
        assert dcmread(rec.path).get("StudyDescription") == dcmread(s.instances[uid]).get(
            "StudyDescription"
        )


# -- 3.5 labels --------------------------------------------------------------------------------
def test_labels_cleaned_at_archive_and_subjects_matched_case_insensitively(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # facts 3.5: MR.1 → MR_1; the subject matches an existing label case-insensitively and the
    # URI shows the existing spelling.
    a, b = study(tmp_path, "a"), study(tmp_path, "b", seed=4)
    r = send_zip(xnat, files_of(a), PROJECT_ID="P", SUBJECT_ID="Sub A", EXPT_LABEL="MR.1",
                 dest="/archive")  # fmt: skip
    assert r.text == "/data/archive/projects/P/subjects/Sub_A/experiments/MR_1\r\n"
    r = send_zip(xnat, files_of(b), PROJECT_ID="P", SUBJECT_ID="SUB_a", EXPT_LABEL="MR 2",
                 dest="/archive")  # fmt: skip
    assert r.text == "/data/archive/projects/P/subjects/Sub_A/experiments/MR_2\r\n"


# -- issue 11 item 10 --------------------------------------------------------------------------
def test_deflated_entry_whose_first_read_is_short_imports(
    xnat: SandboxServer, tmp_path: Path
) -> None:
    # The inflater's short first read of an entry must not be parsed as its whole header. The
    # first entry (stored-block deflate, 65291 + 10 bytes) is sized so that the 64 KiB read
    # that inflates it ends 200 bytes into the DICOM entry after it.
    s = study(tmp_path, instances=1)
    (path,) = s.instances.values()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pad.bin", b"\x01" * 65291, zipfile.ZIP_DEFLATED, compresslevel=0)
        zf.writestr("b.dcm", path.read_bytes(), zipfile.ZIP_DEFLATED)
    r = raw(xnat, buf.getvalue(), "application/zip", **{"Ignore-Unparsable": "true"})
    assert r.status_code == 200, r.text
    (row,) = xnat.prearchive_sessions("P")
    assert [f.name for f in xnat.prearchive_files(row).values()] == ["b.dcm"]


def test_a_250_byte_file_name_is_kept(xnat: SandboxServer, tmp_path: Path) -> None:
    # Temp names no longer grow the stored name past 255 bytes (was a 500).
    s = study(tmp_path, instances=1)
    name = "n" * 246 + ".dcm"
    r = send_zip(xnat, {name: next(iter(s.instances.values()))}, **DEST)
    assert r.status_code == 200, r.text
    (row,) = xnat.prearchive_sessions("P")
    assert [f.name for f in xnat.prearchive_files(row).values()] == [name]
