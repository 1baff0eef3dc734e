"""Upload side of the REST API: the import service, the prearchive and the archive service
(facts §1 and §3)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xnatio.sandbox import views
from xnatio.sandbox.bodies import boundary_of, parse_multipart
from xnatio.sandbox.importer import (
    RAW_NAMES,
    DicomImport,
    FullReader,
    ImportParams,
    archive_kind,
    cleanup,
    iter_entries,
    parse_dest,
    truthy,
)
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.routes import respond, respond_json, route, store_of, uri_list
from xnatio.sandbox.store import UNASSIGNED, PrearcSession

if TYPE_CHECKING:
    from xnatio.sandbox.server import Request, Response

_PREARC = r"/data/prearchive/projects/(?P<p>[^/]+)/(?P<ts>[^/]+)/(?P<f>[^/]+)"


# -- import ------------------------------------------------------------------------------------
@route("POST PUT", r"/data/services/import")
def import_service(req: Request, _: re.Match[str]) -> Response:
    params = dict(req.params)
    store = store_of(req)
    ctype = req.content_type
    multipart = ctype.lower().startswith("multipart/")
    inbody = truthy(params.get("inbody"))
    handler = params.get("import-handler", "SI")
    # Check what can be checked before reading the body (XNAT does too).
    ImportParams.from_params(params)
    if inbody and multipart:
        raise HttpError(406, "In-body uploads cannot use a multipart content type.")
    temp: list[Any] = []
    with cleanup(temp):
        if multipart:
            boundary = boundary_of(ctype)
            if boundary is None:
                raise HttpError(400, "Malformed multipart request: no boundary")
            form = parse_multipart(req.body, boundary, store.tmp_dir())
            temp.extend(part.path for part in form.files)
            for key, value in form.fields.items():
                params.setdefault(key, value)
            if len(form.files) > 1:
                raise HttpError(400, "Importer is limited to one uploaded resource at a time.")
            if not form.files:
                raise HttpError(400, "No file was uploaded.")
            name, body_path = form.files[0].filename, form.files[0].path
        elif inbody:
            base = ctype.split(";", 1)[0].strip()
            name = RAW_NAMES.get(base, "upload.unsupported")
            if handler == "gradual-DICOM":
                name = ""  # no client file name: stored under XNAT's namer name
            elif archive_kind(name) is None:
                raise HttpError(400, f"Unsupported format {name}")
            body_path = None  # read as it arrives
        else:
            raise HttpError(
                400, "Unable to identify the uploaded file: send multipart/form-data or inbody=true"
            )
        p = ImportParams.from_params(params)
        job = DicomImport(store, req.server.knob_box, p, req.path)
        source: Path | FullReader = body_path if body_path else FullReader(req.body)
        if p.handler == "gradual-DICOM":

            def single() -> Any:
                if isinstance(source, Path):
                    with source.open("rb") as stream:
                        yield name, stream
                else:
                    yield name, source

            uris = job.run(single())
        else:
            kind = archive_kind(name)
            if kind is None:
                raise HttpError(400, f"Unsupported format {name}")
            uris = job.run(iter_entries(source, kind, store.tmp_dir()))
        req.server.knob_box.count("files_imported", job.files_written)
    return uri_list(req, uris)


# -- prearchive --------------------------------------------------------------------------------
@route("GET", r"/data/prearchive(?:/projects)?")
def prearchive_all(req: Request, _: re.Match[str]) -> Response:
    auto = req.server.knobs.auto_archive_projects
    rows = [views.prearc_row(s, auto) for s in store_of(req).list_prearc()]
    return respond_json(views.result_set(rows))


@route("GET", r"/data/prearchive/projects/(?P<p>[^/]+)")
def prearchive_project(req: Request, m: re.Match[str]) -> Response:
    auto = req.server.knobs.auto_archive_projects
    rows = [views.prearc_row(s, auto) for s in store_of(req).list_prearc(m["p"])]
    return respond_json(views.result_set(rows))


def _prearc(req: Request, m: re.Match[str]) -> PrearcSession:
    s = store_of(req).get_prearc(m["p"], m["ts"], m["f"])
    if s is None:
        raise HttpError(404, "Unable to find the specified prearchive session.")
    return s


@route("GET", _PREARC)
def prearchive_session(req: Request, m: re.Match[str]) -> Response:
    s = _prearc(req, m)
    return respond_json(
        views.result_set([views.prearc_row(s, req.server.knobs.auto_archive_projects)])
    )


@route("GET", _PREARC + r"/scans")
def prearchive_scans(req: Request, m: re.Match[str]) -> Response:
    s = _prearc(req, m)
    scans: dict[str, dict[str, Any]] = {}
    for f in store_of(req).prearc_files(s.id):
        row = scans.setdefault(
            f["scan"],
            {
                "ID": f["scan"],
                "series_description": f["series_description"] or "",
                "file_count": 0,
                "file_size": 0,
            },
        )
        row["file_count"] += 1
        row["file_size"] += f["size"]
    return respond_json(views.result_set(scans.values()))


@route("DELETE", _PREARC)
def prearchive_delete(req: Request, m: re.Match[str]) -> Response:
    store_of(req).delete_prearc(_prearc(req, m))
    return respond(200, "", "text/plain")


@route("POST", _PREARC)
def prearchive_action(req: Request, m: re.Match[str]) -> Response:
    store = store_of(req)
    s = _prearc(req, m)
    action = req.params.get("action", "")
    if action == "build":
        if store.is_busy(s.id):
            raise HttpError(409, "session document locked")
        store.build(s)
        return respond(200, "", "text/plain")
    if action == "commit":
        if store.is_busy(s.id):
            raise HttpError(409, "session document locked")
        built = store.build(s)
        if s.project in req.server.knobs.auto_archive_projects:
            e = store.archive(built, wrapped=False, delay=_delay(req))
            return uri_list(req, [e.archive_uri], 301, Location=e.archive_uri)
        return uri_list(req, [built.external_url])
    if action == "move":
        target = req.params.get("newProject")
        if not target:
            raise HttpError(400, "The move action requires newProject")
        moved = store.move_prearc(s, target)
        return uri_list(req, [moved.external_url])
    raise HttpError(400, f"Unsupported action: {action or '(none)'}")


def _delay(req: Request) -> Callable[[], None]:
    def wait() -> None:
        import time

        ms = req.server.knobs.archive_ms
        if ms > 0:
            time.sleep(ms / 1000)

    return wait


@route("POST", r"/data/services/archive")
def archive_service(req: Request, _: re.Match[str]) -> Response:
    store = store_of(req)
    src = req.params.get("src", "")
    src = src[len("/data") :] if src.startswith("/data/") else src
    sm = re.match(r"^/prearchive/projects/([^/]+)/([^/]+)/([^/]+)/?$", src)
    if not sm:
        raise HttpError(400, "Invalid src parameter: expected /prearchive/projects/P/TS/F")
    s = store.get_prearc(sm[1], sm[2], sm[3])
    if s is None:
        raise HttpError(404, "Unable to find the specified prearchive session.")
    project = req.params.get("project") or req.params.get("PROJECT_ID")
    subject = req.params.get("subject") or req.params.get("SUBJECT_ID")
    label = req.params.get("session") or req.params.get("EXPT_LABEL")
    if req.params.get("dest"):
        d = parse_dest(req.params["dest"])
        if d.kind != "archive":
            raise HttpError(400, "Parameter dest format error")
        project, subject, label = project or d.project, subject or d.subject, label or d.label
    if s.project == UNASSIGNED and not project:
        raise HttpError(400, "Cannot archive a session that is not assigned to a project.")
    if project and s.project not in (UNASSIGNED, project):
        raise HttpError(
            400,
            f"Project {project} does not match the session's project {s.project}; move it first.",
        )
    e = store.archive(
        s,
        project=project,
        subject=subject,
        label=label,
        overwrite=req.params.get("overwrite"),
        wrapped=False,
        delay=_delay(req),
    )
    return uri_list(req, [e.archive_uri])
