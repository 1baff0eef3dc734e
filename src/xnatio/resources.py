"""Upload non-DICOM files into a session (or scan) resource.

A single file is sent as is::

    PUT /data/projects/P/subjects/S/experiments/E[/scans/ID]/resources/R/files/NAME?inbody=true

A directory becomes ONE uncompressed tar archive, built while it is sent (headers are computed
up front so the ``Content-Length`` is exact; nothing is copied to temp disk), and XNAT unpacks it
into the resource (``extract=true``). Without ``overwrite=true`` XNAT answers a clash with 200 and
``{"duplicates": [...]}`` instead of replacing files (section 5 of ``shared/xnat-api.md``). A clash
is a failure naming the clashing files (``conflicts``), never silently ignored, unless the read-back
shows the file already there is byte-identical to ours (same size and MD5): then there is nothing
to replace, the file counts as verified, and re-running an upload that was interrupted, or whose
answer was lost and retried, succeeds. Without an MD5 from the server a clash is always a conflict.

Tar rather than zip because a zip entry stored without compression needs its CRC-32 *before* its
data unless it uses a data descriptor, which Java's ``ZipInputStream`` (what XNAT unpacks with)
refuses for stored entries; computing CRCs up front would read every file twice. GNU tar headers
(``././@LongLink`` for paths over 100 bytes) are read by every Java tar reader.

Bodies are re-iterable: each iteration reopens the files, so when the client retries a transient
failure (connection reset, 502/503) the whole body is sent again from its first byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from xnatio.errors import UsageError, XnatioError
from xnatio.models import FileOutcome, Outcome, Phase, ProgressCallback, ProgressEvent
from xnatio.xnat.client import XnatClient, quote

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE  # 512
ARCHIVE_NAME = "xnatio-upload.tar"


class SourceChangedError(XnatioError):
    """A local file changed or vanished while it was being sent (not an OSError on purpose:
    urllib3 would take an OSError raised by the body for a network failure and retry)."""


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: Path
    name: str  # path inside the resource, with '/' separators
    size: int
    mtime: int


@dataclass(slots=True)
class ResourceResult:
    """What :func:`upload_resource` did."""

    success: bool
    project: str
    subject: str
    session: str
    resource: str
    scan: str | None
    uri: str
    files: list[FileOutcome] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # every clash XNAT reported
    conflicts: list[str] = field(default_factory=list)  # clashes not byte-identical to ours
    archive: str | None = None  # "tar" when a directory was sent as one archive
    total_bytes: int = 0
    bytes_sent: int = 0
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)
    verified: bool = False  # the files were read back (size, and MD5 where XNAT keeps one)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "project": self.project,
            "subject": self.subject,
            "session": self.session,
            "resource": self.resource,
            "scan": self.scan,
            "uri": self.uri,
            "archive": self.archive,
            "total_bytes": self.total_bytes,
            "bytes_sent": self.bytes_sent,
            "duration": round(self.duration, 3),
            "verified": self.verified,
            "duplicates": self.duplicates,
            "conflicts": self.conflicts,
            "errors": self.errors,
            "files": [
                {"path": f.path, "outcome": f.outcome.value, "size": f.size, "reason": f.reason}
                for f in self.files
            ],
        }


# --- collecting files ----------------------------------------------------------------------------


def collect_files(root: Path) -> tuple[list[LocalFile], list[FileOutcome]]:
    """Every regular file under ``root`` (sorted), and the entries skipped with a reason.

    Symbolic links to files are followed; links to directories are not (loops), and sockets,
    FIFOs and devices are skipped.
    """
    files: list[LocalFile] = []
    skipped: list[FileOutcome] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append(FileOutcome(path=str(path), outcome=Outcome.SKIPPED, reason=reason))

    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
        base = Path(dirpath)
        for d in sorted(dirnames):
            if (base / d).is_symlink():
                skip(base / d, "symbolic link to a directory (not followed)")
        dirnames[:] = sorted(d for d in dirnames if not (base / d).is_symlink())
        for name in sorted(filenames):
            path = base / name
            try:
                st = path.stat()
            except OSError as exc:
                skip(path, f"cannot read: {exc.strerror or exc}")
                continue
            if not stat.S_ISREG(st.st_mode):
                skip(path, "not a regular file")
                continue
            if not os.access(path, os.R_OK):
                skip(path, "cannot read: permission denied")
                continue
            rel = path.relative_to(root).as_posix()
            files.append(LocalFile(path, rel, st.st_size, int(st.st_mtime)))
    return files, skipped


# --- streaming bodies ----------------------------------------------------------------------------


class _Progress:
    def __init__(self, callback: ProgressCallback | None, files: int, total: int) -> None:
        self.callback = callback
        self.files_total = files
        self.bytes_total = total
        self.files_done = 0
        self.bytes_done = 0
        self.md5: dict[str, str] = {}  # name -> MD5 of the bytes sent, for the read-back check

    def restart(self) -> None:
        if self.bytes_done:
            log.info("sending the body again from the start (retry)")
        self.files_done = self.bytes_done = 0
        self.md5.clear()
        self.emit("")

    def add(self, n: int, name: str) -> None:
        self.bytes_done += n
        self.emit(name)

    def file_done(self, name: str) -> None:
        self.files_done += 1
        self.emit(name)

    def emit(self, name: str) -> None:
        if self.callback is not None:
            self.callback(
                ProgressEvent(
                    phase=Phase.UPLOAD,
                    current=self.files_done,
                    total=self.files_total,
                    message=name,
                    bytes_done=self.bytes_done,
                    bytes_total=self.bytes_total,
                )
            )


def _read_exactly(f: LocalFile, progress: _Progress) -> Iterator[bytes]:
    """The file's first ``f.size`` bytes in chunks; raises if it is now shorter."""
    remaining = f.size
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with f.path.open("rb") as fh:
            while remaining:
                chunk = fh.read(min(CHUNK, remaining))
                if not chunk:
                    raise SourceChangedError(
                        f"{f.path} shrank while being uploaded ({f.size} bytes expected)"
                    )
                remaining -= len(chunk)
                digest.update(chunk)
                progress.add(len(chunk), f.name)
                yield chunk
    except OSError as exc:
        raise SourceChangedError(f"cannot read {f.path}: {exc.strerror or exc}") from None
    progress.md5[f.name] = digest.hexdigest()


class FileBody:
    """One file as a request body with a known length; every iteration starts over."""

    def __init__(self, f: LocalFile, progress: _Progress) -> None:
        self.file = f
        self.progress = progress

    def __len__(self) -> int:
        return self.file.size

    def __iter__(self) -> Iterator[bytes]:
        self.progress.restart()
        yield from _read_exactly(self.file, self.progress)
        self.progress.file_done(self.file.name)


def _tar_header(f: LocalFile) -> bytes:
    info = tarfile.TarInfo(f.name)
    info.size = f.size
    info.mtime = f.mtime
    info.mode = 0o644
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


def _padding(size: int) -> int:
    return -size % BLOCK


class TarBody:
    """Files as one uncompressed tar stream with an exact, precomputed length.

    Headers are rebuilt while streaming (deterministic) rather than kept, so memory holds only
    the file list, never file contents or all headers of a large tree.
    """

    def __init__(self, files: list[LocalFile], progress: _Progress) -> None:
        self.files = files
        self.progress = progress
        self.length = 2 * BLOCK + sum(
            len(_tar_header(f)) + f.size + _padding(f.size) for f in files
        )

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        self.progress.restart()
        for f in self.files:
            yield _tar_header(f)
            yield from _read_exactly(f, self.progress)
            pad = _padding(f.size)
            if pad:
                yield b"\0" * pad
            self.progress.file_done(f.name)
        yield b"\0" * (2 * BLOCK)


def iter_tar(files: list[LocalFile]) -> Iterator[bytes]:
    """The tar stream :class:`TarBody` sends (for tests and other callers)."""
    return iter(TarBody(files, _Progress(None, len(files), 0)))


# --- upload --------------------------------------------------------------------------------------


def resource_uri(
    project: str, subject: str, session: str, resource: str, scan: str | None = None
) -> str:
    base = f"/data/projects/{quote(project)}/subjects/{quote(subject)}/experiments/{quote(session)}"
    if scan is not None:
        base += f"/scans/{quote(scan)}"
    return f"{base}/resources/{quote(resource)}"


def _duplicates(body: str) -> list[str]:
    """The ``duplicates`` list of XNAT's clash answer, else [] (success has an empty body)."""
    text = body.strip()
    if not text.startswith("{"):
        return []
    try:
        data = json.loads(text)
    except ValueError:
        return []
    dups = data.get("duplicates") if isinstance(data, dict) else None
    return [str(d) for d in dups] if isinstance(dups, list) else []


def upload_resource(
    client: XnatClient,
    project: str,
    subject: str,
    session: str,
    resource: str,
    path: Path | str,
    *,
    scan: str | None = None,
    overwrite: bool = False,
    progress_callback: ProgressCallback | None = None,
    verify: bool = True,
) -> ResourceResult:
    """Upload a file, or a directory as one archive unpacked by XNAT, into a resource.

    With ``verify`` the resource's file list is read back and every file checked by size and,
    where XNAT reports a digest, by the MD5 of the bytes sent (computed while sending).
    ``success`` is False when files with other content already exist and ``overwrite`` is off
    (``conflicts`` names them) or a file did not land intact. Raises :class:`UsageError` for a
    missing or empty PATH and the client's errors (AuthError, UnreachableError, ServerError)
    after its retries.
    """
    root = Path(path)
    uri = resource_uri(project, subject, session, resource, scan)
    result = ResourceResult(
        success=False,
        project=project,
        subject=subject,
        session=session,
        resource=resource,
        scan=scan,
        uri=uri,
    )
    if root.is_dir():
        files, skipped = collect_files(root)
        if not files:
            raise UsageError(f"{root} holds no regular files to upload")
        name = ARCHIVE_NAME
        result.archive = "tar"
    elif root.is_file():
        st = root.stat()
        if st.st_size == 0:  # XNAT answers an upload without a body with 400
            raise UsageError(f"{root} is empty; XNAT does not accept an empty file upload")
        files, skipped = [LocalFile(root, root.name, st.st_size, int(st.st_mtime))], []
        name = root.name
    else:
        raise UsageError(f"{root} does not exist or is not a file or directory")
    result.total_bytes = sum(f.size for f in files)
    progress = _Progress(progress_callback, len(files), result.total_bytes)
    body: FileBody | TarBody = (
        TarBody(files, progress) if result.archive else FileBody(files[0], progress)
    )
    params: dict[str, str | int | float | bool] = {"inbody": "true"}
    if overwrite:
        params["overwrite"] = "true"
    if result.archive:
        params["extract"] = "true"
    headers = {
        "Content-Type": "application/x-tar" if result.archive else "application/octet-stream"
    }
    started = time.monotonic()
    log.info("PUT %s/files/%s (%d files, %d bytes)", uri, name, len(files), len(body))
    # PUT of the same bytes is idempotent, and the body restarts on every iteration, so the
    # client may retry transient failures. A retry after a lost answer to a request XNAT did
    # store shows up as duplicates of our own files without overwrite; the read-back below
    # recognises them (same size and MD5 as what we sent).
    resp = client.request(
        "PUT", f"{uri}/files/{quote(name)}", params=params, data=body, headers=headers
    )
    result.bytes_sent = len(body)
    result.duplicates = _duplicates(resp.text)
    clash = set(result.duplicates)
    landed = _listing(client, uri) if verify else {}
    result.verified = verify
    for f in files:
        outcome, reason = Outcome.UPLOADED, ""
        if f.name in clash or (not result.archive and clash):
            if verify and _same(landed.get(f.name), f, progress.md5.get(f.name)):
                outcome, reason = Outcome.VERIFIED, "already in the resource, identical"
            else:
                outcome = Outcome.FAILED
                reason = "already in the resource (use --overwrite to replace)"
                result.conflicts.append(f.name)
        elif verify:
            outcome, reason = _check(landed.get(f.name), f, progress.md5.get(f.name))
            if outcome is Outcome.FAILED:
                result.errors.append(f"{f.name}: {reason}")
        result.files.append(
            FileOutcome(path=str(f.path), outcome=outcome, reason=reason, size=f.size)
        )
    result.duration = time.monotonic() - started
    if result.conflicts:
        result.errors.insert(
            0,
            f"{len(result.conflicts)} file(s) already in {resource} with other content: "
            + ", ".join(result.conflicts[:20])
            + (" ..." if len(result.conflicts) > 20 else "")
            + "; use --overwrite to replace them",
        )
    result.files.extend(skipped)
    result.success = not any(fo.outcome is Outcome.FAILED for fo in result.files)
    progress.emit("")
    return result


def _listing(client: XnatClient, uri: str) -> dict[str, tuple[int, str]]:
    """The resource's files as {path inside the resource: (size, md5 or "")}."""
    data = client.get_json(f"{uri}/files")
    rows = data.get("ResultSet", {}).get("Result", []) if isinstance(data, dict) else []
    out: dict[str, tuple[int, str]] = {}
    for row in rows:
        file_uri = str(row.get("URI", ""))
        rel = unquote(file_uri.split("/files/", 1)[1]) if "/files/" in file_uri else ""
        rel = rel or str(row.get("path") or row.get("Name") or "")
        try:
            size = int(row.get("Size", -1))
        except (TypeError, ValueError):
            size = -1
        out[rel] = (size, str(row.get("digest") or "").lower())
    return out


def _same(entry: tuple[int, str] | None, f: LocalFile, md5: str | None) -> bool:
    return entry is not None and entry[0] == f.size and bool(md5) and entry[1] == md5


def _check(entry: tuple[int, str] | None, f: LocalFile, md5: str | None) -> tuple[Outcome, str]:
    if entry is None:
        return Outcome.FAILED, "not in the resource after the upload"
    size, digest = entry
    if size != f.size:
        return Outcome.FAILED, f"XNAT holds {size} bytes, {f.size} were sent"
    if digest and md5 and digest != md5:
        return Outcome.FAILED, "XNAT's MD5 differs from the bytes sent"
    return Outcome.VERIFIED, ""


__all__ = [
    "ResourceResult",
    "SourceChangedError",
    "collect_files",
    "iter_tar",
    "resource_uri",
    "upload_resource",
]
