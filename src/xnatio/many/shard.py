"""Static sharding of an upload-many plan: ``--shard I/N``, ``--shard auto``, ``--shard auto/N``.

Each of N runs (a Slurm array task, a Kubernetes Indexed Job pod, a host of a shell loop) takes
the I-th of N disjoint parts of the same plan, with no coordination service:

* **By StudyInstanceUID only.** A study's shard is a pure function of its StudyInstanceUID and N
  (:func:`shard_of`), nothing else: not the order files are listed in, not the other studies of
  the plan, not the study's size. So every node agrees on the partition even when their views of
  the plan differ (a node that scanned the tree a minute later sees one more study, or a study
  with more files): a study can never be owned by two shards (sent twice) or by none.
* **Stable when the plan grows.** A new study lands in its own shard and moves no old one; a
  study whose files grow stays where it was. A requeued array task therefore redoes exactly its
  own unfinished studies.
* **Balanced by bytes as far as that allows.** Jump consistent hashing (Lamping & Veach, 2014)
  spreads studies uniformly; the bytes per shard then differ only by the spread of study sizes
  (measured in ``docs/scale-out.md``). A rule that balanced bytes exactly (bounded-load hashing,
  greedy bin packing) would make a study's shard depend on the other studies, and so break the
  two guarantees above; over-decomposing (more array tasks than slots, ``--array=0-99%8``) lets
  the scheduler even out the rest.

Jump hashing rather than rendezvous (HRW) hashing: both give a uid-only, growth-stable partition
into numbered buckets (array indices are exactly that) and move ~1/N of the studies when N
changes by one; jump hashing costs O(log N) per study instead of O(N), which matters for a
1,000-task array over a plan of 100,000 studies (every task hashes the whole plan).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from xnatio.errors import UsageError

_SPEC_HELP = "--shard takes I/N (0-based, e.g. 0/4), auto or auto/N"
_MASK64 = (1 << 64) - 1


class ShardItem(Protocol):
    """What sharding needs of a study: its StudyInstanceUID and its size in bytes."""

    @property
    def study_uid(self) -> str: ...

    @property
    def bytes(self) -> int: ...


Item = TypeVar("Item", bound=ShardItem)


@dataclass(frozen=True)
class Shard:
    """The ``index``-th (0-based) of ``count`` parts; ``source`` says where the numbers came from
    (``"--shard 1/4"``, ``"SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_COUNT=4"``…)."""

    index: int
    count: int
    source: str = ""

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(
                f"shard {self.index}/{self.count} does not exist: the index must be 0 to "
                f"count-1 ({_SPEC_HELP})"
            )

    @property
    def label(self) -> str:
        """``"1of4"``: names the shard's run lock and its rows in the ledger."""
        return f"{self.index}of{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, study_uid: str) -> bool:
        return shard_of(study_uid, self.count) == self.index


def _key(study_uid: str) -> int:
    """64 bits of SHA-256 of the UID: the same on every machine and Python (no hash seed)."""
    return int.from_bytes(hashlib.sha256(study_uid.encode("utf-8")).digest()[:8], "big")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach, arXiv:1406.2294): a bucket in ``[0, buckets)``.

    Growing ``buckets`` from N to N+1 moves exactly the keys that go to the new bucket N
    (~1/(N+1) of them); no key moves between old buckets.
    """
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    b, j = -1, 0
    key &= _MASK64
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_of(study_uid: str, count: int) -> int:
    """The shard (0-based, of ``count``) that owns the study with this StudyInstanceUID."""
    return jump_hash(_key(study_uid.strip()), count)


def select(studies: Iterable[Item], shard: Shard | None) -> list[Item]:
    """This shard's studies, in the order given; every study when ``shard`` is None."""
    if shard is None:
        return list(studies)
    return [s for s in studies if shard_of(s.study_uid, shard.count) == shard.index]


def imbalance(studies: Sequence[ShardItem], count: int) -> float:
    """Bytes of the largest shard over the mean bytes per shard (1.0 = perfectly even)."""
    totals = [0] * count
    for s in studies:
        totals[shard_of(s.study_uid, count)] += s.bytes
    mean = sum(totals) / count
    return max(totals) / mean if mean else 1.0


# -- the --shard option ------------------------------------------------------------------------
_FIXED = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_AUTO = re.compile(r"^\s*auto\s*(?:/\s*(\d+)\s*)?$", re.IGNORECASE)


def is_shard_spec(spec: str) -> bool:
    """Whether ``spec`` asks for a shard (``I/N``, ``auto``, ``auto/N``; :func:`parse_shard` may
    still refuse it). ``ManyOptions.shard`` also takes any other name, which then only names the
    run lock (one study per task: ``shard=study_uid``) and filters nothing."""
    return bool(_FIXED.match(spec) or _AUTO.match(spec))


def parse_shard(spec: str, environ: Mapping[str, str]) -> Shard:
    """``I/N`` (0-based), or ``auto``/``auto/N`` from the scheduler's variables in ``environ``.

    ``auto`` reads a Slurm job array (``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT``, or
    ``SLURM_ARRAY_TASK_MIN``/``_MAX``/``_STEP``: ``--array=1-8`` and ``--array=0-14:2`` are
    numbered from their first index) or a Kubernetes Indexed Job (``JOB_COMPLETION_INDEX``,
    whose count Kubernetes does not expose: ``auto/N`` with N = the Job's ``completions``).
    With ``auto/N`` under Slurm, N must agree with the array's size. Anything else raises a
    one-line :class:`UsageError` (exit 2) that names what is missing.
    """
    fixed = _FIXED.match(spec)
    if fixed:
        index, count = int(fixed.group(1)), int(fixed.group(2))
        return Shard(index, count, f"--shard {index}/{count}")
    auto = _AUTO.match(spec)
    if not auto:
        raise UsageError(f"--shard {spec!r} not understood: {_SPEC_HELP}")
    given = int(auto.group(1)) if auto.group(1) is not None else None
    if given is not None and given < 1:
        raise UsageError(f"--shard auto/{given}: the count must be >= 1")
    if environ.get("SLURM_ARRAY_TASK_ID", "").strip():
        return _from_slurm(environ, given)
    if environ.get("JOB_COMPLETION_INDEX", "").strip():
        return _from_kubernetes(environ, given)
    job = (
        " (this Slurm job is not an array: submit it with sbatch --array=0-N)"
        if (environ.get("SLURM_JOB_ID", "").strip())
        else ""
    )
    raise UsageError(
        f"--shard {spec.strip()}: neither SLURM_ARRAY_TASK_ID (a Slurm job array) nor "
        f"JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) is set{job}; give --shard I/N"
    )


def _int_var(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise UsageError(f"--shard auto: {name}={raw!r} is not a non-negative integer")
    return int(raw)


def _from_slurm(environ: Mapping[str, str], given: int | None) -> Shard:
    task = _int_var(environ, "SLURM_ARRAY_TASK_ID")
    assert task is not None
    count = _int_var(environ, "SLURM_ARRAY_TASK_COUNT")
    low = _int_var(environ, "SLURM_ARRAY_TASK_MIN")
    high = _int_var(environ, "SLURM_ARRAY_TASK_MAX")
    step = _int_var(environ, "SLURM_ARRAY_TASK_STEP") or 1
    names = "SLURM_ARRAY_TASK_ID"
    if low is not None and high is not None:
        if (task - low) % step or not low <= task <= high:
            raise UsageError(
                f"--shard auto: SLURM_ARRAY_TASK_ID={task} is not on the array's range "
                f"{low}-{high}:{step}"
            )
        index, span = (task - low) // step, (high - low) // step + 1
        if count is not None and count != span:
            raise UsageError(
                f"--shard auto: the array's indices are not one range ({count} tasks numbered "
                f"{low} to {high}); submit with --array=0-{count - 1} or give --shard I/N"
            )
        count = span
        names += ", SLURM_ARRAY_TASK_MIN/MAX"
    elif count is not None:
        index = task
        names += ", SLURM_ARRAY_TASK_COUNT"
    elif given is not None:
        index, count = task, given
    else:
        raise UsageError(
            "--shard auto: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor "
            "SLURM_ARRAY_TASK_MIN/MAX: give the count with --shard auto/N"
        )
    if given is not None and given != count:
        raise UsageError(
            f"--shard auto/{given}: the Slurm array has {count} tasks; use --shard auto "
            f"(or auto/{count})"
        )
    if index >= count:
        raise UsageError(
            f"--shard auto: SLURM_ARRAY_TASK_ID={task} is outside an array of {count} tasks; "
            f"number the array from 0 (--array=0-{count - 1})"
        )
    return Shard(index, count, f"{names} (task {index} of {count})")


def _from_kubernetes(environ: Mapping[str, str], given: int | None) -> Shard:
    index = _int_var(environ, "JOB_COMPLETION_INDEX")
    assert index is not None
    if given is None:
        raise UsageError(
            f"--shard auto: JOB_COMPLETION_INDEX={index} (a Kubernetes Indexed Job), but "
            "Kubernetes does not expose the number of completions: use --shard auto/N with "
            "N = the Job's spec.completions"
        )
    if index >= given:
        raise UsageError(
            f"--shard auto/{given}: JOB_COMPLETION_INDEX={index} is not below {given}; N must "
            "be the Job's spec.completions"
        )
    return Shard(index, given, f"JOB_COMPLETION_INDEX (index {index} of {given})")


__all__ = [
    "Shard",
    "ShardItem",
    "imbalance",
    "is_shard_spec",
    "jump_hash",
    "parse_shard",
    "select",
    "shard_of",
]
