"""XNAT's JSON shapes for what the sandbox stores (facts §3 and §4).

Listings are ``{"ResultSet": {"Result": [...], "totalRecords": "N"}}`` with string values, as
XNAT's XFTTable serializer writes them; a single experiment is the ``items``/``data_fields``/
``children`` document of ``?format=json``.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterable
from typing import Any

from xnatio.sandbox.store import Experiment, PrearcSession, Store


def result_set(rows: Iterable[dict[str, Any]], title: str | None = None) -> dict[str, Any]:
    result = list(rows)
    out: dict[str, Any] = {"Result": result, "totalRecords": str(len(result))}
    if title:
        out["title"] = title
    return {"ResultSet": out}


def prearc_row(s: PrearcSession, autoarchive_projects: list[str]) -> dict[str, str]:
    lastmod = dt.datetime.fromtimestamp(s.lastmod).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return {
        "project": s.project,
        "timestamp": s.timestamp,
        "lastmod": lastmod,
        "uploaded": s.uploaded,
        "scan_date": s.scan_date or "",
        "scan_time": "",
        "subject": s.subject,
        "folderName": s.folder,
        "name": s.name,
        "tag": s.tag,
        "status": s.status,
        "url": s.url,
        "autoarchive": "AutoArchive" if s.project in autoarchive_projects else "Manual",
        "prevent_anon": "false",
        "prevent_auto_commit": "true" if s.prevent_auto_commit else "false",
        "SOURCE": "",
        "VISIT": "",
        "PROTOCOL": "",
        "TIMEZONE": "",
    }


def experiment_uri(e: Experiment) -> str:
    return f"/data/experiments/{e.id}"


def _resource_summary(files: list[sqlite3.Row]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for f in files:
        entry = out.setdefault(f["resource"], {"count": 0, "size": 0})
        entry["count"] += 1
        entry["size"] += f["size"]
    return out


def experiment_document(store: Store, e: Experiment) -> dict[str, Any]:
    scans = store.scans(e)
    files = store.files(e)
    by_scan: dict[str, list[sqlite3.Row]] = {}
    for f in files:
        by_scan.setdefault(f["scan_id"], []).append(f)
    scan_items = []
    for sc in scans:
        resources = _resource_summary(by_scan.get(sc["scan_id"], []))
        scan_items.append(
            {
                "children": [
                    {
                        "field": "file",
                        "items": [
                            {
                                "children": [],
                                "meta": {"xsi:type": "xnat:resourceCatalog", "isHistory": False},
                                "data_fields": {
                                    "label": label,
                                    "format": "DICOM" if label == "DICOM" else "",
                                    "content": "RAW" if label == "DICOM" else "",
                                    "file_count": info["count"],
                                    "file_size": info["size"],
                                    "URI": f"{experiment_uri(e)}/scans/{sc['scan_id']}"
                                    f"/resources/{label}",
                                },
                            }
                            for label, info in resources.items()
                        ],
                    }
                ],
                "meta": {"xsi:type": sc["xsi_type"], "isHistory": False},
                "data_fields": {
                    "ID": sc["scan_id"],
                    "type": sc["type"] or "",
                    "series_description": sc["series_description"] or "",
                    "modality": sc["modality"] or "",
                    "UID": sc["uid"] or "",
                    "quality": "usable",
                    "image_session_ID": e.id,
                    "xnat_imageScanData_id": sc["scan_id"],
                },
            }
        )
    data_fields = {
        "ID": e.id,
        "label": e.label,
        "project": e.project,
        "subject_ID": e.subject_id,
        "UID": e.uid or "",
        "modality": e.modality or "",
        "date": _iso_date(e.date),
        "insert_date": e.inserted or "",
        "id": e.id,
    }
    return {
        "items": [
            {
                "children": [{"field": "scans/scan", "items": scan_items}],
                "meta": {"xsi:type": e.xsi_type, "isHistory": False},
                "data_fields": data_fields,
            }
        ]
    }


def _iso_date(d: str | None) -> str:
    if d and len(d) == 8 and d.isdigit():
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return d or ""


def experiment_row(e: Experiment) -> dict[str, str]:
    return {
        "ID": e.id,
        "label": e.label,
        "project": e.project,
        "subject_ID": e.subject_id,
        "subject_label": e.subject_label,
        "xsiType": e.xsi_type,
        "UID": e.uid or "",
        "date": _iso_date(e.date),
        "insert_date": e.inserted or "",
        "URI": experiment_uri(e),
    }


def scan_rows(e: Experiment, scans: list[sqlite3.Row]) -> list[dict[str, str]]:
    return [
        {
            "xsiType": sc["xsi_type"],
            "xnat_imagescandata_id": sc["scan_id"],
            "ID": sc["scan_id"],
            "type": sc["type"] or "",
            "series_description": sc["series_description"] or "",
            "quality": "usable",
            "note": "",
            "URI": f"{experiment_uri(e)}/scans/{sc['scan_id']}",
        }
        for sc in scans
    ]


def resource_rows(
    e: Experiment, scan_id: str, resources: list[sqlite3.Row], files: list[sqlite3.Row]
) -> list[dict[str, Any]]:
    rows = []
    summary = _resource_summary(files)
    for res in resources:
        label = res["label"]
        info = summary.get(label, {"count": 0, "size": 0})
        rows.append(
            {
                "xnat_abstractresource_id": f"{e.id}:{scan_id}:{label}",
                "label": label,
                "element_name": "xnat:resourceCatalog",
                "category": "scans" if scan_id else "resources",
                "cat_id": scan_id,
                "cat_desc": "",
                "format": res["format"] or "",
                "content": res["content"] or ("RAW" if label == "DICOM" else ""),
                "tags": res["tags"] or "",
                # Strings, like every ResultSet value XNAT writes.
                "file_count": str(info["count"]),
                "file_size": str(info["size"]),
            }
        )
    return rows


def file_uri(e: Experiment, scan_id: str, resource: str, path: str) -> str:
    scan = f"/scans/{scan_id}" if scan_id else ""
    return f"{experiment_uri(e)}{scan}/resources/{resource}/files/{path}"


def file_rows(e: Experiment, files: list[sqlite3.Row]) -> list[dict[str, str]]:
    return [
        {
            "Name": f["path"].rsplit("/", 1)[-1],
            "Size": str(f["size"]),
            "URI": file_uri(e, f["scan_id"], f["resource"], f["path"]),
            "collection": f["resource"],
            "file_tags": f["tags"] or "",
            "file_format": f["format"] or "",
            "file_content": f["content"] or "",
            "cat_ID": f"{e.id}:{f['scan_id']}:{f['resource']}",
            "digest": f["md5"],
            "path": f["path"],
        }
        for f in files
    ]
