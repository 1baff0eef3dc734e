"""Manifest -> Batches: how the files of one upload are grouped, for either transport.

One interface, :class:`Planner`: ``planner.plan(manifest, parts) -> list[Batch]``, every file in
exactly one batch, the same batches for the same input. The transport chooses the planner
(:func:`planner_for`): :class:`RestPlanner` here (a batch is one import request), and
:class:`xnatio.transports.dicom_store.plan.AssociationPlanner` (a batch is one association).
:func:`make_plan` is what the pipeline asks: it announces the PLAN phase and calls the planner.

REST: an upload of at most :data:`SINGLE_MAX_FILES` files (and :data:`SINGLE_MAX_BYTES`) goes as
one archive in one request: fewer requests, and XNAT builds the session once. Anything larger is
cut into up to ``num_batches`` batches so that many requests run at once: XNAT reads the entries
of one request one after the other (facts 1.1) and parses, re-encodes, anonymizes and writes each
(facts 1.7), so a per-file cost is paid in series by one request and in parallel by many; and one
2.5 GB request is slow and may time out (field reports, facts file 7). The rule counts files, not
only bytes: 1,200 files at 20 ms each took 7.3 s as one request (issue 16); the measurements are
in ``docs/parallel-upload-strategies.md``. Batches keep a series together where they can, so a
failed batch maps to whole series for the user, split only the series larger than a fair share,
and balance bytes so every worker finishes at about the same time (greedy
longest-processing-time: each chunk, largest first, goes to the lightest batch, which is never
worse than 4/3 of the best possible balance).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from xnatio.errors import UsageError
from xnatio.models import (
    Batch,
    DicomFile,
    FileTable,
    Manifest,
    Phase,
    ProgressCallback,
    ProgressEvent,
)

# One request for an upload of at most this many files and bytes; batches above either
# (docs/parallel-upload-strategies.md, "One request or batches"). The most a single request
# can lose to batches is then 100 x the server's per-file time (2 s at 20 ms per file).
SINGLE_MAX_FILES = 100
SINGLE_MAX_BYTES = 100 * 2**20


class Planner(Protocol):
    """How a transport groups the files of a manifest into at most about ``parts`` batches.

    Every file of ``manifest.files`` is in exactly one batch; batches are numbered 0, 1, … in
    order; the same manifest and ``parts`` always give the same batches (resume relies on it).
    """

    def plan(self, manifest: Manifest, parts: int) -> list[Batch]: ...


@dataclass(frozen=True)
class RestPlanner:
    """REST: one batch per import request (:func:`plan_batches`: series-aligned, byte-balanced;
    a small upload whole). An archive PATH is one request (its members re-packed as they are
    read); several studies are cut so that each batch holds one (:func:`split_by_study`)."""

    single_max_files: int = SINGLE_MAX_FILES
    single_max_bytes: int = SINGLE_MAX_BYTES

    def plan(self, manifest: Manifest, parts: int) -> list[Batch]:
        if manifest.source_archive is not None:
            batches = [Batch(index=0, files=manifest.files)] if manifest.files else []
        else:
            batches = plan_batches(
                manifest,
                max(1, parts),
                single_max_files=self.single_max_files,
                single_max_bytes=self.single_max_bytes,
            )
        return split_by_study(batches) if len(manifest.studies()) > 1 else batches


def make_plan(
    manifest: Manifest,
    *,
    parts: int,
    planner: Planner,
    progress: ProgressCallback | None = None,
) -> list[Batch]:
    """The batches ``planner`` makes of ``manifest``, with the PLAN phase told to ``progress``.

    Raises :class:`~xnatio.errors.UsageError` when the manifest holds no DICOM file."""
    if not manifest.files:
        where = manifest.source_archive or manifest.root
        raise UsageError(
            f"no DICOM files found in {where} ({len(manifest.skipped)} other files skipped)"
        )
    if progress is not None:
        progress(ProgressEvent(phase=Phase.PLAN, current=0, total=1, message="planning"))
    batches = planner.plan(manifest, parts)
    if progress is not None:
        progress(
            ProgressEvent(
                phase=Phase.PLAN,
                current=1,
                total=1,
                message=f"{len(batches)} batch{'es' if len(batches) != 1 else ''}",
                bytes_total=manifest.total_bytes,
                batches_total=len(batches),
            )
        )
    return batches


def split_by_study(batches: Sequence[Batch]) -> list[Batch]:
    """The batches cut so that each holds one study (renumbered, order kept): XNAT files each
    StudyInstanceUID into its own prearchive session, and each must go under its own label."""
    out: list[Batch] = []
    for batch in batches:
        files = _table(batch.files)
        codes, _ = files.codes("study_uid")
        groups: dict[int, list[int]] = {}
        for i, code in enumerate(codes):
            groups.setdefault(code, []).append(i)
        for group in groups.values():
            out.append(Batch(index=len(out), files=files.take(group)))
    return out


def _table(files: Sequence[DicomFile]) -> FileTable:
    """``files`` as a FileTable (a batch's files are one; records given by a caller are put
    into one)."""
    return files if isinstance(files, FileTable) else FileTable(files)


def plan_batches(
    manifest: Manifest,
    num_batches: int,
    *,
    single_max_files: int = SINGLE_MAX_FILES,
    single_max_bytes: int = SINGLE_MAX_BYTES,
) -> list[Batch]:
    """Group ``manifest.files`` into batches; every file is in exactly one batch.

    One batch when ``num_batches`` is 1 or the upload holds at most ``single_max_files`` files
    and ``single_max_bytes`` bytes; otherwise up to ``num_batches``, whatever the bytes (a
    session of many small files pays the server's per-file cost in parallel).

    Deterministic: the same manifest and arguments always give the same batches, in the same
    order, which resume relies on.

    O(n) in the files (it is on the way to the first request: issue 16): the files' positions
    are put in series order once, with the running total of their sizes, and every plan tried
    is made of ranges of that order, cut by bisection on the running total; each batch is a
    view of the manifest's table (no record per file: issue 16 item 4).
    """
    files = manifest.files
    if not files:
        return []
    total = files.total_bytes
    if num_batches <= 1 or (len(files) <= single_max_files and total <= single_max_bytes):
        return [Batch(index=0, files=files)]
    num_batches = min(num_batches, len(files))
    fair_share = max(1, math.ceil(total / num_batches))
    series = _series_in_order(files)
    ordered = [p for group in series for p in group]  # positions, in series order
    sizes = array("q", files.sizes())
    sums = [0, *itertools.accumulate(map(sizes.__getitem__, ordered))]  # bytes of ordered[:i]
    ranges: list[_Range] = []
    for group in series:
        start = ranges[-1][1] if ranges else 0
        ranges.append((start, start + len(group)))
    # Cutting a large series into pieces of exactly a fair share can pack badly (32 series of
    # 1.4 shares in 42 batches: pieces of 0.7, two per batch, heaviest 1.36x the mean), so
    # finer cuts of the large series only are tried too and the most even plan wins.
    best: list[list[_Range]] = []
    best_load = 0
    for finer in _FINER_CUTS:
        plan, load = _pack(sums, ranges, num_batches, fair_share, max(1, fair_share // finer))
        if not best or load < best_load:
            best, best_load = plan, load
        if best_load <= fair_share * _GOOD_ENOUGH:
            break
    if best_load > fair_share * _ACCEPTABLE:
        # Whole series and pieces did not pack within 10 % of even: cut the series, in order,
        # at every fair share instead (even to within one file; splits at most one series per
        # cut).
        plan = _cut_in_order(sums, num_batches, total)
        if max(sums[b] - sums[a] for [(a, b)] in plan) < best_load:
            best = plan
    return [
        Batch(index=i, files=files.take(p for a, b in batch for p in ordered[a:b]))
        for i, batch in enumerate(best)
    ]


# Piece sizes tried for series larger than a fair share: 1/1, 1/2, ... of a share.
_FINER_CUTS = (1, 2, 3, 4)
_GOOD_ENOUGH = 1.05
_ACCEPTABLE = 1.10
# Positions of files in the manifest, consecutive in one series.
_Chunk = list[int]
_Range = tuple[int, int]  # the files at ordered[a:b] (plan_batches)


def _cut_in_order(sums: list[int], num_batches: int, total: int) -> list[list[_Range]]:
    """All files in series order, cut into ``num_batches`` runs of nearly equal bytes: a run ends
    after the first file whose running total reaches its share (``running * num_batches >=
    total * (runs so far + 1)``), at most one cut per file."""
    n = len(sums) - 1
    ends: list[int] = []
    at = 0
    while len(ends) < num_batches - 1:
        need = total * (len(ends) + 1)
        j = bisect.bisect_left(sums, need, at + 1, n + 1, key=lambda v: v * num_batches)
        if j > n:
            break
        ends.append(j)
        at = j
    starts = [0, *ends]
    return [[(a, b)] for a, b in zip(starts, [*ends, n], strict=True) if a < b]


def _pack(
    sums: list[int], series: list[_Range], num_batches: int, fair_share: int, piece: int
) -> tuple[list[list[_Range]], int]:
    """Greedy longest-processing-time of series chunks into ``num_batches`` batches.

    Series up to a fair share stay whole; larger ones are cut into pieces of about ``piece``
    bytes. Returns the non-empty batches, each a list of chunks in discovery order, and the
    heaviest batch's bytes.
    """
    chunks: list[tuple[int, int, _Range]] = []  # (bytes, order, files)
    for a, b in series:
        size = sums[b] - sums[a]
        for start, end in _split(sums, a, b, piece if size > fair_share else size):
            chunks.append((sums[end] - sums[start], len(chunks), (start, end)))
    # Largest first; ties broken by the chunk's order so the result is stable.
    chunks.sort(key=lambda c: (-c[0], c[1]))
    heap = [(0, i) for i in range(num_batches)]  # (bytes so far, batch number)
    contents: list[list[tuple[int, _Range]]] = [[] for _ in range(num_batches)]
    for size, order, chunk in chunks:
        load, slot = heapq.heappop(heap)
        contents[slot].append((order, chunk))
        heapq.heappush(heap, (load + size, slot))
    heaviest = max(load for load, _ in heap)
    return [[chunk for _, chunk in sorted(parts)] for parts in contents if parts], heaviest


def _series_in_order(files: FileTable) -> list[_Chunk]:
    """Positions of the files grouped by series, series ordered by study then Series Number;
    file order kept."""
    study, studies = files.codes("study_uid")
    number, numbers = files.codes("series_number")
    uid, uids = files.codes("series_uid")
    groups: dict[tuple[int, int, int], _Chunk] = {}
    for p, key in enumerate(zip(study, number, uid, strict=True)):
        group = groups.get(key)
        if group is None:
            group = groups[key] = []
        group.append(p)

    def order(key: tuple[int, int, int]) -> tuple[str, int, str]:
        n = numbers[key[1]]
        return (studies[key[0]], n if n is not None else 2**31, uids[key[2]])

    return [groups[key] for key in sorted(groups, key=order)]


def _split(sums: list[int], a: int, b: int, limit: int) -> list[_Range]:
    """A series ``a:b`` as is, or cut into consecutive, nearly equal pieces of at most ``limit``
    bytes: a piece ends after the first file whose running total reaches its cumulative share
    (so rounding does not pile up in the last piece), at most one cut per file."""
    size = sums[b] - sums[a]
    # A series of empty files has a limit of 0 (found by tests/test_properties.py): one piece.
    pieces = min(b - a, math.ceil(size / limit)) if limit > 0 else 1
    if pieces <= 1:
        return [(a, b)]
    target = size / pieces
    base = sums[a]
    ends: list[int] = []
    at = a
    while len(ends) < pieces - 1:
        j = bisect.bisect_left(
            sums, target * (len(ends) + 1), at + 1, b + 1, key=lambda v: v - base
        )
        if j > b:
            break
        ends.append(j)
        at = j
    starts = [a, *ends]
    return [(s, e) for s, e in zip(starts, [*ends, b], strict=True) if s < e]


# -- --dry-run -------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB' (decimal units, as file managers and XNAT's UI show sizes)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


_LIST_LIMIT = 50


def describe_plan(manifest: Manifest, batches: Sequence[Batch]) -> str:
    """The plan as plain text for ``--dry-run``: studies, series, batches, skipped files."""
    where = manifest.source_archive or manifest.root
    files = manifest.files
    lines = [
        f"Plan for {where}: {len(files):,} DICOM file{_s(len(files))}, "
        f"{human_bytes(manifest.total_bytes)} in {len(batches)} batch{_es(len(batches))}; "
        f"{len(manifest.duplicates)} duplicate{_s(len(manifest.duplicates))} and "
        f"{len(manifest.skipped)} other file{_s(len(manifest.skipped))} not sent.",
        "",
    ]
    studies = manifest.studies()
    lines.append(f"Studies ({len(studies)}):")
    for st in studies:
        lines.append(
            f"  {st.study_uid}  patient {st.patient_id or '(none)'}  "
            f"{st.file_count:,} file{_s(st.file_count)}  {human_bytes(st.total_bytes)}"
        )
    series = _series_in_order(files)
    lines += ["", f"Series ({len(series)}):"]
    for group in series:
        first = group[0]
        series_number = files.series_number(first)
        number = "-" if series_number is None else str(series_number)
        size = sum(map(files.size, group))
        lines.append(
            f"  #{number:<5} {len(group):>7,} file{_s(len(group))} {human_bytes(size):>10}  "
            f"{files.series_uid(first)}"
        )
    lines += ["", f"Batches ({len(batches)}):"]
    for b in batches:
        in_batch = _table(b.files)
        codes, values = in_batch.codes("series_number")
        numbers = sorted({values[c] for c in set(codes) if values[c] is not None})
        label = ", ".join(map(str, numbers[:8])) + (", ..." if len(numbers) > 8 else "")
        lines.append(
            f"  {b.index + 1:>4}: {len(b.files):>7,} file{_s(len(b.files))} "
            f"{human_bytes(b.total_bytes):>10}  series {label or '-'}"
        )
    for title, entries in (("Duplicates", manifest.duplicates), ("Skipped", manifest.skipped)):
        if not entries:
            continue
        lines += ["", f"{title} ({len(entries)}, not sent):"]
        for entry in entries[:_LIST_LIMIT]:
            lines.append(f"  {entry.path}: {entry.reason}")
        if len(entries) > _LIST_LIMIT:
            rest = Counter(e.reason for e in entries[_LIST_LIMIT:])
            summary = "; ".join(f"{n} x {reason}" for reason, n in rest.most_common(3))
            lines.append(f"  ... and {len(entries) - _LIST_LIMIT} more ({summary})")
    return "\n".join(lines)


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _es(n: int) -> str:
    return "" if n == 1 else "es"
