"""Every DICOM file under several roots, grouped into studies by StudyInstanceUID.

    ROOT... -discover-> Manifests -group-> StudySet (one Study per StudyInstanceUID)

Each root (a folder or a .zip/.tar/.tgz archive) is walked by :func:`xnatio.discover.discover`,
so a file is recognised as DICOM exactly as ``xio upload-dicom`` recognises it, and every other
file is kept with its reason. A study spread over several folders or roots is one study; one
folder holding several studies gives several. XNAT keys sessions by StudyInstanceUID (facts 1.2),
which is why the study, not the folder, is the unit of an upload.

Besides its files, a study carries the header attributes label templates need
(:mod:`xnatio.many.templates`): every top-level attribute of its first instance, read by keyword
with pydicom (``stop_before_pixels``), and ``Modality``, the most frequent over its series. Only
one small ``dict`` of strings is kept per study, never a pydicom Dataset.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
import warnings
import zipfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# pydicom's warnings and log level are process-wide: one lock for every reader that quiets them.
from xnatio.dicomheader import _PYDICOM_LOCK as PYDICOM_LOCK
from xnatio.discover import archive_format, discover
from xnatio.malloc import cap_arenas
from xnatio.models import (
    DicomFile,
    FileTable,
    Manifest,
    Phase,
    ProgressCallback,
    ProgressEvent,
    SkippedFile,
    SopIndex,
    file_path,
)

# Modalities of objects that accompany images (presentation states, reports, key-object
# selections, encapsulated documents): they name a study only when it holds nothing else.
NON_IMAGE_MODALITIES = frozenset({"PR", "SR", "KO", "DOC"})
# Attribute values kept for templates: text, numbers, dates, UIDs; never bulk or binary data.
_SKIPPED_VRS = frozenset({"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"})

_MODALITY = ("Modality",)
_PROGRESS_EVERY = 0.1  # seconds between progress events


@dataclass(slots=True)
class Study:
    """One StudyInstanceUID: its files wherever they were found, and its header attributes."""

    study_uid: str
    # Its files: a view of the rows of the manifests' file table (no record per file: a plan of
    # a million files stays within 200 MB, issue 16 item 4); records are accepted too.
    files: FileTable = field(default_factory=FileTable)
    # Second and later copies of this study's instances (same SOP Instance UID): not sent.
    duplicates: list[SkippedFile] = field(default_factory=list)
    # Per root, the deepest folder holding all of the study's files there (an archive: itself).
    folders: tuple[Path, ...] = ()
    # Keyword -> value (text) of every top-level attribute of the first instance; "Modality"
    # is the study's (most frequent over its series, see :func:`study_modality`).
    attributes: Mapping[str, str] = field(default_factory=dict)
    # Why the first instance's attributes could not be read ("" when they were).
    attributes_error: str = ""
    # The first instance (lowest series number, then path): the one the attributes are from.
    first_instance: str = ""
    # Newest status change (ctime) of its files or archives, in ns: a file copied with its old
    # mtime kept (cp -p, rsync -a) is still new by this; 0 when not looked at.
    newest_change_ns: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.files, FileTable):
            self.files = FileTable(self.files)

    @property
    def patient_id(self) -> str:
        return self.attributes.get("PatientID", self.files[0].patient_id if self.files else "")

    @property
    def modality(self) -> str:
        return self.attributes.get("Modality", "")

    @property
    def file_count(self) -> int:
        return len(self.files)

    @property
    def total_bytes(self) -> int:
        return self.files.total_bytes

    @property
    def series_count(self) -> int:
        return len(set(self.files.codes("series_uid")[0]))

    @property
    def newest_mtime(self) -> float:
        """When a file of the study last changed (seconds since the epoch): the newest
        modification time, or status change time when that is newer (see ``newest_change_ns``)."""
        files = self.files
        newest = max(map(files.mtime_ns, range(len(files))), default=0)
        return max(newest, self.newest_change_ns) / 1e9

    def manifests(self) -> list[Manifest]:
        """The study's files as manifests :func:`xnatio.pipeline.upload` sends as they are.

        Usually one. Files inside archives need a manifest per archive (the transports read
        members from ``Manifest.source_archive``), so a study spread over an archive and a
        folder, or over two archives, gives one per source; each is sent under the same labels,
        and XNAT merges them into one session (facts 1.5). Folder files share one manifest whose
        root is their common folder. Duplicates go with the first manifest.
        """
        files = self.files
        loose: list[int] = []
        by_archive: dict[str, list[int]] = {}
        for i in range(len(files)):
            if files.member(i) is None:
                loose.append(i)
            else:
                by_archive.setdefault(files.fspath(i), []).append(i)
        out: list[Manifest] = []
        if loose:
            folders = {files.folder(i) for i in loose}  # each folder once, not a path per file
            root = Path(os.path.commonpath([str(Path(f or ".")) for f in folders]))
            out.append(Manifest(root=root, files=files.take(loose)))
        for archive, members in by_archive.items():
            where = Path(archive)
            out.append(Manifest(root=where.parent, files=files.take(members), source_archive=where))
        if out:
            out[0].duplicates = list(self.duplicates)
        return out


@dataclass(slots=True)
class StudySet:
    """What :func:`find_studies` found: the studies, and every file that is not in one."""

    roots: tuple[Path, ...]
    studies: list[Study] = field(default_factory=list)
    # Files that are not DICOM (or not sendable), each with its reason.
    skipped: list[SkippedFile] = field(default_factory=list)
    # Roots left out because another root holds them (walked once, as part of that root).
    notes: list[str] = field(default_factory=list)

    def by_uid(self) -> dict[str, Study]:
        return {s.study_uid: s for s in self.studies}

    @property
    def file_count(self) -> int:
        return sum(s.file_count for s in self.studies)


def find_studies(
    roots: Sequence[Path | str],
    *,
    progress: ProgressCallback | None = None,
    discover_manifest: Callable[[Path], Manifest] | None = None,
) -> StudySet:
    """Every DICOM file under ``roots``, grouped by StudyInstanceUID, with each study's attributes.

    A root that does not exist, or is neither a folder nor an archive, raises UsageError (as for
    ``xio upload-dicom``); an empty root, or one holding no DICOM, gives no study (a watched
    outbox is often empty). A root inside another root is walked once, as part of the outer one.
    ``discover_manifest`` replaces the walk of one root (tests).
    """
    # The fixed mmap threshold of an upload (xnatio.malloc), before the walk: the columns and
    # the index of a million files are large blocks grown and freed as it goes, which glibc's
    # own threshold left resident in the heap (10 MB of the million-file plan's peak: "planmem"
    # in docs/performance.md; issue 16 item 4).
    cap_arenas()
    paths = _distinct_roots([Path(r) for r in roots])
    found = StudySet(roots=tuple(paths.kept))
    found.notes.extend(paths.notes)

    def walk(root: Path) -> Manifest:
        return discover(root, progress=progress, require_dicom=False)

    manifests = [(discover_manifest or walk)(root) for root in paths.kept]
    for m in manifests:
        found.skipped.extend(m.skipped)
    # One root walked by discover(): its files hold each SOP Instance UID once already.
    unique = discover_manifest is None and len(manifests) == 1
    found.studies, leftovers = group_manifests(manifests, unique=unique)
    found.skipped.extend(leftovers)
    read_attributes(found.studies, progress)
    for study in found.studies:
        study.newest_change_ns = newest_change(study.files)
    found.studies.sort(key=_study_order)
    return found


@dataclass
class _Roots:
    kept: list[Path]
    notes: list[str]


def _distinct_roots(roots: Sequence[Path]) -> _Roots:
    """Drop repeated roots and roots inside another root (their files would be found twice)."""
    out = _Roots([], [])
    resolved: list[tuple[Path, Path]] = []
    for root in roots:
        try:
            real = root.resolve()
        except OSError:
            real = root.absolute()
        for other, other_real in resolved:
            if real == other_real or (other_real.is_dir() and real.is_relative_to(other_real)):
                out.notes.append(f"{root} is inside {other}, walked once as part of it")
                break
        else:
            # A root given before the folder that holds it: the outer one wins.
            inner = [(o, r) for o, r in resolved if r != real and r.is_relative_to(real)]
            if inner and root.is_dir():
                for o, r in inner:
                    resolved.remove((o, r))
                    out.kept.remove(o)
                    out.notes.append(f"{o} is inside {root}, walked once as part of it")
            resolved.append((root, real))
            out.kept.append(root)
    return out


def group_manifests(
    manifests: Iterable[Manifest], *, unique: bool = False
) -> tuple[list[Study], list[SkippedFile]]:
    """Group the files of ``manifests`` by StudyInstanceUID (no attributes read yet).

    Each file ends up in exactly one place: its study's files, or (a SOP Instance UID already
    seen, in this or an earlier manifest) its study's duplicates; a duplicate whose study cannot
    be told is returned in the second list. The study's folders are, per manifest, the deepest
    folder holding its files there, or the archive.

    A study's files are a view of one file table (that of the manifest when there is one,
    else all manifests' files in one), so a million files cost no record each: rows are
    grouped by the table's study codes into arrays (4 bytes a file), never into lists of ints.
    ``unique``: the caller knows no SOP Instance UID is in two of these files (one manifest
    straight from :func:`xnatio.discover.discover`, which kept the first of each): no index of
    them is built (16 MB and a decoded UID per file at a million files, issue 16 item 4).
    """
    manifests = list(manifests)
    table, starts = _one_table(manifests)
    study_codes, study_uids = table.code_column("study_uid")
    folder_codes, folder_names = table.code_column("folder")
    studies: dict[int, Study] = {}  # by study code, in order of first appearance
    rows: dict[int, array[int]] = {}
    leftovers: list[SkippedFile] = []
    # SOP Instance UID -> its first file
    seen = None if unique else SopIndex(table, len(table))
    folders: dict[int, list[Path]] = {}

    def rows_of(code: int) -> array[int]:
        """The rows kept of the study ``code`` (its Study made as it first appears)."""
        kept = rows.get(code)
        if kept is None:
            kept = rows[code] = array("I")
            studies[code] = Study(study_uids[code])
        return kept

    for m, start in zip(manifests, starts, strict=True):
        stop = start + len(m.files)
        if seen is None:
            for i in range(start, stop):
                rows_of(study_codes[i]).append(i)
            kept_here: Iterable[int] = range(start, stop)
        else:
            kept_rows: array[int] = array("I")
            kept_here = kept_rows
            for i in range(start, stop):
                code = study_codes[i]
                kept = rows_of(code)
                sop = table.sop_instance_uid(i)
                first = seen.get(sop)
                if first is not None:
                    studies[code].duplicates.append(
                        SkippedFile(
                            Path(table.name_of(i)),
                            f"duplicate of {table.name_of(first)} (same SOP Instance UID)",
                            table.size(i),
                        )
                    )
                    continue
                seen.add(sop, i)
                kept.append(i)
                kept_rows.append(i)
        # Per study, the distinct folders of its files here (codes: not a string per file).
        here: dict[int, set[int]] = {}
        pairs = (
            {(study_codes[i], folder_codes[i]) for i in kept_here}
            if seen is not None
            else set(zip(study_codes[start:stop], folder_codes[start:stop], strict=True))
        )
        for code, folder in pairs:
            here.setdefault(code, set()).add(folder)
        if m.duplicates:
            # discover() kept the first copy within one root; a duplicate goes with its study.
            names: dict[str, str] = {}
            for f in m.files:
                names[file_path(f)] = f.study_uid
                if f.member is not None:
                    names[f.member] = f.study_uid
            by_uid = {s.study_uid: s for s in studies.values()}
            for d in m.duplicates:
                duplicate_of = _duplicate_study(d, names)
                if duplicate_of is None:
                    leftovers.append(d)
                else:
                    by_uid[duplicate_of].duplicates.append(d)
        for code in here:  # each study's list: one folder per manifest, in their order
            where = (
                Path(os.path.commonpath([os.path.dirname(folder_names[f]) for f in here[code]]))
                if m.source_archive is None
                else m.source_archive or m.root
            )
            folders.setdefault(code, []).append(where)
    out: list[Study] = []
    for code, study in studies.items():
        if not rows[code]:
            # Only copies of instances already found under another study UID: nothing to send.
            leftovers.extend(study.duplicates)
            continue
        study.files = table.take(rows.pop(code))
        study.folders = tuple(dict.fromkeys(folders.get(code, [])))
        out.append(study)
    return out, leftovers


def _one_table(manifests: Sequence[Manifest]) -> tuple[FileTable, list[int]]:
    """The files of ``manifests`` in one table, and where each manifest's files start in it:
    the manifest's own table when there is one manifest (no copy)."""
    if len(manifests) == 1 and not manifests[0].files.is_view:
        return manifests[0].files, [0]
    table = FileTable()
    starts: list[int] = []
    for m in manifests:
        starts.append(len(table))
        for f in m.files:
            table.append(f)
    return table, starts


def _duplicate_study(d: SkippedFile, names: Mapping[str, str]) -> str | None:
    """The study of a duplicate discover() reported: that of the copy it duplicates."""
    prefix = "duplicate of "
    if not d.reason.startswith(prefix):
        return None
    name = d.reason[len(prefix) :].rsplit(" (same SOP Instance UID)", 1)[0]
    return names.get(name) or names.get(str(Path(name)))


def newest_change(files: Iterable[DicomFile]) -> int:
    """The newest ctime (or mtime) of ``files``' paths, in ns; an archive counts once.

    The mtime a file carries can be old while it is being copied (``cp -p``, ``rsync -a`` set it
    at the end or keep the source's), but the copy's status change time is when it was written;
    a file that vanished since discovery counts as changed now (its study is not complete).
    """
    newest = 0
    paths = (
        {files.fspath(i) for i in range(len(files))}
        if isinstance(files, FileTable)
        else {f.fspath for f in files}
    )
    for path in paths:  # strings: no Path made per file
        try:
            st = os.stat(path)
        except OSError:
            return time.time_ns()
        newest = max(newest, st.st_ctime_ns, st.st_mtime_ns)
    return newest


def _study_order(s: Study) -> tuple[str, str, str, str]:
    a = s.attributes
    return (a.get("PatientID", ""), a.get("StudyDate", ""), a.get("StudyTime", ""), s.study_uid)


# -- attributes --------------------------------------------------------------------------------


def _first(files: FileTable, positions: Iterable[int]) -> int:
    """The position of the first instance among ``positions`` of ``files``: the lowest series
    number, then path (read from the columns: no record per file)."""

    def key(i: int) -> tuple[bool, int, str]:
        number = files.series_number(i)
        return (number is None, number or 0, files.name_of(i))

    return min(positions, key=key)


def study_modality(
    series_modalities: Mapping[str, str], files_per_series: Mapping[str, int]
) -> str:
    """The study's modality: the most frequent over its series.

    Presentation states, reports, key objects and documents (PR, SR, KO, DOC) count only when
    the study holds nothing else; a tie goes to the modality with more files, then the first
    alphabetically, so the answer never depends on the order files were found in.
    """
    present = {s: m for s, m in series_modalities.items() if m}
    images = {s: m for s, m in present.items() if m not in NON_IMAGE_MODALITIES}
    chosen = images or present
    if not chosen:
        return ""
    series = Counter(chosen.values())
    files: Counter[str] = Counter()
    for s, m in chosen.items():
        files[m] += files_per_series.get(s, 0)
    return min(series, key=lambda m: (-series[m], -files[m], m))


def read_attributes(studies: Sequence[Study], progress: ProgressCallback | None = None) -> None:
    """Fill each study's ``attributes`` (first instance, all keywords) and its ``Modality``.

    One full header read per study and one per series (for its Modality); archive members are
    read in one pass over each archive. ``progress`` gets DISCOVER events counting the reads.
    """
    firsts: dict[str, DicomFile] = {}
    series_firsts: dict[str, dict[str, DicomFile]] = {}
    # File -> read every attribute (a first instance) or only Modality (a series' first).
    wanted: dict[DicomFile, bool] = {}
    for study in studies:
        if not study.files:
            continue
        files = study.files
        first = firsts[study.study_uid] = files[_first(files, range(len(files)))]
        study.first_instance = file_path(first)
        codes, values = files.codes("series_uid")
        by_series: dict[int, list[int]] = {}
        for i, code in enumerate(codes):
            by_series.setdefault(code, []).append(i)
        reps = series_firsts[study.study_uid] = {
            values[code]: files[_first(files, positions)] for code, positions in by_series.items()
        }
        for rep in reps.values():
            wanted.setdefault(rep, False)
        wanted[first] = True
    what = (
        f"reading the header attributes of {len(firsts)} stud{'y' if len(firsts) == 1 else 'ies'}"
    )
    headers: dict[DicomFile, dict[str, str] | str] = {}
    last = 0.0
    for f, result in _read_headers(wanted):
        headers[f] = result
        if progress is not None and time.monotonic() - last >= _PROGRESS_EVERY:
            last = time.monotonic()
            progress(ProgressEvent(Phase.DISCOVER, len(headers), len(wanted), what))
    if progress is not None and wanted:
        progress(ProgressEvent(Phase.DISCOVER, len(headers), len(wanted), what))
    for study in studies:
        if not study.files:
            continue
        result = headers.get(firsts[study.study_uid], "it was not read")
        attributes: dict[str, str] = {}
        if isinstance(result, str):
            study.attributes_error = f"{study.first_instance}: {result}"
        else:
            attributes = dict(result)
        modalities: dict[str, str] = {}
        for series_uid, rep in series_firsts[study.study_uid].items():
            header = headers.get(rep)
            if isinstance(header, dict):
                modalities[series_uid] = header.get("Modality", "")
        codes, values = study.files.codes("series_uid")
        counts = Counter(values[code] for code in codes)
        modality = study_modality(modalities, counts)
        if modality:
            attributes["Modality"] = modality
        else:
            attributes.pop("Modality", None)
        study.attributes = attributes


def _read_headers(
    wanted: Mapping[DicomFile, bool],
) -> Iterator[tuple[DicomFile, dict[str, str] | str]]:
    """(file, attributes or the reason they could not be read) for each file of ``wanted``."""
    by_archive: dict[Path, list[DicomFile]] = {}
    for f, full in wanted.items():
        if f.member is None:
            try:
                with open(f.path, "rb") as fp:
                    yield f, header_attributes(fp, None if full else _MODALITY)
            except OSError as exc:
                yield f, f"{f.path} could not be read ({exc.strerror or exc})"
        else:
            by_archive.setdefault(f.path, []).append(f)
    for archive, members in by_archive.items():
        yield from _read_members(archive, members, wanted)


def _read_members(
    archive: Path, files: list[DicomFile], wanted: Mapping[DicomFile, bool]
) -> Iterator[tuple[DicomFile, dict[str, str] | str]]:
    by_name = {f.member or "": f for f in files}
    done: set[str] = set()
    fmt = archive_format(archive)
    try:
        if fmt == "zip":
            with zipfile.ZipFile(archive) as zf:
                for name, f in by_name.items():
                    with zf.open(name) as member:
                        yield f, header_attributes(member, None if wanted[f] else _MODALITY)
                    done.add(name)
        else:
            # A compressed tar is read front to back once, as discovery read it.
            opened = tarfile.open(archive, "r|gz") if fmt == "tgz" else tarfile.open(archive, "r:")  # noqa: SIM115
            with opened as tf:
                for info in tf:
                    found = by_name.get(info.name)
                    if found is None or info.name in done:
                        continue
                    data = tf.extractfile(info)
                    if data is None:
                        continue
                    with data:
                        # A member of a streamed tar cannot seek, which pydicom needs.
                        member = io.BytesIO(data.read())
                    yield found, header_attributes(member, None if wanted[found] else _MODALITY)
                    done.add(info.name)
                    if len(done) == len(by_name):
                        break
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError, KeyError) as exc:
        reason = f"{archive} could not be read again ({exc})"
        for name, f in by_name.items():
            if name not in done:
                yield f, reason
        return
    for name, f in by_name.items():
        if name not in done:
            yield f, f"{archive}/{name} is no longer in the archive"


def header_attributes(fp: IO[bytes], keywords: Sequence[str] | None = None) -> dict[str, str] | str:
    """Keyword -> text of every top-level attribute of the DICOM object in ``fp`` (pixel data and
    other bulk or binary values left out), or only of ``keywords``; or the one-sentence reason
    it could not be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.multival import MultiValue

    try:
        with PYDICOM_LOCK, warnings.catch_warnings():
            # pydicom warns about every oddity it tolerates; catch_warnings is process-wide.
            warnings.simplefilter("ignore")
            log = logging.getLogger("pydicom")
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                ds = pydicom.dcmread(
                    fp,
                    stop_before_pixels=True,
                    force=True,
                    specific_tags=None if keywords is None else list(keywords),
                )
                out: dict[str, str] = {}
                for elem in ds:
                    if elem.VR in _SKIPPED_VRS or not elem.keyword:
                        continue
                    value = elem.value
                    if value is None or isinstance(value, bytes | bytearray):
                        text = ""
                    elif isinstance(value, MultiValue | list | tuple):
                        text = "\\".join(str(v) for v in value)
                    else:
                        text = str(value)
                    out[elem.keyword] = text.strip(" \x00")
            finally:
                log.setLevel(level)
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, AttributeError) as exc:
        return f"its header could not be read by pydicom ({exc})"
    return out
