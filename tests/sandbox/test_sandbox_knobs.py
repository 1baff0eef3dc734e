"""Knobs over real HTTP: injected failures, resets, hangs, disk full, latency and bandwidth."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from sandbox_helpers import (
    TEST_PROJECTS,
    client,
    h3,
    import_zip,
    instance_files,
    session,
    zip_bytes,
)

from xnatio.sandbox import Knobs, SandboxServer

pytestmark = pytest.mark.integration

DEST = {"PROJECT_ID": "P", "SUBJECT_ID": "S", "EXPT_LABEL": "E"}


def test_fail_next_scoped_to_import_with_retry_after(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    body = zip_bytes(instance_files(session(tmp_path, series=1, instances=1)))
    http = client(xnat_server)
    r = http.post(
        xnat_server.url + "/_sandbox/knobs",
        json={"fail_next": 2, "fail_status": 503, "retry_after": 7,
              "fault_path": "/data/services/import"},
    )  # fmt: skip
    assert r.json()["fail_next"] == 2
    assert http.post(xnat_server.url + "/data/JSESSION").status_code == 200  # not faulted
    for _ in range(2):
        r = import_zip(http, xnat_server, body, **DEST)
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "7"
        assert "Injected failure" in h3(r)
    assert import_zip(http, xnat_server, body, **DEST).status_code == 200
    stats = http.get(xnat_server.url + "/_sandbox/stats").json()
    assert stats["fault.fail_next"] == 2
    assert stats["status.503"] == 2


def test_reset_mid_body_then_recover(xnat_server: SandboxServer, tmp_path: Path) -> None:
    body = zip_bytes(instance_files(session(tmp_path, series=1, instances=4)))
    xnat_server.set_knobs(reset_next=1, fault_path="/data/services/import")
    http = client(xnat_server)
    with pytest.raises(requests.ConnectionError):
        import_zip(http, xnat_server, body, **DEST)
    # The cut request imported at most what arrived before the cut, never the whole body.
    imported = sum(len(xnat_server.prearchive_files(p)) for p in xnat_server.prearchive_sessions())
    assert imported < 4
    assert import_zip(client(xnat_server), xnat_server, body, **DEST).status_code == 200


def test_hang_next_times_the_client_out(xnat_server: SandboxServer) -> None:
    xnat_server.set_knobs(hang_next=1, hang_seconds=2)
    with pytest.raises(requests.Timeout):
        client(xnat_server).get(xnat_server.url + "/data/projects", timeout=0.3)
    assert client(xnat_server).get(xnat_server.url + "/data/projects").status_code == 200


def test_disk_full_is_a_400_as_on_xnat(xnat_server: SandboxServer, tmp_path: Path) -> None:
    # facts 1.4: I/O and disk-full failures are "unable to read DICOM object NAME", 400; no 507.
    s = session(tmp_path, series=1, instances=1)
    body = zip_bytes(instance_files(s))
    xnat_server.set_knobs(disk_full=True)
    r = import_zip(client(xnat_server), xnat_server, body, **DEST)
    assert r.status_code == 400
    assert h3(r) == f"unable to read DICOM object {next(iter(s.instances.values())).name}"
    xnat_server.set_knobs(disk_full=False)
    assert import_zip(client(xnat_server), xnat_server, body, **DEST).status_code == 200


def test_latency_and_bandwidth_slow_requests_down(tmp_path: Path) -> None:
    # Observed through client timeouts rather than by timing requests.
    knobs = Knobs(latency_ms=3000)
    with SandboxServer(
        tmp_path / "d", users={"u": "p"}, knobs=knobs, projects=TEST_PROJECTS
    ) as server:
        http = client(server)
        with pytest.raises(requests.Timeout):
            http.get(server.url + "/data/projects", timeout=0.5)
        server.set_knobs(latency_ms=0, bandwidth_mbps=0.1)  # 250 kB take 20 s to arrive
        with pytest.raises(requests.Timeout):
            http.put(
                server.url + "/data/projects/P/subjects/S/experiments/E/resources/R/files/f",
                data=b"x" * 250_000,
                timeout=1,
            )
        assert server.knobs.bandwidth_mbps == 0.1


def test_unknown_knob_is_400(xnat_server: SandboxServer) -> None:
    r = requests.post(xnat_server.url + "/_sandbox/knobs", json={"nope": 1})
    assert r.status_code == 400
    assert "unknown knob" in h3(r)


def test_site_anonymization_changes_stored_files(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    import hashlib

    s = session(tmp_path, series=1, instances=2)
    assert xnat_server.site_anon  # on by default, as XNAT's id.das (facts 1.7)
    http = client(xnat_server)
    r = import_zip(http, xnat_server, zip_bytes(instance_files(s)), **DEST, dest="/archive")
    assert r.status_code == 200
    stored = xnat_server.archived_files("P", "S", "E")
    assert set(stored) == set(s.instances)
    for uid, rec in stored.items():
        sent = s.instances[uid].read_bytes()
        assert rec.md5 != hashlib.md5(sent).hexdigest()
        data = http.get(
            xnat_server.url + "/data/projects/P/subjects/S/experiments/E/scans/"
            f"{rec.scan_id}/resources/DICOM/files/{rec.name}"
        ).content
        assert hashlib.md5(data).hexdigest() == rec.md5 and len(data) == rec.size


def test_reset_mid_tar_body_keeps_entries_read_before_the_cut(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    from sandbox_helpers import tar_bytes

    from xnatio.synth import generate_session

    s = generate_session(tmp_path / "s", series=1, instances=8, image_size=(64, 64))
    body = tar_bytes({p.name: p for p in s.instances.values()})
    xnat_server.set_knobs(reset_next=1, fault_path="/data/services/import")
    http = client(xnat_server)
    with pytest.raises(requests.ConnectionError):
        http.post(
            xnat_server.url + "/data/services/import",
            params={"import-handler": "DICOM-zip", "inbody": "true", **DEST},
            data=body,
            headers={"Content-Type": "application/x-tar"},
        )
    # A tar body is read as it arrives (like XNAT's importer): what came before the cut stays.
    (prearc,) = xnat_server.prearchive_sessions("P")
    assert 0 < len(xnat_server.prearchive_files(prearc)) < 8
    r = client(xnat_server).post(
        xnat_server.url + "/data/services/import",
        params={"import-handler": "DICOM-zip", "inbody": "true", **DEST},
        data=body,
        headers={"Content-Type": "application/x-tar"},
    )
    assert r.status_code == 200
    assert set(xnat_server.prearchive_files(prearc)) == set(s.instances)


def test_knobs_posted_like_curl_dash_d(xnat_server: SandboxServer) -> None:
    r = requests.post(
        xnat_server.url + "/_sandbox/knobs",
        data='{"latency_ms": 5}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200
    assert xnat_server.knobs.latency_ms == 5
