"""Plain data that flows through the upload pipeline.

    PATH -discover-> Manifest -plan-> Batches -pack-> streams -send-> XNAT -verify-> Result

Every stage takes and returns these records; both transports share them.
"""

from __future__ import annotations

import binascii
import enum
import operator
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any, Generic, TypeVar, overload
from urllib.parse import unquote


class DicomFile:
    """One DICOM instance found on disk (header fields only; pixel data is never read).

    Immutable, compared and hashed by value, and a dataclass to ``dataclasses`` (``replace``,
    ``fields``, ``asdict``: :class:`_DicomFileFields`). A manifest does not hold one per file:
    it keeps its files in columns (:class:`FileTable`) and makes a record when one is asked for
    (issue 16 item 4), so hold records only as long as they are needed. The path is kept as a
    string (``fspath``), the very object :func:`file_path` returns; ``path`` makes a ``Path``
    when asked (a ``Path`` per file and the parts it caches cost ~340 bytes a file).
    """

    # In constructor order (_init, _key, __repr__ and pickling follow it). Besides them,
    # ``_table``/``_row``: the FileTable columns and row a record was made from (not part of
    # its value): outcomes find a file's slot by them without a key string per file.
    _SLOTS = (
        "fspath",
        "size",
        "mtime_ns",
        "study_uid",
        "series_uid",
        "sop_instance_uid",
        "sop_class_uid",
        "series_number",
        "transfer_syntax_uid",
        "patient_id",
        "member",
        "ctime_ns",
    )
    __slots__ = (*_SLOTS, "_row", "_table")

    fspath: str  # str(path): the file, or the archive holding it
    size: int
    mtime_ns: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    series_number: int | None
    transfer_syntax_uid: str
    patient_id: str
    # Member name inside an archive when PATH is an archive, else None.
    member: str | None
    # The inode change time (ns; 0 when unknown, e.g. inside an archive): any write changes it,
    # even one that puts the modification time back (the journal's change check, issue 13).
    ctime_ns: int
    # Set only on records a FileTable made (see _SLOTS above).
    _table: _Columns
    _row: int

    def __init__(
        self,
        path: Path | str,
        size: int,
        mtime_ns: int,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        series_number: int | None,
        transfer_syntax_uid: str,
        patient_id: str,
        member: str | None = None,
        ctime_ns: int = 0,
    ) -> None:
        # Named as str(Path(path)), as records always were ("a//b" and "./a" read "a/b", "a");
        # discovery, whose walked strings are in that form already, uses :meth:`walked`.
        _init(
            self,
            str(Path(path)),
            size,
            mtime_ns,
            study_uid,
            series_uid,
            sop_instance_uid,
            sop_class_uid,
            series_number,
            transfer_syntax_uid,
            patient_id,
            member,
            ctime_ns,
        )

    @classmethod
    def walked(cls, fspath: str, *values: object) -> DicomFile:
        """The record of ``fspath``, a path string already as ``str(Path(fspath))`` would be,
        kept as that very object (discovery's walk: no second string per file); ``values``:
        the other fields in constructor order."""
        self = cls.__new__(cls)
        _init(self, fspath, *values)
        return self

    @property
    def path(self) -> Path:
        """The file (or, for an archive member, the archive) as a ``Path`` (made when asked)."""
        return Path(self.fspath)

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, a) for a in DicomFile._SLOTS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not DicomFile:
            return NotImplemented
        assert isinstance(other, DicomFile)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"DicomFile is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"DicomFile is immutable: cannot delete {name!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, self._key())

    def __repr__(self) -> str:
        fields = ", ".join(f"{a}={getattr(self, a)!r}" for a in DicomFile._SLOTS[1:])
        return f"DicomFile(path={self.path!r}, {fields})"


@dataclass(frozen=True)
class _DicomFileFields:
    """The fields :class:`DicomFile` is built from, as a dataclass declares them: DicomFile
    carries their ``__dataclass_fields__``, so ``dataclasses.replace``, ``fields`` and
    ``asdict`` treat it as the dataclass it was before it stored its path compactly."""

    path: Path
    size: int
    mtime_ns: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    series_number: int | None
    transfer_syntax_uid: str
    patient_id: str
    member: str | None = None
    ctime_ns: int = 0


DicomFile.__dataclass_fields__ = _DicomFileFields.__dataclass_fields__  # type: ignore[attr-defined]
_set = object.__setattr__


def _init(self: DicomFile, *values: object) -> None:
    for attr, value in zip(DicomFile._SLOTS, values, strict=True):
        _set(self, attr, value)


def _rebuild(*values: object) -> DicomFile:
    self = DicomFile.__new__(DicomFile)
    _init(self, *values)
    return self


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file under PATH that will not be sent, and why (one short sentence)."""

    path: Path
    reason: str
    size: int = 0
    # A duplicate's instance (the one its first copy is sent as); empty for non-DICOM files.
    sop_instance_uid: str = ""
    series_uid: str = ""


@dataclass(slots=True)
class StudySummary:
    study_uid: str
    patient_id: str
    file_count: int
    total_bytes: int


# -- per-file state in columns ---------------------------------------------------------------------
#
# An upload of 100,000 files (and a plan of 1,000,000) must not hold a Python object per file
# (issue 16 item 4: peak RSS below 120 MB at 100,000 files, 200 MB for a million planned): a
# record and its strings cost 300-400 bytes, the columns below about 80. A FileTable keeps each
# field of every file in one array (sizes and times as machine integers; study, series, class,
# syntax, patient and series number as small codes into a table of distinct values; paths and
# SOP Instance UIDs as UTF-8 text in one buffer, split at their last "/" or "." so the shared
# folder or UID root is kept once), and makes a DicomFile record only when one is asked for.

_WIDER = {"B": "H", "H": "I", "I": "Q"}
_T = TypeVar("_T")


def _limit(column: array[int]) -> int:
    return 1 << (8 * column.itemsize)


class _Interned(Generic[_T]):
    """One code per row into a table of the distinct values (a session has a few series)."""

    __slots__ = ("codes", "index", "limit", "values")

    def __init__(self) -> None:
        self.values: list[_T] = []
        self.index: dict[_T, int] = {}
        self.codes: array[int] = array("B")
        self.limit = _limit(self.codes)

    def append(self, value: _T) -> None:
        code = self.index.get(value)
        if code is None:
            code = self.index[value] = len(self.values)
            self.values.append(value)
            if code >= self.limit:
                self.codes = array(_WIDER[self.codes.typecode], self.codes)
                self.limit = _limit(self.codes)
        self.codes.append(code)

    def extend(self, values: Sequence[_T]) -> None:
        """:meth:`append` of each value, in a few C-level passes (FileTable.add_many)."""
        index = self.index
        for value in dict.fromkeys(values):  # new values get their codes in order of appearance
            if value not in index:
                index[value] = len(self.values)
                self.values.append(value)
        while len(self.values) > self.limit:
            self.codes = array(_WIDER[self.codes.typecode], self.codes)
            self.limit = _limit(self.codes)
        self.codes.extend(map(index.__getitem__, values))

    def __getitem__(self, row: int) -> _T:
        return self.values[self.codes[row]]


# UIDs, and files named by them, are digits and dots: kept as hexadecimal nibbles (dot = a, an
# odd length padded with f) behind a 0xFF byte, which UTF-8 never holds: half the bytes.
_UID_CHARS = "0123456789."
_TO_NIBBLES = str.maketrans(".", "a")
_FROM_NIBBLES = str.maketrans("a", ".")


class _Text:
    """One string per row in one buffer with the end offset of each: UTF-8 (any ``str`` round
    trips, lone surrogates too: names the file system could not decode), or packed two
    characters to a byte when it is made of digits and dots only (a UID)."""

    __slots__ = ("blob", "ends")

    def __init__(self) -> None:
        self.blob = bytearray()
        self.ends: array[int] = array("I")

    def append(self, text: str) -> None:
        self.blob += _encoded(text)
        end = len(self.blob)
        if end >= 1 << 32 and self.ends.typecode == "I":
            self.ends = array("Q", self.ends)
        self.ends.append(end)

    def extend(self, texts: Sequence[str]) -> None:
        """:meth:`append` of each text, the buffer grown once (FileTable.add_many)."""
        joined = "".join(texts)
        if all(texts) and joined.isascii() and joined.replace(".", "").isdigit():
            # UIDs only (the common case): packed as _encoded packs each, in a few passes (an
            # ASCII string made of digits once its dots are gone; str.strip is slower).
            padded = [text + "f" if len(text) % 2 else text for text in texts]
            data = binascii.unhexlify("ff" + "ff".join(padded).replace(".", "a"))
            lengths = [1 + len(text) // 2 for text in padded]
        else:
            pieces = list(map(_encoded, texts))
            data, lengths = b"".join(pieces), list(map(len, pieces))
        ends = list(accumulate(lengths, initial=len(self.blob)))[1:]
        if ends and ends[-1] >= 1 << 32 and self.ends.typecode == "I":
            self.ends = array("Q", self.ends)
        self.blob += data
        self.ends.extend(ends)

    def __getitem__(self, row: int) -> str:
        start = self.ends[row - 1] if row else 0
        data = self.blob[start : self.ends[row]]
        if data[:1] == b"\xff":
            return data[1:].hex().rstrip("f").translate(_FROM_NIBBLES)
        return data.decode("utf-8", "surrogatepass")

    def slice(self, start: int, stop: int) -> list[str]:
        """``[self[row] for row in range(start, stop)]``, in a few C-level passes when each of
        those rows is packed (discovery sends the workers its paths, UID-named files, a chunk
        at a time: issue 16 item 4)."""
        ends = self.ends
        first = ends[start - 1] if start else 0
        at = [0, *(end - first for end in ends[start:stop])]
        data = bytes(self.blob[first : first + at[-1]])
        # Packed rows each start with the 0xFF marker (an empty row has no byte: not packed).
        if not all(a < b and data[a] == 0xFF for a, b in pairwise(at)):
            return [self[row] for row in range(start, stop)]
        # As hexadecimal digits: each row's "ff", then its nibbles ("a" for a dot, a last "f"
        # padding an odd length); a UID holds no "f", so rstrip leaves the row's characters.
        text = data.hex().translate(_FROM_NIBBLES)
        return [text[2 * a + 2 : 2 * b].rstrip("f") for a, b in pairwise(at)]


def _encoded(text: str) -> bytes:
    """How :class:`_Text` stores one string."""
    if text and not text.strip(_UID_CHARS):
        nibbles = text.translate(_TO_NIBBLES)
        return b"\xff" + bytes.fromhex(nibbles + "f" if len(nibbles) % 2 else nibbles)
    return text.encode("utf-8", "surrogatepass")


class SplitStrings:
    """A list of strings, each kept as an interned head (up to and including its last ``sep``)
    and its own tail: the folder of a path, the root of a UID, is stored once (discovery keeps
    the paths it walked in one: ~20 bytes a path instead of a ~120-byte ``str``)."""

    __slots__ = ("head", "sep", "tail")

    def __init__(self, sep: str) -> None:
        self.head: _Interned[str] = _Interned()
        self.tail = _Text()
        self.sep = sep

    def append(self, text: str) -> None:
        cut = text.rfind(self.sep) + 1
        self.head.append(text[:cut])
        self.tail.append(text[cut:])

    def extend(self, texts: Sequence[str]) -> None:
        """:meth:`append` of each text, a column at a time (FileTable.add_many; the walk)."""
        sep = self.sep
        cuts = [text.rfind(sep) + 1 for text in texts]
        self.head.extend([text[:cut] for text, cut in zip(texts, cuts, strict=True)])
        self.tail.extend([text[cut:] for text, cut in zip(texts, cuts, strict=True)])

    def __getitem__(self, row: int) -> str:
        return self.head[row] + self.tail[row]

    def slice(self, start: int, stop: int) -> list[str]:
        """``[self[row] for row in range(start, stop)]``, a column at a time."""
        values = self.head.values
        heads = [values[code] for code in self.head.codes[start:stop]]
        return list(map(operator.add, heads, self.tail.slice(start, stop)))

    def __len__(self) -> int:
        return len(self.tail.ends)

    def __iter__(self) -> Iterator[str]:
        return map(self.__getitem__, range(len(self)))


class _Columns:
    """The columns of a :class:`FileTable`, one row per file, in the order of DicomFile's fields."""

    __slots__ = (
        "ctime_ns",
        "fspath",
        "fspath_shared",
        "member",
        "mtime_ns",
        "patient_id",
        "rows",
        "series_number",
        "series_uid",
        "size",
        "size_limit",
        "sop_class_uid",
        "sop_instance_uid",
        "study_uid",
        "transfer_syntax_uid",
    )

    def __init__(self) -> None:
        self.fspath = SplitStrings("/")
        # True while ``fspath`` is the walk's own list of paths (see FileTable.share_paths).
        self.fspath_shared = False
        self.size: array[int] = array("I")
        self.size_limit = _limit(self.size)
        self.mtime_ns: array[int] = array("q")
        # None while every file's ctime equals its mtime (a file written once).
        self.ctime_ns: array[int] | None = None
        self.study_uid: _Interned[str] = _Interned()
        self.series_uid: _Interned[str] = _Interned()
        self.sop_instance_uid = SplitStrings(".")
        self.sop_class_uid: _Interned[str] = _Interned()
        self.series_number: _Interned[int | None] = _Interned()
        self.transfer_syntax_uid: _Interned[str] = _Interned()
        self.patient_id: _Interned[str] = _Interned()
        # None while no file is an archive member; else "" (none) or "/" + the member's name.
        self.member: _Text | None = None
        self.rows = 0

    def add(
        self,
        fspath: str,
        size: int,
        mtime_ns: int,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        series_number: int | None,
        transfer_syntax_uid: str,
        patient_id: str,
        member: str | None,
        ctime_ns: int,
    ) -> None:
        if not 0 <= size < self.size_limit and self.size.typecode != "q":
            self.size = array("q", self.size)
            self.size_limit = 1 << 63
        # Appended in an order that leaves no column a row longer if one raises (bad types).
        if ctime_ns != mtime_ns and self.ctime_ns is None:
            self.ctime_ns = array("q", self.mtime_ns)
        if member is not None and self.member is None:
            self.member = _Text()
            for _ in range(self.rows):
                self.member.append("")
        own_path = self._own_paths(fspath, fspath)
        self.size.append(size)
        self.mtime_ns.append(mtime_ns)
        if self.ctime_ns is not None:
            self.ctime_ns.append(ctime_ns)
        if self.member is not None:
            self.member.append("" if member is None else "/" + member)
        if own_path:
            self.fspath.append(fspath)
        self.study_uid.append(study_uid)
        self.series_uid.append(series_uid)
        self.sop_instance_uid.append(sop_instance_uid)
        self.sop_class_uid.append(sop_class_uid)
        self.series_number.append(series_number)
        self.transfer_syntax_uid.append(transfer_syntax_uid)
        self.patient_id.append(patient_id)
        self.rows += 1

    def add_many(
        self,
        fspath: Sequence[str],
        size: Sequence[int],
        mtime_ns: Sequence[int],
        study_uid: Sequence[str],
        series_uid: Sequence[str],
        sop_instance_uid: Sequence[str],
        sop_class_uid: Sequence[str],
        series_number: Sequence[int | None],
        transfer_syntax_uid: Sequence[str],
        patient_id: Sequence[str],
        ctime_ns: Sequence[int],
    ) -> None:
        """:meth:`add` of many files (no archive members), a column at a time: the same columns
        as adding them one by one, in a few C-level passes per column."""
        n = len(fspath)
        texts: tuple[Sequence[str | int | None], ...] = (
            study_uid,
            series_uid,
            sop_instance_uid,
            sop_class_uid,
            series_number,
            transfer_syntax_uid,
            patient_id,
        )
        if any(len(c) != n for c in (size, mtime_ns, ctime_ns, *texts)):
            raise ValueError("the columns of FileTable.add_many differ in length")
        if not n:
            return
        # What may raise (bad types) is done before any column grows: none is a row longer.
        sizes, mtimes, ctimes = array("q", size), array("q", mtime_ns), array("q", ctime_ns)
        for column in (fspath, *texts):
            kinds = set(map(type, column))
            if not kinds <= ({int, type(None)} if column is series_number else {str}):
                raise TypeError(f"FileTable.add_many: a column holds {kinds}")
        if self.size.typecode != "q" and not (min(sizes) >= 0 and max(sizes) < self.size_limit):
            self.size = array("q", self.size)
            self.size_limit = 1 << 63
        if self.ctime_ns is None and ctimes != mtimes:
            self.ctime_ns = array("q", self.mtime_ns)
        own_paths = self._own_paths(fspath[0], fspath[-1], n)
        self.size.extend(sizes if self.size.typecode == "q" else size)
        self.mtime_ns.extend(mtimes)
        if self.ctime_ns is not None:
            self.ctime_ns.extend(ctimes)
        if self.member is not None:
            self.member.extend([""] * n)
        if own_paths:
            self.fspath.extend(fspath)
        self.study_uid.extend(study_uid)
        self.series_uid.extend(series_uid)
        self.sop_instance_uid.extend(sop_instance_uid)
        self.sop_class_uid.extend(sop_class_uid)
        self.series_number.extend(series_number)
        self.transfer_syntax_uid.extend(transfer_syntax_uid)
        self.patient_id.extend(patient_id)
        self.rows += n

    def share_paths(self, paths: SplitStrings) -> None:
        """See :meth:`FileTable.share_paths`."""
        if self.rows or paths.sep != "/":
            raise ValueError("only an empty table shares a list of '/'-separated paths")
        self.fspath = paths
        self.fspath_shared = True

    def _own_paths(self, first: str, last: str, n: int = 1) -> bool:
        """Whether the ``n`` rows about to be added (paths ``first`` ... ``last``) must append
        their paths to ``fspath``: always, unless it is shared and they are its very next
        ``n`` strings, which :meth:`FileTable.share_paths`'s rule lets the two ends tell. The
        first time they are not, the rows so far get a copy of their own, and ``fspath`` is
        this table's alone from then on."""
        if not self.fspath_shared:
            return True
        paths, rows = self.fspath, self.rows
        if rows + n <= len(paths) and paths[rows] == first and paths[rows + n - 1] == last:
            return False
        own = SplitStrings("/")
        for start in range(0, rows, _COPY_CHUNK):  # a chunk at a time: no list of all of them
            own.extend(paths.slice(start, min(start + _COPY_CHUNK, rows)))
        self.fspath = own
        self.fspath_shared = False
        return True

    def record(self, row: int) -> DicomFile:
        mtime_ns = self.mtime_ns[row]
        member = self.member[row][1:] or None if self.member is not None else None
        f = DicomFile.walked(
            self.fspath[row],
            self.size[row],
            mtime_ns,
            self.study_uid[row],
            self.series_uid[row],
            self.sop_instance_uid[row],
            self.sop_class_uid[row],
            self.series_number[row],
            self.transfer_syntax_uid[row],
            self.patient_id[row],
            member,
            mtime_ns if self.ctime_ns is None else self.ctime_ns[row],
        )
        _set(f, "_table", self)
        _set(f, "_row", row)
        return f


_COPY_CHUNK = 10_000  # paths copied at a time when a shared path list stops being shared


class FileTable(Sequence[DicomFile]):
    """The DICOM files of a manifest (or a batch, or a study): a sequence of
    :class:`DicomFile` records made on demand from columns (see above), in the order added.

    A table made with ``FileTable(records)`` (or empty) can be appended to; :meth:`take` and
    slicing give views of some of its rows, which share its columns (a batch costs 4 bytes a
    file). Equal to any sequence of the same records in the same order; pickles whole.
    """

    __slots__ = ("_cols", "_rows")

    def __init__(self, records: Iterable[DicomFile] = ()) -> None:
        self._cols = _Columns()
        # The rows of _cols this sequence is (a view), or None: all of them, appendable.
        self._rows: array[int] | None = None
        for f in records:
            self.append(f)

    # -- building

    def append(self, f: DicomFile) -> None:
        self.add(
            f.fspath,
            f.size,
            f.mtime_ns,
            f.study_uid,
            f.series_uid,
            f.sop_instance_uid,
            f.sop_class_uid,
            f.series_number,
            f.transfer_syntax_uid,
            f.patient_id,
            f.member,
            f.ctime_ns,
        )

    def add(
        self,
        fspath: str,
        size: int,
        mtime_ns: int,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        series_number: int | None,
        transfer_syntax_uid: str,
        patient_id: str,
        member: str | None = None,
        ctime_ns: int = 0,
    ) -> None:
        """Append the file these fields describe (as :meth:`DicomFile.walked` takes them)."""
        if self._rows is not None:
            raise TypeError("a view of a FileTable cannot be appended to")
        self._cols.add(
            fspath,
            size,
            mtime_ns,
            study_uid,
            series_uid,
            sop_instance_uid,
            sop_class_uid,
            series_number,
            transfer_syntax_uid,
            patient_id,
            member,
            ctime_ns,
        )

    def add_many(
        self,
        fspath: Sequence[str],
        size: Sequence[int],
        mtime_ns: Sequence[int],
        study_uid: Sequence[str],
        series_uid: Sequence[str],
        sop_instance_uid: Sequence[str],
        sop_class_uid: Sequence[str],
        series_number: Sequence[int | None],
        transfer_syntax_uid: Sequence[str],
        patient_id: Sequence[str],
        ctime_ns: Sequence[int],
    ) -> None:
        """Append many files at once, given as columns of equal length (each as :meth:`add`
        takes it; files on disk, not archive members): the same table as :meth:`add` of each
        in turn, without Python work per file and field (discovery appends a worker's answer
        this way: issue 16 item 4)."""
        if self._rows is not None:
            raise TypeError("a view of a FileTable cannot be appended to")
        self._cols.add_many(
            fspath,
            size,
            mtime_ns,
            study_uid,
            series_uid,
            sop_instance_uid,
            sop_class_uid,
            series_number,
            transfer_syntax_uid,
            patient_id,
            ctime_ns,
        )

    def share_paths(self, paths: SplitStrings) -> None:
        """Keep the paths of the files added from now on in ``paths`` itself, a list of paths
        its owner is still growing (discovery's walk), rather than in a copy: the walk's list
        and the table's column were the same strings twice (~18 MB at a million files, issue
        16 item 4). The table must be empty, and the paths added afterwards must be, in order,
        some of ``paths``' strings, each at most once (discovery adds those of the files it
        keeps); so while the rows added are the very next strings of ``paths`` (checked at the
        two ends of each addition), they share them. The first addition that is not (a file
        skipped or a duplicate before it) gives the table a copy of its own paths so far, and
        the table keeps its own from then on: the same table either way."""
        if self._rows is not None:
            raise TypeError("a view of a FileTable cannot share paths")
        self._cols.share_paths(paths)

    def extend(self, records: Iterable[DicomFile]) -> None:
        for f in list(records):  # a table may be extended with itself
            self.append(f)

    def __iadd__(self, records: Iterable[DicomFile]) -> FileTable:
        """``table += records`` appends them, as for the list a manifest's files once were."""
        self.extend(records)
        return self

    def take(self, positions: Iterable[int]) -> FileTable:
        """A view of the files at ``positions`` (of this sequence), in that order."""
        rows = self._rows
        absolute = positions if rows is None else (rows[p] for p in positions)
        view = FileTable.__new__(FileTable)
        view._cols = self._cols
        view._rows = array("I" if self._cols.rows < 1 << 32 else "Q", absolute)
        return view

    # -- the sequence

    def __len__(self) -> int:
        return self._cols.rows if self._rows is None else len(self._rows)

    @overload
    def __getitem__(self, i: int) -> DicomFile: ...

    @overload
    def __getitem__(self, i: slice) -> FileTable: ...

    def __getitem__(self, i: int | slice) -> DicomFile | FileTable:
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        return self._cols.record(self.row(i))

    def __iter__(self) -> Iterator[DicomFile]:
        record = self._cols.record
        return map(record, self.rows())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # compared by content, as a list

    def __repr__(self) -> str:
        if len(self) > 20:
            return f"FileTable(<{len(self)} files>)"
        return f"FileTable({list(self)!r})"

    # -- columns, without records

    def row(self, i: int) -> int:
        """The row of the ``i``-th file in the columns (``IndexError`` past the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError("FileTable index out of range")
        if i < 0:
            i += n
        return i if self._rows is None else self._rows[i]

    def rows(self) -> Iterable[int]:
        """The rows of the files, in order."""
        return range(self._cols.rows) if self._rows is None else self._rows

    def sizes(self) -> Iterator[int]:
        return map(self._cols.size.__getitem__, self.rows())

    @property
    def total_bytes(self) -> int:
        if self._rows is None:
            return sum(self._cols.size)
        return sum(self.sizes())

    def size(self, i: int) -> int:
        return self._cols.size[self.row(i)]

    def study_uid(self, i: int) -> str:
        return self._cols.study_uid[self.row(i)]

    def series_uid(self, i: int) -> str:
        return self._cols.series_uid[self.row(i)]

    def series_number(self, i: int) -> int | None:
        return self._cols.series_number[self.row(i)]

    def codes(self, column: str) -> tuple[list[int], list[Any]]:
        """One code per file of ``column`` (an interned column: ``study_uid``, ``series_uid``,
        ``sop_class_uid``, ``series_number``, ``transfer_syntax_uid``, ``patient_id``) and the
        values the codes stand for: what grouping needs, without a record per file."""
        interned: _Interned[Any] = getattr(self._cols, column)
        codes = interned.codes
        rows = self.rows()
        return (list(codes) if self._rows is None else [codes[r] for r in rows]), interned.values

    def code_column(self, column: str) -> tuple[Sequence[int], list[Any]]:
        """:meth:`codes` by row of the columns, not copied: the column's own codes, indexed by
        :meth:`row` (a view's files are some of them), and the values they stand for; also
        ``"folder"`` (the folder of each path, as :meth:`folder`). Read it at once: appending
        to the table may widen the codes into a new array. A list of a million codes would
        hold an int object for each above 256 (36 MB; issue 16 item 4)."""
        cols = self._cols
        interned: _Interned[Any] = cols.fspath.head if column == "folder" else getattr(cols, column)
        return interned.codes, interned.values

    def sop_instance_uid(self, i: int) -> str:
        return self._cols.sop_instance_uid[self.row(i)]

    def fspath(self, i: int) -> str:
        return self._cols.fspath[self.row(i)]

    def folder(self, i: int) -> str:
        """The folder part of ``fspath(i)``, up to and including its last "/" (kept once)."""
        return self._cols.fspath.head[self.row(i)]

    def member(self, i: int) -> str | None:
        members = self._cols.member
        return None if members is None else members[self.row(i)][1:] or None

    def name_of(self, i: int) -> str:
        """:func:`file_path` of the ``i``-th file, without making its record."""
        return _file_name(self.fspath(i), self.member(i))

    def mtime_ns(self, i: int) -> int:
        return self._cols.mtime_ns[self.row(i)]

    def ctime_ns(self, i: int) -> int:
        ctimes, row = self._cols.ctime_ns, self.row(i)
        return self._cols.mtime_ns[row] if ctimes is None else ctimes[row]  # (None: all = mtime)

    def holds(self, f: DicomFile | FileOutcome) -> bool:
        """True when ``f`` (a record, or a :func:`row_outcome`) was made from these columns (its
        ``_row`` is a row of them)."""
        return getattr(f, "_table", None) is self._cols

    def same_rows(self, other: FileTable) -> bool:
        """True when ``other`` is these very rows of these columns, in the same order."""
        if other._cols is not self._cols or len(other) != len(self):
            return False
        if self._rows is None and other._rows is None:
            return True
        return list(self.rows()) == list(other.rows())

    @property
    def is_view(self) -> bool:
        """True for :meth:`take`'s views (which cannot be appended to)."""
        return self._rows is not None

    def studies(self) -> list[StudySummary]:
        """Per StudyInstanceUID: its patient, files and bytes (most files first)."""
        c = self._cols
        out: dict[int, StudySummary] = {}
        study, size = c.study_uid.codes, c.size
        for r in self.rows():
            s = out.get(study[r])
            if s is None:
                s = out[study[r]] = StudySummary(c.study_uid[r], c.patient_id[r], 0, 0)
            s.file_count += 1
            s.total_bytes += size[r]
        return sorted(out.values(), key=lambda s: -s.file_count)


class SopIndex:
    """Which file of a :class:`FileTable` holds a SOP Instance UID (to find duplicates): open
    addressing over the table's own column, 8 bytes a slot and no string kept (a ``dict`` of
    the UIDs would hold ~170 bytes a file: 170 MB for a million)."""

    __slots__ = ("_count", "_mask", "_slots", "_table")

    def __init__(self, table: FileTable, expected: int = 0) -> None:
        self._table = table
        size = 16
        while size < 2 * expected:
            size *= 2
        self._slots: array[int] = array("q", [-1]) * size  # position in the table, or -1
        self._mask = size - 1
        self._count = 0

    def _find(self, uid: str) -> int:
        """The slot holding ``uid``, or the empty slot where it would go. A slot keeps 27 bits
        of the UID's hash above the position (:data:`_TAG_SHIFT`), the bits that choose its
        slot too (up to 2**27 slots): a UID is read back from the table (a decode) only where
        they match, not at every slot a probe passes, and growing reads none back (issue 16
        item 4: discovery's index grows while the folders are walked)."""
        slots, mask, uid_at = self._slots, self._mask, self._table.sop_instance_uid
        h = hash(uid)
        tag = h >> 32 & _TAG
        i = (tag if mask <= _TAG else h) & mask
        tag <<= _TAG_SHIFT
        while True:
            at = slots[i]
            if at < 0 or (at & _TAG_BITS == tag and uid_at(at & _POSITION) == uid):
                return i
            i = (i + 1) & mask

    def get(self, uid: str) -> int | None:
        """The position of the file holding ``uid`` in the table, or None."""
        at = self._slots[self._find(uid)]
        return None if at < 0 else at & _POSITION

    def add(self, uid: str, position: int) -> None:
        """Remember that the file at ``position`` holds ``uid`` (not held yet)."""
        if 2 * (self._count + 1) > len(self._slots):
            self._grow()
        self._slots[self._find(uid)] = (hash(uid) >> 32 & _TAG) << _TAG_SHIFT | position
        self._count += 1

    def _grow(self) -> None:
        # The old slots are read as they are, not copied into a list first: a list of the
        # positions held was an int object and a pointer each (~40 bytes), a spike of 40 MB at
        # half a million files when a million-file walk grew its index (issue 16 item 4).
        old = self._slots
        slots = self._slots = array("q", [-1]) * (2 * len(old))
        mask = self._mask = len(slots) - 1
        for tagged in old:
            if tagged < 0:
                continue
            if mask <= _TAG:  # the slot from the kept bits of the hash
                i = tagged >> _TAG_SHIFT & mask
                while slots[i] >= 0:
                    i = (i + 1) & mask
                slots[i] = tagged
            else:
                slots[self._find(self._table.sop_instance_uid(tagged & _POSITION))] = tagged


# SopIndex's slots: a position below 2**36, then 27 bits of the UID's hash.
_TAG_SHIFT = 36
_POSITION = (1 << _TAG_SHIFT) - 1
_TAG = (1 << 27) - 1
_TAG_BITS = _TAG << _TAG_SHIFT


@dataclass(slots=True, init=False)
class Manifest:
    """Everything discovery found under one PATH.

    ``files`` is a :class:`FileTable` (columns, not one object per file: issue 16 item 4);
    a list or tuple of records given to the constructor is stored as one.
    """

    root: Path
    files: FileTable
    skipped: list[SkippedFile]
    # Second and later copies of a SOP Instance UID: not sent, reported.
    duplicates: list[SkippedFile]
    # Set when PATH is an archive file (.zip/.tar/.tar.gz) rather than a directory.
    source_archive: Path | None

    def __init__(
        self,
        root: Path,
        files: Iterable[DicomFile] = (),
        skipped: list[SkippedFile] | None = None,
        duplicates: list[SkippedFile] | None = None,
        source_archive: Path | None = None,
    ) -> None:
        self.root = root
        self.files = files if isinstance(files, FileTable) else FileTable(files)
        self.skipped = [] if skipped is None else skipped
        self.duplicates = [] if duplicates is None else duplicates
        self.source_archive = source_archive

    @property
    def total_bytes(self) -> int:
        return self.files.total_bytes

    def studies(self) -> list[StudySummary]:
        return self.files.studies()

    def series(self) -> dict[str, list[DicomFile]]:
        out: dict[str, list[DicomFile]] = {}
        for f in self.files:
            out.setdefault(f.series_uid, []).append(f)
        return out


@dataclass(frozen=True, slots=True)
class Batch:
    """Files sent together in one request (REST) or one association (C-STORE)."""

    index: int
    # A :class:`FileTable` view of the manifest's rows (plan.py), or records (tests, C-STORE).
    files: Sequence[DicomFile]

    @property
    def total_bytes(self) -> int:
        if isinstance(self.files, FileTable):
            return self.files.total_bytes
        return sum(f.size for f in self.files)


class Outcome(str, enum.Enum):
    UPLOADED = "uploaded"  # the server confirmed it
    VERIFIED = "verified"  # confirmed and found on read-back
    SKIPPED = "skipped"  # not sent on purpose (not DICOM, DICOMDIR, duplicate, already sent)
    FAILED = "failed"  # should have been sent and was not, or did not land


class Origin(str, enum.Enum):
    """Who vouches for an outcome: this run, an earlier run (the journal), or the server."""

    RUN = "run"  # this run sent it (or failed to), or read it back
    JOURNAL = "journal"  # an earlier run sent it and the server confirmed it then
    SERVER = "server"  # the server held it already when this run read the session first


@dataclass(slots=True)
class FileOutcome:
    path: str
    outcome: Outcome
    reason: str = ""
    sop_instance_uid: str = ""
    series_uid: str = ""
    size: int = 0
    batch: int | None = None
    origin: Origin = Origin.RUN

    @property
    def sent_now(self) -> bool:
        """Bytes this run put on the wire (not an earlier run's, not the server's own)."""
        return self.origin is Origin.RUN


class _RowOutcome(FileOutcome):
    """A FileOutcome whose path, SOP Instance UID, series and size are read from the row of a
    FileTable when asked, not held as strings (~300 bytes a file in a 100,000-file upload:
    issue 16 item 4). Equal to, and pickled as, the plain FileOutcome it stands for."""

    __slots__ = ("_row", "_table")

    def __init__(
        self,
        table: _Columns,
        row: int,
        outcome: Outcome,
        reason: str = "",
        origin: Origin = Origin.RUN,
    ) -> None:
        self._table = table
        self._row = row
        self.outcome = outcome
        self.reason = reason
        self.batch = None
        self.origin = origin

    @property
    def path(self) -> str:  # type: ignore[override]
        c = self._table
        member = c.member[self._row][1:] or None if c.member is not None else None
        return _file_name(c.fspath[self._row], member)

    @property
    def sop_instance_uid(self) -> str:  # type: ignore[override]
        return self._table.sop_instance_uid[self._row]

    @property
    def series_uid(self) -> str:  # type: ignore[override]
        return self._table.series_uid[self._row]

    @property
    def size(self) -> int:  # type: ignore[override]
        return self._table.size[self._row]

    def _fields(self) -> tuple[object, ...]:
        return (
            self.path,
            self.outcome,
            self.reason,
            self.sop_instance_uid,
            self.series_uid,
            self.size,
            self.batch,
            self.origin,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileOutcome):
            return NotImplemented
        return self._fields() == _RowOutcome._fields(other)  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]  # as FileOutcome's

    def __repr__(self) -> str:
        return repr(FileOutcome(*self._fields()))  # type: ignore[arg-type]

    def __reduce__(self) -> tuple[object, ...]:
        return (FileOutcome, self._fields())


def row_outcome(files: FileTable, i: int, outcome: Outcome, reason: str = "") -> FileOutcome:
    """The outcome of the ``i``-th file of ``files`` that reads its path and UIDs from the
    columns (:class:`_RowOutcome`)."""
    return _RowOutcome(files._cols, files.row(i), outcome, reason)


def total_bytes(files: Sequence[DicomFile]) -> int:
    """The files' sizes added up: from a :class:`FileTable`'s size column, with no record made
    per file (making 15,000 records to add their sizes was 5 % of the client's CPU on loopback:
    docs/performance.md, "journal")."""
    return files.total_bytes if isinstance(files, FileTable) else sum(f.size for f in files)


def table_row(x: DicomFile | FileOutcome) -> tuple[object, int] | None:
    """The columns and row a record (or a :func:`row_outcome`) was made from, None for one made
    otherwise: what lets a per-file verdict be kept as a row number, not a path string."""
    table = getattr(x, "_table", None)
    return None if table is None else (table, x._row)  # type: ignore[union-attr]


def columns_rows(table: object) -> int:
    """How many rows the columns :func:`table_row` returned hold."""
    assert isinstance(table, _Columns)
    return table.rows


def file_path(f: DicomFile) -> str:
    """How outcomes, the journal, verification and the report name a file: its path, or
    ``ARCHIVE/member`` for a member of an archive PATH (the one copy of this rule)."""
    return _file_name(f.fspath, f.member)


def _file_name(fspath: str, member: str | None) -> str:
    return str(Path(fspath) / member) if member is not None else fspath


class SessionKind(str, enum.Enum):
    """Where a session a transport reported lives on XNAT (facts 1.2, 1.6, 3)."""

    PREARCHIVE = "prearchive"  # received, waiting for a commit
    ARCHIVE = "archive"  # committed: an experiment
    DIRECT_ARCHIVE = "direct-archive"  # sent with Direct-Archive, archived by XNAT when idle


@dataclass(frozen=True, slots=True)
class SessionRef:
    """A session a transport reported, typed once where its URI is read (XNAT answers with a
    ``/data/prearchive/…``, ``/data/archive/…`` or ``/xapi/direct-archive/…`` URI, facts 1.3,
    1.6); the stages above look at ``kind``, never at the URI's text."""

    uri: str
    kind: SessionKind

    @classmethod
    def parse(cls, uri: str) -> SessionRef | None:
        """The reference of ``uri``; None for "" (nothing landed, or nothing remembered)."""
        if not uri:
            return None
        if "/direct-archive/" in uri:
            return cls(uri, SessionKind.DIRECT_ARCHIVE)
        if "/prearchive/" in uri:
            return cls(uri, SessionKind.PREARCHIVE)
        return cls(uri, SessionKind.ARCHIVE)

    @property
    def label(self) -> str:
        """The last path segment: the session's label (Direct-Archive and archive URIs)."""
        return unquote(self.uri.rstrip("/").rsplit("/", 1)[-1])


class Phase(str, enum.Enum):
    SYNTH = "synth"  # xio demo writing its synthetic session
    DISCOVER = "discover"
    PLAN = "plan"
    CONNECT = "connect"
    UPLOAD = "upload"
    COMMIT = "commit"
    VERIFY = "verify"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """What a progress callback receives.

    ``current``/``total`` count files in the UPLOAD phase (and steps elsewhere);
    ``bytes_done``/``bytes_total`` count payload bytes. Progress may go backwards after a retry.
    While uploading, ``current`` counts the files XNAT confirmed, ``files_in_flight`` those
    whose request is out, and ``wire_bytes`` the bytes on the wire (fewer than ``bytes_done``
    when compressed).
    """

    phase: Phase
    current: int
    total: int
    message: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    batches_done: int = 0
    batches_failed: int = 0
    batches_total: int = 0
    files_in_flight: int = 0
    wire_bytes: int = 0


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(slots=True)
class UploadResult:
    """What an upload returns, whatever the transport."""

    success: bool
    total_files: int
    duration: float
    total_size_mb: float
    errors: list[str] = field(default_factory=list)
    files: list[FileOutcome] = field(default_factory=list)
    transport: str = "rest"
    upload_id: str = ""
    project: str = ""
    subject: str = ""
    session: str = ""
    studies: list[StudySummary] = field(default_factory=list)
    batches_total: int = 0
    batches_failed: int = 0
    session_uri: str = ""
    verified: bool | None = None
    # Every session the upload filled (REST: one per StudyInstanceUID), ``session_uri`` first.
    session_uris: list[str] = field(default_factory=list)
    # Things that did not fail the run but the user should know (one line each), e.g. that the
    # server rewrote every file so read-back compared instance counts, not bytes.
    warnings: list[str] = field(default_factory=list)
    # Facts the user may want to know that are neither failures nor warnings (one line each),
    # e.g. that XNAT stored its own copies of the files (facts 1.7), so bytes were not compared.
    notes: list[str] = field(default_factory=list)
    # Direct-Archive URIs whose experiment XNAT had not created yet when xio stopped waiting
    # (facts 1.6): the files were sent, not yet archived; ``xio verify --wait-for`` later.
    pending: list[str] = field(default_factory=list)
    # REST: True when the session is committed (archived, or handed to Direct-Archive); False
    # when it still waits in the prearchive (the next run only commits). None: the transport
    # has no commit step (C-STORE: XNAT files the session itself, facts 6).
    committed: bool | None = None
    # The run's own output could not be written (its --report): the upload may have succeeded,
    # the run still ends "error" with exit 2 (xnatio.errors.OutputError) and says so here.
    output_error: str = ""

    @property
    def uploaded(self) -> list[FileOutcome]:
        return [f for f in self.files if f.outcome in (Outcome.UPLOADED, Outcome.VERIFIED)]

    @property
    def failed(self) -> list[FileOutcome]:
        return [f for f in self.files if f.outcome is Outcome.FAILED]

    @property
    def skipped(self) -> list[FileOutcome]:
        return [f for f in self.files if f.outcome is Outcome.SKIPPED]

    @property
    def mb_per_s(self) -> float:
        return self.total_size_mb / self.duration if self.duration > 0 else 0.0
