"""Planning: every file in exactly one batch, series kept together, bytes balanced, stable."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from xnatio.discover import discover
from xnatio.models import DicomFile, Manifest, SkippedFile
from xnatio.plan import describe_plan, human_bytes, plan_batches
from xnatio.synth import generate_session

MB = 2**20


def _manifest(series_sizes: list[list[int]], *, studies: int = 1) -> Manifest:
    m = Manifest(root=Path("/data"))
    for s, sizes in enumerate(series_sizes, 1):
        for i, size in enumerate(sizes):
            m.files.append(
                DicomFile(
                    path=Path(f"/data/S{s:03d}/{i:05d}"),
                    size=size,
                    mtime_ns=0,
                    study_uid=f"1.2.{s % studies}",
                    series_uid=f"1.2.3.{s}",
                    sop_instance_uid=f"1.2.3.{s}.{i}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                    series_number=s,
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    patient_id="P",
                )
            )
    return m


def _check_partition(m: Manifest, batches: list, num: int) -> None:
    sent = [f.sop_instance_uid for b in batches for f in b.files]
    assert sorted(sent) == sorted(f.sop_instance_uid for f in m.files)  # each exactly once
    assert len(batches) <= max(1, num)
    assert [b.index for b in batches] == list(range(len(batches)))
    assert all(b.files for b in batches)


def test_small_uploads_are_one_batch() -> None:
    few = _manifest([[MB // 2] * 60, [MB // 2] * 40])  # 100 files, 50 MB
    assert len(plan_batches(few, 42)) == 1
    assert plan_batches(Manifest(root=Path("/x")), 42) == []
    assert len(plan_batches(_manifest([[MB] * 300]), 1)) == 1


def test_the_single_request_rule_counts_files_not_bytes() -> None:
    """Issue 16 item 5: 500 files of 1 KB went as one request because they were under 100 MiB,
    paying the server's per-file time in series (1,200 files at 20 ms each: 7.3 s). Above 100
    files the upload is cut into batches whatever its bytes; 100 files of 2 MB too."""
    small_files = _manifest([[1000] * 250, [1000] * 250])  # 500 files, 0.5 MB
    batches = plan_batches(small_files, 42)
    _check_partition(small_files, batches, 42)
    assert len(batches) == 42
    assert len(plan_batches(_manifest([[1000] * 101]), 42)) == 42
    assert len(plan_batches(_manifest([[1000] * 100]), 42)) == 1
    big_files = _manifest([[2 * MB] * 100])  # 100 files but 200 MB
    assert len(plan_batches(big_files, 42)) == 42
    # Deterministic (resume re-plans what is left and must find the same batches).
    again = plan_batches(small_files, 42)
    assert [[f.path for f in b.files] for b in again] == [
        [f.path for f in b.files] for b in batches
    ]


def test_series_kept_together_and_large_ones_split() -> None:
    # 10 series of 100 x 1 MB and one of 2,000 x 1 MB: fair share with 10 batches is 300 MB.
    m = _manifest([[MB] * 100] * 10 + [[MB] * 2000])
    batches = plan_batches(m, 10)
    _check_partition(m, batches, 10)
    assert len(batches) == 10
    holders: dict[str, set[int]] = {}
    for b in batches:
        for f in b.files:
            holders.setdefault(f.series_uid, set()).add(b.index)
    small = [uid for uid in holders if uid != "1.2.3.11"]
    assert all(len(holders[uid]) == 1 for uid in small)  # small series never split
    assert len(holders["1.2.3.11"]) >= 7  # the large one is spread out
    loads = [b.total_bytes for b in batches]
    assert max(loads) <= 1.34 * (sum(loads) / len(loads))


def test_random_manifests_partition_and_balance() -> None:
    rng = random.Random(1234)
    for _ in range(60):
        series = [
            [rng.randint(1, 4 * MB) for _ in range(rng.randint(1, 400))]
            for _ in range(rng.randint(1, 30))
        ]
        m = _manifest(series, studies=rng.randint(1, 3))
        num = rng.randint(1, 64)
        batches = plan_batches(m, num)
        _check_partition(m, batches, num)
        assert batches == plan_batches(m, num)  # deterministic
        if len(batches) > 1:
            loads = [b.total_bytes for b in batches]
            fair = sum(loads) / num
            largest = max(f.size for f in m.files)
            # Within 10 % of even, or even to within one file when cut in order.
            assert max(loads) <= max(1.1 * fair, fair + largest) + 1


def test_plan_of_a_real_discovery_and_dry_run_text(tmp_path: Path) -> None:
    s = generate_session(
        tmp_path / "s", series=3, instances=50, image_size=(64, 64), extras=("txt", "duplicate")
    )
    m = discover(s.root)
    batches = plan_batches(m, 4, single_max_files=10, single_max_bytes=1000)
    _check_partition(m, batches, 4)
    text = describe_plan(m, batches)
    assert f"Plan for {s.root}: 150 DICOM files" in text
    assert "1 duplicate and 1 other file not sent." in text
    assert s.study_uid in text and "patient SYNTH001" in text
    assert "Series (3):" in text and f"Batches ({len(batches)}):" in text
    assert "notes.txt: not a DICOM file" in text
    assert "copy of first instance: duplicate of" in text


def test_long_skip_lists_are_summarised() -> None:
    m = _manifest([[MB] * 3])
    m.skipped = [SkippedFile(Path(f"/data/n{i}.txt"), "not a DICOM file") for i in range(120)]
    text = describe_plan(m, plan_batches(m, 4))
    assert "... and 70 more (70 x not a DICOM file)" in text
    assert text.count(".txt: not a DICOM file") == 50


@pytest.mark.parametrize(
    "n,text", [(0, "0 B"), (999, "999 B"), (1500, "1.5 KB"), (2_500_000_000, "2.5 GB")]
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


# -- the O(n) planner gives the batches the per-file planner gave (issue 16) ----------------------


def _reference_plan(m: Manifest, num_batches: int) -> list[list[str]]:
    """The planner as it was before it worked on index ranges (file by file, O(n) per plan
    tried), kept here as the oracle: same rules, written the obvious way."""
    import heapq
    import math

    files = m.files
    total = sum(f.size for f in files)
    if num_batches <= 1 or (len(files) <= 100 and total <= 100 * 2**20):
        return [[f.sop_instance_uid for f in files]]
    num_batches = min(num_batches, len(files))
    fair = max(1, math.ceil(total / num_batches))
    groups: dict[tuple[str, int, str], list[DicomFile]] = {}
    for f in files:
        number = f.series_number if f.series_number is not None else 2**31
        groups.setdefault((f.study_uid, number, f.series_uid), []).append(f)
    series = [groups[k] for k in sorted(groups)]

    def split(group: list[DicomFile], limit: int) -> list[list[DicomFile]]:
        size = sum(f.size for f in group)
        pieces = min(len(group), math.ceil(size / limit)) if limit > 0 else 1
        if pieces <= 1:
            return [group]
        out: list[list[DicomFile]] = []
        current: list[DicomFile] = []
        running = 0
        for f in group:
            current.append(f)
            running += f.size
            if len(out) < pieces - 1 and running >= size / pieces * (len(out) + 1):
                out.append(current)
                current = []
        return out + ([current] if current else [])

    def pack(piece: int) -> list[list[list[DicomFile]]]:
        chunks = []
        for group in series:
            size = sum(f.size for f in group)
            for chunk in split(group, piece if size > fair else size):
                chunks.append((sum(f.size for f in chunk), len(chunks), chunk))
        chunks.sort(key=lambda c: (-c[0], c[1]))
        heap = [(0, i) for i in range(num_batches)]
        contents: list[list[tuple[int, list[DicomFile]]]] = [[] for _ in range(num_batches)]
        for size, order, chunk in chunks:
            load, slot = heapq.heappop(heap)
            contents[slot].append((order, chunk))
            heapq.heappush(heap, (load + size, slot))
        return [[c for _, c in sorted(p, key=lambda x: x[0])] for p in contents if p]

    def heaviest(plan: list[list[list[DicomFile]]]) -> int:
        return max(sum(f.size for c in b for f in c) for b in plan)

    best: list[list[list[DicomFile]]] = []
    for finer in (1, 2, 3, 4):
        plan = pack(max(1, fair // finer))
        if not best or heaviest(plan) < heaviest(best):
            best = plan
        if heaviest(best) <= fair * 1.05:
            break
    if heaviest(best) > fair * 1.10:
        cut: list[list[list[DicomFile]]] = []
        current: list[DicomFile] = []
        running = 0
        for f in (f for group in series for f in group):
            current.append(f)
            running += f.size
            if len(cut) < num_batches - 1 and running * num_batches >= total * (len(cut) + 1):
                cut.append([current])
                current = []
        if current:
            cut.append([current])
        if heaviest(cut) < heaviest(best):
            best = cut
    return [[f.sop_instance_uid for c in b for f in c] for b in best]


def test_the_planner_gives_the_reference_batches() -> None:
    rng = random.Random(16)
    cases = [
        _manifest([[1000] * 200] * 25),  # the benchmark's 100,000 small files, scaled down
        _manifest([[MB] * 100] * 10 + [[MB] * 2000]),
        _manifest([[0] * 50, [0] * 80]),  # empty files
        _manifest([[7] * 3, [5 * MB], [1] * 300]),
    ]
    for _ in range(25):
        sizes = [
            [rng.choice([0, 1, rng.randint(1, 4 * MB)]) for _ in range(rng.randint(1, 60))]
            for _ in range(rng.randint(1, 30))
        ]
        cases.append(_manifest(sizes, studies=rng.randint(1, 3)))
        # A few huge files among tiny ones: one file crosses several cut points at once.
        spiky = [[rng.choice([1] * 30 + [4 * MB]) for _ in range(rng.randint(1, 60))]]
        cases.append(_manifest(spiky * rng.randint(1, 4)))
    for m in cases:
        for num in (2, 7, 42):
            got = [[f.sop_instance_uid for f in b.files] for b in plan_batches(m, num)]
            assert got == _reference_plan(m, num), (num, [len(s) for s in got])
