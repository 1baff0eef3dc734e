"""Every run converges (issue 13): the state x rerun table, against the local XNAT server.

Each row puts the local files, the journal and the server into a state that a real cron job can
reach (renamed files, a folder moved, ``--restart``, an old journal, a file changed in place, odd
series, faults of ``docs/reliability.md``), then runs the same ``xio upload-dicom`` command again
(the real CLI, in-process) and checks where it ends:

- the exit code, and one line naming what to change where it is not 0;
- how many files the server imported in the rerun (nothing twice: a file it holds is not sent);
- the archived session holds every local instance exactly once, and the prearchive holds no
  CONFLICT or ERROR entry (XNAT's refused merge leaves one, facts 1.5);
- where the row ends in exit 1 with the cause gone, the next run ends in exit 0 (within two runs),
  and no message says "run the same command again" twice for the same cause.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tarfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from upload_helpers import PASSWORD, TEST_PROJECTS, USER, import_tar, imported
from xnatio.cli.main import cli
from xnatio.discover import discover
from xnatio.journal import KEEP_DAYS
from xnatio.models import Manifest
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session
from xnatio.verify import read_session
from xnatio.xnat.client import XnatClient

pytestmark = pytest.mark.integration

AGAIN = "run the same command again"


@dataclass
class Run:
    code: int
    out: str
    err: str
    sent: int  # files the server imported during this run

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass
class World:
    """The three states a row sets up: local files (``source``), journal, server."""

    server: SandboxServer
    tmp: Path
    source: Path
    journal: Path
    runner: CliRunner = field(default_factory=CliRunner)

    def env(self) -> dict[str, str]:
        return {
            "XNAT_SERVER": self.server.url,
            "XNAT_USERNAME": USER,
            "XNAT_PASSWORD": PASSWORD,
            "NO_COLOR": "1",
        }

    def upload(self, *extra: str, source: Path | None = None, journal: Path | None = None) -> Run:
        before = imported(self.server)
        args = ["upload-dicom", "P", "S", "E", str(source or self.source)]
        args += ["--journal", str(journal or self.journal), *extra]
        r = self.runner.invoke(cli, args, env=self.env())
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return Run(r.exit_code, r.stdout, r.stderr, imported(self.server) - before)

    def verify(self, *extra: str) -> Run:
        r = self.runner.invoke(
            cli, ["verify", "P", "S", "E", str(self.source), *extra], env=self.env()
        )
        return Run(r.exit_code, r.stdout, r.stderr, 0)

    def files(self) -> list[Path]:
        return sorted(p for p in self.source.rglob("*") if p.is_file())


def _prearchive_statuses(url: str) -> list[str]:
    rows = requests.get(
        url + "/data/prearchive/projects/P",
        params={"format": "json"},
        auth=(USER, PASSWORD),
        timeout=10,
    ).json()["ResultSet"]["Result"]
    return [str(r["status"]) for r in rows]


def _each_instance_once(server: SandboxServer, manifest: Manifest) -> None:
    with XnatClient(server.url, username=USER, password=PASSWORD) as client:
        scans = read_session(client, "P", "S", "E")
    assert scans is not None
    names = [f.name for s in scans for f in s.files]
    assert len(names) == len(set(names)) == len(manifest.files), "an instance twice, or lost"
    archived = server.archived_files("P", "S", "E")
    assert set(archived) == {f.sop_instance_uid for f in manifest.files}
    assert not {"CONFLICT", "ERROR"} & set(_prearchive_statuses(server.url))


# -- the states ----------------------------------------------------------------------------------


def _first_upload(w: World) -> None:
    assert w.upload().code == 0


def renamed_files(w: World) -> None:
    """Issue 13 item 1: upload, then add `.dcm` to every file name (same bytes, same UIDs)."""
    _first_upload(w)
    for p in w.files():
        p.rename(p.with_name(p.name + ".dcm"))


def renamed_files_fresh_journal(w: World) -> None:
    renamed_files(w)
    w.journal = w.tmp / "another-folder" / "journal.sqlite"


def renamed_files_restart(w: World) -> None:
    renamed_files(w)  # the row's rerun passes --restart


def moved_folder(w: World) -> None:
    """Item 5: the archived session's source folder renamed (a new source for the journal)."""
    _first_upload(w)
    moved = w.tmp / "renamed-exam"
    shutil.move(w.source, moved)
    w.source = moved


def old_journal(w: World) -> None:
    """Item 5: the journal entry is older than the 90 days kept: pruned when the journal opens."""
    _first_upload(w)
    db = sqlite3.connect(w.journal)
    with db:
        db.execute("UPDATE runs SET updated = ?", (time.time() - (KEEP_DAYS + 1) * 86400,))
    db.close()


def changed_in_place(w: World) -> None:
    """Item 2: one file's bytes changed, same size and modification time, on a server that
    stores our bytes (no site script, no re-encoding): read-back sees it by MD5."""
    w.server.site_anon = False
    w.server.set_knobs(reencode=False)
    _first_upload(w)
    victim = w.files()[3]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01  # one pixel value: same instance, other bytes
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))


def changed_in_place_rewriting_server(w: World) -> None:
    """Item 2 where the server rewrites every file (XNAT's default, facts 1.7): the change cannot
    be seen by size, time or MD5; the journal sees it by the inode change time, which no write
    can put back."""
    _first_upload(w)
    victim = w.files()[3]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))


def _rewrite(path: Path, edit: Callable[[object], None]) -> None:
    from pydicom import dcmread

    ds = dcmread(path)
    edit(ds)
    ds.save_as(path)


def shared_series_number(w: World) -> None:
    """Item 3: two series share a SeriesNumber (a scanner re-export); first upload, then rerun."""
    for f in discover(w.source).files:
        if f.series_number == 2:
            _rewrite(f.path, lambda ds: setattr(ds, "SeriesNumber", 1))
    _first_upload(w)


def no_series_uid(w: World) -> None:
    """Item 4: one file has no SeriesInstanceUID."""
    first = discover(w.source).files[0]
    _rewrite(first.path, lambda ds: delattr(ds, "SeriesInstanceUID"))
    _first_upload(w)


def deleted_on_server(w: World) -> None:
    """The journal says sent, the server lost one file."""
    _first_upload(w)
    victim = next(iter(w.server.archived_files("P", "S", "E").values()))
    requests.delete(
        f"{w.server.url}/data/projects/P/subjects/S/experiments/E/scans/{victim.scan_id}"
        f"/resources/DICOM/files/{victim.name}",
        auth=(USER, PASSWORD),
        timeout=10,
    ).raise_for_status()


def half_on_server(w: World) -> None:
    """Half the session was put there by another tool (xio's names); no journal."""
    import_tar(w.server.url, discover(w.source).files[:5])


def import_failed_first(w: World) -> None:
    """Fault: the imports of the first run fail for good (507), then the server is well."""
    w.server.set_knobs(fail_next=100, fail_status=507, fault_path="/data/services/import")
    first = w.upload("--num-batches", "2")
    assert first.code == 1
    w.server.set_knobs(fail_next=0)


def disk_full_first(w: World) -> None:
    """Fault: XNAT's disk full (400 'unable to read DICOM object', facts 1.4)."""
    w.server.set_knobs(disk_full=True, fault_path="/data/services/import")
    assert w.upload().code == 1
    w.server.set_knobs(disk_full=False)


def commit_failed_first(w: World) -> None:
    """Fault: everything sent, the commit failed; the rerun only commits."""
    w.server.set_knobs(fail_next=1, fail_status=400, fault_path="/data/prearchive")
    first = w.upload()
    assert first.code == 1 and "not committed" in first.text
    assert w.server.archived_files("P", "S", "E") == {}


def commit_fails_twice(w: World) -> None:
    """Item 6: the commit failed, and fails again in the commit-only rerun."""
    commit_failed_first(w)
    w.server.set_knobs(fail_next=1, fail_status=400, fault_path="/data/prearchive")


def fresh(w: World) -> None:
    """Nothing sent yet: the fault is on the server during the run (row.knobs)."""


def readback_failed_first(w: World) -> None:
    """Fault: sent and committed, but the read-back failed; the rerun only verifies."""
    w.server.set_knobs(
        fail_next=100, fail_status=400, fault_path="/data/projects/P/subjects/S/experiments/E/scans"
    )
    first = w.upload()
    assert first.code == 1 and "could not read the session back" in first.text, first.text
    w.server.set_knobs(fail_next=0)


def series_filter(w: World) -> None:
    """A series import filter on the server drops series 2 (facts 1.3): XNAT answers 200 and
    keeps nothing of it. The first run says so; the rerun must not promise "the next run sends
    them again" a second time."""
    w.server.set_knobs(reject_series=["2"])
    first = w.upload()
    assert first.code == 1, first.text


def _sent_by_another_tool(w: World, count: int) -> None:
    """The first ``count`` instances put in the session by another tool (or C-STORE): XNAT's
    own names, not ``{SOP Instance UID}.dcm``."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, f in enumerate(discover(w.source).files[:count]):
            tf.add(f.path, arcname=f"{f.series_number}/IM{i:04d}")
    requests.post(
        w.server.url + "/data/services/import",
        params={
            "import-handler": "DICOM-zip",
            "PROJECT_ID": "P",
            "SUBJECT_ID": "S",
            "EXPT_LABEL": "E",
            "dest": "/archive/projects/P/subjects/S/experiments/E",
            "inbody": "true",
        },
        data=buf.getvalue(),
        headers={"Content-Type": "application/x-tar"},
        auth=(USER, PASSWORD),
        timeout=60,
    ).raise_for_status()


def whole_session_by_another_tool(w: World) -> None:
    """Item 5's kin: the session holds every instance under names xio did not give. Sending
    them would be refused (409) and leave a CONFLICT copy (facts 1.5)."""
    _sent_by_another_tool(w, 10)


READ_REFUSED = (
    ("fail_next", 1000),
    ("fail_status", 403),
    ("fault_path", "/data/projects/P/subjects/S/experiments/E/scans"),
)


def readback_refused(w: World) -> None:
    """The account may not read the session back (403): sent, committed, not verified."""
    w.server.set_knobs(**dict(READ_REFUSED))
    first = w.upload()
    assert first.code == 1 and "ask for read access" in first.text, first.text
    assert AGAIN not in first.text


def another_study(w: World) -> None:
    """The label holds another study: XNAT never merges it (facts 1.5); refused before sending."""
    _first_upload(w)
    other = w.tmp / "other"
    generate_session(other, series=1, instances=3, image_size=(32, 32), seed=99)
    w.source = other


@dataclass(frozen=True)
class Row:
    id: str
    state: Callable[[World], None]
    rerun: tuple[str, ...] = ()
    code: int = 0
    sent: int | None = 0  # files imported by the rerun (None: not checked)
    says: str = ""  # a line the rerun prints (stdout or stderr)
    then_code: int | None = None  # a third run, the cause gone: must end so
    knobs: tuple[tuple[str, object], ...] = ()  # server faults during the rerun


ROWS = [
    Row("renamed, same journal", renamed_files, says="10 of 10 files were confirmed"),
    Row("renamed, --restart", renamed_files_restart, ("--restart",), says="already on the server"),
    Row("renamed, new journal folder", renamed_files_fresh_journal, says="already on the server"),
    Row("archived, source folder renamed", moved_folder, says="already on the server"),
    Row("archived, journal entry > 90 days", old_journal, says="already on the server"),
    Row(
        "changed in place, same size+mtime, server keeps our bytes",
        changed_in_place,
        sent=1,
        says="1 file(s) changed since an earlier run sent them",
        then_code=0,
    ),
    Row(
        "changed in place, same size+mtime, --restart (no journal)",
        changed_in_place,
        ("--restart",),
        sent=1,
        says="sending them again, replacing it (overwrite=delete)",
        then_code=0,
    ),
    Row(
        "changed in place, same size+mtime, server rewrites files",
        changed_in_place_rewriting_server,
        sent=1,
        says="1 file(s) changed since an earlier run sent them",
        then_code=0,
    ),
    Row("two series share a SeriesNumber", shared_series_number),
    Row("a file without SeriesInstanceUID", no_series_uid),
    Row("a file deleted on the server", deleted_on_server, sent=1, says="sending them again"),
    Row("half on the server, no journal", half_on_server, sent=5, says="sending only the other 5"),
    Row("imports failed (507)", import_failed_first, sent=10, then_code=0),
    Row("disk full", disk_full_first, sent=10, then_code=0),
    Row("commit failed", commit_failed_first, says="committing the session"),
    Row(
        "HTTP 500 on imports",
        fresh,
        sent=10,
        knobs=(("fail_next", 2), ("fail_status", 500), ("fault_path", "/data/services/import")),
    ),
    Row(
        "HTTP 503 with Retry-After",
        fresh,
        sent=10,
        knobs=(("fail_next", 1), ("fail_status", 503), ("retry_after", 0.1)),
    ),
    Row(
        "connection reset mid-body",
        fresh,
        sent=10,
        knobs=(("reset_next", 1), ("fault_path", "/data/services/import")),
    ),
    Row(
        "a server that stops answering one import",
        fresh,
        ("--timeout", "1"),
        sent=10,
        knobs=(("hang_next", 1), ("hang_seconds", 3.0), ("fault_path", "/data/services/import")),
    ),
    Row("read-back failed", readback_failed_first, says="verifying 10 files"),
    Row(
        "read-back refused (403), until access is given",
        readback_refused,
        code=1,
        says="ask for read access to the project, or pass --no-verify",
        then_code=0,
        knobs=READ_REFUSED,
    ),
    Row(
        "the whole session sent over C-STORE/another tool (XNAT's names)",
        whole_session_by_another_tool,
        says="already on the server",
    ),
    Row(
        "a series filter drops a series, until it is lifted",
        series_filter,
        code=1,
        sent=None,
        says="sending again will not help",
        then_code=0,
        knobs=(("reject_series", ["2"]),),
    ),
    Row(
        "another study under the label",
        another_study,
        code=2,
        says="holds another study",
        then_code=2,
    ),
    Row(
        "commit-only rerun whose commit fails",
        commit_fails_twice,
        code=1,
        says="the commit failed",
        then_code=0,
    ),
]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    exam = tmp_path / "exam"
    generate_session(exam, series=2, instances=5, image_size=(32, 32), seed=13)
    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}, projects=TEST_PROJECTS) as sb:
        yield World(sb, tmp_path, exam, tmp_path / "journal.sqlite")


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_state_then_rerun_converges(world: World, row: Row) -> None:
    row.state(world)
    if row.knobs:
        world.server.set_knobs(**dict(row.knobs))
    again = world.upload(*row.rerun)
    assert again.code == row.code, again.text
    if row.sent is not None:
        assert again.sent == row.sent, again.text
    assert row.says in again.text
    if row.code == 0:
        _each_instance_once(world.server, discover(world.source))
    if row.knobs:
        world.server.set_knobs(fail_next=0, reset_next=0, hang_next=0, reject_series=[])
    third = world.upload()
    if row.then_code is not None:
        assert third.code == row.then_code, third.text
    if third.code == 0:
        assert third.sent == 0 or row.code != 0, third.text  # a converged state stays put
        _each_instance_once(world.server, discover(world.source))
    # Never "run the same command again" twice for the same cause.
    assert not (AGAIN in again.text and AGAIN in third.text), third.text
    assert "Traceback" not in again.text + third.text


def test_verify_names_extra_files_instead_of_holds_all(world: World) -> None:
    """Item 1: a session holding more files than the local instances (here: 4 more instances
    sent by another tool under its own names) is not reported as just "holds all N"."""
    from pydicom.uid import generate_uid

    manifest = discover(world.source)
    assert world.upload().code == 0
    copies = world.tmp / "copies"
    for f in manifest.files[:4]:
        dest = copies / f"{f.series_number}" / f"copy-{f.path.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f.path, dest)
        uid = generate_uid()

        def new_uid(ds: object, uid: str = uid) -> None:
            ds.SOPInstanceUID = uid  # type: ignore[attr-defined]
            ds.file_meta.MediaStorageSOPInstanceUID = uid  # type: ignore[attr-defined]

        _rewrite(dest, new_uid)
    # Another tool (not xio) sends the renamed copies under their own names.
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(copies.rglob("copy-*")):
            tf.add(p, arcname=f"{p.parent.name}/{p.name}")
    requests.post(
        world.server.url + "/data/services/import",
        params={
            "import-handler": "DICOM-zip",
            "dest": "/archive/projects/P/subjects/S/experiments/E",
            "overwrite": "append",
            "overwrite_files": "true",
            "inbody": "true",
        },
        data=buf.getvalue(),
        headers={"Content-Type": "application/x-tar"},
        auth=(USER, PASSWORD),
        timeout=60,
    )
    with XnatClient(world.server.url, username=USER, password=PASSWORD) as client:
        scans = read_session(client, "P", "S", "E")
    assert scans is not None
    on_server = sum(len(s.files) for s in scans)
    extra = on_server - len(manifest.files)
    assert extra == 4
    v = world.verify()
    assert v.code == 0
    first = v.out.splitlines()[0]
    assert f"and {extra} more that match no local file" in first, v.out
    assert f"the session also holds {extra} files that match no local file" in v.out
    as_json = json.loads(world.verify("--json").out)
    assert as_json["extra"] == extra
    # The upload's own read-back says so too (a note: not a failure, exit 0).
    again = world.upload("--json")
    assert again.code == 0
    notes = json.loads(again.out)["notes"]
    assert any(f"the session also holds {extra} files that match no local file" in n for n in notes)


def _pack(kind: str, dest: Path, entries: list[tuple[str, Path]]) -> Path:
    """An archive PATH written as a careless tool would: names taken as given."""
    if kind == "zip":
        with warnings.catch_warnings(), zipfile.ZipFile(dest, "w") as zf:
            warnings.simplefilter("ignore")  # zipfile warns of a duplicate name it writes
            for name, src in entries:
                zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), src.read_bytes())
    else:
        with tarfile.open(dest, "w") as tf:
            for name, src in entries:
                info = tarfile.TarInfo(name)
                info.size = src.stat().st_size
                with src.open("rb") as fh:
                    tf.addfile(info, fh)
    return dest


ARCHIVE_NAMES = {
    # Item 4: two entries of one name (different instances).
    "two entries of one name": lambda i, p: "same.dcm" if i < 2 else f"x/{p.name}",
    # Item 13: names that climb out of an extraction folder, or are absolute.
    "unsafe names": lambda i, p: f"../../{p.name}" if i % 2 else f"/abs/{p.name}",
}


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("names", list(ARCHIVE_NAMES))
def test_an_archive_path_with_odd_member_names(world: World, kind: str, names: str) -> None:
    """Items 4 and 13: every instance stored once, verified, and the rerun sends nothing;
    members are sent re-packed under their instance names (never the names given)."""
    manifest = discover(world.source)
    rename = ARCHIVE_NAMES[names]
    entries = [(rename(i, f.path), f.path) for i, f in enumerate(manifest.files)]
    archive = _pack(kind, world.tmp / f"exam.{kind}", entries)
    first = world.upload(source=archive)
    assert first.code == 0 and first.sent == len(manifest.files), first.text
    second = world.upload(source=archive)
    assert second.code == 0 and second.sent == 0, second.text
    fresh = world.upload("--restart", source=archive)  # no journal: the server is asked
    assert fresh.code == 0 and fresh.sent == 0, fresh.text
    _each_instance_once(world.server, manifest)
    stored = {r.name for r in world.server.archived_files("P", "S", "E").values()}
    assert not any(".." in n or n.startswith("/") for n in stored)


def test_a_resumed_archive_path_sends_only_the_missing_members(world: World) -> None:
    """Item 13: members an earlier run sent (the journal) or the server holds are not sent
    again: here the first run saw the archive with 6 of its 10 members (cut short), and 2 more
    are on the server already (sent by another tool)."""
    manifest = discover(world.source)
    entries = [(f"{f.series_number}/{f.path.name}", f.path) for f in manifest.files]
    archive = world.tmp / "exam.zip"
    _pack("zip", archive, entries[:6])
    assert world.upload(source=archive).code == 0
    import_tar(world.server.url, manifest.files[6:8])
    _pack("zip", archive, entries)
    again = world.upload(source=archive)
    assert again.code == 0 and again.sent == 2, again.text
    assert "6 of 10 files were confirmed by an earlier run" in again.text
    _each_instance_once(world.server, manifest)


def test_part_of_a_series_sent_by_another_tool_is_refused_before_sending(world: World) -> None:
    """Which instances of a series held under foreign names are missing cannot be told: the run
    refuses before sending (exit 2, one line naming --overwrite delete), leaving no CONFLICT
    copy; with --overwrite delete the session's copies are replaced and the run converges."""
    _sent_by_another_tool(world, 7)  # series 1 whole, 2 of series 2's 5
    refused = world.upload()
    assert refused.code == 2 and refused.sent == 0, refused.text
    assert "--overwrite delete" in refused.err.strip().splitlines()[-1]
    assert not {"CONFLICT", "ERROR"} & set(_prearchive_statuses(world.server.url))
    replaced = world.upload("--overwrite", "delete")
    assert replaced.code == 0, replaced.text
    _each_instance_once(world.server, discover(world.source))
    assert world.upload().sent == 0


def test_commit_only_rerun_whose_commit_fails_reports(world: World) -> None:
    """Item 6: one line, a --report written, --json "failed" with exit 1 (not "error")."""
    commit_fails_twice(world)
    report = world.tmp / "report.csv"
    again = world.upload("--json", "--report", str(report))
    assert again.code == 1, again.text
    doc = json.loads(again.out)
    assert doc["status"] == "failed" and doc["exit_code"] == 1
    assert any(e.startswith("the commit failed") for e in doc["errors"]), doc["errors"]
    assert report.exists()  # (its mode, 0600, is item 14: engineer errs)
    assert len(report.read_text().splitlines()) == 1 + len(discover(world.source).files)
    assert world.upload().code == 0


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_members_go_out_under_safe_unique_names(tmp_path: Path, kind: str) -> None:
    """Item 13 at the wire: the body xio streams for an archive PATH names each member
    ``{series}/{SOP Instance UID}.dcm`` (relative, no ``..``, unique), whatever names the
    archive gave (the local server stores by its own rule, so this is checked on the body)."""
    import io

    from xnatio.archive import instance_member_names
    from xnatio.transports.rest.bodies import ArchiveMembers

    exam = tmp_path / "exam"
    generate_session(exam, series=1, instances=4, image_size=(16, 16), seed=5)
    files = discover(exam).files
    names = ["../../a.dcm", "/abs/b.dcm", "same.dcm", "same.dcm"]
    archive = _pack(
        kind, tmp_path / f"x.{kind}", list(zip(names, [f.path for f in files], strict=True))
    )
    m = discover(archive)
    assert len(m.files) == 4
    body = b"".join(ArchiveMembers(archive, m.files, instance_member_names(m.files)))
    with tarfile.open(fileobj=io.BytesIO(body)) as tf:
        sent = {i.name: tf.extractfile(i).read() for i in tf}  # type: ignore[union-attr]
    assert set(sent) == {f"1/{f.sop_instance_uid}.dcm" for f in files}
    by_uid = {f.sop_instance_uid: f.path.read_bytes() for f in files}
    assert all(sent[f"1/{uid}.dcm"] == data for uid, data in by_uid.items())  # own bytes each


def test_one_session_is_locked_whatever_url_spelling_and_journal(world: World) -> None:
    """Item 15: a run holding P/S/E on ``localhost`` with its own journal keeps out a run on
    ``127.0.0.1`` with another journal (exit 2, one line), which then completes once it ends."""
    from xnatio.journal import Journal, Target

    port = world.server.url.rsplit(":", 1)[1]
    with Journal(world.tmp / "elsewhere" / "j.sqlite") as j:
        held = j.lock(Target.rest(f"http://localhost:{port}/", "P", "s", "E"))
        held.acquire()
        try:
            blocked = world.upload()
        finally:
            held.release()
    assert blocked.code == 2 and blocked.sent == 0
    assert "another xio run" in blocked.err and "--wait" in blocked.err
    assert world.upload().code == 0


# -- SIGKILL at the moments that matter, then the same command again ------------------------------

KILL_AT = {
    # (marker on the CLI's stderr after which it is killed, knobs that widen that moment)
    "while sending": ("upload: ", {"per_file_ms": 60}),
    "while committing": ("commit: committing", {"archive_ms": 1500}),
    "while reading back": ("verifying ", {"latency_ms": 400}),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_AT))
def test_sigkill_then_the_same_command_converges(world: World, moment: str) -> None:
    """The issue's adversarial run, as a table: ``kill -9`` at each moment, then the same
    command: exit 0, every instance once, no CONFLICT/ERROR entry, nothing sent twice."""
    import signal
    import subprocess

    from proc_helpers import reap
    from upload_helpers import xio_command, xio_env

    marker, knobs = KILL_AT[moment]
    if moment == "while sending":
        world.server.set_knobs(**knobs)
    args = ["upload-dicom", "P", "S", "E", str(world.source), "--journal", str(world.journal)]
    proc = subprocess.Popen(
        xio_command([*args, "--num-batches", "4", "--upload-workers", "2"]),
        env=xio_env(world.server.url, world.tmp / "home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if moment == "while committing" and line.startswith("upload: "):
                world.server.set_knobs(**knobs)
            if moment == "while reading back" and line.startswith("commit: archived"):
                world.server.set_knobs(**knobs)
            if line.startswith(marker):
                time.sleep(0.3)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(30)
    finally:
        reap(proc)
    assert proc.returncode == -signal.SIGKILL, f"ended before the moment ({proc.returncode})"
    world.server.set_knobs(per_file_ms=0, archive_ms=0, latency_ms=0)
    time.sleep(2.0)  # what was in flight when the client died ends on the server
    again = world.upload()
    assert again.code == 0, again.text
    _each_instance_once(world.server, discover(world.source))
    assert world.upload().sent == 0
