"""Synthetic DICOM sessions for tests, the demo and benchmarks.

A session is N series x M instances of one StudyInstanceUID, CT- or MR-sized 16-bit images whose
pixel data compresses like real scans (empty background, a noisy body), written with UID-style
file names that have no extension, as scanners and PACS exports do. Optional extras reproduce the
input that breaks uploads in the field: a DICOMDIR, a text side file, a second study, a duplicated
instance and a truncated file.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# pydicom (and numpy with it) is imported where a file is made, not with this module: the CLI
# imports this module for `xio synth`'s options, and every command paid 0.3 s for it (issue 16).

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# Image sizes as scanners write them: CT 512x512, MR 256x256, both 16 bits allocated.
_SIZES = {"CT": (512, 512), "MR": (256, 256)}
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

EXTRAS = frozenset({"dicomdir", "txt", "second-study", "duplicate", "truncated"})


@dataclass
class SyntheticSession:
    """What was written, so tests can assert on it file by file."""

    root: Path
    study_uid: str
    patient_id: str
    # SOP Instance UID -> path, for the files of the main study (the ones that should land).
    instances: dict[str, Path] = field(default_factory=dict)
    # Series Number -> SOP Instance UIDs of the main study.
    series: dict[int, list[str]] = field(default_factory=dict)
    # Paths of extras, by extra name.
    extras: dict[str, Path] = field(default_factory=dict)
    second_study_uid: str | None = None
    total_bytes: int = 0

    @property
    def file_count(self) -> int:
        return len(self.instances)


def _phantom(rows: int, cols: int, rng: random.Random) -> bytes:
    """A 16-bit little-endian image: zero background, an elliptical body with noisy tissue.

    Real CT/MR pixel data compresses to roughly 40-60 % with deflate; this does too.
    """
    out = bytearray(rows * cols * 2)
    cy, cx = rows / 2, cols / 2
    ry, rx = rows * 0.42, cols * 0.36
    noise = rng.randbytes(rows * cols)
    for y in range(rows):
        dy = (y - cy) / ry
        if abs(dy) >= 1:
            continue
        half = rx * (1 - dy * dy) ** 0.5
        x0, x1 = int(cx - half), int(cx + half)
        base = 800 + int(200 * (1 - abs(dy)))
        row_off = y * cols
        for x in range(x0, x1):
            v = base + noise[row_off + x]
            i = (row_off + x) * 2
            out[i] = v & 0xFF
            out[i + 1] = v >> 8
    return bytes(out)


def _instance(
    *,
    modality: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    instance_number: int,
    patient_id: str,
    patient_name: str,
    pixels: bytes,
    rows: int,
    cols: int,
) -> Dataset:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(_SOP_CLASS[modality])
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.Modality = modality
    ds.Manufacturer = "xnatio synth"
    ds.StudyDescription = "xnatio synthetic study"
    ds.SeriesDescription = f"{modality} series {series_number}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.8, 0.8]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    return ds


def generate_session(
    out_dir: Path | str,
    *,
    series: int = 3,
    instances: int = 20,
    modality: str = "MR",
    patient_id: str = "SYNTH001",
    extras: Iterable[str] = (),
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
    header: Mapping[str, str | None] | None = None,
    on_file: Callable[[int, int, int], None] | None = None,
) -> SyntheticSession:
    """Write a session of ``series`` x ``instances`` files under ``out_dir`` and describe it.

    ``image_size`` (rows, cols) overrides the modality's usual size, for small fast tests.
    ``header`` sets attributes of every instance by keyword (None removes one), e.g. another
    StudyDate or StudyDescription for ``upload-many``'s label templates.
    ``on_file(done, total, nbytes)`` is called after each instance is written (a progress
    display: ``xio demo``).
    """
    modality = modality.upper()
    if modality not in _SIZES:
        raise ValueError(f"modality must be one of {sorted(_SIZES)}, not {modality!r}")
    unknown = set(extras) - EXTRAS
    if unknown:
        raise ValueError(f"unknown extras {sorted(unknown)}; choose from {sorted(EXTRAS)}")
    extras = set(extras)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, cols = image_size or _SIZES[modality]
    from pydicom.uid import generate_uid

    def uid(*parts: object) -> str:
        # generate_uid concatenates its entropy sources without a separator, so ("sop", 1, 11)
        # and ("sop", 11, 1) would collide: join them unambiguously first.
        key = "|".join([str(seed), patient_id, *map(str, parts)])
        return str(generate_uid(entropy_srcs=[key]))

    study_uid = uid("study")
    session = SyntheticSession(root=root, study_uid=study_uid, patient_id=patient_id)
    for s in range(1, series + 1):
        series_uid = uid("series", s)
        # One phantom per series, shifted per instance so every file differs.
        base = _phantom(rows, cols, rng)
        series_dir = root / f"S{s:03d}"
        series_dir.mkdir(exist_ok=True)
        for i in range(1, instances + 1):
            sop_uid = uid("sop", s, i)
            shift = (i * 2 * cols) % len(base)
            ds = _instance(
                modality=modality,
                study_uid=study_uid,
                series_uid=series_uid,
                sop_uid=sop_uid,
                series_number=s,
                instance_number=i,
                patient_id=patient_id,
                patient_name=f"Synthetic^{patient_id}",
                pixels=base[shift:] + base[:shift],
                rows=rows,
                cols=cols,
            )
            for keyword, value in (header or {}).items():
                if value is None:
                    delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            path = series_dir / sop_uid
            ds.save_as(path, enforce_file_format=True)
            session.instances[sop_uid] = path
            session.series.setdefault(s, []).append(sop_uid)
            session.total_bytes += path.stat().st_size
            if on_file is not None:
                on_file(len(session.instances), series * instances, session.total_bytes)

    if "dicomdir" in extras:
        session.extras["dicomdir"] = _write_dicomdir(root / "DICOMDIR")
    if "txt" in extras:
        side = root / "notes.txt"
        side.write_text("scan notes: patient moved during series 2\n")
        session.extras["txt"] = side
    if "second-study" in extras:
        other = uid("study2")
        session.second_study_uid = other
        sop_uid = uid("sop2")
        ds = _instance(
            modality=modality,
            study_uid=other,
            series_uid=uid("series2"),
            sop_uid=sop_uid,
            series_number=99,
            instance_number=1,
            patient_id=patient_id,
            patient_name=f"Synthetic^{patient_id}",
            pixels=_phantom(rows, cols, rng),
            rows=rows,
            cols=cols,
        )
        path = root / "secondary" / sop_uid
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        session.extras["second-study"] = path
    if "duplicate" in extras and session.instances:
        first = next(iter(session.instances.values()))
        dup = root / "copy of first instance"
        shutil.copyfile(first, dup)
        session.extras["duplicate"] = dup
    if "truncated" in extras:
        src = next(iter(session.instances.values()), None)
        trunc = root / "truncated.dcm"
        if src is not None:
            data = src.read_bytes()
            trunc.write_bytes(data[:200])
        else:
            trunc.write_bytes(b"\0" * 128 + b"DICM")
        session.extras["truncated"] = trunc
    return session


def _write_dicomdir(path: Path) -> Path:
    """A minimal media directory file: DICOM, but not an image (no SOP Class UID in the dataset)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MEDIA_STORAGE_DIRECTORY)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "XNATIO"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = []
    ds.save_as(path, enforce_file_format=True)
    return path
