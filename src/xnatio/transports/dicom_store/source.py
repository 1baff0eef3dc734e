"""Where a file's bytes come from: the file on disk, or a member of a zip / tar PATH.

C-STORE sends instance by instance from many associations at once, so members are read at
random: a zip has a central directory and a plain tar one header per member, both cheap to seek.
A gzipped tar can only be read front to back; it is refused with a hint rather than decompressed
again for every member (or unpacked onto temp disk).
"""

from __future__ import annotations

import io
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import IO

from xnatio.archive import EntryNames, zip_entries
from xnatio.errors import UsageError
from xnatio.models import DicomFile


class SourceReader:
    """Opens each DicomFile of one manifest for reading; safe to use from many threads."""

    def __init__(self, archive: Path | None) -> None:
        self.archive = archive
        self.kind: str | None = None
        self._local = threading.local()
        self._tar: dict[str, tuple[int, int]] = {}
        if archive is None:
            return
        from xnatio.discover import archive_format

        self.kind = archive_format(archive)
        if self.kind == "tgz":
            raise UsageError(
                f"{archive} is a compressed tar, which can only be read front to back; C-STORE "
                "reads members in parallel: unpack it, or send it with --transport rest."
            )
        if self.kind == "tar":
            with tarfile.open(archive, "r:") as tf:
                entry_name = EntryNames()  # two entries of one name are two files
                self._tar = {entry_name(i.name): (i.offset_data, i.size) for i in tf if i.isfile()}

    def open(self, f: DicomFile) -> Path | IO[bytes]:
        """A path (opened by the reader) or an open stream (closed by the caller)."""
        if f.member is None or self.archive is None:
            return Path(f.path)
        if self.kind == "zip":
            zf = getattr(self._local, "zip", None)
            if zf is None:
                zf = self._local.zip = zipfile.ZipFile(self.archive)
                self._local.entries = zip_entries(zf)
            return zf.open(self._local.entries[f.member])
        offset, size = self._tar[f.member]
        with open(self.archive, "rb") as fh:
            fh.seek(offset)
            # Instances are small next to the memory of an association thread; read at once.
            return io.BytesIO(fh.read(size))
