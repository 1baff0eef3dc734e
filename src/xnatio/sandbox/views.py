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


# Facts 3.1 (DatabaseSession.java:27-228): the prearchive listing's columns, in order.
PREARC_COLUMNS = [
    "project",
    "timestamp",
    "lastmod",
    "uploaded",
    "scan_date",
    "scan_time",
    "subject",
    "folderName",
    "name",
    "tag",
    "status",
    "url",
    "autoarchive",
    "prevent_anon",
    "prevent_auto_commit",
    "SOURCE",
    "VISIT",
    "PROTOCOL",
    "TIMEZONE",
]


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
        # The row's own code and flags, stored by the request that created it (facts 1.2, 3.2).
        "autoarchive": s.autoarchive
        or ("AutoArchive" if s.project in autoarchive_projects else "Manual"),
        "prevent_anon": "true" if s.prevent_anon else "false",
        "prevent_auto_commit": "true" if s.prevent_auto_commit else "false",
        "SOURCE": s.source,
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
    ids = store.resource_ids(e)
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
                                    "xnat_abstractresource_id": str(
                                        ids.get((sc["scan_id"], label), "")
                                    ),
                                    "URI": f"{experiment_uri(e)}/scans/{sc['scan_id']}"
                                    f"/resources/{ids.get((sc['scan_id'], label), label)}",
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


SCAN_COLUMNS = [
    "xnat_imagescandata_id",
    "ID",
    "type",
    "quality",
    "xsiType",
    "note",
    "series_description",
    "URI",
]


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
    e: Experiment,
    scan_id: str,
    resources: list[sqlite3.Row],
    files: list[sqlite3.Row],
    ids: dict[tuple[str, str], int],
) -> list[dict[str, Any]]:
    rows = []
    summary = _resource_summary(files)
    for res in resources:
        label = res["label"]
        info = summary.get(label, {"count": 0, "size": 0})
        rows.append(
            {
                # XNAT's numeric xnat_abstractresource_id (facts 4).
                "xnat_abstractresource_id": str(ids.get((scan_id, label), "")),
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


# Facts 4 (CU:79): exactly these columns, all strings; the ResultSet also carries "Columns"
# and "title": "Files" (FL:621-623, 1170-1176).
FILE_COLUMNS = [
    "Name",
    "Size",
    "URI",
    "collection",
    "file_tags",
    "file_format",
    "file_content",
    "cat_ID",
    "digest",
]


def file_listing_extra() -> dict[str, Any]:
    return {"Columns": [{"key": c} for c in FILE_COLUMNS]}


def experiment_base_uri(e: Experiment, via_project: bool) -> str:
    """``/data/projects/P/subjects/{subject ID}/experiments/{expt ID}`` when the request named
    the project, else ``/data/experiments/{expt ID}`` (FL:542; XNATCatalogTemplate.java:82-121)."""
    if via_project:
        return f"/data/projects/{e.project}/subjects/{e.subject_id}/experiments/{e.id}"
    return experiment_uri(e)


def file_uri(base: str, scan_id: str, resource_id: int | str, path: str) -> str:
    from urllib.parse import quote

    scan = f"/scans/{scan_id}" if scan_id else ""
    return f"{base}{scan}/resources/{resource_id}/files/{quote(path)}"


def file_rows(
    e: Experiment,
    files: list[sqlite3.Row],
    ids: dict[tuple[str, str], int],
    *,
    via_project: bool,
) -> list[dict[str, str]]:
    base = experiment_base_uri(e, via_project)
    rows = []
    for f in files:
        rid = ids.get((f["scan_id"], f["resource"]), f["resource"])
        rows.append(
            {
                "Name": f["path"].rsplit("/", 1)[-1],
                "Size": str(f["size"]),
                "URI": file_uri(base, f["scan_id"], rid, f["path"]),
                "collection": f["resource"],
                "file_tags": f["tags"] or "",
                "file_format": f["format"] or "",
                "file_content": f["content"] or "",
                "cat_ID": str(rid),
                "digest": f["md5"] or "",
            }
        )
    return rows


def select_columns(
    rows: list[dict[str, str]], columns: str | None, aliases: dict[str, str] | None = None
) -> tuple[list[dict[str, str]], list[str] | None]:
    """``columns=a,b`` (QueryOrganizerResource.java:160-180): the rows with those columns only,
    plus ``URI``, which XNAT always adds (pyxnat relies on it). ``aliases`` maps XNAT's
    schema-path names (``xnat:subjectAssessorData/subject_id``) to the row's keys."""
    names = {k.lower(): v for k, v in (aliases or {}).items()}
    # A schema path comes back under the listing's own column name (…/subject_id → subject_ID).
    wanted = [names.get(c.lower(), c) for c in (columns or "").split(",") if c]
    if not wanted:
        return rows, None
    if "URI" not in wanted:
        wanted.append("URI")
    out = [{c: r.get(c, "") for c in wanted} for r in rows]
    return out, wanted


# -- listing formats (facts 4: format=json|xml|csv|html, SR:235-264, 507-553; XT:838-907) -------
LISTING_FORMATS = {
    "json": "application/json",
    "xml": "text/xml",
    "csv": "text/csv",
    "html": "text/html",
}


def listing_columns(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    """The table's columns: the given ones, else those of the first row (XFTTable keeps one
    column list for every row)."""
    if columns is not None:
        return columns
    return list(rows[0].keys()) if rows else []


def render_listing(
    rows: Iterable[dict[str, Any]],
    fmt: str,
    *,
    title: str | None = None,
    columns: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """(body, content type) of a ResultSet in one of XNAT's listing formats.

    - json: ``{"ResultSet": {"Result": [...], "totalRecords": "N"[, "title"]…}}``;
    - xml: ``<ResultSet><results><columns><column>…</columns><rows><row><cell>…``;
    - csv: a header row, then one line per row, ``\\n`` line ends (XFTTable.toCSV);
    - html: one ``<table>`` with a header row (XFTTable.toHTML).
    """
    import csv
    import html
    import io
    import json

    result = [{k: "" if v is None else v for k, v in r.items()} for r in rows]
    cols = listing_columns(result, columns)
    if fmt == "json":
        if columns is not None:
            result = [{c: r.get(c, "") for c in cols} for r in result]
        body = result_set(result, title)
        if extra:
            body["ResultSet"].update(extra)
        return json.dumps(body), LISTING_FORMATS["json"]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(cols)
        for r in result:
            writer.writerow([str(r.get(c, "")) for c in cols])
        return out.getvalue(), LISTING_FORMATS["csv"]
    if fmt == "xml":
        esc = html.escape
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<ResultSet xmlns="http://nrg.wustl.edu/xe" '
            'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'totalRecords="{len(result)}"' + (f' title="{esc(title)}"' if title else "") + ">",
            "<results><columns>",
            *(f"<column>{esc(c)}</column>" for c in cols),
            "</columns><rows>",
        ]
        for r in result:
            parts.append("<row>")
            parts += [f"<cell>{esc(str(r.get(c, '')))}</cell>" for c in cols]
            parts.append("</row>")
        parts.append("</rows></results></ResultSet>\n")
        return "".join(parts), LISTING_FORMATS["xml"]
    if fmt == "html":
        esc = html.escape
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body_rows = "".join(
            "<tr>" + "".join(f"<td>{esc(str(r.get(c, '')))}</td>" for c in cols) + "</tr>\n"
            for r in result
        )
        page = (
            "<html><body>"
            + (f"<h3>{esc(title)}</h3>" if title else "")
            + f'<table class="x_rs_t"><tr>{head}</tr>\n{body_rows}</table></body></html>\n'
        )
        return page, LISTING_FORMATS["html"]
    raise ValueError(fmt)
