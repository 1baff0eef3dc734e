"""Route table and handlers of the sandbox's REST API (XNAT paths under ``/data`` and ``/xapi``,
sandbox administration under ``/_sandbox``, a path XNAT does not use)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xnatio.sandbox import views
from xnatio.sandbox.bodies import boundary_of, parse_multipart
from xnatio.sandbox.importer import (
    RAW_NAMES,
    DicomImport,
    ImportParams,
    archive_kind,
    iter_entries,
    parse_dest,
    truthy,
)
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.resources import safe_relpath, store_resource_files
from xnatio.sandbox.store import UNASSIGNED, Experiment, PrearcSession, Store

if TYPE_CHECKING:
    from xnatio.sandbox.server import Request, Response

Handler = Callable[["Request", "re.Match[str]"], "Response"]
_ROUTES: list[tuple[str, re.Pattern[str], Handler, str]] = []

_EXP = (
    r"/data(?:/archive)?(?:/projects/(?P<p>[^/]+)(?:/subjects/(?P<s>[^/]+))?"
    r"/experiments/(?P<e>[^/]+)|/experiments/(?P<eid>[^/]+))"
)
_PREARC = r"/data/prearchive/projects/(?P<p>[^/]+)/(?P<ts>[^/]+)/(?P<f>[^/]+)"


def route(methods: str, pattern: str, name: str | None = None) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for method in methods.split():
            _ROUTES.append(
                (method, re.compile("^" + pattern + "/?$"), fn, name or _pretty(pattern))
            )
        return fn

    return register


def _pretty(pattern: str) -> str:
    """``/data/projects/(?P<p>[^/]+)`` → ``/data/projects/{p}`` (for statistics keys)."""
    text = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
    return text.replace("(?:/archive)?", "").replace("(?:archive/)?", "").replace("?", "")


def route_name(path: str) -> str:
    """A stable label for statistics: the route pattern a path matches."""
    for _, rx, _, name in _ROUTES:
        if rx.match(path):
            return name
    return "other"


def handle(req: Request) -> Response:
    allowed = False
    method = "GET" if req.method == "HEAD" else req.method
    for m, rx, fn, _ in _ROUTES:
        match = rx.match(req.path)
        if match:
            if m == method:
                return fn(req, match)
            allowed = True
    req.server.knob_box.count(f"unrouted {req.method} {req.path}")
    if allowed:
        raise HttpError(405, f"Method {req.method} is not allowed on {req.path}")
    raise HttpError(404, f"The requested resource {req.path} was not found.")


def _store(req: Request) -> Store:
    store = req.server.store
    assert store is not None
    return store


def _resp(*args: Any, **kwargs: Any) -> Response:
    from xnatio.sandbox.server import Response

    return Response(*args, **kwargs)


def _json(data: Any, status: int = 200) -> Response:
    from xnatio.sandbox.server import json_response

    return json_response(data, status)


def uri_list(req: Request, uris: list[str], status: int = 200, **headers: str) -> Response:
    """text/uri-list with CRLF line ends (``format=txt``: text/plain)."""
    body = "".join(u + "\r\n" for u in uris)
    ctype = "text/plain" if req.params.get("format") == "txt" else "text/uri-list"
    return _resp(status, body, ctype, headers)


# -- sandbox administration -------------------------------------------------------------------
@route("GET POST", r"/_sandbox/knobs", "/_sandbox/knobs")
def knobs_endpoint(req: Request, _: re.Match[str]) -> Response:
    if req.method == "POST":
        raw = b""
        while chunk := req.body.read():
            raw += chunk
        try:
            values = json.loads(raw or b"{}")
            if not isinstance(values, dict):
                raise ValueError("expected a JSON object")
            req.server.set_knobs(**values)
        except (ValueError, TypeError) as exc:
            raise HttpError(400, f"Bad knobs: {exc}") from None
    return _json(req.server.knobs.to_json())


@route("GET", r"/_sandbox/stats", "/_sandbox/stats")
def stats_endpoint(req: Request, _: re.Match[str]) -> Response:
    return _json(req.server.stats())


# -- site and auth -----------------------------------------------------------------------------
@route("GET", r"/xapi/siteConfig/buildInfo")
def build_info(req: Request, _: re.Match[str]) -> Response:
    return _json(
        {
            "version": req.server.version,
            "buildNumber": "sandbox",
            "commit": "xnatio-sandbox",
            "branch": "sandbox",
            "sandbox": "true",
            "server": "xnatio sandbox (a local XNAT-compatible test server)",
        }
    )


@route("GET", r"/data/version")
def data_version(req: Request, _: re.Match[str]) -> Response:
    return _resp(200, req.server.version, "text/plain")


@route("GET", r"/xapi/siteConfig/buildInfo/version")
def build_version(req: Request, _: re.Match[str]) -> Response:
    return _resp(200, req.server.version, "text/plain")


@route("GET", r"/xapi/users/username")
def current_username(req: Request, _: re.Match[str]) -> Response:
    assert req.principal is not None
    return _resp(200, req.principal.user, "text/plain")


@route("GET", r"/xapi/users/(?P<u>[^/]+)")
def user_details(req: Request, m: re.Match[str]) -> Response:
    if m["u"] not in req.server.users:
        raise HttpError(404, f"User {m['u']} not found")
    return _json({"username": m["u"], "enabled": True, "verified": True, "admin": True})


@route("GET", r"/data/auth")
def auth_status(req: Request, _: re.Match[str]) -> Response:
    assert req.principal is not None
    return _resp(200, f"User '{req.principal.user}' is logged in", "text/plain")


@route("GET POST", r"/data/JSESSION")
def jsession(req: Request, _: re.Match[str]) -> Response:
    assert req.principal is not None
    sid = req.principal.new_session or req.server.auth.new_session(req.principal.user)
    if req.principal.new_session is None:
        # Cookie-authenticated: XNAT answers with the current session id.
        cookie = req.headers.get("Cookie", "")
        m = re.search(r"JSESSIONID=([0-9A-Fa-f]{32})", cookie)
        if m and req.server.auth.touch(m.group(1)):
            req.server.auth.end_session(sid)
            sid = m.group(1)
    req.principal.new_session = None
    return _resp(200, sid, "text/plain", {"Set-Cookie": f"JSESSIONID={sid}; Path=/; HttpOnly"})


@route("DELETE", r"/data/JSESSION")
def jsession_delete(req: Request, _: re.Match[str]) -> Response:
    m = re.search(r"JSESSIONID=([0-9A-Fa-f]+)", req.headers.get("Cookie", ""))
    req.server.auth.end_session(m.group(1) if m else None)
    if req.principal is not None and req.principal.new_session:
        req.server.auth.end_session(req.principal.new_session)
        req.principal.new_session = None
    return _resp(200, "", "text/plain")


@route("PUT POST", r"/data/services/auth")
def services_auth(req: Request, _: re.Match[str]) -> Response:
    """XNAT's form login (xnatpy uses it): username/password form fields → JSESSION id."""
    form = req.params  # the form body is merged into the parameters
    user = req.server.auth.login(form.get("username", ""), form.get("password", ""))
    if user is None:
        raise HttpError(401, "Login attempt failed. Please try again.")
    sid = req.server.auth.new_session(user)
    return _resp(200, sid, "text/plain", {"Set-Cookie": f"JSESSIONID={sid}; Path=/; HttpOnly"})


@route("GET", r"")
def root(req: Request, _: re.Match[str]) -> Response:
    return _resp(200, "<html><body><h1>XNAT sandbox</h1></body></html>", "text/html")


@route("GET", r"/data/services/tokens/issue")
def token_issue(req: Request, _: re.Match[str]) -> Response:
    assert req.principal is not None
    t = req.server.auth.issue_token(req.principal.user)
    return _json(
        {
            "alias": t.alias,
            "secret": t.secret,
            "xdatUserId": req.principal.user,
            "estimatedExpirationTime": int(t.expires * 1000),
            "enabled": True,
        }
    )


@route("GET", r"/data/services/tokens/validate/(?P<a>[^/]+)/(?P<s>[^/]+)")
def token_validate(req: Request, m: re.Match[str]) -> Response:
    t = req.server.auth.get_token(m["a"])
    if t is None or t.secret != m["s"]:
        raise HttpError(404, "Token not found")
    return _json({"valid": t.user})


@route("GET", r"/data/services/tokens/invalidate/(?P<a>[^/]+)/(?P<s>[^/]+)")
def token_invalidate(req: Request, m: re.Match[str]) -> Response:
    t = req.server.auth.get_token(m["a"])
    if t is None or t.secret != m["s"]:
        raise HttpError(404, "Token not found")
    req.server.auth.invalidate_token(m["a"])
    return _resp(200, "", "text/plain")


# -- import ------------------------------------------------------------------------------------
@route("POST PUT", r"/data/services/import")
def import_service(req: Request, _: re.Match[str]) -> Response:
    from xnatio.sandbox.importer import cleanup

    params = dict(req.params)
    store = _store(req)
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
                name = "upload"
            body_path = req.tmp_path("body")
            temp.append(body_path)
            req.body.to_file(body_path)
        else:
            raise HttpError(
                400, "Unable to identify the uploaded file: send multipart/form-data or inbody=true"
            )
        p = ImportParams.from_params(params)
        job = DicomImport(store, req.server.knob_box, p, req.path)
        if p.handler == "gradual-DICOM":

            def single() -> Any:
                with body_path.open("rb") as stream:
                    yield name, stream

            uris = job.run(single())
        else:
            kind = archive_kind(name)
            if kind is None:
                raise HttpError(400, f"Unsupported format {name}")
            uris = job.run(iter_entries(body_path, kind, store.tmp_dir()))
        req.server.knob_box.count("files_imported", job.files_written)
    return uri_list(req, uris)


# -- prearchive --------------------------------------------------------------------------------
@route("GET", r"/data/prearchive(?:/projects)?")
def prearchive_all(req: Request, _: re.Match[str]) -> Response:
    auto = req.server.knobs.auto_archive_projects
    rows = [views.prearc_row(s, auto) for s in _store(req).list_prearc()]
    return _json(views.result_set(rows))


@route("GET", r"/data/prearchive/projects/(?P<p>[^/]+)")
def prearchive_project(req: Request, m: re.Match[str]) -> Response:
    auto = req.server.knobs.auto_archive_projects
    rows = [views.prearc_row(s, auto) for s in _store(req).list_prearc(m["p"])]
    return _json(views.result_set(rows))


def _prearc(req: Request, m: re.Match[str]) -> PrearcSession:
    s = _store(req).get_prearc(m["p"], m["ts"], m["f"])
    if s is None:
        raise HttpError(404, "Unable to find the specified prearchive session.")
    return s


@route("GET", _PREARC)
def prearchive_session(req: Request, m: re.Match[str]) -> Response:
    s = _prearc(req, m)
    return _json(views.result_set([views.prearc_row(s, req.server.knobs.auto_archive_projects)]))


@route("GET", _PREARC + r"/scans")
def prearchive_scans(req: Request, m: re.Match[str]) -> Response:
    s = _prearc(req, m)
    scans: dict[str, dict[str, Any]] = {}
    for f in _store(req).prearc_files(s.id):
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
    return _json(views.result_set(scans.values()))


@route("DELETE", _PREARC)
def prearchive_delete(req: Request, m: re.Match[str]) -> Response:
    _store(req).delete_prearc(_prearc(req, m))
    return _resp(200, "", "text/plain")


@route("POST", _PREARC)
def prearchive_action(req: Request, m: re.Match[str]) -> Response:
    store = _store(req)
    s = _prearc(req, m)
    action = req.params.get("action", "")
    if action == "build":
        if store.is_busy(s.id):
            raise HttpError(409, "session document locked")
        store.build(s)
        return _resp(200, "", "text/plain")
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
    store = _store(req)
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


# -- projects and subjects ---------------------------------------------------------------------
def _project_row(p: str) -> dict[str, str]:
    return {"ID": p, "secondary_ID": p, "name": p, "description": "", "URI": f"/data/projects/{p}"}


@route("GET", r"/data/projects")
def projects(req: Request, _: re.Match[str]) -> Response:
    return _json(views.result_set(_project_row(p) for p in _store(req).projects()))


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)")
def project(req: Request, m: re.Match[str]) -> Response:
    # Every project exists in the sandbox and belongs to every user: no setup step needed.
    row = _project_row(m["p"])
    return _json({"items": [{"data_fields": row, "meta": {"xsi:type": "xnat:projectData"}}]})


@route("PUT", r"/data/(?:archive/)?projects/(?P<p>[^/]+)")
def project_put(req: Request, m: re.Match[str]) -> Response:
    return _resp(200, "", "text/plain")


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects")
def subjects(req: Request, m: re.Match[str]) -> Response:
    rows = [
        {
            "ID": r["id"],
            "label": r["label"],
            "project": r["project"],
            "URI": f"/data/subjects/{r['id']}",
        }
        for r in _store(req).subjects(m["p"])
    ]
    return _json(views.result_set(rows))


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects/(?P<s>[^/]+)")
def subject(req: Request, m: re.Match[str]) -> Response:
    r = _store(req).subject(m["p"], m["s"])
    if r is None:
        raise HttpError(404, "Unable to find the specified subject.")
    fields = {"ID": r["id"], "label": r["label"], "project": r["project"]}
    return _json({"items": [{"data_fields": fields, "meta": {"xsi:type": "xnat:subjectData"}}]})


@route("PUT", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/subjects/(?P<s>[^/]+)")
def subject_put(req: Request, m: re.Match[str]) -> Response:
    sid, created = _store(req).put_subject(m["p"], m["s"])
    return _resp(201 if created else 200, sid, "text/plain")


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)(?:/subjects/(?P<s>[^/]+))?/experiments")
def experiments(req: Request, m: re.Match[str]) -> Response:
    rows = [views.experiment_row(e) for e in _store(req).experiments(m["p"], m["s"])]
    return _json(views.result_set(rows))


@route("GET", r"/data/experiments")
def all_experiments(req: Request, _: re.Match[str]) -> Response:
    rows = [views.experiment_row(e) for e in _store(req).experiments(req.params.get("project"))]
    return _json(views.result_set(rows))


# -- experiments, scans, resources, files ------------------------------------------------------
def _experiment(req: Request, m: re.Match[str]) -> Experiment:
    store = _store(req)
    e = store.experiment_by_id(m["eid"]) if m["eid"] else store.experiment(m["p"], m["e"])
    if e is None or (m["s"] and m["s"] not in (e.subject_label, e.subject_id)):
        raise HttpError(404, "Unable to find the specified experiment.")
    return e


def _scan(req: Request, e: Experiment, scan_id: str) -> str:
    if not any(sc["scan_id"] == scan_id for sc in _store(req).scans(e)):
        raise HttpError(404, "Unable to find the specified scan.")
    return scan_id


@route("GET", _EXP)
def experiment(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    return _json(views.experiment_document(_store(req), e))


@route(
    "PUT",
    r"/data(?:/archive)?/projects/(?P<p>[^/]+)/subjects/(?P<s>[^/]+)/experiments/(?P<e>[^/]+)",
)
def experiment_put(req: Request, m: re.Match[str]) -> Response:
    """Create an (empty) session: 201 new, 200 existing. A Direct-Archive upload into a
    pre-created session falls back to the prearchive, as on XNAT."""
    store = _store(req)
    existing = store.experiment(m["p"], m["e"])
    if existing is not None:
        return _resp(200, existing.id, "text/plain")
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
    return _resp(201, e.id, "text/plain")


@route("DELETE", _EXP)
def experiment_delete(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    _store(req).delete_experiment(e)
    return _resp(200, "", "text/plain")


@route("GET", _EXP + r"/scans")
def scans(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    return _json(views.result_set(views.scan_rows(e, _store(req).scans(e))))


@route("GET", _EXP + r"/scans/(?P<scan>[^/]+)")
def scan(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    _scan(req, e, m["scan"])
    rows = [r for r in views.scan_rows(e, _store(req).scans(e)) if r["ID"] == m["scan"]]
    return _json({"items": [{"data_fields": rows[0], "meta": {"xsi:type": rows[0]["xsiType"]}}]})


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources")
def resources(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = _scan(req, e, m["scan"]) if m["scan"] else ""
    store = _store(req)
    rows = views.resource_rows(
        e, scan_id, store.resource_labels(e, scan_id), store.files(e, scan_id)
    )
    return _json(views.result_set(rows))


@route("GET", _EXP + r"/scans/(?P<scan>[^/]+)/files")
def scan_files(req: Request, m: re.Match[str]) -> Response:
    """All files of some scans (``ALL`` or ``1,2``); ``format=zip`` downloads them."""
    e = _experiment(req, m)
    store = _store(req)
    wanted = None if m["scan"] == "ALL" else set(m["scan"].split(","))
    rows = [
        f for f in store.files(e) if f["scan_id"] and (wanted is None or f["scan_id"] in wanted)
    ]
    if req.params.get("format") == "zip":
        return _zip_response(req, e, rows)
    return _json(views.result_set(views.file_rows(e, rows)))


def _zip_response(req: Request, e: Experiment, rows: list[Any]) -> Response:
    """A stored (uncompressed) zip laid out as XNAT's downloads are:
    ``{label}/scans/{id}/resources/{res}/files/{path}`` (``{label}/resources/…`` for session
    resources). Built in the tmp dir, removed once sent."""
    import zipfile

    store = _store(req)
    out = req.tmp_path("download")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in rows:
            scan = f"scans/{f['scan_id']}/" if f["scan_id"] else ""
            arcname = f"{e.label}/{scan}resources/{f['resource']}/files/{f['path']}"
            zf.write(store.resource_dir(e, f["scan_id"], f["resource"]) / f["path"], arcname)
    return _resp(200, b"", "application/zip", file=out, remove_file=True)


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files")
def files(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = _scan(req, e, m["scan"]) if m["scan"] else ""
    rows = _store(req).files(e, scan_id, m["r"])
    if not rows and m["r"] not in {r["label"] for r in _store(req).resource_labels(e, scan_id)}:
        raise HttpError(404, "Unable to find the specified resource.")
    if req.params.get("format") == "zip":
        return _zip_response(req, e, rows)
    return _json(views.result_set(views.file_rows(e, rows)))


@route("GET", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files/(?P<path>.+)")
def file_get(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = m["scan"] or ""
    store = _store(req)
    rel = safe_relpath(m["path"])
    if not any(f["path"] == rel for f in store.files(e, scan_id, m["r"])):
        raise HttpError(404, "Unable to find the specified file.")
    path = store.resource_dir(e, scan_id, m["r"]) / rel
    ctype = "application/dicom" if m["r"] == "DICOM" else "application/octet-stream"
    return _resp(200, b"", ctype, file=path)


@route("PUT POST", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)")
def resource_create(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    if m["scan"]:
        _scan(req, e, m["scan"])
    store = _store(req)
    store.resource_dir(e, m["scan"] or "", m["r"]).mkdir(parents=True, exist_ok=True)
    p = req.params
    store.create_resource(
        e, m["scan"] or "", m["r"], p.get("format"), p.get("content"), p.get("tags")
    )
    return _resp(200, "", "text/plain")


@route(
    "PUT POST", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files(?:/(?P<path>.+))?"
)
def file_put(req: Request, m: re.Match[str]) -> Response:
    from xnatio.sandbox.importer import cleanup

    store = _store(req)
    e = _experiment(req, m)
    scan_id = _scan(req, e, m["scan"]) if m["scan"] else ""
    params = dict(req.params)
    temp: list[Any] = []
    with cleanup(temp):
        if req.content_type.lower().startswith("multipart/"):
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
            if not req.body.has_body:
                raise HttpError(400, "No content provided.")
            if not m["path"]:
                raise HttpError(400, "A file name is required for an in-body upload.")
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
        return _json({"duplicates": duplicates})
    return _resp(200, "", "text/plain")


@route("DELETE", _EXP + r"(?:/scans/(?P<scan>[^/]+))?/resources/(?P<r>[^/]+)/files/(?P<path>.+)")
def file_delete(req: Request, m: re.Match[str]) -> Response:
    e = _experiment(req, m)
    scan_id = m["scan"] or ""
    rel = safe_relpath(m["path"])
    store = _store(req)
    if not store.delete_file(e, scan_id, m["r"], rel):
        raise HttpError(404, "Unable to find the specified file.")
    (store.resource_dir(e, scan_id, m["r"]) / rel).unlink(missing_ok=True)
    return _resp(200, "", "text/plain")
