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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

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
    instance_number: str
    series_description: str
    modality: str
    study_date: str | None
    patient_name: str
    patient_id: str
    study_description: str
    accession_number: str
    routing: dict[str, str]
    """``project``/``subject``/``session``/``aa`` from the comment fields (facts §6)."""


_ROUTING = re.compile(r"(project|subject|session|aa)\s*:\s*([\w-]*)", re.IGNORECASE)
_FOLDER_BAD = re.compile(r"[/\\\x00]")


def folder_name(value: str) -> str:
    """A label as a folder name: XNAT keeps the label as the prearchive folder (facts 1.2) and
    cleans it only at archive time (facts 3.5); only what cannot be a path segment changes."""
    name = _FOLDER_BAD.sub("_", value)
    return "_" + name[1:] if name.startswith(".") else name


def _routing(ds: Dataset) -> dict[str, str]:
    return routing_of(lambda keyword: ds.get(keyword, ""))


def routing_of(get: Callable[[str], Any]) -> dict[str, str]:
    """The routing fields, given ``get(keyword)`` → the element's value ("" when absent)."""
    # Patient Comments, then Study Comments, then Additional Patient History: first match wins.
    for keyword in ("PatientComments", "StudyComments", "AdditionalPatientHistory"):
        text = str(get(keyword) or "")
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
            instance_number=str(ds.get("InstanceNumber", "") or "").strip(),
            series_description=str(ds.get("SeriesDescription", "") or ""),
            modality=str(ds.get("Modality", "") or ""),
            study_date=str(ds.get("StudyDate", "") or "") or None,
            patient_name=str(ds.get("PatientName", "") or ""),
            patient_id=str(ds.get("PatientID", "") or ""),
            study_description=str(ds.get("StudyDescription", "") or ""),
            accession_number=str(ds.get("AccessionNumber", "") or ""),
            routing=_routing(ds),
        )
    except Exception as exc:
        raise Unparsable(f"unable to read DICOM object {name}") from exc


def scan_dir(h: DicomHeader) -> str:
    """The scan folder: the Series Number (``+n`` becomes ``_n``), else one derived from the
    Series Instance UID (XNAT's Restructurer.determineScanSubdir)."""
    if h.series_number:
        number = h.series_number
        return "_" + number[1:] if number.startswith("+") else folder_name(number)
    return str(zlib.crc32(h.series_uid.encode()))


def namer_file_name(h: DicomHeader) -> str:
    """XNAT's default DICOM file name template (``rename=true``, or the uploaded name held by
    another instance): ``${StudyInstanceUID}-${SeriesNumber}-${InstanceNumber}-
    ${HashSOPClassUIDWithSOPInstanceUID}.dcm`` (facts 1.2: GDI:630-659; SCP:773-774). The hash
    is XNAT's own function; here a CRC-32 of the two UIDs stands in for it."""
    digest = format(zlib.crc32((h.sop_class + h.sop_uid).encode()), "08x")
    return f"{h.study_uid}-{h.series_number}-{h.instance_number}-{digest}.dcm"


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")


def requested_file_name(entry_name: str) -> str | None:
    """The uploaded name XNAT keeps (``Files.toFileNameChars``), or None if it is unusable."""
    base = entry_name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _SAFE_NAME.sub("_", base).lstrip(".")
    return cleaned or None


# dcm4che2's implementation identity, which XNAT (GradualDicomImporter, dcm4che2) writes into the
# file meta group it regenerates for every stored file (facts 1.7: GDI 141-146, 346-363, 738-825).
IMPLEMENTATION_CLASS_UID = UID("1.2.40.0.13.1.1")
IMPLEMENTATION_VERSION_NAME = "dcm4che-2.0"
_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class SiteScript:
    """The default site-wide anonymization script of XNAT (``id.das``, facts 1.7):
    ``(0008,1030) := project`` (unless Unassigned), ``(0010,0010) := subject``,
    ``(0010,0020) := session``."""

    project: str | None
    subject: str
    session: str


def reencode(src: str, dst: str, script: SiteScript | None) -> tuple[int, str]:
    """Store ``src`` as XNAT does into ``dst``: regenerated file meta + the header re-encoded
    (after the site script, if any) + the rest (pixel data onwards) verbatim. Returns (size, md5)
    of the stored file — not the uploaded file's (facts 1.7).

    Raises ``Unparsable``-worthy exceptions (any) when the file cannot be read back.
    """
    import hashlib

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    with open(src, "rb") as f:
        head = f.read(132)
        f.seek(0)
        try:
            ds = dcmread(f, stop_before_pixels=True, force=head[128:132] != b"DICM")
        except InvalidDicomError:
            f.seek(0)
            ds = dcmread(f, stop_before_pixels=True, force=True)
        rest_at = f.tell()
        found = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if found is not None:
            ts = UID(str(found))
        else:
            implicit = ds.original_encoding[0] if ds.original_encoding[0] is not None else True
            ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        md5 = hashlib.md5()
        size = 0
        with open(dst, "wb") as out:
            if str(ts) == _DEFLATED:
                # A deflated dataset cannot be split at its pixel data: stored as sent.
                f.seek(0)
                rest_at = 0
            else:
                if script is not None:
                    if script.project is not None:
                        ds.StudyDescription = script.project
                    ds.PatientName = script.subject
                    ds.PatientID = script.session
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = ds.SOPClassUID
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                meta.TransferSyntaxUID = ts
                meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
                meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
                ds.file_meta = meta
                ds.preamble = b"\0" * 128
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                data = buf.getvalue()
                out.write(data)
                md5.update(data)
                size += len(data)
                f.seek(rest_at)
            while block := f.read(1 << 20):
                out.write(block)
                md5.update(block)
                size += len(block)
    return size, md5.hexdigest()
