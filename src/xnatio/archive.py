"""Streaming tar and zip archives of source files, with exact sizes known before the first byte.

One implementation serves both uploads that send archives: DICOM instances to the import service
(REST transport) and any files to a resource (``xio upload-resource``, which XNAT unpacks with
``extract=true``). A source is anything with ``path``, ``size`` and ``mtime_ns``
(:class:`SourceFile`; :class:`~xnatio.models.DicomFile` is one).

XNAT's ``DICOM-zip`` importer reads the request body as a zip (``java.util.zip.ZipInputStream``)
or a tar (commons-compress ``TarArchiveInputStream``, gunzipped first for ``.tar.gz``), entry by
entry. So an archive never needs to exist on disk or in memory: it is generated from the source
files while the request body is sent, one chunk at a time, and generated again for a retry.

Tar and stored (uncompressed) zip have sizes that follow from the member names and file sizes
alone, which lets the transport send an exact ``Content-Length`` instead of chunked encoding.
Zip entries carry their CRC-32 in the local header rather than a trailing data descriptor,
because ``ZipInputStream`` refuses STORED entries with a descriptor ("only DEFLATED entries can
have EXT descriptor"); each file's CRC is computed just before its entry is sent.

Member names are always relative, without ``.``/``..`` parts and unique: XNAT rejects a whole
resource archive holding one entry that resolves outside its folder (``ZipUtils``/``TarUtils``
path-traversal check), and the import service would write it anywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, overload

from xnatio import defaults
from xnatio.errors import XnatioError
from xnatio.models import FileTable

if TYPE_CHECKING:
    from xnatio.compress import Compression

CHUNK = 64 * 1024


class Deflater(Protocol):
    """A raw deflate stream (``zlib.compressobj(level, DEFLATED, -15)`` and its likes)."""

    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self, mode: int = ..., /) -> bytes: ...


# The compressor of zip-deflated/zip-auto entries: ISA-L's deflate (python-isal) where it is
# installed, zlib otherwise. Both write standard raw deflate streams, which any inflater reads
# (java.util.zip's in XNAT, facts 1.1); ISA-L's level 1 deflates the benchmark data 2.98x at
# 760 MB/s per CPU second, zlib's level 1 2.90x at 112 MB/s (docs/performance.md,
# "Compression"): the client's CPU per byte sent compressed falls about sevenfold. ISA-L's levels
# are 0-3; a level above 3 goes to zlib. Both release the GIL, so batches deflate in parallel.
try:
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - a platform without python-isal's wheels
    _isal = None  # type: ignore[assignment]

DEFLATE_LIBRARY = "isal" if _isal is not None else "zlib"

# The zip entries' CRC-32, the same standard CRC either way: ISA-L's where installed, 22 GB/s per
# CPU second on the benchmark data against zlib's 4.1 (every byte of a zip is summed once, so
# 0.12 s of CPU for 500 MB becomes 0.02; docs/performance.md, "wan").
crc32 = _isal.crc32 if _isal is not None else zlib.crc32


def deflater(level: int, library: str = DEFLATE_LIBRARY) -> Deflater:
    """A raw deflate stream at ``level``: ISA-L's when available (and ``level`` ≤ 3), zlib's."""
    if library == "isal" and _isal is not None and 0 <= level <= 3:
        return _isal.compressobj(level, _isal.DEFLATED, -15)
    return zlib.compressobj(level, zlib.DEFLATED, -15)


# Files up to this size are read once into memory for their zip CRC; larger ones are read twice.
# One such buffer per stream being generated bounds the memory.
_ZIP_SINGLE_READ = 1024 * 1024

# Content-Type decides how XNAT reads a raw body (facts file, section 1, table).
# "zip-deflated" is a zip whose entries are compressed, streamed with data descriptors: its length
# is known only once sent, so it goes chunked, which XNAT accepts for application/zip only (facts
# 1.1: a chunked body of any other type is refused with 400). A gzip'd tar would need a known
# length, i.e. compressing everything twice or a temporary copy; so there is no tgz writer.
# "zip-auto" is the same stream with each entry DEFLATED or STORED as a
# :class:`xnatio.compress.Compression` decides (``--compress auto``); a zip may mix both.
CONTENT_TYPES = {
    "tar": "application/x-tar",
    "zip": "application/zip",
    "zip-deflated": "application/zip",
    "zip-auto": "application/zip",
}
FILENAMES = {
    "tar": "upload.tar",
    "zip": "upload.zip",
    "zip-deflated": "upload.zip",
    "zip-auto": "upload.zip",
}

# The import service's DICOM-zip handler opens entries whose names end like archives as nested
# archives (DicomZipImporter, facts section 1). A resource's extract=true does not: ZipUtils and
# TarUtils write every entry out as a file, one level only (facts section 5).
_ARCHIVE_LIKE = (".zip", ".tar", ".tgz", ".gz")


def instance_file_name(sop_instance_uid: str) -> str:
    """The file name an instance is sent under: its SOP Instance UID + ``.dcm``.

    XNAT keeps an uploaded file's name unless another instance of the scan already holds it or
    ``rename=true`` is sent (facts 1.2, ``rename`` row; xio never sends it), and it rewrites the
    bytes it stores (facts 1.7). So this name is the identity of an instance that survives on the
    server, and read-back (:mod:`xnatio.verify`) matches instances by it. A UID is digits and
    dots; anything else (a non-conformant UID) becomes ``_``, as XNAT's own name cleaning would.
    """
    safe = re.sub(r"[^0-9A-Za-z._-]", "_", sop_instance_uid).strip(".")
    return (safe or "instance") + ".dcm"


class EntryNames:
    """The one rule naming the entries of an archive PATH uniquely, in archive order.

    A zip or tar may hold several entries of one name (different instances, issue 13 item 4):
    the first keeps its name, the n-th is ``NAME#n``. Discovery, the transports and read-back
    name entries with the same rule, so each entry is one file everywhere (outcomes, journal,
    verification) and is read from its own entry, not the last one of its name.
    """

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def __call__(self, name: str) -> str:
        n = self._seen[name] = self._seen.get(name, 0) + 1
        return name if n == 1 else f"{name}#{n}"


def zip_entries(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Every entry of ``zf`` by its unique name (:class:`EntryNames`), in archive order."""
    name = EntryNames()
    return {name(info.filename): info for info in zf.infolist()}


class DicomSource(Protocol):
    """A DICOM source file: what :func:`instance_member_names` needs of it."""

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def series_number(self) -> int | None: ...


def instance_member_names(files: Sequence[DicomSource]) -> Sequence[str]:
    """``{series number}/{SOP Instance UID}.dcm`` per file (see :func:`instance_file_name`),
    each made when asked (:class:`InstanceNames`).

    The folder only keeps an archive readable by people: XNAT files each instance by its own
    header, not by its folder in the archive (facts 1.2).
    """
    return InstanceNames(files)


class InstanceNames(Sequence[str]):
    """:func:`instance_member_names` of ``files``, each name made when it is read: a request in
    flight holds no name string per file (all 42 batches of an upload are in flight at once:
    120 B a file, 12 MB at 100,000 files; issue 16 item 4). Read from the columns of a
    :class:`~xnatio.models.FileTable` view (no record made)."""

    __slots__ = ("_files",)

    def __init__(self, files: Sequence[DicomSource]) -> None:
        self._files = files

    def __len__(self) -> int:
        return len(self._files)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        files = self._files
        if isinstance(files, FileTable):
            number, uid = files.series_number(i), files.sop_instance_uid(i)
        else:
            f = files[i]
            number, uid = f.series_number, f.sop_instance_uid
        return f"{number if number is not None else 'series'}/" + instance_file_name(uid)

    def __iter__(self) -> Iterator[str]:
        return map(self.__getitem__, range(len(self)))


class SourceFile(Protocol):
    """What an archive needs of a source file: where it is, and its size and mtime when listed."""

    @property
    def path(self) -> Path: ...

    @property
    def size(self) -> int: ...

    @property
    def mtime_ns(self) -> int: ...


F = TypeVar("F", bound=SourceFile)


class SourceChangedError(XnatioError, Generic[F]):
    """A source file vanished or changed since it was listed; nothing of it was sent as valid.

    Not an OSError on purpose: raised from inside a request body, an OSError would look like a
    network failure to urllib3 and be retried instead of failing this one file.
    """

    def __init__(self, file: F, reason: str) -> None:
        super().__init__(f"{file.path}: {reason}")
        self.file = file
        self.reason = reason


def check_sources(files: Sequence[F]) -> tuple[Sequence[F], list[tuple[F, str]]]:
    """Split ``files`` into those still as discovered and those that are not, with a reason.

    Called right before a batch's stream is built, so a file deleted or rewritten since discovery
    is reported failed on its own instead of failing the whole request. When none failed, the
    first is ``files`` itself (a view of the manifest's columns stays one: no record held per
    file while the batch is in flight, issue 16 item 4).
    """
    failed: list[tuple[F, str]] = []
    failed_at: set[int] = set()
    for i, f in enumerate(files):
        reason = _changed(f)
        if reason:
            failed.append((f, reason))
            failed_at.add(i)
    if not failed:
        return files, failed
    return [f for i, f in enumerate(files) if i not in failed_at], failed


def _fspath(f: SourceFile) -> str | Path:
    """Where ``f`` is, as the string a DicomFile keeps: no ``Path`` made per file (its parsed
    parts, interned, cost ~190 bytes a file that stay held: issue 16 item 4)."""
    fspath: str | None = getattr(f, "fspath", None)
    return f.path if fspath is None else fspath


def _changed(f: SourceFile) -> str:
    try:
        st = os.stat(_fspath(f))
    except FileNotFoundError:
        return "file no longer exists (deleted or moved after discovery)"
    except PermissionError:
        return "not readable any more (permission denied)"
    except OSError as exc:
        return f"not readable any more ({exc.strerror})"
    if getattr(f, "member", None) is not None:
        return ""  # a DICOM member of an archive PATH: the archive itself is sent
    if not stat.S_ISREG(st.st_mode):
        return "no longer a regular file"
    if st.st_size != f.size:
        return f"file changed after discovery (size {f.size} -> {st.st_size} bytes)"
    if not os.access(_fspath(f), os.R_OK):
        return "not readable any more (permission denied)"
    return ""


def member_names(
    files: Sequence[SourceFile], root: Path, *, rename_nested_archives: bool = True
) -> list[str]:
    """Archive entry names for ``files``: relative to ``root``, POSIX, safe and unique.

    No absolute paths, no ``.`` or ``..`` parts, no control characters; names that are not valid
    UTF-8 on disk get U+FFFD; with ``rename_nested_archives`` (for the import service) a name XNAT
    would take for a nested archive gets ``.dcm`` added; clashes (after those changes) get ``~2``,
    ``~3``, ... before the extension.
    """
    seen: set[str] = set()
    out: list[str] = []
    for f in files:
        try:
            rel = f.path.relative_to(root).as_posix()
        except ValueError:
            rel = f.path.as_posix()
        name = _safe_name(rel)
        if rename_nested_archives and name.lower().endswith(_ARCHIVE_LIKE):
            name += ".dcm"
        if name in seen:
            stem, dot, ext = name.rpartition(".")
            if not dot or "/" in ext:
                stem, ext = name, ""
            n = 2
            while (candidate := f"{stem}~{n}{'.' + ext if ext else ''}") in seen:
                n += 1
            name = candidate
        seen.add(name)
        out.append(name)
    return out


def _safe_name(rel: str) -> str:
    parts = []
    for part in rel.replace("\\", "/").split("/"):
        if part in ("", ".", ".."):
            continue
        # Undecodable bytes in a POSIX file name arrive as surrogate escapes.
        part = part.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        parts.append("".join("_" if ord(c) < 32 or ord(c) == 127 else c for c in part))
    return "/".join(parts) or "unnamed"


class _Members(Sequence[tuple[str, F]]):
    """(entry name, file) of each member, paired when asked: the files' records are made as
    they are streamed, not held for the whole request (issue 16 item 4)."""

    def __init__(self, names: Sequence[str], files: Sequence[F]) -> None:
        if len(names) != len(files):
            raise ValueError("one archive entry name per file")
        self.names = names
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    @overload
    def __getitem__(self, i: int) -> tuple[str, F]: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[str, F]]: ...

    def __getitem__(self, i: int | slice) -> tuple[str, F] | Sequence[tuple[str, F]]:
        if isinstance(i, slice):
            return list(zip(self.names[i], self.files[i], strict=True))
        return self.names[i], self.files[i]

    def __iter__(self) -> Iterator[tuple[str, F]]:
        return zip(self.names, self.files, strict=True)


class ArchiveStream(Generic[F]):
    """A re-iterable archive of ``files``: iterate it for the bytes, once per attempt.

    ``size`` is the exact byte length (None for zip-deflated, sent chunked). ``members``
    pairs each entry name with its source. Hooks, all optional: ``on_bytes`` is called with the
    length of every chunk as it is handed out (for progress); ``on_member`` with the name and
    source of each entry once its last byte is produced. With ``with_md5``, ``md5`` maps each
    entry name to the MD5 of the bytes sent for it in the current (or last) iteration, to compare
    with the digest XNAT's catalog keeps (facts section 4); ``on_digest`` is called with each
    source and the raw 16-byte MD5 of its bytes as sent (read-back compares them, so that no
    file is read twice: :class:`xnatio.verify.SentDigests`).

    ``rename_nested_archives`` (the default, for the import service) adds ``.dcm`` to names that
    end like archives, because the DICOM-zip importer opens those as nested archives. A resource
    upload turns it off: XNAT unpacks a resource archive one level only and must keep the names.
    ``names``, when given, are the entry names to use (one per file, unique; e.g.
    :func:`instance_member_names`) instead of the paths relative to ``root``.

    ``compression`` (:class:`xnatio.compress.Compression`) decides entry by entry whether a
    ``zip-auto`` stream deflates (``zip-deflated`` deflates all), and is told every entry deflated
    (the compressor's rate; the link's rate comes from the request body, which knows what the
    server acknowledged: :class:`xnatio.transports.rest.bodies.StreamBody`); ``raw_sent`` counts the
    uncompressed bytes of the entries produced so far in this iteration (progress of a
    compressed stream counts these, not wire bytes).

    Iterating raises :class:`SourceChangedError` when a file is missing, unreadable or has
    another size than when it was listed, before any byte of that file's entry is produced.
    """

    def __init__(
        self,
        files: Sequence[F],
        fmt: str,
        *,
        root: Path,
        compresslevel: int = defaults.COMPRESS_LEVEL,
        on_bytes: Callable[[int], None] | None = None,
        on_member: Callable[[str, F], None] | None = None,
        with_md5: bool = False,
        rename_nested_archives: bool = True,
        names: Sequence[str] | None = None,
        compression: Compression | None = None,
        on_digest: Callable[[F, bytes], None] | None = None,
    ) -> None:
        if fmt not in CONTENT_TYPES:
            raise ValueError(f"archive format must be one of {sorted(CONTENT_TYPES)}, not {fmt!r}")
        inside = [f for f in files if getattr(f, "member", None) is not None]
        if inside:
            raise ValueError(f"{inside[0].path} is an archive: send it as is, not re-archived")
        # Kept as given: a view of the manifest's columns makes each record when it is streamed.
        self.files = files
        self.format = fmt
        self.content_type = CONTENT_TYPES[fmt]
        self.filename = FILENAMES[fmt]
        self.compresslevel = compresslevel
        self.compression = compression
        self.raw_sent = 0
        self.on_bytes = on_bytes
        self.on_member = on_member
        self.with_md5 = with_md5
        self.on_digest = on_digest
        self.md5: dict[str, str] = {}
        if names is None:
            names = member_names(self.files, root, rename_nested_archives=rename_nested_archives)
        elif len(set(names)) != len(self.files):
            raise ValueError("archive entry names must be unique, one per file")
        self.members: Sequence[tuple[str, F]] = _Members(names, self.files)
        self.size: int | None
        if fmt == "tar":
            self.size = _tar_size(self.members)
        elif fmt == "zip":
            self.size = _ZipLayout(self.members).total
        else:
            self.size = None

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError("a zip-deflated stream has no length known in advance")
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        self.md5.clear()
        self.raw_sent = 0
        tap = _Tap(self.md5 if self.with_md5 else None, self.on_member, self, self.on_digest)
        compression = self.compression
        if self.format == "zip":
            raw = _zip_chunks(self.members, tap)
        elif self.format in ("zip-deflated", "zip-auto"):
            if self.format == "zip-deflated":
                deflate: Callable[[], bool] = _always
            else:
                deflate = compression.should_deflate if compression is not None else _never
            raw = _deflated_zip_chunks(
                self.members, tap, self.compresslevel, deflate=deflate, compression=compression
            )
        else:
            raw = _tar_chunks(self.members, tap)
        for chunk in _coalesce(raw):
            if self.on_bytes is not None:
                self.on_bytes(len(chunk))
            yield chunk


def make_archive_stream(
    files: Sequence[F],
    fmt: str,
    *,
    root: Path,
    on_bytes: Callable[[int], None] | None = None,
    on_member: Callable[[str, F], None] | None = None,
    with_md5: bool = False,
    rename_nested_archives: bool = True,
    names: Sequence[str] | None = None,
    compression: Compression | None = None,
    on_digest: Callable[[F, bytes], None] | None = None,
) -> ArchiveStream[F]:
    """A streaming ``fmt`` ("tar", "zip", "zip-deflated" or "zip-auto") archive of ``files``,
    names relative to root (or ``names``).

    See :class:`ArchiveStream` for the hooks, ``rename_nested_archives`` and ``names``.
    """
    return ArchiveStream(
        files,
        fmt,
        root=root,
        on_bytes=on_bytes,
        on_member=on_member,
        with_md5=with_md5,
        rename_nested_archives=rename_nested_archives,
        names=names,
        compression=compression,
        on_digest=on_digest,
    )


def _always() -> bool:
    return True


def _never() -> bool:
    return False


def read_source(f: F) -> Iterator[bytes]:
    """One source file's bytes, checked like an archive entry's (for a file sent as is).

    Raises :class:`SourceChangedError` when the file is gone, unreadable or not ``f.size`` long.
    """
    source = _Source(f)
    try:
        yield from source.read_exactly(f.size)
    finally:
        source.close()


class _Tap(Generic[F]):
    """Per-entry bookkeeping while an archive is generated: the MD5 of each entry's bytes as
    they go out (not of a CRC pre-read), and the ``on_member`` hook once an entry is complete."""

    def __init__(
        self,
        md5: dict[str, str] | None,
        on_member: Callable[[str, F], None] | None,
        stream: ArchiveStream[F] | None = None,
        on_digest: Callable[[F, bytes], None] | None = None,
    ) -> None:
        self.md5 = md5
        self.on_member = on_member
        self.stream = stream
        self.on_digest = on_digest
        self.hashing = md5 is not None or on_digest is not None
        self.digest: hashlib._Hash | None = None

    def sent(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        if self.hashing and self.digest is None:
            self.digest = hashlib.md5(usedforsecurity=False)
        digest, stream = self.digest, self.stream
        for piece in pieces:
            if digest is not None:
                digest.update(piece)
            if stream is not None:
                stream.raw_sent += len(piece)
            yield piece

    def done(self, name: str, f: F) -> None:
        if self.hashing:
            digest = self.digest or hashlib.md5(usedforsecurity=False)  # an empty file
            if self.md5 is not None:
                self.md5[name] = digest.hexdigest()
            if self.on_digest is not None:
                self.on_digest(f, digest.digest())
            self.digest = None
        if self.on_member is not None:
            self.on_member(name, f)


def _coalesce(parts: Iterator[bytes]) -> Iterator[bytes]:
    """Join small pieces (headers, small files) into chunks of about CHUNK bytes."""
    pending: list[bytes] = []
    size = 0
    for part in parts:
        if not part:
            continue
        if not pending and len(part) >= CHUNK:
            yield part
            continue
        pending.append(part)
        size += len(part)
        if size >= CHUNK:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


class _Source:
    """One source file opened for streaming, checked against what discovery saw."""

    def __init__(self, f: SourceFile) -> None:
        self.file = f
        try:
            # O_NONBLOCK: a FIFO put in place of the file must not hang the open (refused below).
            flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
            self.fd = os.open(_fspath(f), flags)
        except FileNotFoundError:
            raise SourceChangedError(
                f, "file no longer exists (deleted or moved after discovery)"
            ) from None
        except OSError as exc:
            raise SourceChangedError(f, f"cannot be opened ({exc.strerror})") from None
        st = os.fstat(self.fd)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise SourceChangedError(f, "no longer a regular file")
        if size != f.size:
            os.close(self.fd)
            raise SourceChangedError(
                f, f"file changed after discovery (size {f.size} -> {size} bytes)"
            )

    def read_exactly(self, size: int) -> Iterator[bytes]:
        """The file's first ``size`` bytes in CHUNK pieces; a short file is a changed file."""
        left = size
        while left > 0:
            try:
                data = os.read(self.fd, min(CHUNK, left))
            except OSError as exc:  # an I/O error on this file fails this file, not the request
                raise SourceChangedError(self.file, f"read failed ({exc.strerror})") from None
            if not data:
                raise SourceChangedError(self.file, "file shrank while it was being sent")
            left -= len(data)
            yield data

    def close(self) -> None:
        os.close(self.fd)


# -- tar -------------------------------------------------------------------------------------------

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's default record: the archive is padded to a whole record


class TarStat(Protocol):
    """What a tar header says of a member besides its name."""

    @property
    def size(self) -> int: ...

    @property
    def mtime_ns(self) -> int: ...


def tar_header(name: str, f: TarStat) -> bytes:
    """The header block(s) of one regular-file member ``name``: mode 0644, owner 0:0 with no
    names, the file's size and whole-second mtime. The one tar-header builder of xnatio: the
    batch archives here and the archive-member bodies of ``transports.rest.bodies`` both use it.

    PAX headers carry long and non-ASCII names exactly, as UTF-8 (POSIX.1-2001): read by
    commons-compress (import service), Ant's TarInputStream since 1.9 (resource extraction,
    TarUtils) and GNU tar, whatever the reader's default charset. A name that is not valid
    UTF-8 (surrogate-escaped bytes from the file system) goes out as its raw bytes with
    ``hdrcharset=BINARY``: tarfile's PAX writer does that whatever ``errors`` says.
    """
    info = tarfile.TarInfo(name)
    info.size = f.size
    info.mode = 0o644
    info.mtime = f.mtime_ns // 1_000_000_000
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _tar_header_size(name: str, f: TarStat) -> int:
    if len(name) < 100 and name.isascii() and f.size < 8**11:
        return _BLOCK  # fits the ustar fields: no PAX header (the common case, computed fast)
    return len(tar_header(name, f))


def _padding(size: int) -> int:
    return -size % _BLOCK


def _tar_size(members: Sequence[tuple[str, SourceFile]]) -> int:
    body = sum(_tar_header_size(n, f) + f.size + _padding(f.size) for n, f in members)
    end = body + 2 * _BLOCK
    return end + (-end % _RECORD)


def _tar_chunks(members: Sequence[tuple[str, F]], tap: _Tap[F]) -> Iterator[bytes]:
    written = 0
    for name, f in members:
        source = _Source(f)  # opened and checked before its header goes out
        try:
            header = tar_header(name, f)
            yield header
            yield from tap.sent(source.read_exactly(f.size))
        finally:
            source.close()
        pad = _padding(f.size)
        yield b"\0" * pad
        written += len(header) + f.size + pad
        tap.done(name, f)
    end = written + 2 * _BLOCK
    yield b"\0" * (2 * _BLOCK + (-end % _RECORD))


# -- zip (STORED) ---------------------------------------------------------------------------------

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_MAX32 = 0xFFFFFFFF
_MAX16 = 0xFFFF
_UTF8_FLAG = 0x0800
_UNIX = 3 << 8


class _ZipLayout:
    """Offsets and sizes of every zip record, from names and sizes alone."""

    def __init__(self, members: Sequence[tuple[str, SourceFile]]) -> None:
        self.offsets: list[int] = []
        self.names: list[bytes] = []
        offset = 0
        for name, f in members:
            encoded = name.encode("utf-8")
            self.names.append(encoded)
            self.offsets.append(offset)
            big = f.size >= _MAX32
            offset += _LOCAL.size + len(encoded) + (20 if big else 0) + f.size
        # Central entries need a zip64 extra only where their own size or offset overflows.
        central = sum(
            _CENTRAL.size + len(n) + _central_extra_len(f.size, off)
            for n, (_, f), off in zip(self.names, members, self.offsets, strict=True)
        )
        self.central_offset = offset
        self.central_size = central
        self.zip64 = len(members) >= _MAX16 or offset >= _MAX32 or central >= _MAX32
        end = _END.size + (_END64.size + _LOCATOR64.size if self.zip64 else 0)
        self.total = offset + central + end


def _central_extra_len(size: int, offset: int) -> int:
    fields = (2 if size >= _MAX32 else 0) + (1 if offset >= _MAX32 else 0)
    return 4 + 8 * fields if fields else 0


def _dos_time(mtime_ns: int) -> tuple[int, int]:
    t = time.localtime(mtime_ns / 1e9)
    year = min(max(t.tm_year, 1980), 2107)
    date = (year - 1980) << 9 | t.tm_mon << 5 | t.tm_mday
    clock = t.tm_hour << 11 | t.tm_min << 5 | t.tm_sec // 2
    return date, clock


def _read_whole(source: _Source, size: int) -> tuple[list[bytes], int]:
    """A file of at most ``_ZIP_SINGLE_READ`` bytes, read once, in ``CHUNK`` pieces, and its
    CRC-32. The pieces are not joined: a block above the mmap threshold (128 KiB,
    ``xnatio.malloc``) is mapped fresh and its pages zeroed by the kernel, and joining every
    167 KB file of a stored zip, then copying it into a chunk of the request body, cost a
    15,000-file upload 3-4 s of system CPU more than the tar (docs/performance.md, "loop")."""
    pieces = list(source.read_exactly(size))
    crc = 0
    for piece in pieces:
        crc = crc32(piece, crc)
    return pieces, crc


def _zip_chunks(members: Sequence[tuple[str, F]], tap: _Tap[F]) -> Iterator[bytes]:
    layout = _ZipLayout(members)
    crcs: list[int] = []
    for (name, f), encoded in zip(members, layout.names, strict=True):
        source = _Source(f)
        try:
            if f.size <= _ZIP_SINGLE_READ:
                pieces, crc = _read_whole(source, f.size)
                crcs.append(crc)
                yield _local_header(encoded, f, crc)
                yield from tap.sent(pieces)
            else:
                crc = 0
                for piece in source.read_exactly(f.size):
                    crc = crc32(piece, crc)
                crcs.append(crc)
                yield _local_header(encoded, f, crc)
                os.lseek(source.fd, 0, os.SEEK_SET)
                sent = 0
                for piece in tap.sent(source.read_exactly(f.size)):
                    sent = crc32(piece, sent)
                    yield piece
                if sent != crc:
                    # Rewritten between the two reads: XNAT would reject the entry's CRC anyway.
                    raise SourceChangedError(f, "file changed while it was being sent")
        finally:
            source.close()
        tap.done(name, f)
    yield from _central_directory(members, layout, crcs)


def _flags(encoded: bytes) -> int:
    return _UTF8_FLAG if not encoded.isascii() else 0


def _local_header(encoded: bytes, f: SourceFile, crc: int) -> bytes:
    date, clock = _dos_time(f.mtime_ns)
    big = f.size >= _MAX32
    extra = struct.pack("<HHQQ", 1, 16, f.size, f.size) if big else b""
    size32 = _MAX32 if big else f.size
    head = _LOCAL.pack(
        0x04034B50,
        45 if big else 20,
        _flags(encoded),
        0,  # STORED
        clock,
        date,
        crc,
        size32,
        size32,
        len(encoded),
        len(extra),
    )
    return head + encoded + extra


def _central_directory(
    members: Sequence[tuple[str, SourceFile]], layout: _ZipLayout, crcs: list[int]
) -> Iterator[bytes]:
    for (_, f), encoded, offset, crc in zip(
        members, layout.names, layout.offsets, crcs, strict=True
    ):
        date, clock = _dos_time(f.mtime_ns)
        values: list[int] = []
        if f.size >= _MAX32:
            values += [f.size, f.size]
        if offset >= _MAX32:
            values.append(offset)
        extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
        size32 = _MAX32 if f.size >= _MAX32 else f.size
        version = 45 if values else 20
        yield (
            _CENTRAL.pack(
                0x02014B50,
                _UNIX | version,
                version,
                _flags(encoded),
                0,
                clock,
                date,
                crc,
                size32,
                size32,
                len(encoded),
                len(extra),
                0,
                0,
                0,
                (stat.S_IFREG | 0o644) << 16,
                min(offset, _MAX32),
            )
            + encoded
            + extra
        )
    count = len(members)
    if layout.zip64:
        end64_offset = layout.central_offset + layout.central_size
        yield _END64.pack(
            0x06064B50,
            _END64.size - 12,
            _UNIX | 45,
            45,
            0,
            0,
            count,
            count,
            layout.central_size,
            layout.central_offset,
        )
        yield _LOCATOR64.pack(0x07064B50, 0, end64_offset, 1)
    yield _END.pack(
        0x06054B50,
        0,
        0,
        min(count, _MAX16),
        min(count, _MAX16),
        min(layout.central_size, _MAX32),
        min(layout.central_offset, _MAX32),
        0,
    )


# -- zip (DEFLATED, streamed) ---------------------------------------------------------------------

_DESCRIPTOR = struct.Struct("<IIII")
_DESCRIPTOR_FLAG = 0x0008


def _deflated_zip_chunks(
    members: Sequence[tuple[str, F]],
    tap: _Tap[F],
    level: int,
    *,
    deflate: Callable[[], bool] = _always,
    compression: Compression | None = None,
) -> Iterator[bytes]:
    """A zip whose entries are DEFLATED, each followed by a data descriptor (CRC and sizes are
    known only once its data is out): read once, no length known in advance.

    ``java.util.zip.ZipInputStream`` (XNAT's DICOM-zip importer, facts 1.1) accepts descriptors on
    DEFLATED entries. A file of 4 GiB or more would need zip64 sizes in its descriptor, which
    that reader only takes after a zip64 local header; such a file goes STORED instead, its CRC
    read first, as in :func:`_zip_chunks`. So does every entry for which ``deflate()`` answers
    False (``zip-auto``): a STORED entry carries its CRC and sizes in its local header, without
    a descriptor, which ``ZipInputStream`` requires of STORED entries. ``compression`` is told the
    CPU time each deflated entry took (:class:`xnatio.compress.Compression`).
    """
    cpu = compression.cpu_clock if compression is not None else None
    entries = _Entries()  # name, method, flags, crc, packed, plain size, offset of each
    offset = 0
    for name, f in members:
        encoded = name.encode("utf-8")
        source = _Source(f)
        try:
            if f.size >= _MAX32 or not deflate():
                if f.size <= _ZIP_SINGLE_READ:  # read once, as in _zip_chunks
                    pieces, crc = _read_whole(source, f.size)
                    header = _local_header(encoded, f, crc)
                    yield header
                    yield from tap.sent(pieces)
                else:
                    crc = 0
                    for piece in source.read_exactly(f.size):
                        crc = crc32(piece, crc)
                    os.lseek(source.fd, 0, os.SEEK_SET)
                    header = _local_header(encoded, f, crc)
                    yield header
                    sent = 0
                    for piece in tap.sent(source.read_exactly(f.size)):
                        sent = crc32(piece, sent)
                        yield piece
                    if sent != crc:
                        raise SourceChangedError(f, "file changed while it was being sent")
                entries.append((encoded, 0, _flags(encoded), crc, f.size, f.size, offset))
                offset += len(header) + f.size
                tap.done(name, f)
                continue
            flags = _flags(encoded) | _DESCRIPTOR_FLAG
            date, clock = _dos_time(f.mtime_ns)
            header = (
                _LOCAL.pack(0x04034B50, 20, flags, 8, clock, date, 0, 0, 0, len(encoded), 0)
                + encoded
            )
            yield header
            z = deflater(level)
            crc = 0
            packed = 0
            spent = 0.0  # CPU seconds in zlib (it releases the GIL: batches deflate in parallel)
            for piece in tap.sent(source.read_exactly(f.size)):
                crc = crc32(piece, crc)
                start = cpu() if cpu is not None else 0.0
                out = z.compress(piece)
                if cpu is not None:
                    spent += cpu() - start
                if out:
                    packed += len(out)
                    yield out
            start = cpu() if cpu is not None else 0.0
            out = z.flush()
            if cpu is not None:
                spent += cpu() - start
            packed += len(out)
            yield out
            if compression is not None:
                compression.deflated(f.size, packed, spent)
        finally:
            source.close()
        if packed >= _MAX32:  # incompressible data grown past 4 GiB: the descriptor cannot say it
            raise SourceChangedError(f, "too large to send in a compressed zip (4 GiB)")
        yield _DESCRIPTOR.pack(0x08074B50, crc, packed, f.size)
        entries.append((encoded, 8, flags, crc, packed, f.size, offset))
        offset += len(header) + packed + _DESCRIPTOR.size
        tap.done(name, f)
    yield from _central_records(members, entries, offset)


class _Entries(Sequence[tuple[bytes, int, int, int, int, int, int]]):
    """What the central directory needs of each entry already sent, in columns: a batch in
    flight keeps ~40 bytes an entry, not a tuple of seven values (~300 bytes; every file of an
    upload is in a batch in flight at once: issue 16 item 4)."""

    def __init__(self) -> None:
        self.names = bytearray()
        self.ends: array[int] = array("Q")
        self.methods = bytearray()
        self.flags: array[int] = array("H")
        self.crcs: array[int] = array("I")
        self.packed: array[int] = array("Q")
        self.plain: array[int] = array("Q")
        self.offsets: array[int] = array("Q")

    def append(self, entry: tuple[bytes, int, int, int, int, int, int]) -> None:
        encoded, method, flags, crc, packed, plain, offset = entry
        self.names += encoded
        self.ends.append(len(self.names))
        self.methods.append(method)
        self.flags.append(flags)
        self.crcs.append(crc)
        self.packed.append(packed)
        self.plain.append(plain)
        self.offsets.append(offset)

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, i: int) -> tuple[bytes, int, int, int, int, int, int]: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[bytes, int, int, int, int, int, int]]: ...

    def __getitem__(
        self, i: int | slice
    ) -> (
        tuple[bytes, int, int, int, int, int, int]
        | Sequence[tuple[bytes, int, int, int, int, int, int]]
    ):
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        if i < 0:
            i += len(self)
        start = self.ends[i - 1] if i else 0
        return (
            bytes(self.names[start : self.ends[i]]),
            self.methods[i],
            self.flags[i],
            self.crcs[i],
            self.packed[i],
            self.plain[i],
            self.offsets[i],
        )

    def __iter__(self) -> Iterator[tuple[bytes, int, int, int, int, int, int]]:
        return map(self.__getitem__, range(len(self)))


def _central_records(
    members: Sequence[tuple[str, SourceFile]],
    entries: Sequence[tuple[bytes, int, int, int, int, int, int]],
    central_offset: int,
) -> Iterator[bytes]:
    """Central directory and end records of a zip whose entries are already out."""
    size = 0
    for (_, f), (encoded, method, flags, crc, packed, plain, offset) in zip(
        members, entries, strict=True
    ):
        date, clock = _dos_time(f.mtime_ns)
        values: list[int] = []
        big = plain >= _MAX32 or packed >= _MAX32
        if big:
            values += [plain, packed]
        if offset >= _MAX32:
            values.append(offset)
        extra = struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""
        version = 45 if values else 20
        record = (
            _CENTRAL.pack(
                0x02014B50,
                _UNIX | version,
                version,
                flags,
                method,
                clock,
                date,
                crc,
                _MAX32 if big else packed,
                _MAX32 if big else plain,
                len(encoded),
                len(extra),
                0,
                0,
                0,
                (stat.S_IFREG | 0o644) << 16,
                min(offset, _MAX32),
            )
            + encoded
            + extra
        )
        size += len(record)
        yield record
    count = len(entries)
    if count >= _MAX16 or central_offset >= _MAX32 or size >= _MAX32:
        end64_offset = central_offset + size
        yield _END64.pack(
            0x06064B50, _END64.size - 12, _UNIX | 45, 45, 0, 0, count, count, size, central_offset
        )
        yield _LOCATOR64.pack(0x07064B50, 0, end64_offset, 1)
    yield _END.pack(
        0x06054B50,
        0,
        0,
        min(count, _MAX16),
        min(count, _MAX16),
        min(size, _MAX32),
        min(central_offset, _MAX32),
        0,
    )


__all__ = [
    "CONTENT_TYPES",
    "FILENAMES",
    "ArchiveStream",
    "SourceChangedError",
    "SourceFile",
    "check_sources",
    "instance_file_name",
    "instance_member_names",
    "make_archive_stream",
    "member_names",
    "read_source",
]
