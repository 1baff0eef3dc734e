"""Read-back side of the REST API: projects, subjects, experiments, scans, resources and files
(facts §4 and §5)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from xnatio.sandbox import views
from xnatio.sandbox.bodies import boundary_of, parse_multipart
from xnatio.sandbox.importer import (
    cleanup,
    truthy,
)
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.resources import safe_relpath, store_resource_files
from xnatio.sandbox.routes import respond, respond_json, route, store_of
from xnatio.sandbox.store import Experiment

if TYPE_CHECKING:
    from xnatio.sandbox.server import Request, Response

_EXP = (
    r"/data(?:/archive)?(?:/projects/(?P<p>[^/]+)(?:/subjects/(?P<s>[^/]+))?"
    r"/experiments/(?P<e>[^/]+)|/experiments/(?P<eid>[^/]+))"
)


# -- projects and subjects ---------------------------------------------------------------------
def _project_row(p: str) -> dict[str, str]:
    return {"ID": p, "secondary_ID": p, "name": p, "description": "", "URI": f"/data/projects/{p}"}


@route("GET", r"/data/projects")
def projects(req: Request, _: re.Match[str]) -> Response:
    return respond_json(views.result_set(_project_row(p) for p in store_of(req).projects()))


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)")
def project(req: Request, m: re.Match[str]) -> Response:
    # Every project exists in the sandbox and belongs to every user: no setup step needed.
    row = _project_row(m["p"])
    return respond_json({"items": [{"data_fields": row, "meta": {"xsi:type": "xnat:projectData"}}]})


@route("PUT", r"/data/(?:archive/)?projects/(?P<p>[^/]+)")
def project_put(req: Request, m: re.Match[str]) -> Response:
    return respond(200, "", "text/plain")


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects")
def subjects(req: Request, m: re.Match[str]) -> Response:
    rows = [
        {
            "ID": r["id"],
            "label": r["label"],
            "project": r["project"],
            "URI": f"/data/subjects/{r['id']}",
        }
        for r in store_of(req).subjects(m["p"])
    ]
    return respond_json(views.result_set(rows))


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects/(?P<s>[^/]+)")
def subject(req: Request, m: re.Match[str]) -> Response:
    r = store_of(req).subject(m["p"], m["s"])
    if r is None:
        raise HttpError(404, "Unable to find the specified subject.")
    fields = {"ID": r["id"], "label": r["label"], "project": r["project"]}
    return respond_json(
        {"items": [{"data_fields": fields, "meta": {"xsi:type": "xnat:subjectData"}}]}
    )


@route("PUT", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects/(?P<s>[^/]+)")
def subject_put(req: Request, m: re.Match[str]) -> Response:
    sid, created = store_of(req).put_subject(m["p"], m["s"])
    return respond(201 if created else 200, sid, "text/plain")


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)(?:/subjects/(?P<s>[^/]+))?/experiments")
def experiments(req: Request, m: re.Match[str]) -> Response:
    rows = [views.experiment_row(e) for e in store_of(req).experiments(m["p"], m["s"])]
    return respond_json(views.result_set(rows))


@route("GET", r"/data/experiments")
def all_experiments(req: Request, _: re.Match[str]) -> Response:
    rows = [views.experiment_row(e) for e in store_of(req).experiments(req.params.get("project"))]
    return respond_json(views.result_set(rows))


# -- experiments, scans, resources, files ------------------------------------------------------
def _experiment(req: Request, m: re.Match[str]) -> Experiment:
    store = store_of(req)
    e = store.experiment_by_id(m["eid"]) if m["eid"] else store.experiment(m["p"], m["e"])
    if e is None or (m["s"] and m["s"] not in (e.subject_label, e.subject_id)):
        raise HttpError(404, "Unable to find the specified experiment.")
    return e


def _scan(req: Request, e: Experiment, scan_id: str) -> str:
    if not any(sc["scan_id"] == scan_id for sc in store_of(req).scans(e)):
        raise HttpError(404, "Unable to find the specified scan.")
    return scan_id


@route("GET", _EXP)
def experiment(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    return respond_json(views.experiment_document(store_of(req), e))


@route(
    "PUT",
    r"/data(?:/archive)?/projects/(?P<p>[^/]+)/subjects/(?P<s>[^/]+)/experiments/(?P<e>[^/]+)",
)
def experiment_put(req: Request, m: re.Match[str]) -> Response:
    """Create an (empty) session: 201 new, 200 existing. A Direct-Archive upload into a
    pre-created session falls back to the prearchive, as on XNAT."""
    store = store_of(req)
    existing = store.experiment(m["p"], m["e"])
    if existing is not None:
        return respond(200, existing.id, "text/plain")
    xsi = req.params.get("xsiType", "xnat:mrSessionData")
    modality = {"xnat:mrSessionData": "MR", "xnat:ctSessionData": "CT", "xnat:petSessionData": "PT"}
    e = store.create_experiment(
        project=m["p"],
        subject=m["s"],
        label=m["e"],
        uid=None,
        modality=modality.get(xsi),
        date=None,
    )
    return respond(201, e.id, "text/plain")


@route("DELETE", _EXP)
def experiment_delete(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    store_of(req).delete_experiment(e)
    return respond(200, "", "text/plain")


@route("GET", _EXP + r"/scans")
def scans(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    return respond_json(views.result_set(views.scan_rows(e, store_of(req).scans(e))))


@route("GET", _EXP + r"/scans/(?P<scan>[^/]+)")
def scan(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    _scan(req, e, m["scan"])
    rows = [r for r in views.scan_rows(e, store_of(req).scans(e)) if r["ID"] == m["scan"]]
    return respond_json(
        {"items": [{"data_fields": rows[0], "meta": {"xsi:type": rows[0]["xsiType"]}}]}
    )


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources")
def resources(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = _scan(req, e, m["scan"]) if m["scan"] else ""
    store = store_of(req)
    rows = views.resource_rows(
        e, scan_id, store.resource_labels(e, scan_id), store.files(e, scan_id)
    )
    return respond_json(views.result_set(rows))


@route("GET", _EXP + r"/scans/(?P<scan>[^/]+)/files")
def scan_files(req: Request, m: re.Match[str]) -> Response:
    """All files of some scans (``ALL`` or ``1,2``); ``format=zip`` downloads them."""
    e = _experiment(req, m)
    store = store_of(req)
    wanted = None if m["scan"] == "ALL" else set(m["scan"].split(","))
    rows = [
        f for f in store.files(e) if f["scan_id"] and (wanted is None or f["scan_id"] in wanted)
    ]
    if req.params.get("format") == "zip":
        return _zip_response(req, e, rows)
    return respond_json(views.result_set(views.file_rows(e, rows)))


def _zip_response(req: Request, e: Experiment, rows: list[Any]) -> Response:
    """A stored (uncompressed) zip laid out as XNAT's downloads are:
    ``{label}/scans/{id}/resources/{res}/files/{path}`` (``{label}/resources/…`` for session
    resources). Built in the tmp dir, removed once sent."""
    import zipfile

    store = store_of(req)
    out = req.tmp_path("download")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in rows:
            scan = f"scans/{f['scan_id']}/" if f["scan_id"] else ""
            arcname = f"{e.label}/{scan}resources/{f['resource']}/files/{f['path']}"
            zf.write(store.resource_dir(e, f["scan_id"], f["resource"]) / f["path"], arcname)
    return respond(200, b"", "application/zip", file=out, remove_file=True)


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files")
def files(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = _scan(req, e, m["scan"]) if m["scan"] else ""
    rows = store_of(req).files(e, scan_id, m["r"])
    if not rows and m["r"] not in {r["label"] for r in store_of(req).resource_labels(e, scan_id)}:
        raise HttpError(404, "Unable to find the specified resource.")
    if req.params.get("format") == "zip":
        return _zip_response(req, e, rows)
    return respond_json(views.result_set(views.file_rows(e, rows)))


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files/(?P<path>.+)")
def file_get(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = m["scan"] or ""
    store = store_of(req)
    rel = safe_relpath(m["path"])
    if not any(f["path"] == rel for f in store.files(e, scan_id, m["r"])):
        raise HttpError(404, "Unable to find the specified file.")
    path = store.resource_dir(e, scan_id, m["r"]) / rel
    ctype = "application/dicom" if m["r"] == "DICOM" else "application/octet-stream"
    return respond(200, b"", ctype, file=path)


@route("PUT POST", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)")
def resource_create(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    if m["scan"]:
        _scan(req, e, m["scan"])
    store = store_of(req)
    store.resource_dir(e, m["scan"] or "", m["r"]).mkdir(parents=True, exist_ok=True)
    p = req.params
    store.create_resource(
        e, m["scan"] or "", m["r"], p.get("format"), p.get("content"), p.get("tags")
    )
    return respond(200, "", "text/plain")


@route(
    "PUT POST", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files(?:/(?P<path>.+))?"
)
def file_put(req: Request, m: re.Match[str]) -> Response:
    store = store_of(req)
    e = _experiment(req, m)
    scan_id = _scan(req, e, m["scan"]) if m["scan"] else ""
    params = dict(req.params)
    temp: list[Any] = []
    multipart = req.content_type.lower().startswith("multipart/")
    if truthy(params.get("inbody")) and multipart:
        raise HttpError(
            406,
            "In-body File posts must include the file directly as the body of the message"
            " (not as part of multi-part form data).",
        )
    with cleanup(temp):
        if multipart:
            boundary = boundary_of(req.content_type)
            if boundary is None:
                raise HttpError(400, "Malformed multipart request: no boundary")
            form = parse_multipart(req.body, boundary, store.tmp_dir())
            temp.extend(p.path for p in form.files)
            for key, value in form.fields.items():
                params.setdefault(key, value)
            if not form.files:
                raise HttpError(400, "No content provided.")
            uploads = [(m["path"] or f.filename, f.path) for f in form.files]
            if m["path"] and len(uploads) > 1:
                raise HttpError(400, "Only one file can be uploaded to a file path.")
        else:
            if not m["path"]:
                raise HttpError(406, "In-body File posts must specify a file name in the uri.")
            if not req.body.has_body:
                raise HttpError(400, "No content provided.")
            body_path = req.tmp_path("res")
            temp.append(body_path)
            req.body.to_file(body_path)
            if body_path.stat().st_size == 0:
                raise HttpError(400, "No content provided.")
            uploads = [(m["path"], body_path)]
        if req.server.knob_box.disk_full_for(req.path):
            raise HttpError(507, "No space left on device")
        duplicates: list[str] = []
        for rel, path in uploads:
            duplicates += store_resource_files(
                store,
                e,
                scan_id=scan_id,
                resource=m["r"],
                rel_path=safe_relpath(rel),
                upload=path,
                overwrite=truthy(params.get("overwrite")),
                extract=truthy(params.get("extract")),
                fmt=params.get("format"),
                content=params.get("content"),
                tags=params.get("tags"),
            )
    if duplicates:
        return respond_json({"duplicates": duplicates})
    return respond(200, "", "text/plain")


@route("DELETE", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files/(?P<path>.+)")
def file_delete(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = m["scan"] or ""
    rel = safe_relpath(m["path"])
    store = store_of(req)
    if not store.delete_file(e, scan_id, m["r"], rel):
        raise HttpError(404, "Unable to find the specified file.")
    (store.resource_dir(e, scan_id, m["r"]) / rel).unlink(missing_ok=True)
    return respond(200, "", "text/plain")
