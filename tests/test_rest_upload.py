"""The REST transport end to end, over real HTTP against the local XNAT-compatible server.

Every test asserts what landed on the server, file by file: each SOP Instance UID present exactly
once, with the size and MD5 of the local file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from xnatio.archive import instance_file_name
from xnatio.discover import discover
from xnatio.errors import AuthError, ServerError, UnreachableError
from xnatio.models import Batch, DicomFile, Manifest, Outcome, Phase, ProgressEvent, UploadResult
from xnatio.plan import plan_batches
from xnatio.report import exit_code_of, result_to_dict, status_of, summary_text
from xnatio.retry import RetryPolicy
from xnatio.sandbox.server import SandboxServer
from xnatio.synth import SyntheticSession, generate_session
from xnatio.transports.rest import BAD_MEMBERS_IN_A_ROW, BatchSender, RestTarget, RestUploader
from xnatio.transports.rest import commit as rest_commit
from xnatio.uploaders import upload_dicom_parallel_rest
from xnatio.xnat.client import XnatClient

pytestmark = pytest.mark.integration

USER, PASSWORD = "admin", "admin-secret"
P, S, E = "PROJ", "SUBJ01", "SUBJ01_MR1"


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSession:
    """3 series x 40 instances: above the single-request threshold, so it is batched."""
    return generate_session(
        tmp_path_factory.mktemp("session") / "MR1", series=3, instances=40, image_size=(32, 32)
    )


def upload(srv: SandboxServer, source: Path | str, **kwargs: Any) -> UploadResult:
    options: dict[str, Any] = {"num_batches": 4, "upload_workers": 3, "archive_workers": 2}
    options.update(kwargs)
    return upload_dicom_parallel_rest(
        srv.url, USER, PASSWORD, source_dir=source, project=P, subject=S, session=E, **options
    )


def upload_batched(
    srv: SandboxServer, source: Path, num_batches: int = 4, **kwargs: Any
) -> UploadResult:
    """Through RestUploader with a forced multi-batch plan (the public API sends < 100 MiB as one
    request), as the pipeline does for large sessions."""
    manifest = discover(source)
    batches = plan_batches(manifest, num_batches, single_max_files=10, single_max_bytes=0)
    assert len(batches) == num_batches
    progress = kwargs.pop("progress_callback", None)
    cancel = kwargs.pop("cancel", None)
    options: dict[str, Any] = {"upload_workers": 3, "archive_workers": 2}
    options.update(kwargs)
    target = RestTarget(project=P, subject=S, session=E, num_batches=num_batches, **options)
    with XnatClient(srv.url, username=USER, password=PASSWORD, pool_size=3) as client:
        uploader = RestUploader(client, target, progress_callback=progress, cancel=cancel)
        return uploader.upload(manifest, batches)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_landed(srv: SandboxServer, expected: dict[str, Path]) -> None:
    """Exactly ``expected`` (SOP Instance UID -> local file) is archived, each under the name xio
    sent it as (XNAT keeps it, facts 1.2; the bytes are XNAT's re-encoded copy, facts 1.7)."""
    got = srv.archived_files(P, S, E)
    assert sorted(got) == sorted(expected)
    for uid in expected:
        assert got[uid].name == instance_file_name(uid), uid
    # Nothing left behind in the prearchive (one commit took everything).
    assert srv.prearchive_sessions(P) == []


def test_batched_upload_lands_every_file_once(
    xnat_server: SandboxServer, session_dir: SyntheticSession
) -> None:
    events: list[ProgressEvent] = []
    result = upload_batched(xnat_server, session_dir.root, progress_callback=events.append)

    assert result.success, result.errors
    assert result.total_files == 120
    assert result.batches_total == 4 and result.batches_failed == 0
    assert len(result.uploaded) == 120 and not result.failed
    assert result.session_uri == f"/data/archive/projects/{P}/subjects/{S}/experiments/{E}"
    assert len(result.upload_id) == 32
    assert [s.file_count for s in result.studies] == [120]
    assert_landed(xnat_server, session_dir.instances)

    # Phases in order; the upload counters end complete. The client logged in when it was
    # opened, so the uploader shows no connect phase of its own (the pipeline shows the login).
    phases = list(dict.fromkeys(e.phase for e in events))
    assert phases == [Phase.UPLOAD, Phase.COMMIT, Phase.DONE]
    last_upload = [e for e in events if e.phase is Phase.UPLOAD][-1]
    assert (last_upload.current, last_upload.total) == (120, 120)
    assert last_upload.bytes_done == last_upload.bytes_total == session_dir.total_bytes
    assert (last_upload.batches_done, last_upload.batches_failed) == (4, 0)

    # Read back through the REST endpoints of facts section 4: the scans and their files.
    with XnatClient(xnat_server.url, username=USER, password=PASSWORD) as client:
        base = f"/data/projects/{P}/subjects/{S}/experiments/{E}"
        scans = client.get_json(f"{base}/scans")["ResultSet"]["Result"]
        assert sorted(int(s["ID"]) for s in scans) == sorted(session_dir.series)
        for number, uids in session_dir.series.items():
            files = client.get_json(f"{base}/scans/{number}/resources/DICOM/files")
            rows = files["ResultSet"]["Result"]
            assert len(rows) == len(uids)
            # XNAT keeps the names xio sent (facts 1.2); digests are of its own copies (1.7).
            assert {r["Name"] for r in rows} == {instance_file_name(u) for u in uids}


def test_public_api_sends_a_small_session_in_one_request(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    # Up to 100 files go as one request (issue 16 item 5: more files go as batches).
    session_dir = generate_session(tmp_path / "MR1", series=3, instances=30, image_size=(32, 32))
    events: list[ProgressEvent] = []
    result = upload(xnat_server, session_dir.root, progress_callback=events.append)
    assert result.success, result.errors
    assert result.batches_total == 1 and len(result.uploaded) == 90
    assert result.duration > 0 and result.total_size_mb == session_dir.total_bytes / 1e6
    phases = list(dict.fromkeys(e.phase for e in events))
    assert phases == [
        Phase.CONNECT,  # the login comes before discovery (issue 17: cheap checks first)
        Phase.DISCOVER,  # then planned inside the transport (once; no PLAN event, as the CLI)
        Phase.UPLOAD,
        Phase.COMMIT,
        Phase.DONE,
        Phase.VERIFY,  # the API reads the session back, as the CLI does
    ]
    assert {f.outcome for f in result.files} == {Outcome.VERIFIED}
    assert_landed(xnat_server, session_dir.instances)


@pytest.mark.parametrize("fmt", ["zip", "zip-deflated", "tgz"])
def test_zip_and_deflated_zip_batches(
    xnat_server: SandboxServer, session_dir: SyntheticSession, fmt: str
) -> None:
    """``tgz`` sends a deflated zip: chunked, ``application/zip``, the one type XNAT accepts
    without a known length (facts 1.1)."""
    result = upload_batched(xnat_server, session_dir.root, 3, archive_format=fmt)
    assert result.success, result.errors
    assert_landed(xnat_server, session_dir.instances)
    if fmt != "zip":
        # Every import went chunked, as application/zip (the sandbox would 400 anything else).
        assert xnat_server.stats()["POST /data/services/import"] == 3


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz"])
def test_archive_path_is_repacked_in_one_request(
    xnat_server: SandboxServer, session_dir: SyntheticSession, tmp_path: Path, suffix: str
) -> None:
    archive = tmp_path / f"session{suffix}"
    files = sorted(session_dir.instances.values())
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for f in files:
                zf.write(f, f.relative_to(session_dir.root).as_posix())
    else:
        with tarfile.open(archive, "w:gz" if suffix == ".tar.gz" else "w") as tf:
            for f in files:
                tf.add(f, f.relative_to(session_dir.root).as_posix())
    result = upload(xnat_server, archive)
    assert result.success, result.errors
    assert result.batches_total == 1 and len(result.uploaded) == 120
    assert_landed(xnat_server, session_dir.instances)
    assert xnat_server.stats()["POST /data/services/import"] == 1


def small_session(tmp_path: Path, **kwargs: Any) -> SyntheticSession:
    options: dict[str, Any] = {"series": 2, "instances": 6, "image_size": (32, 32)}
    options.update(kwargs)
    return generate_session(tmp_path / "MR", **options)


def test_file_deleted_after_discovery_is_failed_and_the_rest_lands(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path)
    manifest = discover(session.root)
    gone_uid, gone = next(iter(session.instances.items()))
    gone.unlink()

    result = upload(xnat_server, session.root, manifest=manifest)

    assert not result.success
    [failed] = result.failed
    assert failed.path == str(gone) and failed.sop_instance_uid == gone_uid
    assert failed.reason
    assert len(result.uploaded) == len(session.instances) - 1
    assert_landed(xnat_server, {u: p for u, p in session.instances.items() if u != gone_uid})


def with_bad_member(manifest: Manifest, bad: Path) -> Manifest:
    """The manifest plus an entry for ``bad`` as if discovery had taken it for DICOM."""
    template = manifest.files[len(manifest.files) // 2]
    fake = dataclasses.replace(
        template,
        path=bad,
        size=bad.stat().st_size,
        mtime_ns=bad.stat().st_mtime_ns,
        sop_instance_uid=template.sop_instance_uid + ".999",
    )
    files = list(manifest.files)
    files.insert(len(files) // 2, fake)
    return dataclasses.replace(manifest, files=files)


def test_member_xnat_cannot_read_is_failed_with_its_reason_and_the_rest_lands(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path)
    bad = session.root / "notes.txt"
    bad.write_bytes(b"this is not a DICOM object\n" * 40)
    manifest = with_bad_member(discover(session.root), bad)

    result = upload(xnat_server, session.root, manifest=manifest)

    assert not result.success
    [failed] = result.failed
    assert failed.path == str(bad)
    assert "unable to read DICOM object" in failed.reason
    # XNAT names the entry as sent: the instance name xio gave it (facts 1.2).
    [bad_file] = [f for f in manifest.files if f.path == bad]
    assert instance_file_name(bad_file.sop_instance_uid) in failed.reason
    assert len(result.uploaded) == len(session.instances)
    assert_landed(xnat_server, session.instances)


@pytest.mark.parametrize(
    "knobs",
    [
        {"fail_next": 3, "fail_status": 503, "retry_after": 1},
        {"fail_next": 2, "fail_status": 500},
        {"reset_next": 2},
    ],
    ids=["503-retry-after", "500", "reset-mid-body"],
)
def test_transient_faults_end_in_full_success_without_duplicates(
    xnat_server: SandboxServer, session_dir: SyntheticSession, knobs: dict[str, Any]
) -> None:
    xnat_server.set_knobs(fault_path="/data/services/import", **knobs)
    result = upload_batched(xnat_server, session_dir.root)
    assert result.success, result.errors
    assert xnat_server.knobs.fail_next == 0 and xnat_server.knobs.reset_next == 0
    assert_landed(xnat_server, session_dir.instances)


def test_session_expiry_mid_run_is_renewed(
    xnat_server: SandboxServer, session_dir: SyntheticSession
) -> None:
    fired = threading.Event()

    def expire_once(event: ProgressEvent) -> None:
        if event.phase is Phase.UPLOAD and event.batches_done == 1 and not fired.is_set():
            fired.set()
            xnat_server.set_knobs(expire_sessions=True)

    result = upload_batched(xnat_server, session_dir.root, progress_callback=expire_once)
    assert fired.is_set()
    assert result.success, result.errors
    assert_landed(xnat_server, session_dir.instances)


def test_final_4xx_is_reported_with_xnats_message(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path)
    xnat_server.set_knobs(fault_path="/data/services/import", fail_next=1, fail_status=403)
    result = upload(xnat_server, session.root)
    assert not result.success
    assert len(result.failed) == len(session.instances)  # small: one batch
    assert {f.reason for f in result.failed} == {"Injected failure (403) by the sandbox"}
    assert any("Injected failure (403)" in e for e in result.errors)
    assert xnat_server.archived_files(P, S, E) == {}


def test_auto_archive_project_commits_with_301(xnat_server: SandboxServer, tmp_path: Path) -> None:
    session = small_session(tmp_path)
    xnat_server.set_knobs(auto_archive_projects=[P])
    result = upload(xnat_server, session.root)
    assert result.success, result.errors
    assert result.session_uri.startswith(f"/data/archive/projects/{P}/")
    assert_landed(xnat_server, session.instances)


def test_auto_archive_project_with_overwrite_archives_through_the_service_303(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    """--overwrite append: build, then the archive service with overwrite=append (the one path
    on which XNAT overwrites clashing files, facts 1.5); on an auto-archive row it answers 303
    to the archive URI (facts 3.4)."""
    session = small_session(tmp_path)
    xnat_server.set_knobs(auto_archive_projects=[P])
    result = upload(xnat_server, session.root, overwrite="append")
    assert result.success, result.errors
    assert result.session_uri == f"/data/archive/projects/{P}/subjects/{S}/experiments/{E}"
    stats = xnat_server.stats()
    assert stats["POST /data/services/archive"] == 1
    assert_landed(xnat_server, session.instances)


def test_unknown_project_landing_in_unassigned_is_an_error_naming_the_uri(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    """XNAT files an upload to a project the user cannot read in Unassigned and answers 200
    (facts 1.2). (Direct-Archive: no subject is created first, which would fail with 422.)"""
    session = small_session(tmp_path)
    result = upload_dicom_parallel_rest(
        xnat_server.url,
        USER,
        PASSWORD,
        source_dir=session.root,
        project="NOPE",
        subject=S,
        session=E,
        direct_archive=True,
        preflight=False,  # the engine's own path (the pre-flight refuses NOPE before sending)
    )
    assert not result.success and len(result.failed) == len(session.instances)
    [reason] = {f.reason for f in result.failed}
    assert "Unassigned prearchive" in reason and "nothing was archived" in reason
    assert "Delete /data/prearchive/projects/Unassigned/" in reason


class _FakeClient:
    """XnatClient's ``request`` over ``responses`` (no retries, no login)."""

    server = "https://xnat.test"
    logged_in = True

    def __init__(self) -> None:
        from xnatio.retry import Reachability

        self.session = requests.Session()
        self.reachability = Reachability()

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        from xnatio.xnat.client import XnatClient as Real

        resp = self.session.request(
            method,
            self.server + path,
            params=kw.get("params"),
            allow_redirects=False,
            timeout=5,
        )
        if resp.status_code >= 400:
            Real._raise_for(self, resp)  # type: ignore[arg-type]
        return resp

    def get_json(self, path: str, params: Any = None) -> Any:
        return self.request("GET", path).json()

    def _redact(self, text: str) -> str:
        return text


PRE = "/data/prearchive/projects/P/20260101_000000000/E"


def _uploader(overwrite: str = "none") -> RestUploader:
    target = RestTarget(project=P, subject=S, session=E, overwrite=overwrite)
    retry = RetryPolicy(retries=2, base=0.0, cap=0.0)
    return RestUploader(_FakeClient(), target, retry=retry, sleep=lambda s: None)  # type: ignore[arg-type]


@responses.activate
def test_commit_301_text_plain_without_location_is_archived() -> None:
    archived = f"/data/archive/projects/{P}/subjects/{S}/experiments/{E}"
    responses.post("https://xnat.test" + PRE, status=301, body=archived, content_type="text/plain")
    assert _uploader().commit_session(PRE) == archived


@responses.activate
def test_commit_redirect_elsewhere_is_an_error_naming_the_url() -> None:
    responses.post(
        "https://xnat.test" + PRE,
        status=302,
        headers={"Location": "https://sso.example.org/login"},
        body="<html>login</html>",
    )
    responses.get(f"https://xnat.test/data/projects/{P}/subjects/{S}/experiments/{E}", status=404)
    with pytest.raises(ServerError, match=r"answered 302 to https://sso.example.org/login"):
        _uploader().commit_session(PRE)


@responses.activate
def test_archive_failed_500_is_final_with_xnat_text() -> None:
    responses.post("https://xnat.test" + PRE, status=200, body=PRE, content_type="text/uri-list")
    page = "<html><body><h3>FAILED: Session already exists with matching files.</h3></body></html>"
    archive = responses.post(
        "https://xnat.test/data/services/archive", status=500, body=page, content_type="text/html"
    )
    responses.get(f"https://xnat.test/data/projects/{P}/subjects/{S}/experiments/{E}", status=404)
    with pytest.raises(ServerError, match="FAILED: Session already exists with matching files"):
        _uploader().commit_session(PRE)
    assert archive.call_count == 1  # not retried
    params = responses.calls[1].request.params
    assert params == {"src": PRE[len("/data") :], "subject": S, "session": E}  # no dest


@responses.activate
def test_archive_service_303_and_overwrite_builds_first() -> None:
    build = responses.post("https://xnat.test" + PRE, status=200, body=PRE)
    responses.post(
        "https://xnat.test/data/services/archive",
        status=303,
        headers={
            "Location": f"https://site.example/data/archive/projects/{P}/subjects/{S}/experiments/{E}"
        },
    )
    got = _uploader("delete").commit_session(PRE)
    assert got == f"/data/archive/projects/{P}/subjects/{S}/experiments/{E}"
    assert build.calls[0].request.params == {"action": "build"}
    assert responses.calls[1].request.params["overwrite"] == "delete"


@responses.activate
def test_html_page_with_200_where_uris_are_expected_is_an_error() -> None:
    responses.post("https://xnat.test" + PRE, status=200, body=PRE)
    responses.post(
        "https://xnat.test/data/services/archive",
        status=200,
        body="<html><head><title>Login</title></head></html>",
        content_type="text/html",
    )
    responses.get(f"https://xnat.test/data/projects/{P}/subjects/{S}/experiments/{E}", status=404)
    with pytest.raises(ServerError, match="not a list of XNAT URIs"):
        _uploader().commit_session(PRE)


@pytest.mark.parametrize("overwrite", ["none", "append"])
def test_another_study_is_never_merged_into_an_existing_label(
    xnat_server: SandboxServer, tmp_path: Path, overwrite: str
) -> None:
    """XNAT refuses another StudyInstanceUID under a label, whatever ``overwrite`` says (facts
    1.5, "Invalid modification of session UID"); the uploader's own path (without the pre-flight
    that refuses it earlier) ends with XNAT's final "FAILED" message, and merges nothing."""
    first = small_session(tmp_path / "a", series=1)
    assert upload(xnat_server, first.root).success
    second = small_session(tmp_path / "b", series=1, instances=3, seed=7)
    refused = upload(xnat_server, second.root, overwrite=overwrite, preflight=False, resume=False)
    assert not refused.success
    assert any("Invalid modification of session UID" in e for e in refused.errors), refused.errors
    assert sorted(xnat_server.archived_files(P, S, E)) == sorted(first.instances)


def test_direct_archive_waits_for_the_idle_interval_and_verifies(
    xnat_server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct-Archive's experiment appears only once the session has been idle for XNAT's
    interval (facts 1.6): the upload polls /xapi/direct-archive/… until 404, then the
    experiment, and ends with the archive URI."""
    monkeypatch.setattr(rest_commit, "DIRECT_ARCHIVE_POLL", 0.2)
    xnat_server.set_knobs(build_idle_seconds=2)
    session = small_session(tmp_path)
    events: list[ProgressEvent] = []
    result = upload(
        xnat_server,
        session.root,
        direct_archive=True,
        archive_wait=60,
        progress_callback=events.append,
    )
    assert result.success, result.errors
    assert result.pending == []
    assert result.session_uri == f"/data/archive/projects/{P}/subjects/{S}/experiments/{E}"
    assert any("waiting for XNAT to archive" in e.message for e in events)
    got = xnat_server.archived_files(P, S, E)
    assert sorted(got) == sorted(session.instances)
    assert any("/xapi/direct-archive/" in k for k in xnat_server.stats())  # it did poll


def test_direct_archive_not_archived_within_the_bound_is_pending(
    xnat_server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rest_commit, "DIRECT_ARCHIVE_POLL", 0.1)
    xnat_server.set_knobs(build_idle_seconds=600)
    session = small_session(tmp_path)
    result = upload(xnat_server, session.root, direct_archive=True, archive_wait=0.5)
    assert not result.success and not result.failed
    [pending] = result.pending
    assert pending.startswith(f"/xapi/direct-archive/{P}/") and pending.endswith(f"/{E}")
    assert status_of(result) == "pending" and exit_code_of(result) == 1
    text = summary_text(result)
    assert "not yet archived" in text and f"xio verify {P} {S} {E} PATH --wait-for" in text
    assert result_to_dict(result)["pending"] == [pending]
    assert xnat_server.archived_files(P, S, E) == {}


def test_the_public_api_takes_an_executor(xnat_server: SandboxServer, tmp_path: Path) -> None:
    """upload_dicom_parallel_rest(executor=) reaches the batch pool: a serial executor runs every
    batch in the calling thread."""
    from concurrent.futures import Executor, Future

    from xnatio.coordinator import SerialExecutor

    ran: list[tuple[str, int]] = []

    class Recording(SerialExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            ran.append(("task", threading.get_ident()))
            return super().submit(fn, *args, **kwargs)

    def serial(workers: int) -> Executor:
        ran.append(("workers", workers))
        return Recording()

    session = small_session(tmp_path)
    result = upload(xnat_server, session.root, executor=serial, journal=tmp_path / "journal")
    assert result.success, result.errors
    assert ran == [("workers", 5), ("task", threading.get_ident())]  # 3 + 2 workers, one batch
    assert_landed(xnat_server, session.instances)


def test_dry_run_sends_nothing(session_dir: SyntheticSession) -> None:
    # No server at all: an HTTP request would fail as unreachable.
    result = upload_dicom_parallel_rest(
        "http://127.0.0.1:9",
        USER,
        PASSWORD,
        source_dir=session_dir.root,
        project=P,
        subject=S,
        session=E,
        num_batches=4,
        dry_run=True,
    )
    assert result.success and result.batches_total == 4  # 120 files: batches (issue 16 item 5)
    assert {f.outcome for f in result.files} == {Outcome.SKIPPED}
    assert len(result.files) == 120


def test_in_flight_requests_and_prepared_batches_are_bounded(
    xnat_server: SandboxServer, session_dir: SyntheticSession
) -> None:
    xnat_server.set_knobs(latency_ms=50)
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    class CountingClient(XnatClient):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            try:
                return super().request(*args, **kwargs)
            finally:
                with lock:
                    state["now"] -= 1

    class CountingSender(BatchSender):
        # A batch exists from the start of its preparation to the end of its upload.
        def prepare(self, batch: Batch) -> list[DicomFile]:
            with lock:
                state["batches"] += 1
                state["batches_peak"] = max(state["batches_peak"], state["batches"])
            return super().prepare(batch)

        def send_guarded(self, *args: Any) -> None:
            try:
                super().send_guarded(*args)
            finally:
                with lock:
                    state["batches"] -= 1

    class CountingUploader(RestUploader):
        sender_class = CountingSender

    state.update(batches=0, batches_peak=0)
    manifest = discover(session_dir.root)
    batches = plan_batches(manifest, 12, single_max_files=10, single_max_bytes=0)
    target = RestTarget(project=P, subject=S, session=E, upload_workers=2, archive_workers=1)
    with CountingClient(xnat_server.url, username=USER, password=PASSWORD, pool_size=2) as c:
        result = CountingUploader(c, target).upload(manifest, batches)
    assert result.success, result.errors
    assert len(batches) == 12
    assert state["peak"] == 2  # upload_workers requests at once, never more
    assert state["batches_peak"] == 3  # upload_workers + archive_workers batches alive
    assert_landed(xnat_server, session_dir.instances)


def test_cancel_stops_the_upload(xnat_server: SandboxServer, session_dir: SyntheticSession) -> None:
    xnat_server.set_knobs(bandwidth_mbps=2)  # slow enough to cancel in the middle
    cancel = threading.Event()

    def cancel_on_first_bytes(event: ProgressEvent) -> None:
        if event.phase is Phase.UPLOAD and event.bytes_done > 0:
            cancel.set()

    result = upload_batched(
        xnat_server, session_dir.root, cancel=cancel, progress_callback=cancel_on_first_bytes
    )
    assert not result.success
    assert result.failed  # what was not confirmed is accounted for as failed
    assert xnat_server.archived_files(P, S, E) == {}


def test_a_server_that_stops_answering_is_timed_out_and_retried(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path)
    xnat_server.set_knobs(fault_path="/data/services/import", hang_next=1, hang_seconds=5)
    result = upload(xnat_server, session.root, timeout=1.0)
    assert result.success, result.errors
    assert xnat_server.knobs.hang_next == 0
    assert_landed(xnat_server, session.instances)


def test_disk_full_is_final_and_reported(xnat_server: SandboxServer, tmp_path: Path) -> None:
    """XNAT reports a full disk as 400 "unable to read DICOM object NAME" (facts 1.4): after a
    few such files in a row the batch stops, instead of one request per file."""
    session = small_session(tmp_path, series=1, instances=12)
    xnat_server.set_knobs(fault_path="/data/services/import", disk_full=True)
    result = upload(xnat_server, session.root)
    assert not result.success
    assert len(result.failed) == len(session.instances)
    assert all("unable to read DICOM object" in f.reason for f in result.failed)
    assert any("files in a row" in f.reason for f in result.failed)
    assert xnat_server.stats()["POST /data/services/import"] == BAD_MEMBERS_IN_A_ROW
    assert xnat_server.archived_files(P, S, E) == {}


def test_file_vanishing_while_its_batch_streams_is_failed_and_the_rest_resent(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path, series=1, instances=8)
    manifest = discover(session.root)
    victim = manifest.files[5]  # inside the batch: the body is already being generated

    class NoPrecheckSender(BatchSender):
        # Skip the check made when a batch is prepared, so the stream itself meets the gap.
        def prepare(self, batch: Batch) -> list[DicomFile]:
            victim.path.unlink()
            return list(batch.files)

    class NoPrecheck(RestUploader):
        sender_class = NoPrecheckSender

    target = RestTarget(project=P, subject=S, session=E, upload_workers=1, archive_workers=1)
    with XnatClient(xnat_server.url, username=USER, password=PASSWORD) as client:
        result = NoPrecheck(client, target).upload(manifest, [Batch(0, tuple(manifest.files))])

    [failed] = result.failed
    assert failed.path == str(victim.path) and "no longer exists" in failed.reason
    expected = {u: p for u, p in session.instances.items() if u != victim.sop_instance_uid}
    assert len(result.uploaded) == len(expected)
    assert_landed(xnat_server, expected)


def archive_of(root: Path, archive: Path) -> Path:
    """Every file under ``root`` (DICOM or not) in a .zip or .tar.gz, names relative to root."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                zf.write(f, f.relative_to(root).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for f in files:
                tf.add(f, f.relative_to(root).as_posix())
    return archive


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_path_with_side_files_sends_only_its_dicom_members(
    xnat_server: SandboxServer, tmp_path: Path, suffix: str
) -> None:
    session = small_session(tmp_path, extras=["dicomdir", "txt"])
    archive = archive_of(session.root, tmp_path / f"cd-export{suffix}")

    result = upload(xnat_server, archive)

    assert result.success, result.errors
    assert len(result.uploaded) == len(session.instances)
    assert {Path(f.path).name for f in result.skipped} >= {"DICOMDIR"}
    assert_landed(xnat_server, session.instances)


def test_archive_member_xnat_refuses_is_failed_and_the_rest_resent(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path)
    (session.root / "junk.dcm").write_bytes(b"not DICOM at all " * 64)
    archive = archive_of(session.root, tmp_path / "export.zip")
    manifest = discover(archive)
    [junk] = manifest.skipped
    # As if discovery had taken the junk member for DICOM: sent as is, XNAT refuses it.
    template = manifest.files[0]
    fake = dataclasses.replace(
        template,
        member="junk.dcm",
        size=junk.size,
        sop_instance_uid=template.sop_instance_uid + ".9",
    )
    manifest = dataclasses.replace(manifest, files=[*manifest.files, fake], skipped=[])

    result = upload(xnat_server, archive, manifest=manifest)

    [failed] = result.failed
    assert failed.path.endswith("junk.dcm")
    assert instance_file_name(fake.sop_instance_uid) in failed.reason
    assert len(result.uploaded) == len(session.instances)
    assert_landed(xnat_server, session.instances)


def test_wrong_password_is_an_auth_error_and_nothing_is_sent(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path)
    with pytest.raises(AuthError) as info:
        upload_dicom_parallel_rest(
            xnat_server.url,
            USER,
            "wrong-horse",
            source_dir=session.root,
            project=P,
            subject=S,
            session=E,
        )
    assert "wrong-horse" not in str(info.value)
    assert "POST /data/services/import" not in xnat_server.stats()


def test_no_server_listening_is_unreachable(tmp_path: Path) -> None:
    session = small_session(tmp_path)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UnreachableError):
        upload_dicom_parallel_rest(
            f"http://127.0.0.1:{port}",
            USER,
            PASSWORD,
            source_dir=session.root,
            project=P,
            subject=S,
            session=E,
        )


def test_every_file_gone_after_discovery_fails_each_and_commits_nothing(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path)
    manifest = discover(session.root)
    for path in session.instances.values():
        path.unlink()
    events: list[ProgressEvent] = []
    result = upload(xnat_server, session.root, manifest=manifest, progress_callback=events.append)
    assert not result.success and result.session_uri == ""
    assert len(result.failed) == len(session.instances)
    assert all("no longer exists" in f.reason for f in result.failed)
    assert result.batches_failed == 1
    last = [e for e in events if e.phase is Phase.UPLOAD][-1]
    assert (last.batches_done, last.batches_failed) == (1, 1)
    assert xnat_server.prearchive_sessions(P) == []


# -- several studies in one upload (allow_multiple_studies) ----------------------------------


def two_studies(tmp_path: Path) -> tuple[SyntheticSession, SyntheticSession]:
    """Two studies under one folder: the larger (6 files) and a smaller one (2 files)."""
    big = generate_session(
        tmp_path / "exam" / "A", series=2, instances=3, image_size=(32, 32), seed=11
    )
    small = generate_session(
        tmp_path / "exam" / "B", series=1, instances=2, image_size=(32, 32), seed=12
    )
    assert big.study_uid != small.study_uid
    return big, small


def archive_uri(label: str) -> str:
    return f"/data/archive/projects/{P}/subjects/{S}/experiments/{label}"


@pytest.mark.parametrize("how", ["one-request", "batched", "archive-file", "auto-archive"])
def test_each_study_is_committed_under_its_own_label(
    xnat_server: SandboxServer, tmp_path: Path, how: str
) -> None:
    big, small = two_studies(tmp_path)
    source = tmp_path / "exam"
    if how == "archive-file":
        source = tmp_path / "exam.tar"
        with tarfile.open(source, "w") as tf:
            tf.add(tmp_path / "exam", arcname="exam")
    if how == "auto-archive":
        xnat_server.set_knobs(auto_archive_projects=[P])
    if how == "batched":
        # Batches that mix both studies: each request must still carry one study only.
        manifest = discover(source)
        batches = [Batch(index=i, files=tuple(manifest.files[i::2])) for i in range(2)]
        assert all(len({f.study_uid for f in b.files}) == 2 for b in batches)
        target = RestTarget(project=P, subject=S, session=E, upload_workers=2, archive_workers=1)
        with XnatClient(xnat_server.url, username=USER, password=PASSWORD) as client:
            result = RestUploader(client, target).upload(manifest, batches)
        assert result.batches_total == 4  # each batch cut in two, one study per request
        assert {f.batch for f in result.files} == {0, 1, 2, 3}
    else:
        result = upload(xnat_server, source, allow_multiple_studies=True)

    assert result.success, result.errors
    assert len(result.uploaded) == 8 and not result.failed
    # Nothing is left RECEIVING in the prearchive: every study's session was committed.
    assert xnat_server.prearchive_sessions(P) == []
    # The largest study keeps the label asked for; the other one gets it with a suffix.
    assert sorted(xnat_server.archived_files(P, S, E)) == sorted(big.instances)
    assert sorted(xnat_server.archived_files(P, S, f"{E}_2")) == sorted(small.instances)
    assert result.session_uri == archive_uri(E)
    assert result.session_uris == [archive_uri(E), archive_uri(f"{E}_2")]


def test_several_studies_resume_and_verify_each_session(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    from xnatio.pipeline import ResumeOptions, resumable_rest_upload

    big, small = two_studies(tmp_path)
    manifest = discover(tmp_path / "exam")
    target = RestTarget(project=P, subject=S, session=E, upload_workers=2, archive_workers=1)
    with XnatClient(xnat_server.url, username=USER, password=PASSWORD) as client:
        result = resumable_rest_upload(
            client, manifest, target, options=ResumeOptions(journal=tmp_path / "journal.db")
        )
    assert result.success, result.errors
    assert result.verified is True
    assert {f.outcome for f in result.files} == {Outcome.VERIFIED}
    assert xnat_server.prearchive_sessions(P) == []
    assert sorted(xnat_server.archived_files(P, S, E)) == sorted(big.instances)
    assert sorted(xnat_server.archived_files(P, S, f"{E}_2")) == sorted(small.instances)


# -- subject creation fails ----------------------------------------------------------------------


def test_subject_creation_failing_for_good_fails_every_file_with_the_reason(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    session = small_session(tmp_path)
    xnat_server.set_knobs(fault_path=f"/data/projects/{P}/subjects", fail_next=5, fail_status=503)
    result = upload(
        xnat_server, session.root, retries=1, preflight=False, resume=False
    )  # the engine's PUT
    assert not result.success and result.session_uri == ""
    assert len(result.failed) == len(session.instances)
    reasons = {f.reason for f in result.failed}
    assert len(reasons) == 1
    (reason,) = reasons
    assert f"could not create subject {S}" in reason and "503" in reason
    assert any(f"could not create subject {S}" in e for e in result.errors)
    assert "POST /data/services/import" not in xnat_server.stats()


# -- commit/archive answers lost after the server did the work ----------------------------------


@pytest.mark.parametrize("step", ["archive", "auto-archive commit"])
def test_archived_session_whose_answer_was_lost_is_reconciled_as_success(
    xnat_server: SandboxServer, tmp_path: Path, step: str
) -> None:
    session = small_session(tmp_path)
    if step == "archive":
        xnat_server.set_knobs(fault_path="/data/services/archive", drop_response_next=1)
    else:
        xnat_server.set_knobs(
            auto_archive_projects=[P], fault_path=f"/data/prearchive/projects/{P}/"
        )
        xnat_server.set_knobs(drop_response_next=1)
    result = upload(xnat_server, session.root)
    assert xnat_server.stats().get("fault.drop_response_next") == 1
    assert result.success, result.errors
    assert result.session_uri == archive_uri(E)
    assert_landed(xnat_server, session.instances)


def test_lost_answer_without_an_archived_session_stays_a_failure(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    """Read-back only turns an error into success when the session really is archived."""
    first = small_session(tmp_path / "a", series=1)
    assert upload(xnat_server, first.root).success
    # Another study under the same label: XNAT refuses it ("FAILED: Invalid modification of
    # session UID", facts 1.5) and the prearchive entry stays.
    second = small_session(tmp_path / "b", series=1, instances=3, seed=7)
    refused = upload(xnat_server, second.root, preflight=False, resume=False)  # (engine's own)
    assert not refused.success
    assert any("Invalid modification of session UID" in e for e in refused.errors)
    assert len(xnat_server.prearchive_sessions(P)) == 1


def test_dry_run_of_several_studies_shows_one_study_per_batch_and_its_label(
    tmp_path: Path,
) -> None:
    big, small = two_studies(tmp_path)
    result = upload_dicom_parallel_rest(
        "http://127.0.0.1:9",
        USER,
        PASSWORD,
        source_dir=tmp_path / "exam",
        project=P,
        subject=S,
        session=E,
        allow_multiple_studies=True,
        dry_run=True,
    )
    assert result.batches_total == 2
    by_uid = {f.sop_instance_uid: f.reason for f in result.files}
    assert {by_uid[u] for u in big.instances} == {
        f"dry run: would be sent in batch 1 as session {E}"
    }
    assert {by_uid[u] for u in small.instances} == {
        f"dry run: would be sent in batch 2 as session {E}_2"
    }


def test_public_api_resumes_and_reads_back_like_the_cli(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    """The API goes through the same pipeline as ``xio upload-dicom`` (issue 12): the second
    call of the same upload sends nothing (journal), and both read the session back."""
    session = small_session(tmp_path)
    journal = tmp_path / "journal.sqlite"
    first = upload(xnat_server, session.root, journal=journal)
    assert first.success and first.verified is True, first.errors
    assert xnat_server.stats()["POST /data/services/import"] == 1
    again = upload(xnat_server, session.root, journal=journal)
    assert again.success and again.verified is True, again.errors
    assert xnat_server.stats()["POST /data/services/import"] == 1  # nothing sent twice
    assert {f.outcome for f in again.files} == {Outcome.VERIFIED}
