"""Bad input: every file gets an outcome with a one-line reason, nothing crashes, the rest lands.

Uploads go through the resumable REST path into the local XNAT server and are read back.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom.data
import pytest

from upload_helpers import PASSWORD, TEST_PROJECTS, USER, upload, xio_command, xio_env
from xnatio.discover import check_single_study, discover
from xnatio.errors import UsageError
from xnatio.models import Manifest, Outcome, Phase, ProgressEvent, UploadResult
from xnatio.report import exit_code_of
from xnatio.sandbox import SandboxServer
from xnatio.synth import generate_session


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}, projects=TEST_PROJECTS) as server:
        yield server


def accounted(manifest: Manifest, result: UploadResult) -> None:
    """Each discovered file and each skipped one has exactly one outcome, with a one-line
    reason unless it landed."""
    paths = [o.path for o in result.files]
    assert len(paths) == len(set(paths))
    expected = {str(f.path) for f in manifest.files}
    expected |= {str(s.path) for s in (*manifest.skipped, *manifest.duplicates)}
    assert set(paths) == expected
    for o in result.files:
        if o.outcome in (Outcome.SKIPPED, Outcome.FAILED):
            assert o.reason and "\n" not in o.reason and "Traceback" not in o.reason, o


def full_result(manifest: Manifest, result: UploadResult) -> UploadResult:
    from xnatio.report import account_for_skipped

    return account_for_skipped(result, manifest)


@pytest.mark.integration
def test_truncated_empty_and_side_files_are_skipped_the_rest_lands(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    root = tmp_path / "exam"
    generate_session(
        root,
        series=2,
        instances=3,
        image_size=(32, 32),
        extras=["dicomdir", "txt", "duplicate", "truncated"],
    )
    (root / "empty.dcm").write_bytes(b"")
    manifest = discover(root)
    result = full_result(manifest, upload(sandbox.url, root, tmp_path / "j.sqlite"))
    accounted(manifest, result)
    assert exit_code_of(result) == 0, result.errors
    by_name = {Path(o.path).name: o for o in result.files}
    assert by_name["empty.dcm"].outcome is Outcome.SKIPPED
    assert "empty" in by_name["empty.dcm"].reason
    assert by_name["truncated.dcm"].outcome is Outcome.SKIPPED
    assert "truncated" in by_name["truncated.dcm"].reason
    assert sum(o.outcome is Outcome.VERIFIED for o in result.files) == 6


@pytest.mark.integration
@pytest.mark.slow
def test_pydicom_bundled_test_files(sandbox: SandboxServer, tmp_path: Path) -> None:
    """pydicom's own collection of odd files (big endian, deflated, compressed, no meta, broken
    ones, many studies): discovery and the server sort them, every one gets an outcome."""
    root = tmp_path / "pydicom"
    root.mkdir()
    for i, src in enumerate(sorted(pydicom.data.get_testdata_files())):
        if Path(src).is_file():
            shutil.copy(src, root / f"{i:03d}_{Path(src).name}")
    manifest = discover(root)
    assert len(manifest.files) > 50
    # They hold many studies: refused by default, in one sentence (section 7 of the facts).
    with pytest.raises(UsageError) as err:
        check_single_study(manifest, allow_multiple=False)
    assert "\n" not in str(err.value)
    # Forced into one session anyway: every file still ends with an outcome and a reason.
    result = full_result(
        manifest, upload(sandbox.url, root, tmp_path / "j.sqlite", overwrite="append", batches=8)
    )
    accounted(manifest, result)
    assert any(o.outcome is Outcome.VERIFIED for o in result.files)
    assert exit_code_of(result) == 1  # what did not land in P/S/E is reported failed


@pytest.mark.integration
def test_deep_tree_and_symlink_loop(sandbox: SandboxServer, tmp_path: Path) -> None:
    root = tmp_path / "exam"
    session = generate_session(root, series=1, instances=3, image_size=(32, 32))
    deep = root
    for _ in range(120):
        deep = deep / "d"
    deep.mkdir(parents=True)
    first = next(iter(session.instances.values()))
    first.rename(deep / first.name)
    os.symlink("..", root / "S001" / "loop")  # a loop back up the tree
    manifest = discover(root)
    assert len(manifest.files) == 3
    result = full_result(manifest, upload(sandbox.url, root, tmp_path / "j.sqlite"))
    accounted(manifest, result)
    assert exit_code_of(result) == 0, result.errors
    assert {o.outcome for o in result.files if o.sop_instance_uid} == {Outcome.VERIFIED}


@pytest.mark.integration
def test_files_that_vanish_or_grow_during_the_upload(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    root = tmp_path / "exam"
    generate_session(root, series=3, instances=4, image_size=(32, 32), seed=3)
    manifest = discover(root)
    last = [f.path for f in manifest.files if f.series_number == 3]
    vanished, grown = last[0], last[1]
    # Batches go one at a time (workers=1), and the server takes 1 s over the first one (4
    # files at 250 ms): the last series is not even prepared until the first batch is answered.
    sandbox.set_knobs(per_file_ms=250)
    meddled: list[bool] = []

    def meddle(event: ProgressEvent) -> None:
        # While the first batch is going out, change two files of the last series: in the
        # sending thread, so it is done before that batch can be answered.
        if event.phase is Phase.UPLOAD and event.bytes_done > 0 and not meddled:
            meddled.append(True)
            vanished.unlink()
            with grown.open("ab") as fh:
                fh.write(b"\0" * 64)

    result = upload(sandbox.url, root, tmp_path / "j.sqlite", batches=3, progress_callback=meddle)
    assert meddled
    accounted(manifest, full_result(manifest, result))
    by_path = {o.path: o for o in result.files}
    assert by_path[str(vanished)].outcome is Outcome.FAILED
    assert by_path[str(grown)].outcome is Outcome.FAILED
    for p in (vanished, grown):
        reason = by_path[str(p)].reason
        assert reason and "\n" not in reason
    assert exit_code_of(result) == 1
    assert sum(o.outcome is Outcome.VERIFIED for o in result.files) == len(manifest.files) - 2


@pytest.mark.slow
def test_one_hundred_thousand_tiny_files(tmp_path: Path) -> None:
    """Discovery of 100,000 tiny non-DICOM files next to a small session: each is accounted
    for with a reason, memory and time stay reasonable (no assertion on time)."""
    root = tmp_path / "many"
    generate_session(root / "exam", series=1, instances=3, image_size=(32, 32))
    for d in range(100):
        folder = root / f"junk{d:03d}"
        folder.mkdir()
        first = folder / "0.txt"
        first.write_bytes(b"x")
        for i in range(1, 1000):
            # Hard links: 100,000 paths for discovery at a fraction of the cost of creating them.
            os.link(first, folder / f"{i}.txt")
    manifest = discover(root)
    assert len(manifest.files) == 3
    assert len(manifest.skipped) == 100_000
    assert {s.reason for s in manifest.skipped} == {"not a DICOM file (too short)"}


SETPRIV = shutil.which("setpriv")


@pytest.mark.integration
@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv (util-linux) to drop root's DAC bypass")
def test_permission_denied_files_and_folders(sandbox: SandboxServer, tmp_path: Path) -> None:
    """The command runs without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (tests run as root, who
    would read anything): an unreadable file and an unreadable folder are reported, each with
    its reason, and everything else lands."""
    root = tmp_path / "exam"
    session = generate_session(root, series=2, instances=3, image_size=(32, 32))
    locked_dir = root / "locked"
    locked_dir.mkdir()
    paths = list(session.instances.values())
    shutil.move(paths[0], locked_dir / paths[0].name)
    paths[1].chmod(0)
    locked_dir.chmod(0)
    report = tmp_path / "report.csv"
    home = tmp_path / "home"
    try:
        env = xio_env(sandbox.url, home)
        args = ["upload-dicom", "P", "S", "E", str(root), "--report", str(report)]
        assert SETPRIV is not None
        done = subprocess.run(
            [SETPRIV, "--bounding-set=-dac_override,-dac_read_search", *xio_command(args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        locked_dir.chmod(0o755)
        paths[1].chmod(0o644)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = {r["path"]: r for r in csv.DictReader(report.read_text().splitlines())}
    assert rows[str(locked_dir)]["outcome"] == "skipped"
    assert "permission denied" in rows[str(locked_dir)]["reason"]
    assert rows[str(paths[1])]["outcome"] == "skipped"
    assert "permission denied" in rows[str(paths[1])]["reason"]
    assert sum(r["outcome"] == "verified" for r in rows.values()) == 4
