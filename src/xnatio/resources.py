"""Upload non-DICOM files into a session (or scan) resource.

A single file is sent as is::

    PUT /data/projects/P/subjects/S/experiments/E[/scans/ID]/resources/R/files/NAME?inbody=true

A directory becomes ONE uncompressed tar archive, built while it is sent by the same streaming
archive the REST transport uses (:mod:`xnatio.archive`: exact ``Content-Length``, nothing copied
to temp disk, names relative and safe), and XNAT unpacks it into the resource (``extract=true``).
Without ``overwrite=true`` XNAT answers a clash with 200 and ``{"duplicates": [...]}`` instead of
replacing files (section 5 of ``shared/xnat-api.md``). A clash is a failure naming the clashing
files (``conflicts``), never silently ignored, unless the read-back shows the file already there
is byte-identical to ours (same size and MD5): then there is nothing to replace, the file counts
as verified, and re-running an upload that was interrupted, or whose answer was lost and retried,
succeeds. Without an MD5 from the server a clash is always a conflict.

Entry names are kept as they are on disk, even ``x.zip`` or ``y.tar.gz``: XNAT's resource
extraction (``ZipUtils``/``TarUtils.extract``) writes every entry out as a file, one level only,
so the ``.dcm`` suffix the import service needs against nested-archive unpacking is not wanted
here (it would rename the user's files and break the read-back check). Names too long for a plain
tar header, or not ASCII, travel in PAX headers (UTF-8 by definition), which the tar readers
XNAT uses (Ant ``TarInputStream`` since 1.9, commons-compress) apply.

Tar rather than zip because a zip entry stored without compression needs its CRC-32 *before* its
data unless it uses a data descriptor, which Java's ``ZipInputStream`` refuses for stored entries;
computing CRCs up front would read every large file twice.

Bodies are re-iterable: each iteration reopens the files, so when the client retries a transient
failure (connection reset, 502/503) the whole body is sent again from its first byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from xnatio.archive import (
    ArchiveStream,
    SourceChangedError,
    make_archive_stream,
    read_source,
)
from xnatio.errors import UsageError
from xnatio.models import FileOutcome, Outcome, Phase, ProgressCallback, ProgressEvent
from xnatio.xnat.client import XnatClient, quote

log = logging.getLogger(__name__)

ARCHIVE_NAME = "xnatio-upload.tar"


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file to upload, as listed (an :class:`xnatio.archive.SourceFile`)."""

    path: Path
    size: int
    mtime_ns: int


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
            files.append(LocalFile(path, st.st_size, st.st_mtime_ns))
    return files, skipped


# --- the request body ----------------------------------------------------------------------------


class _Progress:
    """Progress in bytes of the request body (what goes on the wire) and files completed."""

    def __init__(self, callback: ProgressCallback | None, files: int) -> None:
        self.callback = callback
        self.files_total = files
        self.bytes_total = 0
        self.files_done = 0
        self.bytes_done = 0
        self.last = ""  # the file completed last, shown as the message

    def restart(self) -> None:
        if self.bytes_done:
            log.info("sending the body again from the start (retry)")
        self.files_done = self.bytes_done = 0
        self.last = ""
        self.emit("")

    def add(self, n: int) -> None:
        self.bytes_done += n
        self.emit(self.last)

    def file_done(self, name: str, _file: object = None) -> None:
        self.files_done += 1
        self.last = name
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


class ResourceBody:
    """What one resource upload sends: a file as is, or a directory as one streamed tar.

    ``members`` pairs the name each file gets in the resource with the file; ``md5`` maps those
    names to the MD5 of the bytes sent in the latest attempt (for the read-back check). Every
    iteration starts from the first byte; a file that changed since it was listed raises
    :class:`~xnatio.archive.SourceChangedError`. Raises :class:`UsageError` for a missing or
    empty PATH.
    """

    def __init__(self, path: Path | str, progress_callback: ProgressCallback | None = None) -> None:
        root = Path(path)
        self.skipped: list[FileOutcome] = []
        self.stream: ArchiveStream[LocalFile] | None = None
        self._md5: dict[str, str] = {}
        if root.is_dir():
            files, self.skipped = collect_files(root)
            if not files:
                raise UsageError(f"{root} holds no regular files to upload")
            self.progress = _Progress(progress_callback, len(files))
            self.stream = make_archive_stream(
                files,
                "tar",
                root=root,
                on_bytes=self.progress.add,
                on_member=self.progress.file_done,
                with_md5=True,
                rename_nested_archives=False,
            )
            self.members = self.stream.members
            self.name = ARCHIVE_NAME
            self.content_type = self.stream.content_type
            self.size = len(self.stream)
        elif root.is_file():
            st = root.stat()
            if st.st_size == 0:  # XNAT answers an upload without a body with 400
                raise UsageError(f"{root} is empty; XNAT does not accept an empty file upload")
            self.progress = _Progress(progress_callback, 1)
            self.members = [(root.name, LocalFile(root, st.st_size, st.st_mtime_ns))]
            self.name = root.name
            self.content_type = "application/octet-stream"
            self.size = st.st_size
        else:
            raise UsageError(f"{root} does not exist or is not a file or directory")
        self.progress.bytes_total = self.size

    @property
    def archive(self) -> bool:
        return self.stream is not None

    @property
    def md5(self) -> dict[str, str]:
        return self.stream.md5 if self.stream is not None else self._md5

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        self.progress.restart()
        if self.stream is not None:
            yield from self.stream
            return
        name, f = self.members[0]
        self._md5.clear()
        digest = hashlib.md5(usedforsecurity=False)
        for chunk in read_source(f):
            digest.update(chunk)
            self.progress.add(len(chunk))
            yield chunk
        self._md5[name] = digest.hexdigest()
        self.progress.file_done(name)


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
    body = ResourceBody(path, progress_callback)
    result.archive = "tar" if body.archive else None
    result.total_bytes = sum(f.size for _, f in body.members)
    params: dict[str, str | int | float | bool] = {"inbody": "true"}
    if overwrite:
        params["overwrite"] = "true"
    if body.archive:
        params["extract"] = "true"
    started = time.monotonic()
    log.info("PUT %s/files/%s (%d files, %d bytes)", uri, body.name, len(body.members), len(body))
    # PUT of the same bytes is idempotent, and the body restarts on every iteration, so the
    # client may retry transient failures. A retry after a lost answer to a request XNAT did
    # store shows up as duplicates of our own files without overwrite; the read-back below
    # recognises them (same size and MD5 as what we sent).
    resp = client.request(
        "PUT",
        f"{uri}/files/{quote(body.name)}",
        params=params,
        data=body,
        headers={"Content-Type": body.content_type},
    )
    result.bytes_sent = len(body)
    result.duplicates = _duplicates(resp.text)
    clash = set(result.duplicates)
    landed = _listing(client, uri) if verify else {}
    result.verified = verify
    for name, f in body.members:
        outcome, reason = Outcome.UPLOADED, ""
        if name in clash or (not body.archive and clash):
            if verify and _same(landed.get(name), f, body.md5.get(name)):
                outcome, reason = Outcome.VERIFIED, "already in the resource, identical"
            else:
                outcome = Outcome.FAILED
                reason = "already in the resource (use --overwrite to replace)"
                result.conflicts.append(name)
        elif verify:
            outcome, reason = _check(landed.get(name), f, body.md5.get(name))
            if outcome is Outcome.FAILED:
                result.errors.append(f"{name}: {reason}")
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
    result.files.extend(body.skipped)
    result.success = not any(fo.outcome is Outcome.FAILED for fo in result.files)
    body.progress.emit("")
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
    "LocalFile",
    "ResourceBody",
    "ResourceResult",
    "SourceChangedError",
    "collect_files",
    "resource_uri",
    "upload_resource",
]
