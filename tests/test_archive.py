"""Streaming archives: exact sizes, byte-identical round trips, odd names, changed sources."""

from __future__ import annotations

import hashlib
import io
import os
import pwd
import shutil
import subprocess
import tarfile
import textwrap
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from xnatio.archive import (
    CONTENT_TYPES,
    SourceChangedError,
    check_sources,
    make_archive_stream,
    member_names,
    read_source,
)
from xnatio.discover import discover
from xnatio.models import DicomFile
from xnatio.synth import generate_session

FORMATS = ["tar", "zip", "zip-deflated"]

LONG_DIR = "a folder with spaces/" + "d" * 120 + "/ünïcødé 名前"
ODD_NAMES = [
    "plain",
    "with space.dcm",
    f"{LONG_DIR}/{'x' * 150}",  # > 100 characters: tar needs a PAX name
    "ünïcødé/画像 1.dcm",
    "tab\there",  # control character: replaced
    "looks like.tar.gz",  # XNAT would open it as a nested archive
]
SIZES = [1, 511, 512, 513, 300_000, 1_500_000]  # around blocks, chunks and the zip read limit


def _record(path: Path, size: int | None = None) -> DicomFile:
    st = path.stat()
    return DicomFile(
        path=path,
        size=st.st_size if size is None else size,
        mtime_ns=st.st_mtime_ns,
        study_uid="1.2",
        series_uid="1.2.3",
        sop_instance_uid=str(path),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_number=1,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="P",
    )


@pytest.fixture
def odd_files(tmp_path: Path) -> tuple[Path, list[DicomFile]]:
    root = tmp_path / "src"
    files = []
    for i, name in enumerate(ODD_NAMES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(SIZES[i % len(SIZES)]))
        files.append(_record(path))
    return root, files


def _read_back(data: bytes, fmt: str) -> dict[str, bytes]:
    if fmt.startswith("zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            assert zf.testzip() is None  # every CRC checks out
            method = zipfile.ZIP_DEFLATED if fmt == "zip-deflated" else zipfile.ZIP_STORED
            assert {i.compress_type for i in zf.infolist()} == {method}
            return {i.filename: zf.read(i) for i in zf.infolist()}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        out = {}
        for info in tf:
            assert info.isfile() and info.mode == 0o644
            fp = tf.extractfile(info)
            assert fp is not None
            out[info.name] = fp.read()
        return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_exact_size_and_repeatable(
    odd_files: tuple[Path, list[DicomFile]], fmt: str
) -> None:
    root, files = odd_files
    counted: list[int] = []
    stream = make_archive_stream(files, fmt, root=root, on_bytes=counted.append)
    assert stream.content_type == CONTENT_TYPES[fmt]
    assert (
        stream.filename
        == {"tar": "upload.tar", "zip": "upload.zip", "zip-deflated": "upload.zip"}[fmt]
    )
    first = b"".join(stream)
    second = b"".join(stream)  # a retry re-reads the files and produces the same bytes
    assert first == second
    assert sum(counted) == 2 * len(first)
    if fmt == "zip-deflated":
        assert stream.size is None
    else:
        assert stream.size == len(first)
    names = [n for n, _ in stream.members]
    assert names == [
        "plain",
        "with space.dcm",
        f"{LONG_DIR}/{'x' * 150}",
        "ünïcødé/画像 1.dcm",
        "tab_here",
        "looks like.tar.gz.dcm",
    ]
    content = _read_back(first, fmt)
    assert list(content) == names
    for name, f in stream.members:
        assert content[name] == f.path.read_bytes()


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_system_tools_read_the_names_back(
    odd_files: tuple[Path, list[DicomFile]], fmt: str, tmp_path: Path
) -> None:
    root, files = odd_files
    stream = make_archive_stream(files, fmt, root=root)
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(b"".join(stream))
    names = [n for n, _ in stream.members]
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    if fmt == "tar":
        listing = subprocess.run(
            ["tar", "-tvf", str(out)], capture_output=True, text=True, check=True, env=env
        )
        lines = listing.stdout.splitlines()
        assert all(line.startswith("-rw-r--r--") for line in lines)
        # permissions, owner, size, date, time, name
        assert [line.split(None, 5)[5] for line in lines] == names
        extracted = tmp_path / "x"
        extracted.mkdir()
        subprocess.run(["tar", "-xf", str(out), "-C", str(extracted)], check=True, env=env)
        for name, f in stream.members:
            assert (extracted / name).read_bytes() == f.path.read_bytes()
    else:
        if shutil.which("unzip") is None:
            pytest.skip("unzip not installed")
        test = subprocess.run(["unzip", "-t", str(out)], capture_output=True, text=True, env=env)
        assert test.returncode == 0, test.stdout + test.stderr
        assert "No errors detected" in test.stdout


JAVA_READER = textwrap.dedent(
    """
    import java.io.*;
    import java.util.zip.*;

    public class ReadZip {
        public static void main(String[] args) throws Exception {
            try (ZipInputStream in = new ZipInputStream(new FileInputStream(args[0]))) {
                ZipEntry e;
                byte[] buf = new byte[65536];
                while ((e = in.getNextEntry()) != null) {
                    CRC32 crc = new CRC32();
                    long n = 0;
                    int r;
                    while ((r = in.read(buf)) > 0) { crc.update(buf, 0, r); n += r; }
                    String crcHex = Long.toHexString(crc.getValue());
                    System.out.println(crcHex + " " + n + " " + e.getName());
                }
            }
        }
    }
    """
)


@pytest.mark.skipif(shutil.which("java") is None, reason="no Java to run ZipInputStream")
def test_java_zipinputstream_reads_the_zip(
    odd_files: tuple[Path, list[DicomFile]], tmp_path: Path
) -> None:
    """XNAT reads uploads with java.util.zip.ZipInputStream, which rejects STORED entries that
    use data descriptors: ours must stream through it entry by entry."""
    root, files = odd_files
    stream = make_archive_stream(files, "zip", root=root)
    out = tmp_path / "upload.zip"
    out.write_bytes(b"".join(stream))
    source = tmp_path / "ReadZip.java"
    source.write_text(JAVA_READER)
    run = subprocess.run(
        ["java", "-Dfile.encoding=UTF-8", "-Dstdout.encoding=UTF-8", str(source), str(out)],
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    expected = [
        f"{zlib.crc32(f.path.read_bytes()):x} {f.size} {name}" for name, f in stream.members
    ]
    assert run.stdout.decode("utf-8").splitlines() == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_md5_and_on_member_report_each_entry_as_sent(
    odd_files: tuple[Path, list[DicomFile]], fmt: str
) -> None:
    root, files = odd_files
    done: list[str] = []
    stream = make_archive_stream(
        files, fmt, root=root, with_md5=True, on_member=lambda name, f: done.append(name)
    )
    names = [n for n, _ in stream.members]
    expected = {n: hashlib.md5(f.path.read_bytes()).hexdigest() for n, f in stream.members}
    data = b"".join(stream)
    assert done == names
    # a large zip entry is read twice (CRC, then data): only the bytes sent are hashed
    assert stream.md5 == expected
    assert b"".join(stream) == data and stream.md5 == expected and done == names + names
    # without the option nothing is hashed
    plain = make_archive_stream(files, fmt, root=root)
    assert b"".join(plain) == data and plain.md5 == {}


@dataclass(frozen=True)
class _Plain:
    """Any record with path, size and mtime_ns will do (a resource file, not a DicomFile)."""

    path: Path
    size: int
    mtime_ns: int


@pytest.mark.parametrize("fmt", FORMATS)
def test_any_source_record_and_names_kept_as_they_are(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "r"
    (root / "sub").mkdir(parents=True)
    sources = []
    for rel, data in [("data.zip", b"PK"), ("sub/old.TAR.GZ", b"gz"), ("notes.txt", b"n")]:
        (root / rel).write_bytes(data)
        st = (root / rel).stat()
        sources.append(_Plain(root / rel, st.st_size, st.st_mtime_ns))
    kept = make_archive_stream(sources, fmt, root=root, rename_nested_archives=False)
    assert [n for n, _ in kept.members] == ["data.zip", "sub/old.TAR.GZ", "notes.txt"]
    assert all(isinstance(f, _Plain) for _, f in kept.members)
    assert _read_back(b"".join(kept), fmt) == {
        "data.zip": b"PK",
        "sub/old.TAR.GZ": b"gz",
        "notes.txt": b"n",
    }
    # the import service's default: XNAT would open these as nested archives
    renamed = make_archive_stream(sources, fmt, root=root)
    assert [n for n, _ in renamed.members] == ["data.zip.dcm", "sub/old.TAR.GZ.dcm", "notes.txt"]


def test_read_source_checks_like_an_entry(tmp_path: Path) -> None:
    path = tmp_path / "one.bin"
    path.write_bytes(os.urandom(600_000))
    f = _record(path)
    assert b"".join(read_source(f)) == path.read_bytes()
    path.write_bytes(b"short")
    with pytest.raises(SourceChangedError, match="changed after discovery") as err:
        b"".join(read_source(f))
    assert err.value.file is f


@pytest.mark.parametrize("fmt", FORMATS)
def test_source_replaced_by_a_directory_is_reported(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "gone"
    path.write_bytes(b"12345")
    f = _record(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(SourceChangedError, match="no longer a regular file") as err:
        b"".join(make_archive_stream([f], fmt, root=tmp_path))
    assert err.value.file is f


def test_member_names_are_safe_and_unique(tmp_path: Path) -> None:
    root = tmp_path / "r"
    paths = [root / "a" / "x.dcm", root / "a" / "x.dcm", root / "..." / "y", tmp_path / "outside"]
    files = []
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"1")
        files.append(_record(p))
    names = member_names(files, root)
    assert names[:3] == ["a/x.dcm", "a/x~2.dcm", ".../y"]
    assert not names[3].startswith("/") and names[3].endswith("outside")
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_or_changed_file_raises_before_its_entry(
    odd_files: tuple[Path, list[DicomFile]], fmt: str
) -> None:
    root, files = odd_files
    victim = files[3]
    victim_name = "ünïcødé/画像 1.dcm".encode()
    victim.path.unlink()
    ok, failed = check_sources(files)
    assert victim not in ok and [f for f, _ in failed] == [victim]
    assert "no longer exists" in failed[0][1]

    stream = make_archive_stream(files, fmt, root=root)
    emitted: list[bytes] = []
    with pytest.raises(SourceChangedError) as err:
        for chunk in stream:
            emitted.append(chunk)
    assert err.value.file is victim and "no longer exists" in err.value.reason
    assert victim_name not in b"".join(emitted)

    # Same length check, now the file exists with another size.
    victim.path.write_bytes(b"changed")
    ok, failed = check_sources(files)
    assert [f for f, _ in failed] == [victim] and "size" in failed[0][1]
    with pytest.raises(SourceChangedError, match="changed after discovery"):
        b"".join(make_archive_stream(files, fmt, root=root))
    # Without the failed file the rest streams fine.
    assert _read_back(b"".join(make_archive_stream(ok, fmt, root=root)), fmt)


def test_a_real_session_round_trips(tmp_path: Path) -> None:
    s = generate_session(tmp_path / "s", series=2, instances=5, image_size=(32, 32))
    m = discover(s.root)
    stream = make_archive_stream(m.files, "tar", root=m.root)
    data = b"".join(stream)
    assert len(data) == stream.size
    content = _read_back(data, "tar")
    assert {name.split("/", 1)[1] for name in content} == set(s.instances)


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_memory_stays_bounded(tmp_path: Path, fmt: str) -> None:
    """300 MB through the stream with a peak of a few MB (sparse files keep the test quick)."""
    root = tmp_path / "big"
    root.mkdir()
    files = []
    for i in range(60):
        p = root / f"f{i:03d}"
        with open(p, "wb") as fp:
            fp.truncate(10_000_000 if i % 2 else 300_000)
        files.append(_record(p))
    total = sum(f.size for f in files)
    assert total > 300_000_000
    stream = make_archive_stream(files, fmt, root=root)
    tracemalloc.start()
    n = 0
    for chunk in stream:
        n += len(chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == stream.size
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


class _ZerosWithEnds(io.RawIOBase):
    """A read-only file: ``head`` bytes, then ``gap`` zero bytes, then ``tail`` bytes."""

    def __init__(self, head: bytes, gap: int, tail: bytes) -> None:
        self.head, self.gap, self.tail = head, gap, tail
        self.size = len(head) + gap + len(tail)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: bytearray) -> int:  # type: ignore[override]
        n = min(len(buf), self.size - self.pos)
        out = bytearray()
        start = self.pos
        end = start + n
        h, g = len(self.head), len(self.head) + self.gap
        if start < h:
            out += self.head[start : min(end, h)]
        if end > h and start < g:
            out += bytes(min(end, g) - max(start, h))
        if end > g:
            out += self.tail[max(start, g) - g : end - g]
        buf[:n] = out
        self.pos = end
        return n


@pytest.mark.slow
def test_zip64_for_a_file_over_4_gib(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as fp:
        fp.truncate(2**32 + 10)  # sparse: no disk used
    small = tmp_path / "small"
    small.write_bytes(b"after the big one")
    files = [_record(big), _record(small)]
    stream = make_archive_stream(files, "zip", root=tmp_path)
    head = bytearray()
    tail = bytearray()
    n = 0
    for chunk in stream:
        if len(head) < 4096:
            head += chunk[: 4096 - len(head)]
        tail = (tail + chunk[-4096:])[-4096:]
        n += len(chunk)
    assert n == stream.size
    # Reassemble the archive lazily: the real head and tail around the known run of zeros.
    fake = _ZerosWithEnds(bytes(head), n - len(head) - len(tail), bytes(tail))
    with zipfile.ZipFile(io.BufferedReader(fake)) as zf:
        infos = zf.infolist()
        assert [(i.filename, i.file_size) for i in infos] == [("big", 2**32 + 10), ("small", 17)]
        assert zf.read("small") == b"after the big one"
        assert infos[1].header_offset > 2**32
        with zf.open("big") as fp:
            assert fp.read(1024) == bytes(1024)


def test_zip_file_rewritten_while_streaming_is_reported(tmp_path: Path) -> None:
    """A file over the single-read limit is read twice (CRC, then data): a change in between
    must not go out as an entry with a wrong CRC unnoticed."""
    path = tmp_path / "big"
    path.write_bytes(bytes(1_500_000))
    f = _record(path)
    chunks = iter(make_archive_stream([f], "zip", root=tmp_path))
    first = next(chunks)  # the local header (CRC of the zeros) and the first piece
    assert first.startswith(b"PK\x03\x04")
    with open(path, "r+b") as fp:  # same size, other content
        fp.seek(1_000_000)
        fp.write(b"\x01" * 1000)
    with pytest.raises(SourceChangedError, match="changed while it was being sent"):
        for _ in chunks:
            pass


JAVA_TAR_READER = textwrap.dedent(
    """
    import java.io.*;
    import java.util.zip.*;
    import org.apache.commons.compress.archivers.tar.*;

    public class ReadTar {
        public static void main(String[] args) throws Exception {
            InputStream raw = new BufferedInputStream(new FileInputStream(args[0]));
            if (args[0].endsWith(".gz")) raw = new GZIPInputStream(raw);
            try (TarArchiveInputStream in = new TarArchiveInputStream(raw)) {
                TarArchiveEntry e;
                byte[] buf = new byte[65536];
                while ((e = in.getNextTarEntry()) != null) {
                    CRC32 crc = new CRC32();
                    long n = 0;
                    int r;
                    while ((r = in.read(buf)) > 0) { crc.update(buf, 0, r); n += r; }
                    String crcHex = Long.toHexString(crc.getValue());
                    System.out.println(crcHex + " " + n + " " + e.getName());
                }
            }
        }
    }
    """
)


def _commons_compress() -> Path | None:
    # The user's real home (the tests' HOME is a temporary folder).
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    jars = sorted(home.glob(".m2/repository/org/apache/commons/commons-compress/*/*.jar"))
    return jars[0] if jars else None


@pytest.mark.parametrize("fmt", ["tar"])
def test_commons_compress_reads_the_tar(
    odd_files: tuple[Path, list[DicomFile]], tmp_path: Path, fmt: str
) -> None:
    """XNAT reads tar uploads with commons-compress TarArchiveInputStream: long and unicode
    names (PAX headers) must come through exactly."""
    jar = _commons_compress()
    if shutil.which("java") is None or jar is None:
        pytest.skip("needs Java and a commons-compress jar in the local Maven repository")
    root, files = odd_files
    stream = make_archive_stream(files, fmt, root=root)
    out = tmp_path / stream.filename
    out.write_bytes(b"".join(stream))
    source = tmp_path / "ReadTar.java"
    source.write_text(JAVA_TAR_READER)
    run = subprocess.run(
        ["java", "-cp", str(jar), "-Dstdout.encoding=UTF-8", str(source), str(out)],
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    expected = [
        f"{zlib.crc32(f.path.read_bytes()):x} {f.size} {name}" for name, f in stream.members
    ]
    assert run.stdout.decode("utf-8").splitlines() == expected


JAVA_ZIP_READER = textwrap.dedent(
    """
    import java.io.*;
    import java.util.zip.*;

    public class ReadZip {
        public static void main(String[] args) throws Exception {
            // XNAT's DICOM-zip importer reads a zip body entry by entry like this (facts 1.1).
            PrintStream out = new PrintStream(System.out, true, "UTF-8");
            try (ZipInputStream zin = new ZipInputStream(new FileInputStream(args[0]))) {
                ZipEntry e;
                byte[] buf = new byte[8192];
                while ((e = zin.getNextEntry()) != null) {
                    CRC32 crc = new CRC32();
                    long n = 0;
                    int r;
                    while ((r = zin.read(buf)) > 0) { crc.update(buf, 0, r); n += r; }
                    out.println(Long.toHexString(crc.getValue()) + " " + n + " " + e.getName());
                }
            }
        }
    }
    """
)


def test_java_zip_input_stream_reads_the_deflated_zip(
    odd_files: tuple[Path, list[DicomFile]], tmp_path: Path
) -> None:
    """The deflated zip (sent chunked, entries with data descriptors) as XNAT reads it:
    ``java.util.zip.ZipInputStream``, which accepts descriptors on DEFLATED entries only."""
    if shutil.which("java") is None:
        pytest.skip("needs Java")
    root, files = odd_files
    stream = make_archive_stream(files, "zip-deflated", root=root)
    out = tmp_path / "upload.zip"
    out.write_bytes(b"".join(stream))
    source = tmp_path / "ReadZip.java"
    source.write_text(JAVA_ZIP_READER)
    run = subprocess.run(
        ["java", "-Dstdout.encoding=UTF-8", str(source), str(out)],
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()
    expected = [
        f"{zlib.crc32(f.path.read_bytes()):x} {f.size} {name}" for name, f in stream.members
    ]
    assert run.stdout.decode("utf-8").splitlines() == expected
