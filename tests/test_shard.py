"""Static sharding (xnatio.many.shard): the partition's properties and the --shard option."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnatio.errors import EXIT_USAGE, UsageError
from xnatio.many.shard import Shard, imbalance, jump_hash, parse_shard, select, shard_of


@dataclass(frozen=True)
class Study:
    study_uid: str
    bytes: int = 1


uids = st.lists(
    st.from_regex(r"1\.2\.[1-9][0-9]{0,8}(\.[1-9][0-9]{0,6}){1,6}", fullmatch=True),
    unique=True,
    max_size=60,
)
counts = st.integers(min_value=1, max_value=40)


@given(uids, counts)
def test_shards_partition_the_plan(plan: list[str], count: int) -> None:
    """Every study is in exactly one shard: disjoint and covering."""
    studies = [Study(u) for u in plan]
    parts = [select(studies, Shard(i, count)) for i in range(count)]
    seen = [s.study_uid for part in parts for s in part]
    assert sorted(seen) == sorted(plan)  # covering, and no study twice
    for i, part in enumerate(parts):
        assert all(shard_of(s.study_uid, count) == i for s in part)


@given(uids, counts, st.randoms(use_true_random=False))
def test_partition_does_not_depend_on_order_or_sizes(
    plan: list[str], count: int, rnd: random.Random
) -> None:
    """The same on every node: listing order and study sizes change nothing."""
    studies = [Study(u, rnd.randint(0, 10**9)) for u in plan]
    shuffled = [Study(s.study_uid, rnd.randint(0, 10**9)) for s in studies]
    rnd.shuffle(shuffled)
    for i in range(count):
        a = {s.study_uid for s in select(studies, Shard(i, count))}
        b = {s.study_uid for s in select(shuffled, Shard(i, count))}
        assert a == b


@given(uids, uids, counts)
def test_new_studies_do_not_move_old_ones(old: list[str], new: list[str], count: int) -> None:
    grown = [Study(u) for u in old + [u for u in new if u not in old]]
    for i in range(count):
        before = {s.study_uid for s in select([Study(u) for u in old], Shard(i, count))}
        after = {s.study_uid for s in select(grown, Shard(i, count))}
        assert before <= after


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=500))
def test_growing_the_array_moves_keys_only_to_the_new_shard(key: int, n: int) -> None:
    a, b = jump_hash(key, n), jump_hash(key, n + 1)
    assert 0 <= a < n
    assert b in (a, n)


PINNED_JUMP = [6, 6, 8, 5, 9]
PINNED_UIDS = [5, 1, 5]


def test_known_assignments_never_change() -> None:
    """Pinned values: a change of hash would silently re-partition every site's running plan."""
    assert jump_hash(0, 1) == 0
    assert [jump_hash(k, 10) for k in (1, 2, 3, 2**63, 2**64 - 1)] == PINNED_JUMP
    assert [shard_of(u, 8) for u in ("1.2.3", "1.2.840.113619.2.55.3", " 1.2.3 ")] == PINNED_UIDS


def test_balance_on_a_large_plan() -> None:
    """2,000 studies of log-normal size over 8 shards: the largest shard within 15 % of the mean
    (docs/scale-out.md has the measurement over more shapes)."""
    rnd = random.Random(15)
    studies = [
        Study(f"1.2.826.0.1.3680043.{rnd.randrange(10**12)}", int(rnd.lognormvariate(18, 0.8)))
        for _ in range(2000)
    ]
    assert imbalance(studies, 8) < 1.15
    sizes = [len(select(studies, Shard(i, 8))) for i in range(8)]
    assert max(sizes) - min(sizes) < 120


# -- the --shard option ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "env", "expected"),
    [
        ("0/4", {}, (0, 4)),
        (" 3 / 4 ", {"SLURM_ARRAY_TASK_ID": "0"}, (3, 4)),  # explicit wins over the scheduler
        ("auto", {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
        (
            "auto",
            {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"},
            (4, 8),
        ),
        (
            "auto",
            {
                "SLURM_ARRAY_TASK_ID": "6",
                "SLURM_ARRAY_TASK_COUNT": "8",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "14",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            (3, 8),
        ),
        (
            "AUTO/1000",
            {
                "SLURM_ARRAY_TASK_ID": "999",
                "SLURM_ARRAY_TASK_COUNT": "1000",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "999",
            },
            (999, 1000),
        ),
        ("auto/5", {"JOB_COMPLETION_INDEX": "4"}, (4, 5)),
        ("auto/3", {"SLURM_ARRAY_TASK_ID": "1"}, (1, 3)),
    ],
)
def test_parse_shard(spec: str, env: dict[str, str], expected: tuple[int, int]) -> None:
    shard = parse_shard(spec, env)
    assert (shard.index, shard.count) == expected
    assert shard.source


@pytest.mark.parametrize(
    ("spec", "env", "names"),
    [
        ("auto", {}, "SLURM_ARRAY_TASK_ID"),
        ("auto", {"SLURM_JOB_ID": "7"}, "--array"),
        ("auto", {"JOB_COMPLETION_INDEX": "2"}, "auto/N"),
        ("auto/2", {"JOB_COMPLETION_INDEX": "2"}, "completions"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "1"}, "auto/N"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "integer"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, "--array=0-3"),
        (
            "auto",  # --array=0,3,7: not one range
            {
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_MAX": "7",
            },
            "not one range",
        ),
        (
            "auto/3",
            {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"},
            "has 4 tasks",
        ),
        ("4/4", {}, "0 to count-1"),
        ("1/0", {}, "0 to count-1"),
        ("auto/0", {"JOB_COMPLETION_INDEX": "0"}, ">= 1"),
        ("half", {}, "I/N"),
        ("-1/4", {}, "I/N"),
    ],
)
def test_bad_shard_is_one_usage_line(spec: str, env: dict[str, str], names: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_shard(spec, env)
    message = str(info.value)
    assert names in message
    assert "\n" not in message
    assert info.value.exit_code == EXIT_USAGE


@settings(max_examples=50)
@given(st.integers(min_value=1, max_value=1001), st.data())
def test_every_slurm_array_task_gets_a_distinct_shard(count: int, data: st.DataObject) -> None:
    low = data.draw(st.integers(min_value=0, max_value=5))
    step = data.draw(st.integers(min_value=1, max_value=3))
    high = low + (count - 1) * step
    seen = set()
    for task in range(low, high + 1, step):
        env = {
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_COUNT": str(count),
            "SLURM_ARRAY_TASK_MIN": str(low),
            "SLURM_ARRAY_TASK_MAX": str(high),
            "SLURM_ARRAY_TASK_STEP": str(step),
        }
        shard = parse_shard("auto", env)
        assert shard.count == count
        seen.add(shard.index)
    assert seen == set(range(count))


def test_cli_bad_shard_exits_2_with_one_line(tmp_path: Path) -> None:
    """`--shard auto` outside any scheduler: exit 2, one line naming what is missing, before the
    tree is scanned or the server asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION"))}
    env["HOME"] = str(tmp_path)
    xio = [sys.executable, "-m", "xnatio", "upload-many", str(tmp_path), "--project", "P"]
    for spec, says in (("auto", "SLURM_ARRAY_TASK_ID"), ("5/4", "0 to count-1")):
        out = subprocess.run(
            [*xio, "--shard", spec, "--server", "http://127.0.0.1:9", "--user", "u"],
            env={**env, "XNAT_PASSWORD": "pw"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == EXIT_USAGE, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], out.stderr
        assert "Traceback" not in out.stderr


def test_runner_filters_by_shard_and_keeps_lock_names() -> None:
    """ManyOptions.shard: "I/N" filters the plan (the runner's one filter); "all" or any other
    name (one study per task: shard=study_uid) only names the run lock and filters nothing."""
    from xnatio.many.runner import ManyOptions, StudyJob, my_studies
    from xnatio.many.shard import is_shard_spec

    jobs = [
        StudyJob(study_uid=f"1.2.3.{i}", project="P", subject="S", session=f"E{i}", manifests=())
        for i in range(40)
    ]
    parts = [my_studies(jobs, ManyOptions(shard=f"{i}/4")) for i in range(4)]
    assert sorted(j.study_uid for p in parts for j in p) == sorted(j.study_uid for j in jobs)
    assert all(parts)
    for name in ("all", "1.2.840.99", "nightly"):
        assert not is_shard_spec(name)
        assert my_studies(jobs, ManyOptions(shard=name)) == jobs
    assert is_shard_spec("auto") and is_shard_spec("auto/3") and is_shard_spec("2/8")


XIO_MANY = (sys.executable, "-m", "xnatio", "upload-many")


def test_dry_run_with_a_shard_lists_only_its_studies(tmp_path: Path) -> None:
    from xnatio.synth import generate_session

    root = tmp_path / "outbox"
    for i in range(8):
        generate_session(
            root / f"s{i}", series=1, instances=1, patient_id=f"P{i}", seed=i, image_size=(8, 8)
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XNAT_", "SLURM_"))}
    env["HOME"] = str(tmp_path)
    seen: list[set[str]] = []
    for spec in ("0/3", "1/3", "2/3"):
        out = subprocess.run(
            [*XIO_MANY, str(root), "--project", "P", "--dry-run", "--json", "--shard", spec],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        uids = {r["study_uid"] for r in rows if "study_uid" in r}
        shard = parse_shard(spec, {})
        assert all(shard.owns(u) for u in uids)
        seen.append(uids)
    assert sum(len(s) for s in seen) == 8 and len(set().union(*seen)) == 8
