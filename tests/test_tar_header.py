"""One tar-header builder (issue 12): ``archive.tar_header`` replaced the two that batch archives
(archive.py) and archive-member bodies (transports/rest/bodies.py) each had; it writes byte for byte
what either of them wrote."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from xnatio.archive import tar_header


@dataclass(frozen=True)
class _Stat:
    size: int
    mtime_ns: int


def _as_archive_py_built_it(name: str, f: _Stat) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = f.size
    info.mode = 0o644
    info.mtime = f.mtime_ns // 1_000_000_000
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def _as_bodies_py_built_it(name: str, f: _Stat) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = f.size
    info.mode = 0o644
    info.mtime = f.mtime_ns // 1_000_000_000
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


_NAMES = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=250),
    st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=150),
    # undecodable bytes of a file name, as os.fsdecode gives them (surrogate escapes)
    st.binary(min_size=1, max_size=40).map(lambda b: (b"n" + b).decode("utf-8", "surrogateescape")),
)
_SIZES = st.one_of(st.integers(0, 10**7), st.integers(8**11 - 2, 8**11 + 2), st.integers(0, 2**40))


@given(name=_NAMES, size=_SIZES, mtime_ns=st.integers(0, 2**62))
def test_the_one_builder_writes_what_both_old_ones_wrote(
    name: str, size: int, mtime_ns: int
) -> None:
    f = _Stat(size, mtime_ns)
    built = tar_header(name, f)
    assert built == _as_bodies_py_built_it(name, f)
    assert built == _as_archive_py_built_it(name, f)


def test_a_header_reads_back_with_its_name_size_and_mtime() -> None:
    name = "série/" + "x" * 120 + "/1.2.3.dcm"  # non-ASCII and longer than ustar's 100
    f = _Stat(size=3, mtime_ns=1_700_000_000_999_999_999)
    data = tar_header(name, f) + b"abc" + b"\0" * 509 + b"\0" * 1024
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        [member] = tf.getmembers()
    assert (member.name, member.size, member.mtime, member.mode) == (name, 3, 1_700_000_000, 0o644)
    assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
