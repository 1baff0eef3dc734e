"""Benchmark data: synthetic sessions generated once into a cache, keyed by their parameters.

The cache lives in ``benchmarks/.cache/`` (gitignored) or ``$XNATIO_BENCH_CACHE``. A dataset is
only reused when its ``complete.json`` marker exists, so an interrupted generation is redone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xnatio.synth import generate_session

# An MR or CT session has tens of series; 30 at most keeps every series a few hundred files, as
# in the 15,000-file sessions users describe (15,000 = 30 x 500).
MAX_SERIES = 30


def cache_root() -> Path:
    env = os.environ.get("XNATIO_BENCH_CACHE")
    root = Path(env) if env else Path(__file__).resolve().parent / ".cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class DataSpec:
    """A session of about ``files`` instances of ``rows`` x ``cols`` 16-bit pixels."""

    files: int
    rows: int
    cols: int
    modality: str = "MR"
    seed: int = 7

    @property
    def layout(self) -> tuple[int, int]:
        """(series, instances per series): exactly ``files`` in up to 30 equal series
        (15,000 = 30 x 500), or 30 series of at least ``files`` in all."""
        for series in range(min(MAX_SERIES, self.files), 0, -1):
            if self.files % series == 0:
                return series, self.files // series
        return MAX_SERIES, math.ceil(self.files / MAX_SERIES)

    @property
    def key(self) -> str:
        series, per = self.layout
        return f"{self.modality}-{series}x{per}-{self.rows}x{self.cols}-seed{self.seed}"


@dataclass(frozen=True)
class Dataset:
    spec: DataSpec
    path: Path
    files: int
    bytes: int
    study_uid: str

    def to_json(self) -> dict[str, object]:
        series, per = self.spec.layout
        return {
            "key": self.spec.key,
            "path": str(self.path),
            "files": self.files,
            "bytes": self.bytes,
            "series": series,
            "instances_per_series": per,
            "image": f"{self.spec.rows}x{self.spec.cols} 16-bit {self.spec.modality}",
            "study_uid": self.study_uid,
        }


def ensure_dataset(spec: DataSpec, log: Callable[[str], None] = print) -> Dataset:
    root = cache_root() / "data" / spec.key
    marker = root / "complete.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        return Dataset(spec, root / "session", info["files"], info["bytes"], info["study_uid"])
    if root.exists():
        shutil.rmtree(root)
    series, per = spec.layout
    log(f"generating {series * per} files ({spec.rows}x{spec.cols}) into {root} (once; cached)")
    start = time.perf_counter()
    session = generate_session(
        root / "session",
        series=series,
        instances=per,
        modality=spec.modality,
        seed=spec.seed,
        image_size=(spec.rows, spec.cols),
    )
    if session.file_count != series * per:
        raise RuntimeError(
            f"xnatio.synth wrote {series * per} files but only {session.file_count} distinct "
            "SOP Instance UIDs: a benchmark of duplicates would measure deduplication"
        )
    info = {
        "files": session.file_count,
        "bytes": session.total_bytes,
        "study_uid": session.study_uid,
        "generate_s": round(time.perf_counter() - start, 2),
    }
    marker.write_text(json.dumps(info))
    log(f"  generated in {info['generate_s']} s")
    return Dataset(
        spec, root / "session", session.file_count, session.total_bytes, session.study_uid
    )


def ensure_tar(dataset: Dataset, log: Callable[[str], None] = print) -> Path:
    """One uncompressed tar of the whole session (for the curl limit), built once and cached."""
    tar_path = dataset.path.parent / "session.tar"
    done = dataset.path.parent / "session.tar.complete"
    if tar_path.exists() and done.exists():
        return tar_path
    log(f"building {tar_path} (once; cached; not timed)")
    tmp = tar_path.with_suffix(".tar.part")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(dataset.path.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(dataset.path)), recursive=False)
    tmp.rename(tar_path)
    done.touch()
    return tar_path


def ensure_dcm_view(dataset: Dataset) -> Path:
    """The same files under ``<name>.dcm`` names (hard links: no extra disk, same page cache).

    For tools that pick files by extension: xnatctl 0.6.0 takes a file only if its suffix is a
    DICOM extension or it has none, so UID-named files (``1.2.840...``, whose last dotted part
    looks like a suffix) are skipped by it.
    """
    view = dataset.path.parent / "session-dcm"
    done = dataset.path.parent / "session-dcm.complete"
    if view.exists() and done.exists():
        return view
    shutil.rmtree(view, ignore_errors=True)
    for dirpath, _, names in os.walk(dataset.path):
        target = view / Path(dirpath).relative_to(dataset.path)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.link(os.path.join(dirpath, name), target / f"{name}.dcm")
    done.touch()
    return view


def warm_cache(dataset: Dataset) -> float:
    """Read every file once so each contender starts from the same warm page cache."""
    start = time.perf_counter()
    for dirpath, _, names in os.walk(dataset.path):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass
    return time.perf_counter() - start


@dataclass(frozen=True)
class ManySpec:
    """``studies`` studies of ``files_per_study`` tiny files (8 x 8 pixels, ~1.1 KB), in
    ``series_per_study`` series each: the many-study trees ``upload-many`` plans (issue 12:
    1,000,000 files in 1,000 studies)."""

    studies: int
    files_per_study: int
    series_per_study: int = 4

    @property
    def files(self) -> int:
        return self.studies * self.files_per_study

    @property
    def key(self) -> str:
        return f"many-{self.studies}x{self.files_per_study}-{self.series_per_study}series-8x8"


def _same_length_uid(uid: bytes, n: int) -> bytes:
    """``uid`` with its tail replaced by ``9`` and ``n`` in ten digits: as long as ``uid`` (so
    every element length in the file stays right), distinct for distinct ``n``, and no
    component gains a leading zero."""
    return uid[:-11] + b"9%010d" % n


def ensure_many(spec: ManySpec, log: Callable[[str], None] = print) -> Dataset:
    """The tree of ``spec`` (``ROOT/STUDYnnnnn/SEnn/IMnnnnnn.dcm``), generated once and cached.

    Writing a million files through pydicom would take most of an hour, so one tiny instance
    is made with :func:`xnatio.synth.generate_session` and copied with its Study, Series and
    SOP Instance UIDs and its patient ID replaced by values of the same length: every copy is a
    valid DICOM file with its own identity, one patient per study.
    """
    import pydicom

    root = cache_root() / "data" / spec.key
    marker = root / "complete.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        return Dataset(_as_dataspec(spec), root / "session", info["files"], info["bytes"], "")
    if root.exists():
        shutil.rmtree(root)
    log(f"generating {spec.files} tiny files in {spec.studies} studies into {root} (once; cached)")
    start = time.perf_counter()
    one = generate_session(root / "template", series=1, instances=1, image_size=(8, 8))
    template_path = next(iter(one.instances.values()))
    template = template_path.read_bytes()
    header = pydicom.dcmread(template_path, stop_before_pixels=True)
    study, series = str(header.StudyInstanceUID).encode(), str(header.SeriesInstanceUID).encode()
    sop, patient = str(header.SOPInstanceUID).encode(), str(header.PatientID).encode()
    shutil.rmtree(root / "template")
    total = n = 0
    per_series = max(1, spec.files_per_study // spec.series_per_study)
    for s in range(spec.studies):
        new_patient = (b"P%0*d" % (len(patient) - 1, s))[-len(patient) :]
        by_study = template.replace(study, _same_length_uid(study, s)).replace(patient, new_patient)
        for k in range(spec.series_per_study):
            folder = root / "session" / f"STUDY{s:05d}" / f"SE{k:02d}"
            folder.mkdir(parents=True)
            by_series = by_study.replace(series, _same_length_uid(series, s * 1000 + k))
            last = spec.files_per_study if k == spec.series_per_study - 1 else (k + 1) * per_series
            for i in range(k * per_series, last):
                data = by_series.replace(sop, _same_length_uid(sop, n))
                (folder / f"IM{i:06d}.dcm").write_bytes(data)
                n += 1
                total += len(data)
    info = {"files": n, "bytes": total, "generate_s": round(time.perf_counter() - start, 2)}
    marker.write_text(json.dumps(info))
    log(f"  generated in {info['generate_s']} s")
    return Dataset(_as_dataspec(spec), root / "session", n, total, "")


def _as_dataspec(spec: ManySpec) -> DataSpec:
    """A DataSpec standing for a many-study tree in the harness's records (files, 8 x 8)."""
    return DataSpec(spec.files, 8, 8, modality="MANY")
