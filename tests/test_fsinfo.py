"""Which file system holds the resume journal, and the journal mode chosen for it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from xnatio import journal as journal_module
from xnatio.fsinfo import filesystem_type, is_network_filesystem, under_scheduler
from xnatio.journal import Journal


def _mountinfo_for(path: Path, fstype: str) -> str:
    dev = os.stat(path).st_dev
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    return (
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"40 27 {majmin} / /home rw,relatime shared:1 - {fstype} server:/export rw,vers=4.2\n"
        "41 27 0:99 / /elsewhere rw - ext4 /dev/sdz rw\n"
    )


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="needs util-linux findmnt")
def test_the_type_is_the_kernels(tmp_path: Path) -> None:
    expected = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert filesystem_type(tmp_path) == expected
    # A journal not created yet: its nearest existing folder says
    assert filesystem_type(tmp_path / "state" / "xnatio" / "journal.sqlite") == expected


def test_the_mount_is_found_by_device_not_by_prefix(tmp_path: Path) -> None:
    assert filesystem_type(tmp_path, _mountinfo_for(tmp_path, "nfs4")) == "nfs4"
    assert filesystem_type(tmp_path, "41 27 0:99 / / rw - ext4 /dev/sdz rw\n") == ""


@pytest.mark.parametrize(
    ("fstype", "network"),
    [
        ("nfs4", True),
        ("nfs", True),
        ("lustre", True),
        ("gpfs", True),
        ("ceph", True),
        ("cifs", True),
        ("fuse.sshfs", True),
        ("ext4", False),
        ("xfs", False),
        ("tmpfs", False),
        ("overlay", False),
        ("", False),
    ],
)
def test_network_file_systems(fstype: str, network: bool) -> None:
    assert is_network_filesystem(fstype) is network


def test_a_scheduler_task_is_recognised() -> None:
    assert under_scheduler({"SLURM_JOB_ID": "12"}) == "SLURM_JOB_ID"
    assert under_scheduler({"JOB_COMPLETION_INDEX": "3"}) == "JOB_COMPLETION_INDEX"
    assert under_scheduler({"HOME": "/root"}) == ""


def _mode(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:  # a Connection's own with: no close
        return str(db.execute("PRAGMA journal_mode").fetchone()[0])


def test_a_journal_on_local_disk_uses_wal(tmp_path: Path) -> None:
    Journal(tmp_path / "j.sqlite").close()
    assert _mode(tmp_path / "j.sqlite") == "wal"


def test_a_journal_on_a_network_file_system_uses_rollback_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """WAL's shared-memory index does not work between machines (sqlite.org/wal.html)."""
    monkeypatch.setattr(journal_module, "filesystem_type", lambda path: "nfs4")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with caplog.at_level(logging.WARNING):
        Journal(tmp_path / "j.sqlite").close()
    assert _mode(tmp_path / "j.sqlite") == "delete"
    assert not caplog.records  # one workstation with an NFS home: nothing to warn about
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with caplog.at_level(logging.WARNING):
        Journal(tmp_path / "j2.sqlite").close()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "network file system (nfs4)" in warning
    assert "XNATIO_JOURNAL=$TMPDIR/xnatio-journal.sqlite" in warning
