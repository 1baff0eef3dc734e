"""Property-based tests: invariants that must hold for any input, not only the examples we chose.

- archives: the predicted size is the size of the bytes produced (tar, stored zip), and every
  archive reads back with the standard library; huge fake sizes (ustar and zip64 boundaries) are
  checked on sparse files, where only the headers are written;
- member names are relative, safe and unique whatever the paths or UIDs;
- planning partitions the files (each in exactly one batch, batch count within the limit);
- verification's outcome lists partition the files, whatever order the server lists things in;
- the env-file parser reads back any value written with shell quoting; a profile value written by
  ``xio login`` reads back exactly.

Small files and modest ``max_examples`` keep the module at a few seconds.
"""

from __future__ import annotations

import io
import math
import os
import shlex
import string
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from xnatio.archive import (
    _central_directory,
    _local_header,
    _tar_size,
    _ZipLayout,
    instance_file_name,
    instance_member_names,
    make_archive_stream,
    member_names,
    tar_header,
)
from xnatio.config_file import load_profile, update_profile
from xnatio.models import DicomFile, Manifest, Outcome
from xnatio.models import file_path as outcome_path
from xnatio.pipeline import planner_for
from xnatio.plan import make_plan, plan_batches
from xnatio.settings import parse_env_file
from xnatio.verify import ServerFile, ServerScan, VerifyReport, compare

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# File-name text: any character a POSIX file name can hold (no "/", no NUL, no lone surrogates),
# with plenty of non-ASCII and control characters.
name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00")
segment = st.text(name_chars, min_size=1, max_size=40).filter(
    lambda s: s not in (".", "..") and len(s.encode("utf-8")) <= 255
)
rel_paths = st.lists(segment, min_size=1, max_size=4).map(lambda parts: "/".join(parts))


# -- archives: predicted size == bytes produced --------------------------------------------------


@dataclass(frozen=True)
class _Fake:
    """A source with a size that need not exist on disk (headers only)."""

    path: Path
    size: int
    mtime_ns: int = 1_700_000_000 * 10**9


def _write_tree(root: Path, entries: Sequence[tuple[str, bytes]]) -> list[_Fake]:
    files = []
    for rel, data in entries:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files.append(_Fake(p, len(data), p.stat().st_mtime_ns))
    return files


def _unique_by_path(entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    # A path cannot be both a file and a folder, nor two files.
    seen: set[str] = set()
    out = []
    for rel, data in entries:
        prefixes = {"/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1)}
        if rel in seen or prefixes & seen or any(s.startswith(rel + "/") for s in seen):
            continue
        seen.add(rel)
        out.append((rel, data))
    return out


archive_entries = st.lists(
    st.tuples(
        st.one_of(rel_paths, st.text(string.ascii_letters, min_size=95, max_size=160)),
        st.binary(max_size=1500),
    ),
    min_size=1,
    max_size=6,
).map(_unique_by_path)


@FAST
@given(entries=archive_entries, fmt=st.sampled_from(["tar", "zip", "zip-deflated"]))
def test_archive_size_is_exact_and_it_reads_back(
    entries: list[tuple[str, bytes]], fmt: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = _write_tree(root, entries)
        stream = make_archive_stream(files, fmt, root=root, with_md5=True)
        data = b"".join(stream)
        if fmt == "zip-deflated":
            assert stream.size is None  # streamed with data descriptors: not predictable
        else:
            assert stream.size == len(data)
        assert b"".join(stream) == data  # a retry sends the same bytes
        names = [n for n, _ in stream.members]
        if fmt == "tar":
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                got = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]
        else:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                assert zf.testzip() is None
                got = {n: zf.read(n) for n in zf.namelist()}
        assert got == {
            n: (root / rel).read_bytes() for n, (rel, _) in zip(names, entries, strict=True)
        }


# Sizes around the ustar limit (8**11: the 11 octal digits of the size field) and the zip64 one
# (0xFFFFFFFF), and names around ustar's 100-byte name field.
big_sizes = st.one_of(
    st.integers(0, 3000),
    st.sampled_from([8**11 - 1, 8**11, 8**11 + 1, 2**32 - 2, 2**32 - 1, 2**32, 2**33 + 5]),
    st.integers(2**31, 2**34),
)
header_names = st.one_of(
    st.builds(lambda n, c: (c * n)[:n], st.integers(96, 104), st.sampled_from(["a", "é", "ab/"])),
    st.text(string.ascii_letters + "/._-", min_size=98, max_size=102),
    st.text(name_chars, min_size=1, max_size=120),
)


def _sparse(path: Path, pieces: list[tuple[int, bytes]], total: int) -> None:
    """A file of ``total`` bytes holding ``pieces`` at their offsets; the rest is a hole."""
    with path.open("wb") as fh:
        for offset, data in pieces:
            fh.seek(offset)
            fh.write(data)
        fh.truncate(total)


@FAST
@given(members=st.lists(st.tuples(header_names, big_sizes), min_size=1, max_size=4))
def test_tar_size_prediction_holds_for_huge_sizes_and_long_names(
    members: list[tuple[str, int]],
) -> None:
    """The fast size path (one 512-byte header when the name and size fit ustar) agrees with the
    headers actually built, and tarfile reads every header at the predicted offsets."""
    members = [(_safe(n), size) for n, size in members]
    assume(len({n for n, _ in members}) == len(members))
    fakes = [(n, _Fake(Path(n), size)) for n, size in members]
    pieces, offset = [], 0
    for name, f in fakes:
        header = tar_header(name, f)
        pieces.append((offset, header))
        offset += len(header) + f.size + (-f.size % 512)
    total = _tar_size(fakes)
    end = offset + 2 * 512  # two zero blocks, then padding to a whole 10240-byte record
    assert total == end + (-end % 10240)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sparse.tar"
        _sparse(path, pieces, total)
        with tarfile.open(path) as tf:
            got = [(m.name, m.size) for m in tf.getmembers()]
    assert got == members


@FAST
@given(
    members=st.lists(st.tuples(st.text(name_chars, min_size=1, max_size=30), big_sizes), max_size=4)
)
def test_zip_layout_holds_across_the_zip64_boundary(members: list[tuple[str, int]]) -> None:
    """Local headers at the predicted offsets, the central directory (zip64 records when an
    offset or size passes 4 GiB) at the end: the predicted total is the file's size, and zipfile
    reads every entry's name, size and offset from it (the data itself is a hole)."""
    members = [(_safe(n), size) for n, size in members]
    assume(len({n for n, _ in members}) == len(members))
    fakes = [(n, _Fake(Path(n), size)) for n, size in members]
    layout = _ZipLayout(fakes)
    pieces, offset = [], 0
    for (_, f), encoded, predicted in zip(fakes, layout.names, layout.offsets, strict=True):
        assert predicted == offset
        header = _local_header(encoded, f, 0)
        pieces.append((offset, header))
        offset += len(header) + f.size
    central = b"".join(_central_directory(fakes, layout, [0] * len(fakes)))
    assert layout.central_offset == offset
    assert layout.total == offset + len(central)
    pieces.append((offset, central))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sparse.zip"
        _sparse(path, pieces, layout.total)
        with zipfile.ZipFile(path) as zf:
            got = [(i.filename, i.file_size, i.header_offset) for i in zf.infolist()]
    assert got == [(n, size, off) for (n, size), off in zip(members, layout.offsets, strict=True)]


def _safe(name: str) -> str:
    """A member name as member_names makes them (the writers get names already made safe)."""
    return member_names([_Fake(Path("/r") / name.lstrip("/"), 0)], Path("/r"))[0]


# -- member names ---------------------------------------------------------------------------------


def _assert_safe(names: list[str]) -> None:
    assert len(set(names)) == len(names)
    for name in names:
        p = PurePosixPath(name)
        assert name and not p.is_absolute() and not name.startswith("/")
        assert all(part not in ("", ".", "..") for part in name.split("/"))
        assert not any(ord(c) < 32 or ord(c) == 127 for c in name)
        name.encode("utf-8")  # no lone surrogates: every reader can decode it


@FAST
@given(
    paths=st.lists(
        st.text(
            st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60
        ),
        min_size=1,
        max_size=8,
    ),
    nested=st.booleans(),
)
def test_member_names_are_relative_safe_and_unique(paths: list[str], nested: bool) -> None:
    root = Path("/data/exam")
    files = [_Fake(root / p if i % 2 else Path("/elsewhere") / p, 0) for i, p in enumerate(paths)]
    names = member_names(files, root, rename_nested_archives=nested)
    _assert_safe(names)
    if nested:
        assert not any(n.lower().endswith((".zip", ".tar", ".tgz", ".gz")) for n in names)


uids = st.lists(st.integers(0, 10**12).map(str), min_size=2, max_size=8).map(".".join)


@FAST
@given(
    instances=st.lists(
        st.tuples(uids, st.one_of(st.none(), st.integers(-5, 10**6))),
        min_size=1,
        max_size=20,
        unique_by=lambda t: t[0],
    )
)
def test_instance_names_are_safe_and_one_per_instance(
    instances: list[tuple[str, int | None]],
) -> None:
    """Valid SOP Instance UIDs (digits and dots) give distinct, safe names."""

    @dataclass
    class Instance:
        sop_instance_uid: str
        series_number: int | None

    names = instance_member_names([Instance(u, n) for u, n in instances])
    _assert_safe(names)
    assert len({instance_file_name(u) for u, _ in instances}) == len(instances)


@FAST
@given(uid=st.text(max_size=80))
def test_any_uid_gives_a_safe_file_name(uid: str) -> None:
    name = instance_file_name(uid)
    assert name.endswith(".dcm") and "/" not in name and name not in (".dcm",)
    assert set(name) <= set(string.ascii_letters + string.digits + "._-")
    assert not name.startswith(".")


# -- planning partitions the files ----------------------------------------------------------------


def _identity(f: DicomFile) -> tuple[str, str | None]:
    """Which file a record is (each test file has its own path): a manifest makes its records
    when asked (models.FileTable), so two records of one file are equal, not identical."""
    return (f.fspath, f.member)


def _dicom(i: int, series: int, size: int, study: int = 0) -> DicomFile:
    return DicomFile(
        path=Path(f"/exam/{series}/{i}.dcm"),
        size=size,
        mtime_ns=0,
        study_uid=f"1.2.{study}",
        series_uid=f"1.2.{study}.{series}",
        sop_instance_uid=f"1.2.{study}.{series}.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_number=series,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="P",
    )


manifests = st.lists(
    st.tuples(st.integers(1, 12), st.integers(0, 5 * 2**20), st.integers(0, 1)),
    max_size=300,
).map(lambda rows: [_dicom(i, s, size, study) for i, (s, size, study) in enumerate(rows)])


@FAST
@given(
    files=manifests,
    num_batches=st.integers(0, 50),
    single_max_files=st.integers(0, 120),
    single_max_bytes=st.integers(0, 200 * 2**20),
)
def test_planning_partitions_the_files(
    files: list[DicomFile], num_batches: int, single_max_files: int, single_max_bytes: int
) -> None:
    manifest = Manifest(root=Path("/exam"), files=files)
    batches = plan_batches(
        manifest,
        num_batches,
        single_max_files=single_max_files,
        single_max_bytes=single_max_bytes,
    )
    planned = [f for b in batches for f in b.files]
    assert sorted(map(_identity, planned)) == sorted(map(_identity, files))  # each exactly once
    assert all(b.files for b in batches)  # no empty request
    assert len(batches) <= max(1, num_batches) if files else batches == []
    assert [b.index for b in batches] == list(range(len(batches)))
    total = sum(f.size for f in files)
    small = len(files) <= single_max_files and total <= single_max_bytes
    if files and (num_batches <= 1 or small):
        assert len(batches) == 1  # a small upload is one request
    elif files:
        # Balanced: no batch heavier than an even share plus one file (the cut-in-order bound).
        share = math.ceil(total / min(num_batches, len(files)))
        assert max(b.total_bytes for b in batches) <= share + max(f.size for f in files)
    again = plan_batches(
        manifest,
        num_batches,
        single_max_files=single_max_files,
        single_max_bytes=single_max_bytes,
    )
    assert [[_identity(f) for f in b.files] for b in again] == [
        [_identity(f) for f in b.files] for b in batches
    ]


@FAST
@given(
    files=manifests.filter(bool),
    parts=st.integers(0, 50),
    transport=st.sampled_from(["rest", "dicom-store"]),
)
def test_both_transports_plans_partition_the_files_through_one_interface(
    files: list[DicomFile], parts: int, transport: str
) -> None:
    """REST requests and C-STORE associations come from the same call (xnatio.plan.Planner):
    every file in exactly one non-empty batch, numbered in order, the same plan every time."""
    manifest = Manifest(root=Path("/exam"), files=files)
    batches = make_plan(manifest, parts=parts, planner=planner_for(transport))
    planned = [f for b in batches for f in b.files]
    assert sorted(map(_identity, planned)) == sorted(map(_identity, files))  # each exactly once
    assert all(b.files for b in batches)
    assert [b.index for b in batches] == list(range(len(batches)))
    again = make_plan(manifest, parts=parts, planner=planner_for(transport))
    assert [[_identity(f) for f in b.files] for b in again] == [
        [_identity(f) for f in b.files] for b in batches
    ]


# -- verification's outcome lists partition the files ---------------------------------------------

# Where each local file is on the server: in its series' scan, in another scan, or not at all.
FATES = ("own", "other", "absent")


@st.composite
def listings(draw: st.DrawFn) -> tuple[list[DicomFile], list[ServerScan]]:
    n_series = draw(st.integers(1, 4))
    files: list[DicomFile] = []
    for s in range(1, n_series + 1):
        number = draw(st.sampled_from([s, s, 1, None]))  # repeated and missing series numbers
        for _ in range(draw(st.integers(1, 5))):
            f = _dicom(len(files), s, 100)
            files.append(
                DicomFile(
                    **{
                        **{k: getattr(f, k) for k in f.__dataclass_fields__},
                        "series_number": number,
                    }
                )
            )
    scans: dict[str, ServerScan] = {}
    for s in range(1, n_series + 2):  # one more scan than series: a stranger's
        uid = draw(st.sampled_from([f"1.2.0.{s}", ""]))
        scans[str(s)] = ServerScan(id=str(s), uid=uid)
    for f in files:
        fate = draw(st.sampled_from(FATES))
        if fate == "absent":
            continue
        own = f.series_uid.rsplit(".", 1)[1]
        target = own if fate == "own" else draw(st.sampled_from(sorted(scans)))
        scans[target].files.append(ServerFile(instance_file_name(f.sop_instance_uid), 100, None))
    for scan in scans.values():  # files xio did not send (other names), sometimes
        for k in range(draw(st.integers(0, 3))):
            scan.files.append(ServerFile(f"other-{scan.id}-{k}.dcm", 100, None))
    return files, list(scans.values())


def _verdicts(files: list[DicomFile], scans: list[ServerScan]) -> dict[str, Outcome]:
    checks, unmatched, unreadable = compare(files, scans, threads=1)
    report = VerifyReport("P", "S", "E", found=True, series=checks, unmatched_scans=unmatched)
    report.unreadable = unreadable
    lists = [f for c in checks for f in (*c.verified, *c.missing, *c.different, *c.uncounted)]
    # Every local file is in exactly one of a series' lists.
    assert sorted(map(_identity, lists)) == sorted(map(_identity, files))
    outcomes = report.outcomes()
    assert sorted(o.path for o in outcomes) == sorted(outcome_path(f) for f in files)
    return {o.path: o.outcome for o in outcomes}


@FAST
@given(listing=listings(), order=st.randoms(use_true_random=False))
def test_verification_partitions_the_files_whatever_the_servers_order(
    listing: tuple[list[DicomFile], list[ServerScan]], order: object
) -> None:
    files, scans = listing
    first = _verdicts(files, scans)
    shuffled = [ServerScan(s.id, s.uid, list(s.files)) for s in scans]
    order.shuffle(shuffled)  # type: ignore[attr-defined]
    for s in shuffled:
        order.shuffle(s.files)  # type: ignore[attr-defined]
    assert _verdicts(files, shuffled) == first
    # A file listed in its own scan always verifies; one listed nowhere never does.
    listed = {sf.name for s in scans for sf in s.files}
    for f in files:
        if instance_file_name(f.sop_instance_uid) not in listed and first[outcome_path(f)] is (
            Outcome.VERIFIED
        ):
            # only a series matched by count (rule 3) verifies without its names
            assert not any(
                instance_file_name(g.sop_instance_uid) in listed
                for g in files
                if g.series_uid == f.series_uid
            )


# -- env files and profiles ----------------------------------------------------------------------

env_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
# Anything a one-line value can hold: no NUL (no file can), no "\n" (a line break ends it).
env_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\n\r"))


@FAST
@given(
    pairs=st.dictionaries(env_keys, env_values, max_size=6),
    export=st.booleans(),
    comments=st.booleans(),
)
def test_env_file_reads_back_shell_quoted_values(
    pairs: dict[str, str], export: bool, comments: bool
) -> None:
    lines = []
    for key, value in pairs.items():
        if comments:
            lines.append(f"# {key} follows")
        lines.append(f"{'export ' if export else ''}{key}={shlex.quote(value)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ".env"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        assert parse_env_file(path) == pairs


@FAST
@given(
    value=st.text(st.characters(blacklist_categories=("Cs",))),
    key=st.sampled_from(["server", "username", "password", "token"]),
)
def test_a_profile_value_reads_back_exactly(value: str, key: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        update_profile(path, "default", {key: value, "verify_tls": False})
        update_profile(path, "other", {key: "x"})
        profile = load_profile(path, "default", required=True)
        assert profile is not None
        assert profile.values == {key: value, "verify_tls": False}
        assert os.stat(path).st_mode & 0o077 == 0
