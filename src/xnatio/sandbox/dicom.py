"""Reading what the importer needs from a DICOM object's header, and XNAT's naming rules.

XNAT (GradualDicomImporter) reads the header up to the pixel data with dcm4che and copies the rest
of the stream unread; an object without a preamble is accepted; one without SOP Class UID or SOP
Instance UID is refused ("object {name} contains no SOP Class UID"), which is how a DICOMDIR fails;
anything unreadable fails as "unable to read DICOM object {name}".
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

HEAD_BYTES = 1 << 16  # header bytes read before deciding where a file goes


class Unparsable(Exception):
    """An entry XNAT would refuse; ``str()`` is XNAT's message."""


@dataclass(frozen=True)
class DicomHeader:
    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    series_number: str
    series_description: str
    modality: str
    study_date: str | None
    patient_name: str
    patient_id: str
    routing: dict[str, str]
    """``project``/``subject``/``session``/``aa`` from the comment fields (facts §6)."""


_ROUTING = re.compile(r"(project|subject|session|aa)\s*:\s*([\w-]*)", re.IGNORECASE)
_LABEL_BAD = re.compile(r"[^A-Za-z0-9_-]")


def clean_label(value: str) -> str:
    """XNAT labels allow letters, digits, ``_`` and ``-``; other characters become ``_``."""
    return _LABEL_BAD.sub("_", value.strip())


def _routing(ds: Dataset) -> dict[str, str]:
    # Patient Comments, then Study Comments, then Additional Patient History: first match wins.
    for keyword in ("PatientComments", "StudyComments", "AdditionalPatientHistory"):
        text = str(ds.get(keyword, "") or "")
        found = {k.lower(): v for k, v in _ROUTING.findall(text)}
        if found:
            return found
    return {}


def _parse(data: io.BytesIO | str, *, force: bool) -> Dataset:
    return dcmread(data, stop_before_pixels=True, force=force)


def read_header(head: bytes, name: str, full_path: str | None = None) -> DicomHeader:
    """Parse the header from its first bytes (or the whole spooled file, ``full_path``)."""
    source: io.BytesIO | str = full_path if full_path is not None else io.BytesIO(head)
    try:
        try:
            ds = _parse(source, force=False)
        except InvalidDicomError:
            # No preamble/"DICM": dcm4che still reads a bare dataset that starts with a group
            # 0002 or 0008 element; pydicom needs force=True for that. Text files don't qualify.
            if head[:2] not in (b"\x02\x00", b"\x08\x00"):
                raise
            if isinstance(source, io.BytesIO):
                source.seek(0)
            ds = _parse(source, force=True)
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        study_uid = str(ds.get("StudyInstanceUID", "") or "")
    except Unparsable:
        raise
    except Exception as exc:
        raise Unparsable(f"unable to read DICOM object {name}") from exc
    if not sop_class:
        raise Unparsable(f"object {name} contains no SOP Class UID")
    if not sop_uid:
        raise Unparsable(f"object {name} contains no SOP Instance UID")
    try:
        series_number = str(ds.get("SeriesNumber", "") or "").strip()
        return DicomHeader(
            sop_class=sop_class,
            sop_uid=sop_uid,
            study_uid=study_uid,
            series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
            series_number=series_number,
            series_description=str(ds.get("SeriesDescription", "") or ""),
            modality=str(ds.get("Modality", "") or ""),
            study_date=str(ds.get("StudyDate", "") or "") or None,
            patient_name=str(ds.get("PatientName", "") or ""),
            patient_id=str(ds.get("PatientID", "") or ""),
            routing=_routing(ds),
        )
    except Exception as exc:
        raise Unparsable(f"unable to read DICOM object {name}") from exc


def scan_dir(h: DicomHeader) -> str:
    """The scan folder: the Series Number (``+n`` becomes ``_n``), else one derived from the
    Series Instance UID (XNAT's Restructurer.determineScanSubdir)."""
    if h.series_number:
        number = h.series_number
        return "_" + number[1:] if number.startswith("+") else clean_label(number)
    return str(zlib.crc32(h.series_uid.encode()))


def namer_file_name(h: DicomHeader) -> str:
    """XNAT's default DICOM file name template: ``{StudyUID}-{Series}-{Instance}-{hash}.dcm``.

    (The instance number is not kept in the header record; the hash of SOP class + instance keeps
    names unique.)
    """
    digest = format(zlib.crc32((h.sop_class + h.sop_uid).encode()), "08x")
    return f"{h.study_uid}-{h.series_number or 'x'}-{digest}.dcm"


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")


def requested_file_name(entry_name: str) -> str | None:
    """The uploaded name XNAT keeps (``Files.toFileNameChars``), or None if it is unusable."""
    base = entry_name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _SAFE_NAME.sub("_", base).lstrip(".")
    return cleaned or None
