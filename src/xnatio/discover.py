"""Find every DICOM instance under PATH (a directory or an archive) and read its header: a Manifest.

DICOM is recognised by content, never by name (field reports: UID-named files and GE's
``i1234.MRDC.1`` are images, ``DICOMDIR`` is not). Every other file is listed as skipped with a
one-sentence reason, so each file under PATH is accounted for. Only the header fields the upload
needs are read (see :mod:`xnatio.dicomheader`); pixel data never is.
"""

from __future__ import annotations

import contextlib
import operator
import os
import stat
import tarfile
import time
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import cast

from xnatio.archive import EntryNames, zip_entries
from xnatio.errors import UsageError
from xnatio.examine import (
    Packed,
    Result,
    Workers,
    examine,
    examine_stream,
    not_regular_reason,
    pack,
    part,
)
from xnatio.models import (
    Manifest,
    Phase,
    ProgressCallback,
    ProgressEvent,
    SkippedFile,
    SopIndex,
    SplitStrings,
)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Below this many candidates threads are not worth starting.
_THREAD_THRESHOLD = 1000
_CHUNK = 100
# Measured on 16,000 files (2 cores): warm cache 1 thread 38,700 files/s, 4 threads 23,800;
# cold cache 1 thread 9,300 files/s, 4 threads 12,700. Cold is the usual case for a fresh
# upload (and network file systems gain far more), so reads overlap by default.
_DEFAULT_THREADS = 4
# From this many candidates on, headers are read by worker processes, one per core (up to
# _MAX_PROCESSES): a worker starts in about 0.1 s, while the folders are walked.
PROCESS_THRESHOLD = 5000
_MAX_PROCESSES = 8
_PROCESS_CHUNK = 500
_PROGRESS_EVERY = 0.1  # seconds between progress events


def discover(
    path: Path | str,
    *,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    require_dicom: bool = True,
    processes: int | None = None,
) -> Manifest:
    """Walk PATH (directory or .zip/.tar/.tar.gz/.tgz archive) and describe every file in it.

    A folder's headers are read by ``processes`` worker processes (:mod:`xnatio.examine`; None:
    one per core, on a machine of more than one, when the folder holds at least
    :data:`PROCESS_THRESHOLD` files and ``workers`` is not 1; 0: none), else by ``workers``
    threads (1: one after the other). The
    manifest is the same whichever reads them.

    Raises UsageError when PATH is missing, not a directory or supported archive, empty, or
    holds no DICOM at all (the last two only with ``require_dicom``: a watched outbox may be
    empty between exports).
    """
    root = Path(path)
    try:
        st = root.stat()
    except FileNotFoundError:
        raise UsageError(f"{root} does not exist.") from None
    except OSError as exc:
        raise UsageError(f"{root} cannot be read: {exc.strerror}.") from None
    if stat.S_ISDIR(st.st_mode):
        manifest = _discover_directory(root, progress, workers, processes)
    elif stat.S_ISREG(st.st_mode) and archive_format(root) is not None:
        manifest = _discover_archive(root, progress)
    else:
        raise UsageError(
            f"{root} is neither a directory nor a .zip, .tar, .tar.gz or .tgz archive."
        )
    if require_dicom and not manifest.files and not manifest.duplicates:
        examined = len(manifest.skipped)
        if examined == 0:
            raise UsageError(f"{root} is empty: there are no files to upload.")
        reasons = Counter(s.reason for s in manifest.skipped).most_common(3)
        top = "; ".join(f"{n} x {reason}" for reason, n in reasons)
        raise UsageError(
            f"No DICOM files found in {root}: looked at {examined} "
            f"file{'s' if examined != 1 else ''} ({top})."
        )
    return manifest


def check_single_study(manifest: Manifest, *, allow_multiple: bool) -> None:
    """Refuse several StudyInstanceUIDs in one upload unless the user allowed it.

    XNAT keys prearchive sessions by StudyInstanceUID: several studies under one label become
    several sessions or a session stuck in the prearchive (field reports; facts file 7).
    """
    studies = manifest.studies()
    if len(studies) <= 1 or allow_multiple:
        return
    listing = "; ".join(
        f"{s.study_uid} (patient {s.patient_id or 'unknown'}, {s.file_count} "
        f"file{'s' if s.file_count != 1 else ''})"
        for s in studies
    )
    where = manifest.source_archive or manifest.root
    raise UsageError(
        f"{where} holds {len(studies)} studies, which XNAT would split into separate sessions "
        f"or leave in the prearchive: {listing}. Upload each study on its own, or pass "
        "--allow-multiple-studies to send them all."
    )


def archive_format(path: Path) -> str | None:
    """'zip', 'tar' or 'tgz' when ``path`` is such an archive (by content), else None."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(512)
    except OSError:
        return None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tgz" if path.name.lower().endswith(ARCHIVE_SUFFIXES) else None
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if path.name.lower().endswith(".tar") and tarfile.is_tarfile(path):
        return "tar"  # a pre-POSIX (v7) tar has no "ustar" magic
    return None


# -- directories -------------------------------------------------------------------------------


def _walk(
    root: Path,
    walked: Callable[[SplitStrings], None] | None = None,
    files: SplitStrings | None = None,
) -> tuple[SplitStrings, list[SkippedFile]]:
    """Every regular file under ``root`` in sorted path order, plus what could not be walked.

    Symlinked directories are followed once: (st_dev, st_ino) of each directory entered is
    remembered, so a link back up the tree cannot loop. The paths are kept compactly (a folder
    once, then each name: ~20 bytes a file, where a list of strings held ~170; issue 16 item 4).
    ``walked(files)`` is called each time files were added (the workers are fed meanwhile).
    ``files``: the (empty) list to walk into; a new one when None.
    """
    files = SplitStrings(os.sep) if files is None else files
    skipped: list[SkippedFile] = []
    root_st = root.stat()
    visited = {(root_st.st_dev, root_st.st_ino)}
    # A stack of iterators over sorted directory listings gives a depth-first, sorted walk.
    stack: list[Iterator[os.DirEntry[str]]] = []

    def enter(directory: str) -> None:
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=_name)
        except PermissionError:
            skipped.append(
                SkippedFile(Path(directory), "directory not readable (permission denied)")
            )
            return
        except OSError as exc:
            skipped.append(SkippedFile(Path(directory), f"directory not readable ({exc.strerror})"))
            return
        stack.append(iter(entries))

    enter(str(root))
    while stack:
        # The files of a folder up to its next subfolder, added at once (SplitStrings.extend:
        # no Python call per file beyond the two type checks, issue 16 item 4).
        run: list[str] = []
        for entry in stack[-1]:
            try:
                if entry.is_file():  # the type the listing gave (d_type): no stat
                    run.append(entry.path)
                    continue
                if not entry.is_dir():
                    # Never opened: a FIFO would block discovery, /dev/zero would never end.
                    skipped.append(SkippedFile(Path(entry.path), _not_regular(entry)))
                    continue
                st = entry.stat()
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    reason = (
                        "symbolic link to a folder already walked"
                        if entry.is_symlink()
                        else "folder already walked through a symbolic link"
                    )
                    skipped.append(SkippedFile(Path(entry.path), reason))
                    continue
            except OSError as exc:
                # A symlink loop (ELOOP) or an entry removed while walking.
                skipped.append(
                    SkippedFile(Path(entry.path), f"cannot be examined ({exc.strerror})")
                )
                continue
            visited.add(key)
            files.extend(run)
            enter(entry.path)  # walked next, before the rest of this folder
            break
        else:
            files.extend(run)
            stack.pop()
        if run and walked is not None:
            walked(files)
    return files, skipped


_name = operator.attrgetter("name")


def _not_regular(entry: os.DirEntry[str]) -> str:
    """The skip reason of a walked entry that is neither a folder nor a regular file."""
    if not entry.is_symlink():
        return not_regular_reason(entry.stat(follow_symlinks=False).st_mode)
    try:
        mode = os.stat(entry.path).st_mode
    except FileNotFoundError:
        return "broken symbolic link"
    target = os.readlink(entry.path)
    return f"symbolic link to {target}: {not_regular_reason(mode)}"


def _examine_chunk(paths: list[str]) -> list[Result]:
    return [examine(p) for p in paths]


Chunk = tuple[Sequence[str], Packed]  # names (paths, or members of an archive) and results


def _examine_all(
    paths: SplitStrings, workers: int, report: Callable[[int], None]
) -> Iterator[Chunk]:
    """Examine ``paths`` in order, a chunk at a time; with ``workers`` > 1, threads overlap the
    file reads.

    Header parsing holds the GIL, so threads do not add CPU; they hide I/O latency on a cold
    cache or a network file system, where most of the time is spent waiting in open/read.
    Worker processes (:class:`xnatio.examine.Workers`) run the parse on every core instead.
    """
    chunks = (part(paths, i, min(i + _CHUNK, len(paths))) for i in range(0, len(paths), _CHUNK))
    done = 0
    if workers <= 1 or len(paths) < _THREAD_THRESHOLD:
        for names in chunks:
            yield names, pack(_examine_chunk(names))
            done += len(names)
            report(done)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xnatio-discover")
    # A few chunks ahead of the reader, not all of them: Executor.map would submit every chunk
    # at once and hold each result (a header's strings) until read (issue 16 item 4).
    pending: deque[tuple[list[str], Future[list[Result]]]] = deque()
    try:
        for names in chunks:
            pending.append((names, pool.submit(_examine_chunk, names)))
            if len(pending) < 4 * workers:
                continue
            names, results = pending.popleft()
            yield names, pack(results.result())
            done += len(names)
            report(done)
        while pending:
            names, results = pending.popleft()
            yield names, pack(results.result())
            done += len(names)
            report(done)
    finally:
        # On Ctrl-C (or an error in the caller) drop the chunks not started yet.
        pool.shutdown(wait=False, cancel_futures=True)


class _Progress:
    def __init__(self, callback: ProgressCallback | None, total: int, what: str) -> None:
        self.callback = callback
        self.total = total
        self.what = what
        self.last = 0.0

    def __call__(self, current: int, *, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self.last >= _PROGRESS_EVERY:
            self.last = now
            self.callback(ProgressEvent(Phase.DISCOVER, current, self.total, self.what))


def _discover_directory(
    root: Path, callback: ProgressCallback | None, workers: int | None, processes: int | None
) -> Manifest:
    manifest = Manifest(root=root)
    with contextlib.ExitStack() as stack:
        pool: Workers | None = None
        auto = processes is None and workers != 1 and _process_count() > 1
        if auto and _looks_big(root):
            # Started before the walk, so that they import while it runs; only for a folder
            # big enough (a cheap look at the top level: a session of a few files never pays).
            pool = stack.enter_context(Workers(_process_count()))
        elif processes:
            pool = stack.enter_context(Workers(processes))
        locate = _locate(root)
        collector = _Collector(manifest, locate)
        walked = None
        if pool is not None:
            feeding = pool

            # Workers started before the walk are sent chunks of it as it goes, and their
            # answers are taken as they come (Workers.feed, Workers.ready): they never wait
            # for the walk to end.
            def walked(files: SplitStrings) -> None:
                feeding.feed(files, _PROCESS_CHUNK)
                for names, packed in feeding.ready(files, _PROCESS_CHUNK):
                    collector.take(names, packed)

        walk = SplitStrings(os.sep)
        if locate is None and os.sep == "/":
            # The files' paths are the walk's own strings: kept once, not in the walk's list
            # and again in the file table (FileTable.share_paths; issue 16 item 4).
            manifest.files.share_paths(walk)
        paths, manifest.skipped = _walk(root, walked, walk)
        if auto and pool is None and len(paths) >= PROCESS_THRESHOLD:  # the early look missed
            pool = stack.enter_context(Workers(_process_count()))
        report = _Progress(callback, len(paths), f"reading DICOM headers under {root}")
        report(0, force=True)
        chunks: Iterable[Chunk]
        if pool is not None and (processes or len(paths) >= PROCESS_THRESHOLD or pool.answered):
            chunks = pool.examine(paths, _PROCESS_CHUNK, report)
        else:
            stack.close()  # the workers are not needed (none has answered)
            chunks = _examine_all(paths, _DEFAULT_THREADS if workers is None else workers, report)
        for names, packed in chunks:
            collector.take(names, packed)
        collector.finish()
    report(len(paths), force=True)
    return manifest


def _process_count() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, _MAX_PROCESSES))


def _looks_big(root: Path) -> bool:
    """Could ``root`` hold :data:`PROCESS_THRESHOLD` files? True when its top level and the
    first level of folders below it list that many entries (or more folders than can be
    looked at cheaply); a guess that only decides whether workers start early."""
    seen = 0
    folders: list[str] = []
    try:
        with os.scandir(root) as it:
            for entry in it:
                seen += 1
                if seen >= PROCESS_THRESHOLD:
                    return True
                if entry.is_dir():
                    folders.append(entry.path)
    except OSError:
        return False
    for folder in folders[:64]:
        with contextlib.suppress(OSError), os.scandir(folder) as it:
            for _ in it:
                seen += 1
                if seen >= PROCESS_THRESHOLD:
                    return True
    return len(folders) > 64


def _locate(root: Path) -> Callable[[str], str] | None:
    """How a walked name becomes the path a file is recorded under (see :class:`_PathMaker`);
    None: the name itself. The walk starts from ``str(root)``, which a Path keeps in its normal
    form, and joins each entry's name to its folder with one "/", so every name it makes is in
    that form already, except under "." ("./a" is "a"): no per-file work then."""
    return _PathMaker() if str(root) == "." else None


class _PathMaker:
    """The path string a walked file is recorded under: ``str(Path(name))`` (so names read as
    they always have, ``./a/b`` as ``a/b``), which is ``name`` itself, the very string the walk
    made, whenever its folder is already in that form (one check per folder). A
    :class:`DicomFile` keeps that one string, not a ``Path``."""

    def __init__(self) -> None:
        self._folders: dict[str, str | None] = {}  # folder -> its normal form, None: the same

    def __call__(self, name: str) -> str:
        folder, base = os.path.split(name)
        if folder in self._folders:
            normal = self._folders[folder]
        else:
            as_path = str(Path(folder))
            normal = self._folders[folder] = None if as_path == folder else as_path
        if normal is None:
            return name
        return base if normal == "." else os.path.join(normal, base)


# -- archives ----------------------------------------------------------------------------------


def _discover_archive(archive: Path, callback: ProgressCallback | None) -> Manifest:
    fmt = archive_format(archive)
    manifest = Manifest(root=archive.parent, source_archive=archive)
    try:
        if fmt == "zip":
            members = list(_zip_members(archive, callback))
        else:
            members = list(_tar_members(archive, fmt == "tgz", callback))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise UsageError(f"{archive} could not be read as a {fmt} archive: {exc}.") from None
    # Path order (by component), as the directory walk yields: "a/b" before "a.b".
    members.sort(key=lambda m: m[0].split("/"))
    names = [name for name, _ in members]
    chunks = [(names, pack([result for _, result in members]))]
    del members
    _collect(manifest, chunks, None, len(names), archive=str(archive))
    return manifest


def _zip_members(archive: Path, callback: ProgressCallback | None) -> Iterator[tuple[str, Result]]:
    with zipfile.ZipFile(archive) as zf:
        # Unique names: two entries of one name are two files (archive.EntryNames).
        infos = [(name, i) for name, i in zip_entries(zf).items() if not i.is_dir()]
        report = _Progress(callback, len(infos), f"reading DICOM headers in {archive.name}")
        report(0, force=True)
        for n, (name, info) in enumerate(infos, 1):
            report(n - 1)
            try:
                mtime = int(datetime(*info.date_time).timestamp() * 1e9)
            except (ValueError, OverflowError):
                mtime = 0  # a zip date that is not a date (month 0): keep the entry anyway
            if info.file_size == 0:
                yield name, ("empty file (0 bytes)", 0)
                continue
            try:
                with zf.open(info) as fp:
                    yield name, examine_stream(fp, info.file_size, mtime)
            except (RuntimeError, NotImplementedError, zipfile.BadZipFile) as exc:
                # Encrypted members, unsupported compression, CRC errors.
                yield name, (f"archive member cannot be read ({exc})", 0)
        report(len(infos), force=True)


def _tar_members(
    archive: Path, gzipped: bool, callback: ProgressCallback | None
) -> Iterator[tuple[str, Result]]:
    # A compressed tar is read front to back once ("r|gz"), never seeked or extracted.
    report = _Progress(callback, 0, f"reading DICOM headers in {archive.name}")
    report(0, force=True)
    opened = tarfile.open(archive, "r|gz") if gzipped else tarfile.open(archive, "r:")  # noqa: SIM115
    n = 0
    entry_name = EntryNames()  # two entries of one name are two files
    with opened as tf:
        for info in tf:
            name = entry_name(info.name)
            if info.isdir():
                continue
            report(n)
            n += 1
            if not info.isfile():
                yield name, ("not a regular file (link or device entry)", 0)
                continue
            if info.size == 0:
                yield name, ("empty file (0 bytes)", 0)
                continue
            fp = tf.extractfile(info)
            if fp is None:
                yield name, ("archive member cannot be read", 0)
                continue
            with fp:
                yield name, examine_stream(fp, info.size, int(info.mtime * 1e9))
    report.total = n  # known only now: a streamed tar has no index
    report(n, force=True)


# -- shared ------------------------------------------------------------------------------------


def _collect(
    manifest: Manifest,
    chunks: Iterable[Chunk],
    locate: Callable[[str], str] | None,
    expected: int = 0,
    archive: str | None = None,
) -> None:
    """Turn examined chunks (in sorted name order) into the manifest's file table (see
    :class:`_Collector`)."""
    collector = _Collector(manifest, locate, expected, archive)
    for names, packed in chunks:
        collector.take(names, packed)
    collector.finish()


class _Collector:
    """Turns examined chunks (in sorted name order) into the manifest's file table (columns, no
    record per file: issue 16 item 4), a chunk at a time (FileTable.add_many); keeps the first
    of duplicates. The names are paths, made into the recorded ones by ``locate`` (None: as
    they are), or, with ``archive``, the members of that archive. ``expected``: about how many
    files there are (0: not known yet, the walk goes on; the index grows). The files skipped
    here follow those already in ``manifest.skipped`` (:meth:`finish`: the walk's come first,
    though chunks are taken while it runs).

    The one place a Manifest's files are made from what discovery read (xnatio.examine.Found).
    """

    def __init__(
        self,
        manifest: Manifest,
        locate: Callable[[str], str] | None,
        expected: int = 0,
        archive: str | None = None,
    ) -> None:
        self.manifest = manifest
        self.locate = locate
        self.archive = archive
        self.skipped: list[SkippedFile] = []
        # SOP Instance UID -> the file that has it first
        self.first_seen = SopIndex(manifest.files, expected)

    def take(self, names: Sequence[str], packed: Packed) -> None:
        manifest, archive, files, first_seen = (
            self.manifest,
            self.archive,
            self.manifest.files,
            self.first_seen,
        )
        if self.locate is not None:
            names = list(map(self.locate, names))
        skips = packed[0]
        if skips:
            for at, reason, skipped_size in skips:
                self.skipped.append(SkippedFile(_shown(names[at], archive), reason, skipped_size))
            skipped = {at for at, _, _ in skips}
            names = [name for at, name in enumerate(names) if at not in skipped]
        keep = _firsts(manifest, first_seen, names, packed, archive)
        if len(keep) < len(names):
            names = [names[j] for j in keep]
            packed = cast(Packed, ([], *([column[j] for j in keep] for column in packed[1:])))
        _, size, mtime, ctime, klass, uid, study, series, number, ts, patient = packed
        start = len(files)
        if archive is None:
            files.add_many(
                names, size, mtime, study, series, uid, klass, number, ts, patient, ctime
            )
        else:
            for j, name in enumerate(names):
                files.add(
                    archive,
                    size[j],
                    mtime[j],
                    study[j],
                    series[j],
                    uid[j],
                    klass[j],
                    number[j],
                    ts[j],
                    patient[j],
                    name,
                    ctime[j],
                )
        for j, sop_uid in enumerate(uid):
            first_seen.add(sop_uid, start + j)

    def finish(self) -> None:
        self.manifest.skipped.extend(self.skipped)
        self.skipped = []


def _firsts(
    manifest: Manifest,
    first_seen: SopIndex,
    names: Sequence[str],
    packed: Packed,
    archive: str | None,
) -> list[int]:
    """The positions of the files of a chunk (``names``, ``packed`` without its skipped files)
    whose SOP Instance UID neither an earlier file of the table (``first_seen``) nor an earlier
    one of the chunk holds; the others go to ``manifest.duplicates``, in order."""
    files = manifest.files
    _, size, _, _, _, uid, _, series, _, _, _ = packed
    firsts: dict[str, int] = {}
    keep: list[int] = []
    for j, sop_uid in enumerate(uid):
        before = first_seen.get(sop_uid)
        if before is not None:
            first_name = files.fspath(before) if archive is None else files.member(before)
        elif sop_uid in firsts:
            first_name = names[firsts[sop_uid]]
        else:
            firsts[sop_uid] = j
            keep.append(j)
            continue
        manifest.duplicates.append(
            SkippedFile(
                _shown(names[j], archive),
                f"duplicate of {first_name} (same SOP Instance UID)",
                size[j],
                sop_instance_uid=sop_uid,
                series_uid=series[j],
            )
        )
    return keep


def _shown(name: str, archive: str | None) -> Path:
    return Path(archive, name) if archive is not None else Path(name)
