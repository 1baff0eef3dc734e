"""Read back what landed in XNAT and compare it with the local manifest, instance by instance.

The server side comes from three reads (facts 4): the experiment (``…/experiments/E?format=json``:
its ``data_fields.UID`` is the StudyInstanceUID, and its ``scans/scan`` children carry each scan's
``ID`` and, where XNAT stored it, the Series Instance ``UID``), the scan list, and per scan
``…/scans/{ID}/resources/DICOM/files?format=json`` (``Name``, ``Size``, ``digest``).

What survives on the server. XNAT re-encodes every file it stores, and its site-wide
anonymization script, enabled by default, rewrites Patient Name, Patient ID and Study Description
unless ``prevent_anon=true`` (facts 1.7); the catalog ``digest`` is the MD5 of the *stored* file.
So bytes, sizes and MD5s of the upload are in general not on the server. The file *name* is: xio
sends each instance as ``{SOP Instance UID}.dcm`` (:func:`xnatio.archive.instance_file_name`) and
XNAT keeps an uploaded name unless another instance holds it (facts 1.2, ``rename`` row). Hence:

1. **By name.** A local file is *landed* when a scan of the session holds its name. A local file
   whose name is nowhere is *missing*: that instance, by SOP Instance UID, is not on the server
   (a file deleted there is reported so). A local series is paired with the scan holding most of
   its instances, so two series that share a Series Number (XNAT's scan ID, facts 4
   *(unconfirmed)*) are still told apart.
2. **Bytes, where they are ours.** A few landed files (the first of each series, at most
   :data:`PROBES`) are compared with the server's digest. If one matches, the server stores our
   bytes (``prevent_anon`` and no re-encoding): every landed file with a digest is then compared,
   and one that differs is a failure (damaged, or changed locally since the upload). If none
   matches, the server rewrote its copies (facts 1.7): not a failure, the files are verified by
   name and the report says so once (:attr:`VerifyReport.rewritten_note`). The local MD5 of a
   file is the one computed while an upload sent it (:class:`SentDigests`: no file is read
   twice); only files this process did not send are read and hashed (the members of an archive
   PATH in one pass over it). An upload computes none when XNAT's site script will rewrite every
   file anyway (:func:`server_rewrites`).

The server's listings are read a few scans at a time (:data:`xnatio.defaults.VERIFY_LISTINGS`
requests at once, handed on in order) and each is reduced to arrays as its turn comes
(:class:`_Holders`): memory grows with the local files, not with the listing. The local files are
compared as positions in arrays over the manifest's columns, with no record per file.
3. **By count, when no name matches.** A session filled by another tool, or over C-STORE, holds
   XNAT's own file names. A local series none of whose names is on the server is paired with
   the scan of the same Series Instance UID, else with the scan whose ID is its Series Number
   when no other local series has that number; it is verified by count when that scan holds
   exactly as many files not named after another local instance, else its files fail (which of
   them are there cannot be told). Such files carry :data:`COUNT_REASON`.
4. **Another study.** When the experiment's StudyInstanceUID is known and is not the local one,
   every file fails with that reason: the label holds a different study.

Server files that match nothing local are *extra*: shown, not a failure (the session may have
held them before). Progress: with a ``progress`` callback, :func:`verify_session` emits
``Phase.VERIFY`` events counting local files (and their bytes) compared so far.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import re
import tarfile
import zipfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote

from xnatio import defaults
from xnatio.archive import EntryNames, instance_file_name, zip_entries
from xnatio.errors import ServerError, UsageError, XnatioError
from xnatio.models import (
    DicomFile,
    FileOutcome,
    FileTable,
    Outcome,
    Phase,
    ProgressCallback,
    ProgressEvent,
    SopIndex,
    file_path,
    total_bytes,
)

# A name xio gives an instance (archive.instance_file_name of a conformant UID): digits and dots.
_INSTANCE_NAME = re.compile(r"[0-9]+(\.[0-9]+)*\.dcm")
MD5_CHUNK = 1 << 20  # bytes read at a time: memory stays bounded whatever the file size
MD5_THREADS = 4
_HASH_WINDOW = 256  # files hashed per round of the thread pool
# Landed files hashed to find out whether the server stores our bytes (rule 2).
PROBES = 8

COUNT_REASON = (
    "verified by instance count in its series: the server holds the series under file names "
    "xio did not give (sent by another tool or over C-STORE)"
)
REWRITTEN_NOTE = (
    "XNAT stored its own copy of each file (re-encoded, and rewritten by its site anonymization "
    "script unless prevent_anon, facts 1.7): instances were matched by name and counted per "
    "series, bytes not compared"
)


class JsonGetter(Protocol):
    """What verification needs from :class:`xnatio.xnat.client.XnatClient`."""

    def get_json(self, path: str, params: Any = None) -> Any: ...


class SentDigests:
    """The MD5 of each instance's bytes as they were sent, computed while the request body
    streams them (the body reads every byte once anyway), so read-back compares them with the
    server's ``digest`` without reading a file again (issue 16 item 6).

    Keyed by SOP Instance UID (a string the manifest holds already), 16 raw bytes per file, not a
    hex string. Written from the sending threads (one dict store each, atomic in CPython).
    """

    __slots__ = ("_by_uid",)

    def __init__(self) -> None:
        self._by_uid: dict[str, bytes] = {}

    def record(self, f: DicomFile, digest: bytes) -> None:
        self._by_uid[f.sop_instance_uid] = digest

    def get(self, f: DicomFile) -> str | None:
        """The hex MD5 of what was sent as ``f``, or None if it was not sent by this process."""
        digest = self._by_uid.get(f.sop_instance_uid)
        return None if digest is None else digest.hex()

    def __len__(self) -> int:
        return len(self._by_uid)


SITE_SCRIPT_PATH = "/data/config/anon/script"


def server_rewrites(client: JsonGetter) -> bool | None:
    """True when XNAT will rewrite every file xio sends, so no MD5 of ours can match its catalog:
    the site-wide anonymization script is enabled (XNAT creates it enabled) and runs on each file
    at receipt, as xio never sends ``prevent_anon`` (facts 1.7; status read as facts 5 says).
    None when that cannot be told (disabled or no script: XNAT still re-encodes each header,
    facts 1.7, but whether the bytes then differ is not known; unreadable). Read once before
    sending, so that digests are computed while sending only when they may be compared."""
    try:
        rows = _rows(client.get_json(SITE_SCRIPT_PATH))
    except XnatioError:
        return None  # 404: no site script (facts 5); any other failure: not known
    return True if rows and str(rows[0].get("status", "")).lower() == "enabled" else None


@dataclass(slots=True)
class ServerFile:
    name: str
    size: int
    md5: str | None


@dataclass(slots=True)
class ServerScan:
    id: str
    uid: str
    files: list[ServerFile] = field(default_factory=list)


@dataclass(slots=True)
class ServerSession:
    """A session as read back: its scans and, when XNAT lists it, its StudyInstanceUID."""

    scans: list[ServerScan]
    study_uid: str = ""

    def names(self) -> set[str]:
        return {f.name for s in self.scans for f in s.files}


@dataclass(slots=True)
class SeriesCheck:
    """One local series against the scan it landed in."""

    series_uid: str
    series_number: int | None
    scan_id: str  # "" when no scan matched
    local: int
    on_server: int
    # Landed: found by name (or, with ``counted``, by count). ``identical``: how many of them the
    # server holds byte for byte (their MD5 matched). The files are views of the manifest's rows
    # when it was a FileTable (records made when read: no record per file held, issue 16 item
    # 4), else lists of the records given.
    verified: Sequence[DicomFile] = field(default_factory=list)
    identical: int = 0
    counted: bool = False
    missing: Sequence[DicomFile] = field(default_factory=list)
    different: Sequence[DicomFile] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    # Set when the series was paired by count and the scan holds another number of files.
    uncounted: Sequence[DicomFile] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.different and not self.uncounted


@dataclass(slots=True)
class VerifyReport:
    project: str
    subject: str
    session: str
    found: bool  # the experiment exists
    series: list[SeriesCheck] = field(default_factory=list)
    unmatched_scans: list[str] = field(default_factory=list)
    unreadable: list[tuple[DicomFile, str]] = field(default_factory=list)
    # True: the server holds our bytes (MD5s matched); False: it rewrote them; None: not known.
    byte_identical: bool | None = None
    # The experiment's StudyInstanceUID when it is not the local one (rule 4), else "".
    other_study: str = ""
    # Files in scans no local series landed in (all of them match no local file).
    unmatched_files: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.found
            and not self.other_study
            and not self.unreadable
            and all(s.ok for s in self.series)
        )

    @property
    def verified(self) -> list[DicomFile]:
        """Local files found on the server (by name, or counted per series)."""
        return [f for s in self.series for f in s.verified]

    @property
    def counted(self) -> list[DicomFile]:
        """Verified files whose series was matched by count only (rule 3)."""
        return [f for s in self.series if s.counted for f in s.verified]

    @property
    def warning(self) -> str:
        """One line when files were verified by count only, not by name."""
        n = sum(len(s.verified) for s in self.series if s.counted)
        if not n:
            return ""
        return (
            f"warning: {n} file{'' if n == 1 else 's'} verified by instance count per series "
            "only: the server holds them under file names xio did not give"
        )

    @property
    def extra(self) -> int:
        """Server files of the session that match no local file (extras in the scans local
        series landed in, and every file of the other scans)."""
        return sum(len(s.extra) for s in self.series) + self.unmatched_files

    @property
    def extra_note(self) -> str:
        """One line when the session holds files that match no local file: not a failure (the
        session may hold other data), but never hidden behind "holds all" (issue 13: a second
        copy of instances sent under other names shows here)."""
        n = self.extra
        if not n or not self.found or self.other_study:
            return ""
        scans = sorted(
            {s.scan_id for s in self.series if s.extra} | set(self.unmatched_scans),
            key=lambda x: (len(x), x),
        )
        return (
            f"the session also holds {n} file{'' if n == 1 else 's'} that match no local file "
            f"(scan{'' if len(scans) == 1 else 's'} {', '.join(scans)}): sent by another tool or "
            "under other names; xio never deletes them"
        )

    @property
    def rewritten_note(self) -> str:
        """One line when the server's copies are not our bytes (facts 1.7): not a failure."""
        verified = any(s.verified for s in self.series)
        return REWRITTEN_NOTE if self.byte_identical is False and verified else ""

    @property
    def note(self) -> str:
        """Why differing files are failures: other files of the session are byte-identical."""
        same = sum(s.identical for s in self.series)
        if not same or not any(s.different for s in self.series):
            return ""
        return (
            f"{same} other file(s) are byte-identical on the server, so the server stores our "
            "bytes and these differences are damage or local changes since the upload"
        )

    @property
    def missing(self) -> list[DicomFile]:
        """Local files with no counterpart on the server at all (not merely different)."""
        return [f for s in self.series for f in s.missing]

    @property
    def problems(self) -> list[tuple[DicomFile, str]]:
        """Every local file that did not verify, with a one-line reason."""
        out: list[tuple[DicomFile, str]] = list(self.unreadable)
        if self.other_study:
            why = (
                f"session {self.session} holds another study (StudyInstanceUID "
                f"{self.other_study}), not this one"
            )
            out.extend((f, why) for s in self.series for f in [*s.verified, *s.missing])
            out.extend((f, why) for s in self.series for f in [*s.different, *s.uncounted])
            return out
        for s in self.series:
            where = f"series {s.series_number}" if s.series_number is not None else "series"
            for f in s.missing:
                scan = f", scan {s.scan_id}" if s.scan_id else ": no scan holds any of it"
                out.append(
                    (
                        f,
                        f"instance {f.sop_instance_uid} ({instance_file_name(f.sop_instance_uid)})"
                        f" is not on the server ({where}{scan})",
                    )
                )
            for f in s.different:
                out.append(
                    (
                        f,
                        f"the server's copy differs (MD5; {where}, scan {s.scan_id}) although "
                        "it stores other files of this upload byte for byte",
                    )
                )
            for f in s.uncounted:
                out.append(
                    (
                        f,
                        f"scan {s.scan_id} holds {s.on_server} file(s) for the {s.local} of "
                        f"{where}, under names xio did not give: which are there cannot be told",
                    )
                )
        return out

    def verdicts(self) -> Iterator[tuple[str, Outcome, str]]:
        """(outcome path, outcome, reason) per file, in ``outcomes()`` order, made one at a time
        (no FileOutcome per file: callers that only settle existing outcomes need none)."""
        for f, outcome, reason in self.verdict_files():
            yield file_path(f), outcome, reason

    def verdict_files(self) -> Iterator[tuple[DicomFile, Outcome, str]]:
        """:meth:`verdicts` with the local file instead of its path (a later verdict of a file
        overrides an earlier one)."""
        if not self.other_study:  # else every verified file is one of the problems
            for s in self.series:
                reason = COUNT_REASON if s.counted else ""
                for f in s.verified:
                    yield f, Outcome.VERIFIED, reason
        for f, why in self.problems:
            yield f, Outcome.FAILED, why

    def outcomes(self) -> list[FileOutcome]:
        by_path = {file_path(f): f for s in self.series for f in _all_local(s)}
        by_path.update((file_path(f), f) for f, _ in self.unreadable)
        return [_outcome(by_path[p], o, r) for p, o, r in self.verdicts()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "xnatio.verify-result/2",
            "project": self.project,
            "subject": self.subject,
            "session": self.session,
            "ok": self.ok,
            "session_found": self.found,
            "other_study": self.other_study or None,
            "byte_identical": self.byte_identical,
            "warnings": [self.warning] if self.warning else [],
            "notes": [n for n in (self.extra_note, self.rewritten_note) if n],
            "series": [
                {
                    "series_uid": s.series_uid,
                    "series_number": s.series_number,
                    "scan_id": s.scan_id,
                    "local": s.local,
                    "on_server": s.on_server,
                    "verified": len(s.verified),
                    "byte_identical": s.identical,
                    "matched_by": "count" if s.counted else "name",
                    "missing": [
                        {"path": str(f.path), "sop_instance_uid": f.sop_instance_uid}
                        for f in s.missing
                    ],
                    "different": [str(f.path) for f in s.different],
                    "uncounted": [str(f.path) for f in s.uncounted],
                    "extra": s.extra,
                }
                for s in self.series
            ],
            "unmatched_scans": self.unmatched_scans,
            "extra": self.extra,
            "unreadable": [{"path": str(f.path), "reason": r} for f, r in self.unreadable],
        }

    def table(self) -> str:
        """A plain-text per-series table (what a mismatch prints)."""
        head = ("series", "scan", "local", "server", "verified", "missing", "different", "extra")
        rows: list[tuple[str, ...]] = [head]
        for s in self.series:
            rows.append(
                (
                    str(s.series_number if s.series_number is not None else "?"),
                    s.scan_id or "-",
                    str(s.local),
                    str(s.on_server),
                    str(len(s.verified)),
                    str(len(s.missing)),
                    str(len(s.different) + len(s.uncounted)),
                    str(len(s.extra)),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        )


def _all_local(s: SeriesCheck) -> list[DicomFile]:
    return [*s.verified, *s.missing, *s.different, *s.uncounted]


def _outcome(f: DicomFile, outcome: Outcome, reason: str) -> FileOutcome:
    return FileOutcome(
        path=file_path(f),
        outcome=outcome,
        reason=reason,
        sop_instance_uid=f.sop_instance_uid,
        series_uid=f.series_uid,
        size=f.size,
    )


def experiment_path(project: str, subject: str, session: str) -> str:
    p, s, e = (quote(x, safe="") for x in (project, subject, session))
    return f"/data/projects/{p}/subjects/{s}/experiments/{e}"


def _rows(data: Any) -> list[dict[str, Any]]:
    try:
        rows = data["ResultSet"]["Result"]
    except (KeyError, TypeError):
        raise ServerError("the server answered a listing without ResultSet.Result") from None
    return [r for r in rows if isinstance(r, dict)]


def read_server_session(
    client: JsonGetter, project: str, subject: str, session: str
) -> ServerSession | None:
    """The scans, DICOM files and StudyInstanceUID of a session; None if it does not exist."""
    found = stream_server_session(client, project, subject, session)
    return None if found is None else ServerSession(list(found[1]), found[0])


def stream_server_session(
    client: JsonGetter,
    project: str,
    subject: str,
    session: str,
    *,
    in_flight: int = defaults.VERIFY_LISTINGS,
    expected_files: int = 0,
) -> tuple[str, Iterator[ServerScan]] | None:
    """The StudyInstanceUID of a session and its scans, each with its DICOM files, in the
    order XNAT lists the scans, as the iterator is advanced; None if the session does not exist.

    Up to ``in_flight`` scan listings are requested at once (each request waits a round trip:
    one after the other, 30 scans over a 50 ms link cost 1.5 s), each reduced to its
    :class:`ServerScan` in the thread that read it, and handed out in order: at most
    ``in_flight`` listings are held, whatever the number of scans (verification keeps only
    what it needs of each). With ``expected_files`` (the local files), fewer are requested at
    once when the scans are large: at most :data:`xnatio.defaults.VERIFY_LISTING_FILES` files'
    listings on average (a parsed listing costs ~1.5 KB a file; four 4,000-file listings held
    25 MB at the peak of a 100,000-file read-back, where one request's round trip is a small
    part of reading it). A failed listing raises when its turn comes, as one read in turn
    would."""
    base = experiment_path(project, subject, session)
    try:
        experiment = client.get_json(base)
    except ServerError as exc:
        if exc.status == 404:
            return None
        raise
    uids: dict[str, str] = {}
    study_uid = ""
    try:
        item = experiment["items"][0]
        study_uid = str(item.get("data_fields", {}).get("UID", "") or "")
        for child in item.get("children", []):
            if child.get("field") == "scans/scan":
                for scan_item in child.get("items", []):
                    fields = scan_item.get("data_fields", {})
                    if "ID" in fields:
                        uids[str(fields["ID"])] = str(fields.get("UID", ""))
    except (KeyError, IndexError, TypeError, AttributeError):
        pass  # the shape is unconfirmed (facts 4): UIDs are a refinement, the listings count
    rows = _rows(client.get_json(base + "/scans"))

    def read(row: dict[str, Any]) -> ServerScan:
        scan_id = str(row.get("ID", ""))
        scan = ServerScan(scan_id, uids.get(scan_id, "") or str(row.get("UID", "") or ""))
        try:
            listing = client.get_json(
                f"{base}/scans/{quote(scan_id, safe='')}/resources/DICOM/files"
            )
        except ServerError as exc:
            if exc.status == 404:  # a scan without a DICOM resource (snapshots only)
                return scan
            raise
        for f in _rows(listing):
            try:
                size = int(str(f.get("Size", "")).strip())
            except ValueError:
                size = -1
            digest = str(f.get("digest", "") or "").strip().lower()
            # Name is the file's path in the resource; only its last part is the file name.
            name = str(f.get("Name", "")).rsplit("/", 1)[-1]
            scan.files.append(ServerFile(name, size, digest or None))
        return scan

    if expected_files and rows:
        per_scan = max(1, expected_files // len(rows))
        in_flight = min(in_flight, max(1, defaults.VERIFY_LISTING_FILES // per_scan))

    def scans() -> Iterator[ServerScan]:
        if in_flight <= 1 or len(rows) <= 1:
            yield from map(read, rows)
            return
        pool = ThreadPoolExecutor(min(in_flight, len(rows)), thread_name_prefix="xnatio-verify")
        try:
            ahead: collections.deque[Future[ServerScan]] = collections.deque()
            left = iter(rows)
            for row in itertools.islice(left, in_flight):
                ahead.append(pool.submit(read, row))
            while ahead:
                scan = ahead.popleft().result()
                for row in itertools.islice(left, 1):
                    ahead.append(pool.submit(read, row))
                yield scan
                del scan
        finally:  # also when the caller stops early: what is not started is not read
            pool.shutdown(wait=True, cancel_futures=True)

    return study_uid, scans()


def read_session(
    client: JsonGetter, project: str, subject: str, session: str
) -> list[ServerScan] | None:
    """The scans and DICOM files of a session as XNAT lists them; None if it does not exist."""
    found = read_server_session(client, project, subject, session)
    return None if found is None else found.scans


def md5_of(path: Path, *, member: str | None = None, chunk: int = MD5_CHUNK) -> str:
    """MD5 of a file, or of ``member`` inside a zip/tar archive, read ``chunk`` bytes at a time."""
    with _open_local(path, member) as fh:
        return _md5_stream(fh, chunk)


@contextlib.contextmanager
def _open_local(path: Path, member: str | None) -> Iterator[IO[bytes]]:
    if member is None:
        with open(path, "rb") as fh:
            yield fh
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf, zf.open(zip_entries(zf)[member]) as fh:
            yield fh
    else:
        with tarfile.open(path) as tf:
            entry_name = EntryNames()  # the entry of this unique name, not the last of its name
            info = next((i for i in tf if entry_name(i.name) == member), None)
            if info is None:
                raise KeyError(member)
            extracted = tf.extractfile(info)
            if extracted is None:
                raise OSError(f"{member} is not a regular file in {path.name}")
            with extracted:
                yield extracted


class _Progress:
    """Phase.VERIFY events over one read-back: local files compared so far, and their bytes."""

    def __init__(self, callback: ProgressCallback | None, files: Sequence[DicomFile]) -> None:
        self._callback = callback
        self._total = len(files)
        self._bytes_total = total_bytes(files)
        self._current = 0
        self._bytes_done = 0

    def emit(self, message: str = "") -> None:
        if self._callback is not None:
            self._callback(
                ProgressEvent(
                    Phase.VERIFY,
                    self._current,
                    self._total,
                    message,
                    bytes_done=self._bytes_done,
                    bytes_total=self._bytes_total,
                )
            )

    def advance(self, files: Sequence[DicomFile]) -> None:
        if files:
            self._current += len(files)
            self._bytes_done += total_bytes(files)
            self.emit()


def _pick(files: Sequence[DicomFile], positions: Sequence[int]) -> Sequence[DicomFile]:
    """The files at ``positions``: a view of a FileTable's rows (4 bytes a file, records made
    when read), else a list of the records given."""
    if isinstance(files, FileTable):
        return files.take(positions)
    return [files[i] for i in positions]


def _local_digests(
    files: Sequence[DicomFile], threads: int
) -> tuple[dict[int, str], list[tuple[DicomFile, str]]]:
    """MD5 per file (by index into ``files``) and the files that could not be read.

    Plain files are hashed ``threads`` at a time. Members of an archive PATH are hashed in one
    pass over each archive (:func:`_archive_digests`): opening a compressed tar and scanning it
    for every member made verifying 400 members of a .tar.gz take 31 s (issue 16 item 6).
    """
    digests: dict[int, str] = {}
    unreadable: list[tuple[DicomFile, str]] = []
    plain: list[int] = []
    by_archive: dict[Path, list[int]] = {}
    for i, f in enumerate(files):
        if f.member is None:
            plain.append(i)
        else:
            by_archive.setdefault(f.path, []).append(i)

    def one(i: int) -> tuple[int, str | None, str]:
        try:
            return i, md5_of(files[i].path), ""
        except OSError as exc:
            return i, None, _unreadable(exc)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        # A window of files at a time: map() submits a future per item at once (~2 KB each).
        for start in range(0, len(plain), _HASH_WINDOW):
            for i, digest, why in pool.map(one, plain[start : start + _HASH_WINDOW]):
                if digest is not None:
                    digests[i] = digest
                else:
                    unreadable.append((files[i], why))
    for archive, indexes in by_archive.items():
        found, bad = _archive_digests(archive, {files[i].member or "": i for i in indexes})
        digests.update(found)
        unreadable.extend((files[i], why) for i, why in bad)
    return digests, unreadable


def _unreadable(exc: BaseException) -> str:
    why = getattr(exc, "strerror", None) or type(exc).__name__
    return f"cannot read it to verify ({why})"


def _archive_digests(
    archive: Path, wanted: dict[str, int]
) -> tuple[dict[int, str], list[tuple[int, str]]]:
    """MD5 of the members ``wanted`` (unique entry name -> caller's index) of one archive PATH,
    in one pass: a zip opened once, a tar (compressed or not) read once as a stream, each
    member hashed as it goes by. Returns the digests and (index, reason) for those not read."""
    digests: dict[int, str] = {}
    bad: list[tuple[int, str]] = []
    left = dict(wanted)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name, info in zip_entries(zf).items():
                    i = left.pop(name, None)
                    if i is not None:
                        with zf.open(info) as fh:
                            digests[i] = _md5_stream(fh)
        else:
            entry_name = EntryNames()  # each entry by its unique name, in archive order
            with tarfile.open(archive, "r|*") as tf:
                for entry in tf:
                    i = left.pop(entry_name(entry.name), None)
                    extracted = tf.extractfile(entry) if i is not None else None
                    if i is not None and extracted is None:
                        bad.append((i, "cannot read it to verify (not a regular file)"))
                    elif i is not None and extracted is not None:
                        with extracted:
                            digests[i] = _md5_stream(extracted)
                    if not left:
                        break  # the rest of the archive is not read
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        why = _unreadable(exc)
        return digests, [*bad, *((i, why) for i in left.values())]
    gone = "cannot read it to verify (no longer in the archive)"
    return digests, [*bad, *((i, gone) for i in left.values())]


def _md5_stream(fh: IO[bytes], chunk: int = MD5_CHUNK) -> str:
    h = hashlib.md5(usedforsecurity=False)
    while block := fh.read(chunk):
        h.update(block)
    return h.hexdigest()


@dataclass(slots=True)
class _ScanSummary:
    """What comparing needs of one server scan once its file listing has been read: the count,
    and the names that match no local file (in listing order). The listing itself is dropped."""

    id: str
    uid: str
    count: int = 0
    foreign: list[str] = field(default_factory=list)


class _Holders:
    """Where the local files' names were found on the server, one scan listing at a time: per
    local file the first scan holding its name and that file's MD5 (16 raw bytes), in arrays;
    further holders (a name in two scans, rare) in a dict."""

    def __init__(self, files: Sequence[DicomFile]) -> None:
        # The files' columns (a copy when given records): names are looked up in an index over
        # the SOP Instance UID column (models.SopIndex, 8 bytes a slot), not a dict of a string
        # per file (~15 MB at 100,000 files, issue 16 item 4).
        self.table = files if isinstance(files, FileTable) else FileTable(files)
        n = len(self.table)
        self.first = array("i", [-1]) * n
        self.md5 = bytearray(16 * n)
        self.has_md5 = bytearray(n)
        self.more: dict[int, list[tuple[int, str | None]]] = {}
        # A name xio gives is the UID + ".dcm": found by its UID; non-conformant UIDs by name.
        self._by_uid = SopIndex(self.table, n)
        self._by_name: dict[str, int] = {}
        for i in range(n):
            uid = self.table.sop_instance_uid(i)
            name = instance_file_name(uid)
            if name == uid + ".dcm":
                self._by_uid.add(uid, i)
            else:
                self._by_name[name] = i

    def local(self, name: str) -> int | None:
        if name.endswith(".dcm"):
            i = self._by_uid.get(name[:-4])
            if i is not None:
                return i
        return self._by_name.get(name)

    def add(self, scan: ServerScan, index: int) -> _ScanSummary:
        """Take in one scan's listing (then dropped by the caller)."""
        summary = _ScanSummary(scan.id, scan.uid, len(scan.files))
        for sf in scan.files:
            i = self.local(sf.name)
            if i is None:
                summary.foreign.append(sf.name)
            elif self.first[i] < 0:
                self.first[i] = index
                if sf.md5 is not None and len(sf.md5) == 32:
                    try:
                        self.md5[16 * i : 16 * i + 16] = bytes.fromhex(sf.md5)
                        self.has_md5[i] = 1
                    except ValueError:
                        pass  # not an MD5: compared as none
            else:
                self.more.setdefault(i, []).append((index, sf.md5))
        return summary

    def holds(self, i: int, scan: int) -> bool:
        """Does scan number ``scan`` hold local file ``i``'s name?"""
        return self.first[i] == scan or any(at == scan for at, _ in self.more.get(i, ()))

    def md5_at(self, i: int, scan: int) -> tuple[bool, str | None]:
        """(found, MD5 hex or None) of local file ``i`` in scan number ``scan``."""
        if self.first[i] == scan:
            return True, self.md5[16 * i : 16 * i + 16].hex() if self.has_md5[i] else None
        for index, md5 in self.more.get(i, []):
            if index == scan:
                return True, md5
        return False, None

    def scans_of(self, i: int) -> list[int]:
        first = self.first[i]
        return [] if first < 0 else [first, *(index for index, _ in self.more.get(i, []))]


def _positions() -> array[int]:
    return array("i")


@dataclass(slots=True)
class _Pairing:
    """Where each local series landed (rules 1 and 3), as positions in the local files; made
    into the check's files once everything is compared (:meth:`settle`)."""

    check: SeriesCheck
    local: array[int]
    scan: _ScanSummary | None
    # Every landed file: its position in the local files and the scan (number) it was found in.
    landed: array[int] = field(default_factory=_positions)
    landed_in: array[int] = field(default_factory=_positions)
    verified: array[int] = field(default_factory=_positions)
    missing: array[int] = field(default_factory=_positions)
    different: array[int] = field(default_factory=_positions)
    uncounted: array[int] = field(default_factory=_positions)

    def settle(self, files: Sequence[DicomFile], dropped: set[int]) -> None:
        """The check's files from the positions; ``dropped``: landed files found unreadable or
        different when bytes were compared (not verified)."""
        c = self.check
        verified = self.verified
        if dropped:
            verified = array("i", (i for i in verified if i not in dropped))
        c.verified = _pick(files, verified)
        c.missing = _pick(files, self.missing)
        c.different = _pick(files, self.different)
        c.uncounted = _pick(files, self.uncounted)


def compare(
    files: Sequence[DicomFile],
    scans: Iterable[ServerScan],
    *,
    threads: int = MD5_THREADS,
    progress: ProgressCallback | None = None,
) -> tuple[list[SeriesCheck], list[str], list[tuple[DicomFile, str]]]:
    """Pair local series with scans and instances with files; see the module docstring.

    Returns the per-series checks, the IDs of scans no local series landed in, and the local
    files that could not be read (rule 2's verdict is in :func:`verify_session`'s report).
    """
    checks, unmatched, unreadable, _, _ = _compare(files, scans, threads=threads, progress=progress)
    return checks, unmatched, unreadable


def _compare(
    files: Sequence[DicomFile],
    scans: Iterable[ServerScan],
    *,
    threads: int,
    progress: ProgressCallback | None,
    sent: SentDigests | None = None,
) -> tuple[list[SeriesCheck], list[str], list[tuple[DicomFile, str]], bool | None, int]:
    """The comparison, taking ``scans`` one at a time (each listing is reduced to arrays and
    dropped before the next is read: memory does not grow with the server's listing). Also
    returns how many server files are in scans no local series landed in.

    Files are positions in arrays throughout, read from the columns of a FileTable (no record
    per file: issue 16 item 4); the checks' files are views of ``files`` when it is one."""
    tracker = _Progress(progress, files)
    holders = _Holders(files)
    table = holders.table
    summaries = [holders.add(scan, index) for index, scan in enumerate(scans)]
    codes, series_uids = table.codes("series_uid")
    by_code: dict[int, array[int]] = {}
    for i, code in enumerate(codes):
        by_code.setdefault(code, array("i")).append(i)
    del codes
    by_series = {series_uids[code]: indexes for code, indexes in by_code.items()}
    # Per scan, the local files whose name it holds (for the names of its extra files).
    held: dict[int, array[int]] = {}
    for i in range(len(table)):
        for at in holders.scans_of(i):
            held.setdefault(at, array("i")).append(i)

    pairings: list[_Pairing] = []
    used: set[str] = set()
    for uid, indexes in by_series.items():
        hits = Counter(holders.first[i] for i in indexes if holders.first[i] >= 0)
        scan: _ScanSummary | None = None
        at = -1
        if hits:
            # The first scan of that ID (IDs are unique in XNAT; if not, as before).
            scan_id = summaries[hits.most_common(1)[0][0]].id
            at = next(n for n, s in enumerate(summaries) if s.id == scan_id)
            scan = summaries[at]
        check = SeriesCheck(
            series_uid=uid,
            series_number=table.series_number(indexes[0]),
            scan_id=scan.id if scan is not None else "",
            local=len(indexes),
            on_server=scan.count if scan is not None else 0,
        )
        pairing = _Pairing(check, indexes, scan)
        pairings.append(pairing)
        if scan is None:
            continue
        used.add(scan.id)
        for i in indexes:
            where = at
            if not holders.holds(i, at):
                # Landed in another scan of the session (split series): still there.
                where = holders.first[i]
            if where < 0:
                pairing.missing.append(i)
            else:
                pairing.landed.append(i)
                pairing.landed_in.append(where)
                pairing.verified.append(i)
        mine = set(indexes)
        others = [
            instance_file_name(table.sop_instance_uid(j)) for j in held.get(at, ()) if j not in mine
        ]
        check.extra = [*scan.foreign, *others]
    del held

    _pair_by_count(pairings, summaries, used, by_series, table)
    identity, unreadable, dropped = _compare_bytes(pairings, files, holders, threads, sent)
    for p in pairings:
        p.settle(files, dropped)
        tracker.advance(_pick(files, p.local))
    checks = [p.check for p in pairings]
    unmatched = [s.id for s in summaries if s.id not in used]
    unmatched_files = sum(s.count for s in summaries if s.id not in used)
    checks.sort(key=lambda c: (c.series_number is None, c.series_number or 0, c.series_uid))
    return checks, unmatched, unreadable, identity, unmatched_files


def _pair_by_count(
    pairings: list[_Pairing],
    scans: Sequence[_ScanSummary],
    used: set[str],
    by_series: dict[str, array[int]],
    table: FileTable,
) -> None:
    """Rule 3: series none of whose names is on the server, paired by UID or unique number."""
    numbers = Counter(table.series_number(indexes[0]) for indexes in by_series.values())
    by_uid = {s.uid: s for s in scans if s.uid}
    by_id = {s.id: s for s in scans}
    for p in pairings:
        c = p.check
        if p.scan is not None:
            continue
        scan = by_uid.get(c.series_uid)
        if scan is None and c.series_number is not None and numbers[c.series_number] == 1:
            candidate = by_id.get(str(c.series_number))
            # Not a scan another local series landed in, nor one of another series' UID.
            if candidate is not None and (not candidate.uid or candidate.uid not in by_series):
                scan = candidate
        if scan is None or scan.id in used:
            p.missing = array("i", p.local)
            continue
        used.add(scan.id)
        p.scan = scan
        others = len(scan.foreign)  # its files not named after any local instance
        c.scan_id, c.on_server, c.counted = scan.id, others, True
        if others == len(p.local):
            p.verified = array("i", p.local)
        else:
            p.uncounted = array("i", p.local)


def _digests(
    files: Sequence[DicomFile], threads: int, sent: SentDigests | None
) -> tuple[dict[int, str], list[tuple[int, str]]]:
    """:func:`_local_digests`, taking the digest of each file sent by this process from
    ``sent`` instead of reading it again; the files not read as (position, reason)."""
    known: dict[int, str] = {}
    read = array("i")
    for i, f in enumerate(files):
        digest = sent.get(f) if sent is not None else None
        if digest is None:
            read.append(i)
        else:
            known[i] = digest
    if not read:
        return known, []
    reading = _pick(files, read)
    sums, unreadable = _local_digests(reading, threads)
    known.update((read[j], digest) for j, digest in sums.items())
    # _local_digests names the unreadable by record: back to positions, by their place in ``read``
    # (records of a view are made anew when read, so not by identity).
    where = {file_path(reading[j]): read[j] for j in range(len(read))} if unreadable else {}
    return known, [(where[file_path(f)], why) for f, why in unreadable]


def _compare_bytes(
    pairings: list[_Pairing],
    files: Sequence[DicomFile],
    holders: _Holders,
    threads: int,
    sent: SentDigests | None = None,
) -> tuple[bool | None, list[tuple[DicomFile, str]], set[int]]:
    """Rule 2: probe a few landed files; if the server holds our bytes, compare them all (by
    the digests computed while sending, ``sent``, where there are some). Also returns the
    positions of landed files that are not verified after all (unreadable, or different: those
    are added to their pairing's ``different``)."""

    def with_md5(p: _Pairing) -> Iterator[tuple[int, str, int]]:
        for i, at in zip(p.landed, p.landed_in, strict=True):
            md5 = holders.md5_at(i, at)[1]
            if md5:
                yield i, md5, at

    probes = [(i, md5) for p in pairings for i, md5, _ in itertools.islice(with_md5(p), 1)][:PROBES]
    if not probes:
        return None, [], set()
    digests, bad_probes = _digests(_pick(files, [i for i, _ in probes]), threads, sent)
    unreadable = {probes[k][0]: why for k, why in bad_probes}
    if not any(digests.get(k) == md5 for k, (_, md5) in enumerate(probes)):
        # No probe matched: the server rewrote its copies (facts 1.7).
        return (False if digests else None), _unreadable_files(files, unreadable), set()
    # Every landed file at once: an archive PATH is then read in one pass for all its members.
    owner, positions, scans = array("i"), array("i"), array("i")
    for n, p in enumerate(pairings):
        for i, _, at in with_md5(p):
            owner.append(n)
            positions.append(i)
            scans.append(at)
    sums, bad = _digests(_pick(files, positions), threads, sent)
    for k, why in bad:
        unreadable.setdefault(positions[k], why)
    dropped = {positions[k] for k, _ in bad}
    for k, (n, i) in enumerate(zip(owner, positions, strict=True)):
        if i in dropped:
            continue
        p = pairings[n]
        if sums.get(k) == holders.md5_at(i, scans[k])[1]:
            p.check.identical += 1
        else:
            dropped.add(i)
            p.different.append(i)
    return True, _unreadable_files(files, unreadable), dropped


def _unreadable_files(
    files: Sequence[DicomFile], unreadable: dict[int, str]
) -> list[tuple[DicomFile, str]]:
    return [(files[i], why) for i, why in unreadable.items()]


def verify_session(
    client: JsonGetter,
    project: str,
    subject: str,
    session: str,
    files: Iterable[DicomFile],
    *,
    threads: int = MD5_THREADS,
    progress: ProgressCallback | None = None,
    sent: SentDigests | None = None,
) -> VerifyReport:
    """Read the session back and compare it with ``files`` (the manifest's DICOM files);
    ``progress`` receives Phase.VERIFY events (see the module docstring); ``sent``: the digests
    computed while this process sent them (a file without one is read again if its bytes are
    compared)."""
    # A FileTable as it is (records made when read, issue 16 item 4), other files listed once.
    local = files if isinstance(files, FileTable) else list(files)
    _Progress(progress, local).emit(f"reading {project}/{subject}/{session} back")
    report = VerifyReport(project, subject, session, found=True)
    server = stream_server_session(client, project, subject, session, expected_files=len(local))
    study_uid, scans = server if server is not None else ("", iter(()))
    if server is None:
        report.found = False
        # Nothing to read back or hash: no "200/200 files, 13103.8 MB/s" before "not found".
        progress = None
    studies = (
        {s.study_uid for s in local.studies()}
        if isinstance(local, FileTable)
        else {f.study_uid for f in local}
    )
    if study_uid and local and study_uid not in studies:
        report.other_study = study_uid
    (
        report.series,
        report.unmatched_scans,
        report.unreadable,
        report.byte_identical,
        report.unmatched_files,
    ) = _compare(local, scans, threads=threads, progress=progress, sent=sent)
    return report


def already_on_server(server: ServerSession, files: Sequence[DicomFile]) -> list[DicomFile]:
    """The files whose instance the session already holds (what a re-run must not send: XNAT
    refuses an incoming SOP Instance UID already in the scan, identical bytes included, and
    leaves a CONFLICT copy in the prearchive, facts 1.5).

    By name first (rule 1). A series none of whose names is there but whose scan (rule 3: same
    Series Instance UID, else its unique Series Number) holds files under other names (sent over
    C-STORE, or by another tool) is there whole when that scan holds exactly as many such files;
    when it holds some other number, which instances are missing cannot be told and sending any
    would be refused: :class:`UsageError` with what to do instead (``--overwrite delete``, which
    replaces the session's copies, or another session label)."""
    names = server.names()
    there = [f for f in files if instance_file_name(f.sop_instance_uid) in names]
    rest = [f for f in files if instance_file_name(f.sop_instance_uid) not in names]
    if not rest:
        return there
    local_names = {instance_file_name(f.sop_instance_uid) for f in files}
    by_series: dict[str, list[DicomFile]] = {}
    for f in files:
        by_series.setdefault(f.series_uid, []).append(f)
    numbers = Counter(members[0].series_number for members in by_series.values())
    by_uid = {s.uid: s for s in server.scans if s.uid}
    by_id = {s.id: s for s in server.scans}
    rest_ids = {id(f) for f in rest}
    for uid, members in by_series.items():
        if not all(id(f) in rest_ids for f in members):
            continue  # some of its names are there: that series is xio's, matched by name
        number = members[0].series_number
        scan = by_uid.get(uid)
        if scan is None and number is not None and numbers[number] == 1:
            candidate = by_id.get(str(number))
            if candidate is not None and (not candidate.uid or candidate.uid not in by_series):
                scan = candidate
        if scan is None:
            continue  # not on the server: sent
        # Named as xio names instances ({UID}.dcm): other instances xio sent (``files`` may be
        # only the part a resumed run has left to send), not another tool's.
        foreign = sum(
            1
            for sf in scan.files
            if sf.name not in local_names and not _INSTANCE_NAME.fullmatch(sf.name)
        )
        if foreign == len(members):
            there.extend(members)  # the whole series, under names xio did not give
        elif foreign:
            raise UsageError(
                f"scan {scan.id} of the session already holds {foreign} file(s) of series "
                f"{number if number is not None else uid} under names xio did not give (sent "
                f"over C-STORE or by another tool), for the {len(members)} here: which are "
                "missing cannot be told, and XNAT refuses to merge an instance it holds (facts "
                "1.5); pass --overwrite delete to replace the session's copies, or upload under "
                "another session label"
            )
    return there
