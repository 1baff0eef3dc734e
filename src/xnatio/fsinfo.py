"""Which file system a path lives on, and whether it is shared over the network.

The resume journal is an SQLite file. SQLite's WAL mode keeps its index in shared memory, which
only works when every process using the file runs on one machine; on NFS, Lustre, GPFS, CephFS,
SMB or a FUSE mount the journal is kept in rollback mode instead, and a run started by a
scheduler (where several nodes may share one home folder) says how to give each node its own.

Linux only: the file system is found in ``/proc/self/mountinfo`` by the path's device number,
which is right for bind mounts and nested mounts alike. Elsewhere nothing is known (``""``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

# File system types whose files are shared between machines (as /proc/self/mountinfo names them).
_NETWORK_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "ceph",
        "beegfs",
        "glusterfs",
        "9p",
        "afs",
        "panfs",
        "wekafs",
        "orangefs",
        "pvfs2",
    }
)

# Environment variables a scheduler sets in every task it starts (Slurm; a Kubernetes indexed Job).
_SCHEDULER_ENV = ("SLURM_JOB_ID", "JOB_COMPLETION_INDEX", "PBS_JOBID", "LSB_JOBID", "SGE_TASK_ID")


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system holding ``path`` (or its nearest existing parent), e.g.
    ``ext4``, ``nfs4``, ``fuse.sshfs``; ``""`` when it cannot be told."""
    probe = path
    while True:
        try:
            dev = os.stat(probe).st_dev
            break
        except OSError:
            if probe.parent == probe:
                return ""
            probe = probe.parent
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    found = ""
    for line in mountinfo.splitlines():
        # "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
        fields, sep, rest = line.partition(" - ")
        parts = fields.split()
        if not sep or len(parts) < 5 or parts[2] != wanted:
            continue
        found = rest.split()[0] if rest.split() else ""  # the last mount of a device wins
    return found


def is_network_filesystem(fstype: str) -> bool:
    """True for a file system shared between machines (NFS, Lustre, GPFS, CephFS, SMB, FUSE)."""
    return fstype in _NETWORK_TYPES or fstype.startswith(("fuse.", "nfs"))


def under_scheduler(environ: Mapping[str, str] | None = None) -> str:
    """The scheduler variable that says this process is a batch task (``""`` if none)."""
    env = os.environ if environ is None else environ
    return next((name for name in _SCHEDULER_ENV if env.get(name)), "")
