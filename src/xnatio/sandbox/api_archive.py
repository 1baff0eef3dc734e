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
from xnatio.sandbox.routes import listing, respond, respond_json, route, store_of
from xnatio.sandbox.store import Experiment

if TYPE_CHECKING:
    from xnatio.sandbox.server import Request, Response

_EXP = (
    r"/data(?:/archive)?(?:/projects/(?P<p>[^/]+)(?:/subjects/(?P<s>[^/]+))?"
    r"/experiments/(?P<e>[^/]+)|/experiments/(?P<eid>[^/]+))"
)


# -- access -----------------------------------------------------------------------------------
def _user(req: Request) -> str:
    assert req.principal is not None
    return req.principal.user


def data_project(req: Request, project: str) -> str:
    """The canonical ID of a project whose data the user may read; else 404 without a message
    (facts 4: missing/unreadable project, SubjAssessmentResource.java:74-82; SR:1117-1122)."""
    access = req.server.access
    pid = access.canonical_project(project)
    if pid is None or not access.can_read_data(_user(req), pid):
        raise HttpError(404, "")
    return pid


def require_edit(req: Request, project: str) -> None:
    """Owners, members and admins create and change data (facts 1.2; collaborators read)."""
    if not req.server.access.can_edit(_user(req), project):
        raise HttpError(
            403, f"Specified user account has insufficient edit privileges for {project}."
        )


def require_delete(req: Request, project: str) -> None:
    """Owners and admins delete experiments and scans (members may not; Permissions.canDelete)."""
    if not req.server.access.can_delete(_user(req), project):
        raise HttpError(
            403, f"Specified user account has insufficient delete privileges for {project}."
        )


# -- subjects ----------------------------------------------------------------------------------
@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects")
def subjects(req: Request, m: re.Match[str]) -> Response:
    pid = data_project(req, m["p"])
    rows = [
        {
            "ID": r["id"],
            "project": r["project"],
            "label": r["label"],
            "insert_date": "",
            "insert_user": "",
            "URI": f"/data/subjects/{r['id']}",
        }
        for r in store_of(req).subjects(pid)
    ]
    rows, columns = views.select_columns(rows, req.params.get("columns"))
    return listing(req, rows, title="Subjects", columns=columns)


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects/(?P<s>[^/]+)")
def subject(req: Request, m: re.Match[str]) -> Response:
    pid = data_project(req, m["p"])
    r = store_of(req).subject(pid, m["s"])
    if r is None:
        raise HttpError(404, "Unable to find the specified subject.")
    fields = {"ID": r["id"], "label": r["label"], "project": r["project"]}
    return respond_json(
        {"items": [{"data_fields": fields, "meta": {"xsi:type": "xnat:subjectData"}}]}
    )


@route("PUT", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects/(?P<s>[^/]+)")
def subject_put(req: Request, m: re.Match[str]) -> Response:
    """Facts 2 (SubjectResource.java:203-242, 264-272, 372): 201 + the new subject's ID as
    text/plain, 200 if it exists; 422 when the project is missing or unreadable; 403 without the
    right to create subjects in it."""
    access = req.server.access
    pid = access.canonical_project(m["p"])
    if pid is None or not access.can_read(_user(req), pid):
        raise HttpError(422, "Submitted subject record must include the project attribute.")
    require_edit(req, pid)
    sid, created = store_of(req).put_subject(pid, m["s"])
    return respond(201 if created else 200, sid, "text/plain")


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)(?:/subjects/(?P<s>[^/]+))?/experiments")
def experiments(req: Request, m: re.Match[str]) -> Response:
    pid = data_project(req, m["p"])
    rows = [views.experiment_row(e) for e in store_of(req).experiments(pid, m["s"])]
    return _experiment_listing(req, rows)


_EXPERIMENT_ALIASES = {
    "xnat:subjectAssessorData/subject_id": "subject_ID",
    "xnat:experimentData/label": "label",
    "xnat:experimentData/project": "project",
}


def _experiment_listing(req: Request, rows: list[dict[str, str]]) -> Response:
    """Experiment listings: the ``ID``/``label``/``xsiType`` filters (an xsiType names the
    type or a super-type: ``xnat:subjectAssessorData`` and ``xnat:imageSessionData`` take every
    session) and ``columns=``."""
    p = req.params
    if p.get("ID"):
        rows = [r for r in rows if r["ID"] in p["ID"].split(",")]
    if p.get("label"):
        rows = [r for r in rows if r["label"] in p["label"].split(",")]
    xsi = p.get("xsiType", "")
    if xsi and xsi not in ("xnat:subjectAssessorData", "xnat:imageSessionData"):
        rows = [r for r in rows if r["xsiType"] == xsi]
    rows, columns = views.select_columns(rows, p.get("columns"), _EXPERIMENT_ALIASES)
    return listing(req, rows, title="Experiments", columns=columns)


@route("GET", r"/data/experiments")
def all_experiments(req: Request, _: re.Match[str]) -> Response:
    access, user = req.server.access, _user(req)
    wanted = req.params.get("project")
    project = access.canonical_project(wanted) if wanted else None
    if wanted and project is None:
        return listing(req, [], title="Experiments")
    rows = [
        views.experiment_row(e)
        for e in store_of(req).experiments(project)
        if access.can_read_data(user, e.project)
    ]
    return _experiment_listing(req, rows)


# -- experiments, scans, resources, files ------------------------------------------------------
def _experiment(req: Request, m: re.Match[str]) -> Experiment:
    store = store_of(req)
    if m["eid"]:
        e = store.experiment_by_id(m["eid"])
        if e is not None and not req.server.access.can_read_data(_user(req), e.project):
            e = None  # an experiment the user may not read is not there for them
    else:
        e = store.experiment(data_project(req, m["p"]), m["e"])
    if e is None or (m["s"] and m["s"] not in (e.subject_label, e.subject_id)):
        raise HttpError(404, "Unable to find the specified experiment.")
    return e


def _via_project(m: re.Match[str]) -> bool:
    return not m["eid"]


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
    access = req.server.access
    pid = access.canonical_project(m["p"])
    if pid is None or not access.can_read(_user(req), pid):
        raise HttpError(404, "")
    require_edit(req, pid)
    existing = store.experiment(pid, m["e"])
    if existing is not None:
        return respond(200, existing.id, "text/plain")
    xsi = req.params.get("xsiType", "xnat:mrSessionData")
    modality = {"xnat:mrSessionData": "MR", "xnat:ctSessionData": "CT", "xnat:petSessionData": "PT"}
    e = store.create_experiment(
        project=pid,
        subject=m["s"],
        label=m["e"],
        uid=None,
        modality=modality.get(xsi),
        date=None,
    )
    return respond(201, e.id, "text/plain")


@route("DELETE", _EXP)
def experiment_delete(req: Request, m: re.Match[str]) -> Response:
    """Owners and admins delete a session (its files too; ``removeFiles`` is implied here)."""
    e = _experiment(req, m)
    require_delete(req, e.project)
    store_of(req).delete_experiment(e)
    return respond(200, "", "text/plain")


@route("GET", _EXP + r"/scans")
def scans(req: Request, m: re.Match[str]) -> Response:
    """Facts 4 (ScanList.java:280-335): xnat_imagescandata_id, ID, type, quality, xsiType, note,
    series_description, URI; ``columns=`` replaces them (QueryOrganizerResource.java:160-180)."""
    e = _experiment(req, m)
    rows, columns = views.select_columns(
        views.scan_rows(e, store_of(req).scans(e)), req.params.get("columns")
    )
    return listing(req, rows, title="Scans", columns=columns or views.SCAN_COLUMNS)


@route("GET", _EXP + r"/scans/(?P<scan>[^/]+)")
def scan(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    _scan(req, e, m["scan"])
    rows = [r for r in views.scan_rows(e, store_of(req).scans(e)) if r["ID"] == m["scan"]]
    return respond_json(
        {"items": [{"data_fields": rows[0], "meta": {"xsi:type": rows[0]["xsiType"]}}]}
    )


@route("DELETE", _EXP + r"/scans/(?P<scan>[^/]+)")
def scan_delete(req: Request, m: re.Match[str]) -> Response:
    """Owners and admins delete a scan with its files (ScanResource: delete permission)."""
    e = _experiment(req, m)
    _scan(req, e, m["scan"])
    require_delete(req, e.project)
    store_of(req).delete_scan(e, m["scan"])
    return respond(200, "", "text/plain")


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources")
def resources(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = _scan(req, e, m["scan"]) if m["scan"] else ""
    store = store_of(req)
    rows = views.resource_rows(
        e,
        scan_id,
        store.resource_labels(e, scan_id),
        store.files(e, scan_id),
        store.resource_ids(e, scan_id),
    )
    return listing(req, rows, title="Resources")


def _file_listing(req: Request, m: re.Match[str], e: Experiment, rows: list[Any]) -> Response:
    ids = store_of(req).resource_ids(e)
    return listing(
        req,
        views.file_rows(e, rows, ids, via_project=_via_project(m)),
        title="Files",
        columns=views.FILE_COLUMNS,
        extra=views.file_listing_extra(),
    )


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
    return _file_listing(req, m, e, rows)


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


def _resource(req: Request, e: Experiment, scan_id: str, label_or_id: str) -> str:
    return store_of(req).resource_label(e, scan_id, label_or_id)


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files")
def files(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = _scan(req, e, m["scan"]) if m["scan"] else ""
    label = _resource(req, e, scan_id, m["r"])
    rows = store_of(req).files(e, scan_id, label)
    if not rows and label not in {r["label"] for r in store_of(req).resource_labels(e, scan_id)}:
        raise HttpError(404, "Unable to find the specified resource.")
    if req.params.get("format") == "zip":
        return _zip_response(req, e, rows)
    return _file_listing(req, m, e, rows)


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files/(?P<path>.+)")
def file_get(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = m["scan"] or ""
    store = store_of(req)
    label = _resource(req, e, scan_id, m["r"])
    rel = safe_relpath(m["path"])
    if not any(f["path"] == rel for f in store.files(e, scan_id, label)):
        raise HttpError(404, "Unable to find the specified file.")
    path = store.resource_dir(e, scan_id, label) / rel
    ctype = "application/dicom" if label == "DICOM" else "application/octet-stream"
    return respond(200, b"", ctype, file=path)


@route("PUT POST", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)")
def resource_create(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    require_edit(req, e.project)
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
    require_edit(req, e.project)
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
    """Delete one file: the edit right on its project (members too) *(inferred from
    FileList's use of the parent's edit permission; hardest-on-client choice: a collaborator or
    a user without a role gets 403)*."""
    e = _experiment(req, m)
    require_edit(req, e.project)
    scan_id = m["scan"] or ""
    store = store_of(req)
    label = _resource(req, e, scan_id, m["r"])
    rel = safe_relpath(m["path"])
    if not store.delete_file(e, scan_id, label, rel):
        raise HttpError(404, "Unable to find the specified file.")
    (store.resource_dir(e, scan_id, label) / rel).unlink(missing_ok=True)
    return respond(200, "", "text/plain")
