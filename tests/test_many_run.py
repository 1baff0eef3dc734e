"""``xio upload-many``'s runner and ledger against the sandbox: each study once, in one session.

Studies are synthetic sessions (``xnatio.synth``) of tiny images; the plan rows are
:class:`xnatio.many.runner.StudyJob` built from ``discover`` (the grouping and templates of
``xnatio.many.plan`` are tested in test_many_plan.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xnatio.discover import discover
from xnatio.many import ledger as states
from xnatio.many.ledger import Ledger, RunLock, RunLockedError
from xnatio.many.runner import (
    ManyEvent,
    ManyOptions,
    StudyJob,
    upload_many,
)
from xnatio.models import Manifest
from xnatio.sandbox import SandboxServer
from xnatio.settings import Secret, Settings
from xnatio.synth import generate_session

pytestmark = pytest.mark.integration


def make_study(root: Path, name: str, *, patient: str, seed: int, files: int = 4) -> Path:
    generate_session(
        root / name,
        series=2,
        instances=files // 2,
        patient_id=patient,
        seed=seed,
        image_size=(8, 8),
    )
    return root / name


def jobs_of_tree(root: Path, project: str = "P") -> list[StudyJob]:
    """One StudyJob per StudyInstanceUID under ``root`` (labels: PatientID / PatientID_n)."""
    manifest = discover(root)
    by_study: dict[str, list[Any]] = {}
    for f in manifest.files:
        by_study.setdefault(f.study_uid, []).append(f)
    jobs = []
    for uid, files in sorted(by_study.items(), key=lambda kv: kv[1][0].patient_id):
        patient = files[0].patient_id
        jobs.append(
            StudyJob(
                study_uid=uid,
                project=project,
                subject=patient,
                session=f"{patient}_MR",
                manifests=(Manifest(root=root, files=files),),
                patient_id=patient,
                folders=tuple(sorted({str(f.path.parent) for f in files})),
            )
        )
    return jobs


def settings_of(server: SandboxServer) -> Settings:
    return Settings(server=server.url, username=server.username, password=Secret(server.password))


def run(
    server: SandboxServer,
    root: Path,
    state: Path,
    events: list[ManyEvent] | None = None,
    **options: Any,
) -> Any:
    clock = options.pop("clock", time.time)
    options.setdefault("num_batches", 2)
    options.setdefault("upload_workers", 2)
    options.setdefault("retries", 1)
    return upload_many(
        settings=settings_of(server),
        plan=jobs_of_tree(root),
        options=ManyOptions(**options),
        state_dir=state,
        events=(events.append if events is not None else None),
        clock=clock,
    )


def instances_on_server(server: SandboxServer, project: str = "P") -> Counter[str]:
    """SOP Instance UID -> how many archived copies the whole project holds."""
    store = server._store()
    seen: Counter[str] = Counter()
    for e in store.experiments(project):
        for f in store.files(e, resource="DICOM"):
            if f["sop_uid"]:
                seen[f["sop_uid"]] += 1
    return seen


def sessions_of_study(server: SandboxServer, root: Path, project: str = "P") -> dict[str, set[str]]:
    """StudyInstanceUID -> labels of the sessions holding its instances."""
    store = server._store()
    study_of = {f.sop_instance_uid: f.study_uid for f in discover(root).files}
    out: dict[str, set[str]] = {}
    for e in store.experiments(project):
        for f in store.files(e, resource="DICOM"):
            if f["sop_uid"] in study_of:
                out.setdefault(study_of[f["sop_uid"]], set()).add(e.label)
    return out


def assert_each_once(server: SandboxServer, root: Path) -> None:
    local = {f.sop_instance_uid for f in discover(root).files}
    seen = instances_on_server(server)
    assert set(seen) >= local
    assert all(seen[uid] == 1 for uid in local), [u for u in local if seen[u] != 1]
    assert all(len(labels) == 1 for labels in sessions_of_study(server, root).values())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "outbox"
    for i in range(3):
        make_study(root, f"exam{i}", patient=f"PAT{i}", seed=i + 1)
    return root


def test_each_study_its_own_session_and_a_rerun_sends_nothing(
    xnat_server: SandboxServer, tree: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    events: list[ManyEvent] = []
    result = run(xnat_server, tree, state, events)
    assert result.exit_code == 0
    assert result.count(states.VERIFIED) == 3 and result.sent_files == 12
    assert sorted(xnat_server.experiment_labels("P")) == ["PAT0_MR", "PAT1_MR", "PAT2_MR"]
    assert_each_once(xnat_server, tree)
    kinds = Counter(e.kind for e in events)
    assert kinds["planned"] == kinds["started"] == kinds["verified"] == 3

    imported = xnat_server.stats().get("files_imported", 0)
    again = run(xnat_server, tree, state)
    assert again.exit_code == 0 and again.ran == 0 and again.sent_files == 0
    assert xnat_server.stats().get("files_imported", 0) == imported
    assert_each_once(xnat_server, tree)


def test_ledger_files_are_private_and_readable_by_status(
    xnat_server: SandboxServer, tree: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    run(xnat_server, tree, state)
    files = list((state / "studies").glob("*.json"))
    assert len(files) == 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "studies").stat().st_mode) == 0o700
    records = Ledger(state).records()
    assert {r.state for r in records} == {states.VERIFIED}
    assert {r.session for r in records} == {"PAT0_MR", "PAT1_MR", "PAT2_MR"}
    assert all(r.session_uri.endswith(r.session) for r in records)
    assert not list((state / "locks").iterdir())  # the run lock is given back


def test_new_study_and_new_files_of_an_archived_study_are_picked_up(
    xnat_server: SandboxServer, tree: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    run(xnat_server, tree, state)
    # A new study arrives, and a new series of PAT0's study (same StudyInstanceUID).
    make_study(tree, "exam3", patient="PAT3", seed=9)
    first = discover(tree / "exam0").files[0]
    extra = generate_session(
        tree / "late", series=1, instances=2, patient_id="PAT0", seed=1, image_size=(8, 8)
    )
    assert extra.study_uid == first.study_uid  # same seed: same study, new instances below
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    for path in extra.instances.values():
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = 99
        ds.save_as(path, enforce_file_format=True)

    result = run(xnat_server, tree, state)
    assert result.exit_code == 0
    ran = {o.record.session for o in result.studies if o.ran}
    assert ran == {"PAT0_MR", "PAT3_MR"}
    assert result.sent_files == 4 + 2  # the new study, and only the new files of PAT0's
    assert sorted(xnat_server.experiment_labels("P")) == [
        "PAT0_MR",
        "PAT1_MR",
        "PAT2_MR",
        "PAT3_MR",
    ]
    assert_each_once(xnat_server, tree)


def test_a_failing_study_is_retried_with_backoff_then_quarantined(
    xnat_server: SandboxServer, tree: Path, tmp_path: Path
) -> None:
    """PAT1's label holds another study on the server: XNAT would refuse to merge it (facts 1.5),
    so the pre-flight fails that study, run after run; the others are verified."""
    other = generate_session(tmp_path / "other", series=1, instances=1, seed=77, image_size=(8, 8))
    [job] = jobs_of_tree(other.root)
    job = dataclasses.replace(job, subject="PAT1", session="PAT1_MR")
    put_there = upload_many(
        settings=settings_of(xnat_server), plan=[job], state_dir=tmp_path / "other-state"
    )
    assert put_there.exit_code == 0
    state = tmp_path / "state"
    now = [1_000_000.0]

    def go(**kw: Any) -> Any:
        return run(xnat_server, tree, state, clock=lambda: now[0], max_attempts=3, **kw)

    first = go()
    assert first.exit_code == 1
    rec = {o.record.patient_id: o.record for o in first.studies}
    assert rec["PAT1"].state == states.FAILED and rec["PAT1"].attempts == 1
    assert "another study" in rec["PAT1"].last_error or rec["PAT1"].last_error
    assert rec["PAT0"].state == rec["PAT2"].state == states.VERIFIED

    backing_off = go()  # too early: the backoff is not over, nothing runs
    assert backing_off.ran == 0 and backing_off.exit_code == 1
    for expected in (states.FAILED, states.QUARANTINED):
        now[0] += 10 * 3600
        later = go()
        assert later.ran == 1
        assert {o.record.patient_id: o.state for o in later.studies}["PAT1"] == expected
    now[0] += 10 * 3600
    assert go().ran == 0  # quarantined: left out
    retried = go(retry_quarantined=True)
    assert retried.ran == 1
    record = Ledger(state).records()
    assert [r.attempts for r in record if r.patient_id == "PAT1"] == [1]


def test_one_cap_on_requests_in_flight_whatever_the_studies(
    xnat_server: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 studies at once with 4 batch workers each, capped at 3 requests: the server never
    sees more than 3 at once (counted in its request handler)."""
    from xnatio.sandbox import server as sandbox_server

    root = tmp_path / "outbox"
    for i in range(6):
        make_study(root, f"exam{i}", patient=f"PAT{i}", seed=i + 1, files=8)
    lock = threading.Lock()
    now, peak = [0], [0]
    dispatch = sandbox_server.Handler._dispatch

    def counted(self: Any) -> None:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            dispatch(self)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(sandbox_server.Handler, "_dispatch", counted)
    xnat_server.set_knobs(latency_ms=30)
    result = run(
        xnat_server,
        root,
        tmp_path / "state",
        parallel_studies=4,
        max_requests=3,
        upload_workers=4,
        num_batches=4,
    )
    assert result.exit_code == 0 and result.count(states.VERIFIED) == 6
    assert peak[0] <= 3, peak[0]
    assert peak[0] >= 2  # studies did overlap: the cap, not serial sending, held it down


def test_run_lock_refuses_an_overlapping_run_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "run-all.lock"
    first = RunLock(path)
    first.acquire()
    with pytest.raises(RunLockedError, match="another xio upload-many run"):
        RunLock(path).acquire()
    first.release()
    assert not path.exists()
    # A lock left by a dead process of this host is stale at once.
    path.write_text(json.dumps({"host": first.host, "pid": 999999999, "started": 0}))
    second = RunLock(path)
    second.acquire()
    assert "999999999" in second.took_over
    second.release()
    # Another host's lock is stale only once untouched for stale_seconds.
    path.write_text('{"host": "elsewhere", "pid": 1, "started": 0}')
    with pytest.raises(RunLockedError):
        RunLock(path, stale_seconds=60).acquire()
    os.utime(path, (0, 0))
    third = RunLock(path, stale_seconds=60)
    third.acquire()
    third.release()


def test_after_move_only_after_verification(
    xnat_server: SandboxServer, tree: Path, tmp_path: Path
) -> None:
    done = tmp_path / "done"
    result = run(xnat_server, tree, tmp_path / "state", after="move", after_dir=done)
    assert result.exit_code == 0
    assert list(tree.iterdir()) == []  # every source file moved, emptied folders removed
    moved = discover(done).files
    assert len(moved) == 12
    assert {f.path.relative_to(done).parts[:3] for f in moved} == {
        ("P", f"PAT{i}", f"PAT{i}_MR") for i in range(3)
    }


# -- the command, as cron and systemd run it ------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    from upload_helpers import PASSWORD, TEST_PROJECTS, USER

    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}, projects=TEST_PROJECTS) as s:
        yield s


def future(root: Path, seconds: float = 3600.0) -> None:
    """Date every file under ``root`` in the future: the study settles only then (a plan
    never sends a study whose newest change is not at least --settle old)."""
    then = time.time() + seconds
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (then, then))


def interleaved_tree(root: Path, studies: int, files: int = 4) -> Path:
    """``studies`` studies whose files are mixed in the same two folders, plus side files."""
    for i in range(studies):
        s = generate_session(
            root / f".gen{i}",
            series=2,
            instances=files // 2,
            patient_id=f"PAT{i}",
            seed=100 + i,
            image_size=(8, 8),
        )
        for n, path in enumerate(sorted(s.instances.values())):
            dest = root / ("a" if n % 2 else "b") / f"{i}_{n}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            path.rename(dest)
        shutil.rmtree(root / f".gen{i}")
    (root / "a" / "README.txt").write_text("not DICOM")
    time.sleep(1.1)  # older than a --settle of 1s (the plan also looks at the change time)
    return root


def test_cli_plan_then_run_then_rerun(sandbox: SandboxServer, tmp_path: Path) -> None:
    from upload_helpers import run_xio, xio_env

    root = interleaved_tree(tmp_path / "outbox", 3)
    generate_session(root / "fresh", series=1, instances=2, patient_id="NEW", seed=5)
    future(root / "fresh")  # still being written, as far as the plan can tell
    env = xio_env(sandbox.url, tmp_path / "home")
    state = str(tmp_path / "state")
    args = ["upload-many", str(root), "--project", "P", "--state-dir", state, "--settle", "1s"]

    dry = run_xio([*args, "--dry-run", "--plan-out", str(tmp_path / "plan.csv")], env)
    assert dry.returncode == 0, dry.stderr
    assert "4 studies, 3 ready to send" in dry.stdout
    assert "settling" in dry.stdout and "new session" in dry.stdout
    assert stat.S_IMODE((tmp_path / "plan.csv").stat().st_mode) == 0o600
    assert sandbox.stats().get("files_imported", 0) == 0

    first = run_xio([*args, "--json", "--num-batches", "2"], env)
    assert first.returncode == 0, first.stderr  # 3 verified, the fresh one deliberately waiting
    events = [json.loads(line) for line in first.stdout.splitlines()]
    kinds = Counter(e["event"] for e in events)
    assert kinds["verified"] == 3 and kinds["waiting"] == 1 and kinds["summary"] == 1
    summary = events[-1]
    assert summary["totals"]["verified"] == 3 and summary["exit_code"] == 0
    assert len(sandbox.experiment_labels("P")) == 3

    again = run_xio(args, env)
    assert again.returncode == 0, again.stderr
    assert "0 sent this run" in again.stdout
    # A cron log stays short: verified and unchanged studies are counted, not listed.
    assert "3 verified by earlier runs, unchanged" in again.stdout
    assert "skipped" not in again.stderr and "PAT0" not in again.stdout
    status = run_xio(["status", "--state-dir", state], env)
    assert status.returncode == 0 and status.stdout.startswith("4 studies: 3 verified, 1 waiting")


@pytest.mark.slow
def test_sigkill_in_the_middle_of_several_studies_then_rerun(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """kill -9 while studies are in flight; the rerun ends with every instance on the server
    exactly once and each study in exactly one session."""
    import signal
    import subprocess

    from proc_helpers import reap
    from upload_helpers import run_xio, wait_for, xio_command, xio_env

    root = interleaved_tree(tmp_path / "outbox", 6, files=12)
    env = xio_env(sandbox.url, tmp_path / "home")
    state = tmp_path / "state"
    args = ["upload-many", str(root), "--project", "P", "--state-dir", str(state)]
    args += ["--parallel-studies", "2", "--num-batches", "6", "--upload-workers", "2"]
    args += ["--settle", "1s"]
    sandbox.set_knobs(latency_ms=60)
    proc = subprocess.Popen(
        xio_command(args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert wait_for(lambda: sandbox.stats().get("files_imported", 0) >= 20, timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        reap(proc)
    states_now = Counter(r.state for r in Ledger(state).records())
    assert states_now[states.SENDING] >= 1  # killed in the middle of a study
    sandbox.set_knobs(latency_ms=0)
    rerun = run_xio(args, env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert {r.state for r in Ledger(state).records()} == {states.VERIFIED}
    assert_each_once(sandbox, root)
    assert len(sandbox.experiment_labels("P")) == 6


@pytest.mark.slow
def test_watch_picks_up_a_study_copied_in_and_stops_cleanly_on_sigterm(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    import signal
    import subprocess

    from proc_helpers import reap
    from upload_helpers import wait_for, xio_command, xio_env

    root = interleaved_tree(tmp_path / "outbox", 1)
    env = xio_env(sandbox.url, tmp_path / "home")
    state = tmp_path / "state"
    args = ["upload-many", str(root), "--project", "P", "--state-dir", str(state)]
    args += ["--watch", "--interval", "2", "--settle", "1s"]
    proc = subprocess.Popen(
        xio_command(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    def verified() -> int:
        return sum(1 for r in Ledger(state).records() if r.state == states.VERIFIED)

    try:
        assert wait_for(lambda: verified() == 1, timeout=60)
        # A new study is copied in while it watches.
        new = generate_session(
            tmp_path / "incoming", series=1, instances=3, patient_id="LATE", seed=42
        )
        shutil.copytree(new.root, root / "late")
        assert wait_for(lambda: verified() == 2, timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        reap(proc)
    assert proc.returncode == 0, err
    assert "watching:" in err  # the heartbeat
    assert "2 verified" in out
    assert_each_once(sandbox, root)
    assert not list((state / "locks").iterdir())


def test_options_refuse_after_without_verification_and_share_the_cap_over_cstore() -> None:
    from xnatio.errors import UsageError

    with pytest.raises(UsageError, match="--after delete/move"):
        ManyOptions(after="delete", verify=False).check()
    with pytest.raises(UsageError, match="move:DIR"):
        ManyOptions(after="move").check()
    cstore = ManyOptions(transport="dicom-store", max_requests=12, parallel_studies=4)
    assert cstore._batches() == 3  # 4 studies x 3 associations: never more than 12
    assert ManyOptions(num_batches=7, max_requests=2)._batches() == 7  # REST: the pool caps


def test_upload_many_layers_spell_no_default_of_their_own() -> None:
    """The many-study defaults live in xnatio.defaults only (as the upload defaults do)."""
    import ast

    from xnatio import defaults

    src = Path(__file__).resolve().parent.parent / "src" / "xnatio"
    spelled = {
        defaults.MANY_PARALLEL_STUDIES,
        defaults.MANY_MAX_REQUESTS,
        defaults.MANY_RETRY_BACKOFF,
        defaults.MANY_WATCH_INTERVAL,
        defaults.MANY_SETTLE,
    }
    for rel in ("many/runner.py", "many/watch.py", "cli/upload_many.py"):
        for node in ast.walk(ast.parse((src / rel).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and type(node.value) in (int, float):
                assert node.value not in spelled, f"{rel}:{node.lineno} spells {node.value}"


def test_cli_runs_a_reviewed_plan_whose_edited_labels_win(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    import csv

    from upload_helpers import run_xio, xio_env

    root = interleaved_tree(tmp_path / "outbox", 2)
    env = xio_env(sandbox.url, tmp_path / "home")
    plan = tmp_path / "plan.csv"
    args = ["upload-many", str(root), "--project", "P", "--settle", "1s", "--dry-run"]
    made = run_xio([*args, "--plan-out", str(plan)], env)
    assert made.returncode == 0, made.stderr
    with plan.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["subject"] for r in rows] == ["PAT0", "PAT1"]
    rows[0]["session"] = "Baseline visit"  # XNAT would clean it to Baseline_visit (facts 3.5)
    with plan.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    state = str(tmp_path / "state")
    ran = run_xio(["upload-many", str(plan), "--state-dir", state, "--settle", "1s"], env)
    assert ran.returncode == 0, ran.stderr
    assert sorted(sandbox.experiment_labels("P")) == ["Baseline_visit", rows[1]["session"]]
    assert_each_once(sandbox, root)


def test_a_study_in_a_folder_and_an_archive_is_one_session(
    xnat_server: SandboxServer, tmp_path: Path
) -> None:
    """Half of a study loose in a folder, half inside a .zip: two manifests, sent under the same
    labels one after the other; XNAT merges the second into the first's session (facts 1.5)."""
    import zipfile

    from xnatio.many import build_plan, find_studies

    root = tmp_path / "outbox"
    s = generate_session(root / "exam", series=2, instances=3, patient_id="PZ", seed=3)
    files = sorted(s.instances.values())
    with zipfile.ZipFile(tmp_path / "rest.zip", "w") as zf:
        for path in files[3:]:
            zf.write(path, arcname=path.name)
            path.unlink()
    roots = [root, tmp_path / "rest.zip"]  # ROOT... may name archives
    plan = build_plan(find_studies(roots), project="P", session="{PatientID}_MR", settle=0)
    [row] = plan.rows
    assert len(plan.studies[row.study_uid].manifests()) == 2
    result = upload_many(settings=settings_of(xnat_server), plan=plan, state_dir=tmp_path / "state")
    assert result.exit_code == 0, [o.record.last_error for o in result.studies]
    assert xnat_server.experiment_labels("P") == ["PZ_MR"]
    assert set(xnat_server.archived_files("P", "PZ", "PZ_MR")) == set(s.instances)
