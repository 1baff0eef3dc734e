"""Read back what landed in XNAT and compare it with the local manifest, series by series.

The server side comes from three reads (section 4 of ``shared/xnat-api.md``): the experiment
(``…/experiments/E?format=json``: its ``scans/scan`` children carry each scan's ``ID`` and, where
XNAT stored it, the Series Instance ``UID``), the scan list, and per scan
``…/scans/{ID}/resources/DICOM/files?format=json`` (``Name``, ``Size``, and ``digest`` = MD5 when
the catalog has one).

Matching rule. XNAT renames every file on import (its naming pattern, not ours), so names cannot
be compared. Instead:

1. each local series (Series Instance UID) is paired with the scan whose ``UID`` equals it; when
   the server gives no UIDs, with the scan whose ``ID`` is the series number (XNAT's default scan
   ID). Local series that share a series number and cannot be told apart by UID are pooled.
2. inside a pair, files are compared as multisets of ``(size, md5)``; the MD5 is computed locally
   (streamed, a few threads) only for scans where the server gives digests, otherwise ``(size,)``.
   Every local file whose key is matched by a server file is VERIFIED. Leftover local files are
   paired with leftover server files as *different* (the server holds an instance, but not these
   bytes: a site anonymization script, or a damaged transfer); local files left after that are
   *missing*. Server files left over are *extra* (shown, not a failure: the session may have held
   them before this upload).
3. a server that rewrites every file it stores. XNAT runs the site-wide anonymization script on
   each file as it writes it (commonly Patient Name/ID := subject/session label), so on such a
   server no stored file has the size and MD5 that was sent. When, in one session, *no* local file
   matches a server file byte for byte and at least one differs, the server is taken to rewrite
   files, and in each series that holds exactly as many files as were sent, whose sizes differ
   from ours by no more than a header rewrite could (:data:`HEADER_SLACK`), the differing files
   are *rewritten*: VERIFIED by instance count, bytes not compared (the report carries one
   warning line). Missing instances still fail; so does a series with more or fewer files than
   sent (which of them are ours cannot be told without the bytes). Where some files match byte
   for byte and others differ, the server evidently does not rewrite files, so the differences
   are failures (damage, or files changed locally after the upload).

   Why "none identical" and not "most differ": the script runs on every file the server writes,
   and the fields it rewrites are the same in every file of a session, so its effect is all or
   nothing. Byte-identical files next to different ones mean something else changed them.

A session that holds files with the same size and MD5 is the same content, so the multiset rule
cannot mistake one file for another in a way that matters.

Progress: with a ``progress`` callback, :func:`verify_session` emits ``Phase.VERIFY`` events
counting local files (and their bytes) compared so far: one at the start, while the session is
read back, then one per file hashed, and one per series compared by size only or not found.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import quote

from xnatio.errors import ServerError
from xnatio.journal import outcome_path
from xnatio.models import DicomFile, FileOutcome, Outcome, Phase, ProgressCallback, ProgressEvent

MD5_CHUNK = 1 << 20  # bytes read at a time: memory stays bounded whatever the file size
MD5_THREADS = 4
# The most a header rewrite may change a file's size by. Anonymization edits names, IDs and dates,
# and may strip private tags, of which Siemens' CSA headers (~10-200 KB) are the largest common
# ones; pixel data is untouched. Pixel data of a real image (a 256x256 MR slice is 128 KB, a CT
# slice 512 KB) is mostly larger, so a truncated file or another image usually shows.
HEADER_SLACK = 256 * 1024

REWRITE_REASON = (
    "instance landed; the server rewrote its header (site anonymization?), bytes not compared"
)

Key = tuple[int, str | None]


class JsonGetter(Protocol):
    """What verification needs from :class:`xnatio.xnat.client.XnatClient`."""

    def get_json(self, path: str, params: Any = None) -> Any: ...


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
class SeriesCheck:
    """One local series against the scan it landed in."""

    series_uid: str
    series_number: int | None
    scan_id: str  # "" when no scan matched
    local: int
    on_server: int
    verified: list[DicomFile] = field(default_factory=list)
    missing: list[DicomFile] = field(default_factory=list)
    different: list[DicomFile] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    compared_md5: bool = False
    # Landed, but the server rewrote the bytes (site anonymization): verified by count only.
    rewritten: list[DicomFile] = field(default_factory=list)
    # The session shows a server that rewrites every file (no file of it is byte-identical).
    server_rewrites: bool = False
    # The largest size change between this series' differing files and the server's leftovers.
    size_change: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.different


@dataclass(slots=True)
class VerifyReport:
    project: str
    subject: str
    session: str
    found: bool  # the experiment exists
    series: list[SeriesCheck] = field(default_factory=list)
    unmatched_scans: list[str] = field(default_factory=list)
    unreadable: list[tuple[DicomFile, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.found and not self.unreadable and all(s.ok for s in self.series)

    @property
    def verified(self) -> list[DicomFile]:
        """Local files the server holds byte for byte."""
        return [f for s in self.series for f in s.verified]

    @property
    def rewritten(self) -> list[DicomFile]:
        """Local files that landed, but that the server rewrote (counted, bytes not compared)."""
        return [f for s in self.series for f in s.rewritten]

    @property
    def warning(self) -> str:
        """One line when files were verified by count only because the server rewrote them."""
        n = len(self.rewritten)
        if not n:
            return ""
        return (
            "warning: the server rewrote every file it stored (a site anonymization script?): "
            f"{n} file{'' if n == 1 else 's'} verified by instance count per series, "
            "bytes not compared"
        )

    @property
    def note(self) -> str:
        """Why differing files were not taken for a server rewrite, when some files match."""
        same = len(self.verified)
        if not same or not any(s.different for s in self.series):
            return ""
        return (
            f"{same} other file(s) are byte-identical on the server, so these differences "
            "are not a server-wide rewrite (site anonymization)"
        )

    @property
    def missing(self) -> list[DicomFile]:
        """Local files with no counterpart on the server at all (not merely different)."""
        return [f for s in self.series for f in s.missing]

    @property
    def problems(self) -> list[tuple[DicomFile, str]]:
        """Every local file that did not verify, with a one-line reason."""
        out: list[tuple[DicomFile, str]] = list(self.unreadable)
        for s in self.series:
            where = f"series {s.series_number}" if s.series_number is not None else "series"
            for f in s.missing:
                reason = (
                    f"not on the server after upload ({where}: no matching scan)"
                    if not s.scan_id
                    else f"not on the server after upload ({where}, scan {s.scan_id})"
                )
                out.append((f, reason))
            for f in s.different:
                out.append((f, _different_reason(s, where)))
        return out

    def verdicts(self) -> Iterator[tuple[str, Outcome, str]]:
        """(outcome path, outcome, reason) per file, in ``outcomes()`` order, made one at a time
        (no FileOutcome per file: callers that only settle existing outcomes need none)."""
        for f in self.verified:
            yield outcome_path(f), Outcome.VERIFIED, ""
        for f in self.rewritten:
            yield outcome_path(f), Outcome.VERIFIED, REWRITE_REASON
        for f, why in self.problems:
            yield outcome_path(f), Outcome.FAILED, why

    def outcomes(self) -> list[FileOutcome]:
        out = [_outcome(f, Outcome.VERIFIED, "") for f in self.verified]
        out.extend(_outcome(f, Outcome.VERIFIED, REWRITE_REASON) for f in self.rewritten)
        out.extend(_outcome(f, Outcome.FAILED, why) for f, why in self.problems)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "xnatio.verify-result/1",
            "project": self.project,
            "subject": self.subject,
            "session": self.session,
            "ok": self.ok,
            "session_found": self.found,
            "server_rewrote": bool(self.rewritten),
            "warnings": [self.warning] if self.warning else [],
            "series": [
                {
                    "series_uid": s.series_uid,
                    "series_number": s.series_number,
                    "scan_id": s.scan_id,
                    "local": s.local,
                    "on_server": s.on_server,
                    "verified": len(s.verified) + len(s.rewritten),
                    "rewritten": len(s.rewritten),
                    "missing": [str(f.path) for f in s.missing],
                    "different": [str(f.path) for f in s.different],
                    "extra": s.extra,
                    "compared_md5": s.compared_md5,
                }
                for s in self.series
            ],
            "unmatched_scans": self.unmatched_scans,
            "unreadable": [{"path": str(f.path), "reason": r} for f, r in self.unreadable],
        }

    def table(self) -> str:
        """A plain-text per-series table (what a mismatch prints)."""
        # "rewritten" (a subset of "verified") only where the server rewrote files.
        rewrites = bool(self.rewritten)
        head: tuple[str, ...] = ("series", "scan", "local", "server", "verified")
        head += ("rewritten",) * rewrites + ("missing", "different", "extra")
        rows = [head]
        for s in self.series:
            rows.append(
                (
                    str(s.series_number if s.series_number is not None else "?"),
                    s.scan_id or "-",
                    str(s.local),
                    str(s.on_server),
                    str(len(s.verified) + len(s.rewritten)),
                    *((str(len(s.rewritten)),) * rewrites),
                    str(len(s.missing)),
                    str(len(s.different)),
                    str(len(s.extra)),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows
        )


def _different_reason(s: SeriesCheck, where: str) -> str:
    what = "size/MD5" if s.compared_md5 else "size"
    if s.server_rewrites and (s.missing or s.extra):
        how_many = "of the" if s.missing else "for the"
        return (
            f"the server rewrote the files of {where} (scan {s.scan_id}) and holds {s.on_server} "
            f"{how_many} {s.local} sent: which are these cannot be told without the bytes"
        )
    if s.server_rewrites and s.size_change > HEADER_SLACK:
        return (
            f"differs on the server by up to {s.size_change} bytes, more than a header rewrite "
            f"({what}; {where}, scan {s.scan_id})"
        )
    return f"differs on the server ({what}; {where}, scan {s.scan_id})"


def _outcome(f: DicomFile, outcome: Outcome, reason: str) -> FileOutcome:
    return FileOutcome(
        path=outcome_path(f),
        outcome=outcome,
        reason=reason,
        sop_instance_uid=f.sop_instance_uid,
        series_uid=f.series_uid,
        size=f.size,
    )


def _experiment_path(project: str, subject: str, session: str) -> str:
    p, s, e = (quote(x, safe="") for x in (project, subject, session))
    return f"/data/projects/{p}/subjects/{s}/experiments/{e}"


def _rows(data: Any) -> list[dict[str, Any]]:
    try:
        rows = data["ResultSet"]["Result"]
    except (KeyError, TypeError):
        raise ServerError("the server answered a listing without ResultSet.Result") from None
    return [r for r in rows if isinstance(r, dict)]


def read_session(
    client: JsonGetter, project: str, subject: str, session: str
) -> list[ServerScan] | None:
    """The scans and DICOM files of a session as XNAT lists them; None if it does not exist."""
    base = _experiment_path(project, subject, session)
    try:
        experiment = client.get_json(base)
    except ServerError as exc:
        if exc.status == 404:
            return None
        raise
    uids: dict[str, str] = {}
    try:
        for child in experiment["items"][0].get("children", []):
            if child.get("field") == "scans/scan":
                for item in child.get("items", []):
                    fields = item.get("data_fields", {})
                    if "ID" in fields:
                        uids[str(fields["ID"])] = str(fields.get("UID", ""))
    except (KeyError, IndexError, TypeError, AttributeError):
        pass  # UIDs are a refinement; the scan list below is what counts
    scans: list[ServerScan] = []
    for row in _rows(client.get_json(base + "/scans")):
        scan_id = str(row.get("ID", ""))
        scan = ServerScan(scan_id, uids.get(scan_id, "") or str(row.get("UID", "") or ""))
        try:
            listing = client.get_json(
                f"{base}/scans/{quote(scan_id, safe='')}/resources/DICOM/files"
            )
        except ServerError as exc:
            if exc.status == 404:  # a scan without a DICOM resource (e.g. a snapshot-only scan)
                scans.append(scan)
                continue
            raise
        for f in _rows(listing):
            try:
                size = int(str(f.get("Size", "")).strip())
            except ValueError:
                size = -1
            digest = str(f.get("digest", "") or "").strip().lower()
            scan.files.append(ServerFile(str(f.get("Name", "")), size, digest or None))
        scans.append(scan)
    return scans


def md5_of(path: Path, *, member: str | None = None, chunk: int = MD5_CHUNK) -> str:
    """MD5 of a file, or of ``member`` inside a zip/tar archive, read ``chunk`` bytes at a time."""
    h = hashlib.md5(usedforsecurity=False)
    with _open_local(path, member) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _open_local(path: Path, member: str | None) -> Iterator[IO[bytes]]:
    if member is None:
        with open(path, "rb") as fh:
            yield fh
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf, zf.open(member) as fh:
            yield fh
    else:
        with tarfile.open(path) as tf:
            extracted = tf.extractfile(member)
            if extracted is None:
                raise OSError(f"{member} is not a regular file in {path.name}")
            with extracted:
                yield extracted


class _Progress:
    """Phase.VERIFY events over one read-back: local files compared so far, and their bytes."""

    def __init__(self, callback: ProgressCallback | None, files: Sequence[DicomFile]) -> None:
        self._callback = callback
        self._total = len(files)
        self._bytes_total = sum(f.size for f in files)
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
            self._bytes_done += sum(f.size for f in files)
            self.emit()


def _local_digests(
    files: Sequence[DicomFile], threads: int, progress: _Progress
) -> tuple[dict[int, str], list[tuple[DicomFile, str]]]:
    """MD5 per file (by index into ``files``) and the files that could not be read."""
    digests: dict[int, str] = {}
    unreadable: list[tuple[DicomFile, str]] = []

    def one(i: int) -> tuple[int, str | None, str]:
        f = files[i]
        try:
            return i, md5_of(f.path, member=f.member), ""
        except (OSError, zipfile.BadZipFile, tarfile.TarError, KeyError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            return i, None, f"cannot read it to verify ({why})"

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, digest, why in pool.map(one, range(len(files))):
            progress.advance(files[i : i + 1])
            if digest is not None:
                digests[i] = digest
            else:
                unreadable.append((files[i], why))
    return digests, unreadable


def compare(
    files: Sequence[DicomFile],
    scans: Sequence[ServerScan],
    *,
    threads: int = MD5_THREADS,
    progress: ProgressCallback | None = None,
) -> tuple[list[SeriesCheck], list[str], list[tuple[DicomFile, str]]]:
    """Pair local series with scans and compare files (see the module docstring)."""
    tracker = _Progress(progress, files)
    by_series: dict[str, list[DicomFile]] = {}
    for f in files:
        by_series.setdefault(f.series_uid, []).append(f)
    by_uid = {s.uid: s for s in scans if s.uid}
    by_id = {s.id: s for s in scans}

    # Step 1: local series -> scan (UID first, then ID == series number), pooling clashes.
    groups: dict[str, tuple[ServerScan | None, list[str]]] = {}
    for uid, members in by_series.items():
        scan = by_uid.get(uid)
        if scan is None:
            number = members[0].series_number
            candidate = by_id.get(str(number)) if number is not None else None
            if candidate is not None and (not candidate.uid or candidate.uid not in by_series):
                scan = candidate
        key = scan.id if scan is not None else f"?{uid}"
        groups.setdefault(key, (scan, []))[1].append(uid)

    checks: list[SeriesCheck] = []
    unreadable: list[tuple[DicomFile, str]] = []
    used: set[str] = set()
    for scan, uids in groups.values():
        local = [f for uid in uids for f in by_series[uid]]
        first = by_series[uids[0]][0]
        check = SeriesCheck(
            series_uid=",".join(uids),
            series_number=first.series_number,
            scan_id=scan.id if scan is not None else "",
            local=len(local),
            on_server=len(scan.files) if scan is not None else 0,
        )
        checks.append(check)
        if scan is None:
            check.missing = local
            tracker.advance(local)
            continue
        used.add(scan.id)
        use_md5 = bool(scan.files) and all(sf.md5 for sf in scan.files)
        check.compared_md5 = use_md5
        local_keys: list[Key | None]
        if use_md5:
            digests, bad = _local_digests(local, threads, tracker)
            unreadable.extend(bad)
            bad_ids = {id(f) for f, _ in bad}
            local_keys = [
                None if id(f) in bad_ids else (f.size, digests.get(i)) for i, f in enumerate(local)
            ]
        else:
            local_keys = [(f.size, None) for f in local]
            tracker.advance(local)
        pool: Counter[Key] = Counter((sf.size, sf.md5 if use_md5 else None) for sf in scan.files)
        leftover_local: list[DicomFile] = []
        for f, lkey in zip(local, local_keys, strict=True):
            if lkey is None:
                continue  # unreadable: reported once, above
            if pool[lkey] > 0:
                pool[lkey] -= 1
                check.verified.append(f)
            else:
                leftover_local.append(f)
        leftover_server = [
            sf for sf in scan.files if _take(pool, (sf.size, sf.md5 if use_md5 else None))
        ]
        n_diff = min(len(leftover_local), len(leftover_server))
        check.different = leftover_local[:n_diff]
        check.missing = leftover_local[n_diff:]
        check.extra = [sf.name for sf in leftover_server[n_diff:]]
        check.size_change = _size_change(
            [f.size for f in leftover_local], [sf.size for sf in leftover_server]
        )
    _accept_server_rewrite(checks)
    unmatched = [s.id for s in scans if s.id not in used]
    checks.sort(key=lambda c: (c.series_number is None, c.series_number or 0, c.series_uid))
    return checks, unmatched, unreadable


def _size_change(local: list[int], server: list[int]) -> int:
    """The largest size change between equally many local and server files, paired smallest to
    smallest (of all pairings, that one has the smallest largest change); 0 if the counts differ
    (then the series fails on its count anyway)."""
    if not local or len(local) != len(server):
        return 0
    return max(abs(x - y) for x, y in zip(sorted(local), sorted(server), strict=True))


def _accept_server_rewrite(checks: list[SeriesCheck]) -> None:
    """Rule 3 of the module docstring, over one session's series."""
    if any(c.verified for c in checks) or not any(c.different for c in checks):
        return
    for c in checks:
        c.server_rewrites = True
        if c.different and not c.missing and not c.extra and c.size_change <= HEADER_SLACK:
            c.rewritten, c.different = c.different, []


def _take(pool: Counter[Key], key: Key) -> bool:
    """Consume one unmatched server file of ``key`` (so leftovers are listed by name once)."""
    if pool[key] > 0:
        pool[key] -= 1
        return True
    return False


def verify_session(
    client: JsonGetter,
    project: str,
    subject: str,
    session: str,
    files: Iterable[DicomFile],
    *,
    threads: int = MD5_THREADS,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Read the session back and compare it with ``files`` (the manifest's DICOM files);
    ``progress`` receives Phase.VERIFY events (see the module docstring)."""
    local = list(files)
    _Progress(progress, local).emit(f"reading {project}/{subject}/{session} back")
    report = VerifyReport(project, subject, session, found=True)
    scans = read_session(client, project, subject, session)
    if scans is None:
        report.found = False
        scans = []
    report.series, report.unmatched_scans, report.unreadable = compare(
        local, scans, threads=threads, progress=progress
    )
    return report
