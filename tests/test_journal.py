"""The resume journal and the run lock, on a real SQLite file and real processes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from proc_helpers import reap
from xnatio.errors import ConfigError
from xnatio.journal import (
    EARLIER_RUN_REASON,
    Journal,
    LockedError,
    RunLock,
    Target,
    default_journal_path,
    default_lock_dir,
    manifest_fingerprint,
    relative_name,
    strip_credentials,
)
from xnatio.models import DicomFile, FileOutcome, Manifest, Outcome, file_path, row_outcome

TARGET = Target.rest("https://xnat.example.org/", "P", "S", "E")


def make_manifest(root: Path, n: int = 6) -> Manifest:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        p = root / f"series{i % 2}" / f"img{i}.dcm"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * (100 + i))
        st = p.stat()
        files.append(
            DicomFile(
                path=p,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                study_uid="1.2.3",
                series_uid=f"1.2.3.{i % 2}",
                sop_instance_uid=f"1.2.3.{i % 2}.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                series_number=i % 2 + 1,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                patient_id="PAT",
            )
        )
    return Manifest(root=root, files=files)


def restat(m: Manifest) -> Manifest:
    """The manifest discovery would produce now (sizes and mtimes re-read)."""
    files = []
    for f in m.files:
        st = f.path.stat()
        files.append(
            DicomFile(
                path=f.path,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                study_uid=f.study_uid,
                series_uid=f.series_uid,
                sop_instance_uid=f.sop_instance_uid,
                sop_class_uid=f.sop_class_uid,
                series_number=f.series_number,
                transfer_syntax_uid=f.transfer_syntax_uid,
                patient_id=f.patient_id,
            )
        )
    return Manifest(root=m.root, files=files)


def test_default_path_precedence(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    assert default_journal_path(home) == tmp_path / ".local/state/xnatio/journal.sqlite"
    xdg = {**home, "XDG_STATE_HOME": str(tmp_path / "st")}
    assert default_journal_path(xdg) == tmp_path / "st/xnatio/journal.sqlite"
    env = {**xdg, "XNATIO_JOURNAL": str(tmp_path / "j.db")}
    assert default_journal_path(env) == tmp_path / "j.db"


def test_default_path_uses_isolated_home(isolated_home: Path) -> None:
    assert default_journal_path() == isolated_home / ".local/state/xnatio/journal.sqlite"


def test_target_key_never_holds_credentials() -> None:
    assert strip_credentials("HTTPS://alice:s3cret@XNAT.example.org:8443/xnat/?a=1#x") == (
        "https://xnat.example.org:8443/xnat"
    )
    t = Target.rest("https://bob:hunter22@host/", "P", "S", "E")
    assert "hunter22" not in t.key() and "bob" not in t.key()
    assert t == Target.rest("https://host", "P", "S", "E")


def test_confirmed_files_are_not_sent_again(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        done, todo = run.split()
        assert done == [] and todo == m.files
        run.record_confirmed(m.files[:4], batch=0)
    # A new process (a re-run) sees what the first one confirmed.
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        done, todo = run.split()
        assert done == m.files[:4]
        assert todo == m.files[4:]
        earlier = run.earlier_outcomes(done)
        assert {o.outcome for o in earlier} == {Outcome.UPLOADED}
        assert {o.reason for o in earlier} == {EARLIER_RUN_REASON}


def test_changed_files_are_sent_again(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        j.open_run(TARGET, m).record_confirmed(m.files)
    grown = m.files[1].path
    grown.write_bytes(grown.read_bytes() + b"more")
    touched = m.files[2].path
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    m2 = restat(m)
    with Journal(tmp_path / "j.sqlite") as j:
        done, todo = j.open_run(TARGET, m2).split()
    assert [f.path for f in todo] == [grown, touched]
    assert len(done) == len(m.files) - 2


def test_restart_forgets(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        run.record_confirmed(m.files)
        run.record_commit("/data/archive/projects/P/subjects/S/experiments/E")
        run2 = j.open_run(TARGET, m, restart=True)
        assert run2.split() == ([], m.files)
        assert not run2.committed


def test_targets_and_roots_are_separate(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    other = make_manifest(tmp_path / "other")
    with Journal(tmp_path / "j.sqlite") as j:
        j.open_run(TARGET, m).record_confirmed(m.files)
        assert (
            j.open_run(Target.rest("https://xnat.example.org", "P", "S", "E2"), m).split()[0] == []
        )
        assert (
            j.open_run(Target.dicom("xnat.example.org", 8104, "XNAT", "P", "S", "E"), m).split()[0]
            == []
        )
        assert j.open_run(TARGET, other).split()[0] == []
        assert j.open_run(TARGET, m).split()[1] == []


def test_commit_state_follows_new_confirmations(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        run.record_confirmed(m.files[:3])
        assert not run.committed
        run.record_commit("/data/prearchive/projects/P/1/E")
        assert run.committed and run.session_uri == "/data/prearchive/projects/P/1/E"
        run.record_verified()
        assert run.verified
        # More files confirmed after a commit need another commit (and another verification).
        run.record_confirmed(m.files[3:])
        assert not run.committed and not run.verified
        assert run.session_uri == "/data/prearchive/projects/P/1/E"


def test_outcomes_hook_and_forget(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        outcomes = [
            FileOutcome(str(m.files[0].path), Outcome.UPLOADED, batch=3),
            FileOutcome(str(m.files[1].path), Outcome.FAILED, reason="HTTP 500"),
            FileOutcome(str(m.files[2].path), Outcome.VERIFIED),
            FileOutcome("/not/in/manifest", Outcome.UPLOADED),
        ]
        assert run.record_outcomes(outcomes) == 2
        done, _ = run.split()
        assert done == [m.files[0], m.files[2]]
        run.forget([m.files[0]])
        assert run.split()[0] == [m.files[2]]


def test_the_safety_net_after_a_send_writes_only_what_the_hook_did_not(tmp_path: Path) -> None:
    """resume records a send's outcomes again after it (``only_new``): rows the hook wrote are
    not written twice (issue 16 item 4: ~3 s and a record per file at 100,000 files), and
    what the hook missed is written."""
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        outcomes = [
            FileOutcome(file_path(f), Outcome.UPLOADED, sop_instance_uid=f.sop_instance_uid)
            for f in m.files
        ]
        assert run.record_outcomes(outcomes[:4]) == 4  # the hook, as batches are confirmed
        assert run.record_outcomes(outcomes, only_new=True) == 2
        assert run.record_outcomes(outcomes, only_new=True) == 0
        assert run.split()[0] == m.files
        assert run.record_outcomes(outcomes[:1]) == 1  # the hook writes whatever it is given


def _journal_rows(j: Journal) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(j.path)) as db:  # (``with`` a connection: no close)
        return db.execute(
            "SELECT relpath, size, mtime_ns, sop_uid, batch, ctime_ns FROM files ORDER BY relpath"
        ).fetchall()


def test_outcomes_made_from_the_manifests_rows_are_recorded_by_row(tmp_path: Path) -> None:
    """The transports' outcomes carry their row of the manifest's columns (row_outcome): each
    is recorded as that file, the same rows as by UID and name; in a view of the columns (a
    resumed run sends only what is left) at its position in the view, and an outcome of a row
    the view does not hold is none of its files."""
    m = make_manifest(tmp_path / "src")
    by_row, by_name = tmp_path / "by_row.sqlite", tmp_path / "by_name.sqlite"
    with Journal(by_row) as j:
        run = j.open_run(TARGET, m)
        assert run.record_outcomes([row_outcome(m.files, i, Outcome.UPLOADED) for i in (5, 0, 3)])
        assert run.split()[0] == [m.files[0], m.files[3], m.files[5]]
        assert run._by_uid is None  # found by row: no index of the UIDs was made
    with Journal(by_name) as j:
        j.open_run(TARGET, m).record_outcomes(
            [FileOutcome(file_path(m.files[i]), Outcome.UPLOADED) for i in (5, 0, 3)]
        )
    with Journal(by_row) as a, Journal(by_name) as b:
        assert _journal_rows(a) == _journal_rows(b) != []

    view = Manifest(root=m.root, files=m.files.take([3, 5, 1]))
    with Journal(tmp_path / "view.sqlite") as j:
        run = j.open_run(TARGET, view)
        outcomes = [row_outcome(m.files, i, Outcome.UPLOADED) for i in (1, 0, 5)]
        assert run.record_outcomes(outcomes) == 2  # row 0 is not in the view
        assert run.split()[0] == [m.files[5], m.files[1]]
        assert run.record_outcomes(outcomes, only_new=True) == 0


def _fingerprint_of_records(m: Manifest) -> str:
    """The fingerprint as first written: the records sorted by relative name."""
    h = hashlib.sha256()
    for f in sorted(m.files, key=lambda f: relative_name(f, m.root)):
        h.update(f"{relative_name(f, m.root)}\0{f.size}\0{f.mtime_ns}\n".encode())
    return h.hexdigest()


def test_the_fingerprint_is_the_same_whatever_the_order_of_discovery(tmp_path: Path) -> None:
    """Read from the columns, in name order (sorted only when discovery's order is not it):
    the same value as sorting the records, which journals written before hold."""
    m = make_manifest(tmp_path / "src", n=12)
    in_order = Manifest(root=m.root, files=sorted(m.files, key=lambda f: f.fspath))
    shuffled = Manifest(root=m.root, files=[*m.files[7:], *m.files[:7]][::-1])
    expected = _fingerprint_of_records(m)
    assert manifest_fingerprint(in_order) == expected
    assert manifest_fingerprint(shuffled) == expected
    assert manifest_fingerprint(m) == expected


def test_fingerprint_tracks_size_and_mtime(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    fp = manifest_fingerprint(m)
    assert fp == manifest_fingerprint(restat(m))
    m.files[0].path.write_bytes(b"changed")
    assert fp != manifest_fingerprint(restat(m))


def test_fingerprint_is_written_when_recorded_not_when_the_run_opens(tmp_path: Path) -> None:
    # Opening a run is on the way to the first request: it no longer sorts and hashes every
    # file's name (issue 16); the fingerprint is written once the files are sent.
    m = make_manifest(tmp_path / "src")
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        run = j.open_run(TARGET, m)
        assert run.split() == ([], m.files)  # a first run: everything to send, nothing changed
        assert run.changed_since_sent(m.files) == []
        assert _fingerprint_in(path) == ""
        run.record_fingerprint()
    assert _fingerprint_in(path) == manifest_fingerprint(m)


def _fingerprint_in(path: Path) -> str:
    db = sqlite3.connect(path)  # closed here: a Connection's own 'with' does not close it
    try:
        return str(db.execute("SELECT fingerprint FROM runs").fetchone()[0])
    finally:
        db.close()


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src", n=64)
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        chunks = [m.files[i : i + 4] for i in range(0, 64, 4)]
        threads = [
            threading.Thread(target=run.record_confirmed, args=(c,), kwargs={"batch": i})
            for i, c in enumerate(chunks)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(run.split()[0]) == 64


def _open_and_close(path: str) -> str:
    try:
        Journal(Path(path)).close()
    except ConfigError as exc:
        return str(exc)
    return "ok"


def test_processes_opening_a_new_journal_together_all_get_it(tmp_path: Path) -> None:
    """A job array's tasks (or upload-many's studies) start together on one journal.

    SQLite refuses the switch to WAL with "database is locked" at once, busy timeout or not,
    while another process is creating the same file: before the retry, about one round in
    four failed a process with "cannot use the resume journal".
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        for i in range(20):
            path = str(tmp_path / f"j{i}.sqlite")
            answers = pool.map(_open_and_close, [path] * 8)
            assert answers == ["ok"] * 8, next(a for a in answers if a != "ok")


def test_journal_file_is_private(tmp_path: Path) -> None:
    with Journal(tmp_path / "state" / "j.sqlite") as j:
        assert (j.path.stat().st_mode & 0o777) == 0o600


# -- the lock ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("http://localhost:8080", "http://127.0.0.1:8080/"),
        ("http://127.0.0.1:8080", "http://[::1]:8080"),
        ("https://XNAT.example.org/xnat/", "https://user:pw@xnat.example.org:443/xnat"),
        ("http://h.example.org:80", "http://h.example.org"),
    ],
)
def test_the_lock_is_keyed_on_the_server_not_the_url_spelling(a: str, b: str) -> None:
    assert Target.rest(a, "P", "S", "E").lock_key() == Target.rest(b, "P", "s", "E").lock_key()
    # Another server (port, context path), project or session is another lock.
    key = Target.rest(a, "P", "S", "E").lock_key()
    assert Target.rest(a, "P", "S", "E2").lock_key() != key
    assert Target.rest(a.rstrip("/") + "/other", "P", "S", "E").lock_key() != key
    assert "pw" not in Target.rest(b, "P", "S", "E").lock_key()


def test_two_journal_folders_and_two_spellings_share_one_lock(tmp_path: Path) -> None:
    """Issue 13 item 15: `localhost` vs `127.0.0.1`, each run with its own --journal, used to
    upload the same session at once; the locks now live in one folder per user."""
    with Journal(tmp_path / "a" / "j.sqlite") as a, Journal(tmp_path / "b" / "j.sqlite") as b:
        first = a.lock(Target.rest("http://localhost:8080", "P", "S", "E"))
        first.acquire()
        try:
            with pytest.raises(LockedError):
                b.lock(Target.rest("http://127.0.0.1:8080/", "P", "S", "E")).acquire()
        finally:
            first.release()
    assert first.path.parent == default_lock_dir()


def test_lock_folder_that_cannot_be_made_is_one_configuration_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XNATIO_LOCK_DIR", str(blocker / "locks"))
    with pytest.raises(
        ConfigError,
        match=r"cannot create the run lock .* or choose another lock folder with XNATIO_LOCK_DIR",
    ) as err:
        RunLock(TARGET).acquire()
    assert err.value.exit_code == 2


def test_second_run_on_same_target_refuses() -> None:
    first = RunLock(TARGET)
    first.acquire()
    try:
        with pytest.raises(LockedError) as err:
            RunLock(TARGET).acquire()
        msg = str(err.value)
        assert f"pid {os.getpid()}" in msg and "--wait" in msg and "P/S/E" in msg
        assert err.value.exit_code == 2
        # Another target is not blocked.
        other = RunLock(Target.rest("https://xnat.example.org", "P", "S", "E2"))
        other.acquire()
        other.release()
    finally:
        first.release()
    again = RunLock(TARGET)
    again.acquire()
    again.release()


def test_wait_blocks_until_the_holder_finishes() -> None:
    first = RunLock(TARGET)
    first.acquire()
    order: list[str] = []
    waited = threading.Event()

    def second() -> None:
        lock = RunLock(TARGET)
        lock.acquire(wait=True, on_wait=lambda _msg: waited.set())
        order.append("second acquired")
        lock.release()

    t = threading.Thread(target=second)
    t.start()
    assert waited.wait(10)
    order.append("first released")
    first.release()
    t.join(10)
    assert order == ["first released", "second acquired"]


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from xnatio.journal import RunLock, Target, Journal
    from xnatio.models import Manifest
    t = Target.rest("https://xnat.example.org", "P", "S", "E")
    lock = RunLock(t)
    lock.acquire()
    j = Journal(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.integration
def test_lock_of_a_killed_run_is_released(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(journal)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError):
            RunLock(TARGET).acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        lock = RunLock(TARGET)
        lock.acquire()  # no stale lock after kill -9
        lock.release()
    finally:
        reap(proc)


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from xnatio.journal import Journal, Target
    from xnatio.models import DicomFile, Manifest
    root = Path(sys.argv[2])
    files = [
        DicomFile(path=root / f"f{i}", size=i, mtime_ns=i, study_uid="1", series_uid="1.1",
                  sop_instance_uid=f"1.1.{i}", sop_class_uid="1", series_number=1,
                  transfer_syntax_uid="1", patient_id="p")
        for i in range(20000)
    ]
    j = Journal(Path(sys.argv[1]))
    run = j.open_run(Target.rest("https://h", "P", "S", "E"), Manifest(root=root, files=files))
    for i in range(0, len(files), 10):
        run.record_confirmed(files[i : i + 10], batch=i // 10)
        if i == 500:
            print("writing", flush=True)
    """
)


@pytest.mark.integration
def test_kill_9_mid_write_leaves_a_consistent_journal(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(journal), str(tmp_path / "src")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    reap(proc)
    db = sqlite3.connect(journal)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n, batches = db.execute("SELECT count(*), count(DISTINCT batch) FROM files").fetchone()
    db.close()
    # Whole batches only: each batch of 10 is one transaction.
    assert n >= 510 and n == batches * 10


def test_transport_hooks_and_changed_files(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        run.record_confirmed(m.files[:2])
        run.record_session_uri("/data/prearchive/projects/P/20260101_000000000/E")
        assert run.session_uri == "/data/prearchive/projects/P/20260101_000000000/E"
        assert run.split()[0] == m.files[:2]
        first = m.files[0].path
        first.write_bytes(first.read_bytes() + b"!")
        now = restat(m)
        run2 = j.open_run(TARGET, now)
        # Only a file an earlier run sent counts as changed; a never-sent file is just pending.
        assert [f.path for f in run2.changed_since_sent(now.files)] == [first]


def test_unusable_journal_is_one_clear_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError) as err:
        Journal(garbage)
    assert str(garbage) in str(err.value) and "--journal" in str(err.value)
    assert err.value.exit_code == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError):
        Journal(blocker / "sub" / "journal.sqlite")  # its folder cannot be created


def test_old_verified_uploads_are_pruned(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    other = make_manifest(tmp_path / "other")
    with Journal(tmp_path / "j.sqlite") as j:
        done = j.open_run(TARGET, m)
        done.record_confirmed(m.files)
        done.record_verified()
        pending = j.open_run(TARGET, other)
        pending.record_confirmed(other.files[:2])
    # keep_days=0: everything verified is old enough; unverified uploads are always kept.
    with Journal(tmp_path / "j.sqlite", keep_days=0) as j:
        assert j.open_run(TARGET, m).split()[0] == []
        assert j.open_run(TARGET, other).split()[0] == other.files[:2]


def test_a_file_renamed_since_it_was_sent_is_the_same_instance(tmp_path: Path) -> None:
    """File identity is the SOP Instance UID within a source (issue 12), not its display path:
    renaming a file locally between runs does not send it again; forgetting it (read-back did
    not find it) forgets it under its new name too."""
    import dataclasses

    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        j.open_run(TARGET, m).record_confirmed(m.files)
    old = m.files[0].path
    new = old.with_name("renamed.dcm")
    old.rename(new)
    m2 = Manifest(root=m.root, files=[dataclasses.replace(m.files[0], path=new), *m.files[1:]])
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m2)
        done, todo = run.split()
        assert todo == [] and len(done) == len(m.files)
        run.forget([m2.files[0]])
        assert run.split()[1] == [m2.files[0]]


def test_a_file_whose_server_copy_differs_is_remembered_until_verified(tmp_path: Path) -> None:
    """Issue 13 item 2: a file the read-back found different on the server is not forgotten
    (else the next run finds it "on the server" by name and never replaces it): it is to send
    again, as changed (replacing the server's copy), until a read-back verifies the session."""
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        run.record_confirmed(m.files)
        run.mark_different([m.files[2]])
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        done, todo = run.split()
        assert todo == [m.files[2]] and len(done) == len(m.files) - 1
        assert run.changed_since_sent(m.files) == [m.files[2]]
        run.record_confirmed([m.files[2]])  # sent again: still to check until verified
        assert run.changed_since_sent(m.files) == [m.files[2]]
        run.record_verified()
        assert run.split()[1] == [] and run.changed_since_sent(m.files) == []


def test_lock_folder_follows_the_state_folder_not_the_journal(tmp_path: Path) -> None:
    assert default_lock_dir({"XNATIO_LOCK_DIR": str(tmp_path / "l")}) == tmp_path / "l"
    assert default_lock_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "xnatio/locks"
    assert default_lock_dir({"HOME": str(tmp_path)}) == tmp_path / ".local/state/xnatio/locks"
    # The journal's own variable does not move the locks: two journals, one lock folder.
    env = {"HOME": str(tmp_path), "XNATIO_JOURNAL": str(tmp_path / "j" / "x.sqlite")}
    assert default_lock_dir(env) == tmp_path / ".local/state/xnatio/locks"


def test_runs_in_which_a_file_was_lost_are_counted_until_verified(tmp_path: Path) -> None:
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        assert run.record_lost([m.files[0]]) == {m.files[0].sop_instance_uid: 1}
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        counts = run.record_lost(m.files[:2])
        assert counts == {m.files[0].sop_instance_uid: 2, m.files[1].sop_instance_uid: 1}
        run.record_verified()
        assert run.record_lost([m.files[0]]) == {m.files[0].sop_instance_uid: 1}


def test_a_write_that_puts_the_mtime_back_is_still_a_change(tmp_path: Path) -> None:
    """Issue 13 item 2: same size, same mtime, new bytes: the inode change time differs."""
    import dataclasses

    m = make_manifest(tmp_path / "src")
    f = m.files[1]
    st = f.path.stat()
    m = Manifest(
        root=m.root,
        files=[dataclasses.replace(g, ctime_ns=st.st_ctime_ns) if g == f else g for g in m.files],
    )
    with Journal(tmp_path / "j.sqlite") as j:
        j.open_run(TARGET, m).record_confirmed(m.files)
    time.sleep(0.01)
    f.path.write_bytes(b"y" * f.size)  # other bytes, same size
    os.utime(f.path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the mtime put back
    now = f.path.stat()
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    changed = dataclasses.replace(m.files[1], ctime_ns=now.st_ctime_ns)
    m2 = Manifest(root=m.root, files=[m.files[0], changed, *m.files[2:]])
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m2)
        assert run.split()[1] == [changed]
        assert run.changed_since_sent(m2.files) == [changed]
    # A journal row without a ctime (written before it was kept) is not a change by itself.
    unknown = dataclasses.replace(changed, ctime_ns=0)
    with Journal(tmp_path / "j.sqlite") as j:
        assert j.open_run(TARGET, m2).changed_since_sent([unknown]) == []


def test_a_journal_from_before_ctime_gains_the_column(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "j.sqlite")
    db.executescript(
        "CREATE TABLE files (run_id INTEGER NOT NULL, relpath TEXT NOT NULL, size INTEGER NOT "
        "NULL, mtime_ns INTEGER NOT NULL, sop_uid TEXT NOT NULL, batch INTEGER, confirmed_at "
        "REAL NOT NULL, PRIMARY KEY (run_id, relpath));"
    )
    db.close()
    m = make_manifest(tmp_path / "src")
    with Journal(tmp_path / "j.sqlite") as j:
        run = j.open_run(TARGET, m)
        run.record_confirmed(m.files)
        assert run.split()[1] == []


def test_a_difference_that_outlives_its_replacement_is_named_not_promised_again(
    tmp_path: Path,
) -> None:
    """Issue 13: "the next run replaces it" is said once; a file found different again after a
    run replaced it gets the line that says what to check instead."""
    from xnatio.models import UploadResult
    from xnatio.resume import _remember_problems
    from xnatio.verify import SeriesCheck, VerifyReport

    m = make_manifest(tmp_path / "src")
    bad = m.files[0]

    def report() -> VerifyReport:
        check = SeriesCheck(bad.series_uid, 1, "1", 3, 3, different=[bad])
        return VerifyReport("P", "S", "E", found=True, series=[check])

    lines: list[list[str]] = []
    for _ in range(2):
        with Journal(tmp_path / "j.sqlite") as j:
            run = j.open_run(TARGET, m)
            result = UploadResult(success=False, total_files=6, duration=0, total_size_mb=0)
            _remember_problems(result, report(), run, frozenset())
            lines.append(result.errors)
    assert lines[0] == [
        "the next run of the same command replaces the server's copy of 1 file(s) "
        "(overwrite=delete, facts 1.5)"
    ]
    assert len(lines[1]) == 1 and "still differs" in lines[1][0] and "check" in lines[1][0]
