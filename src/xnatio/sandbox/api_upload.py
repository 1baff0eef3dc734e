"""Upload side of the REST API: the import service, the prearchive, the archive service and
Direct-Archive's ``/xapi/direct-archive`` (facts 1, 3). Answers, codes and texts are XNAT's."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import threading
import time
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
    truthy,
)
from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.routes import listing, respond, respond_json, route, store_of
from xnatio.sandbox.store import (
    AUTO_ARCHIVE,
    AUTO_ARCHIVE_OVERWRITE,
    MSG_LOCKED,
    MSG_OPERATION,
    MSG_UNASSIGNED,
    UNASSIGNED,
    ArchiveFailure,
    Experiment,
    PrearcSession,
    Store,
)
from xnatio.sandbox.workers import Body, import_elsewhere

if TYPE_CHECKING:
    from xnatio.sandbox.server import Request, Response

_PREARC = r"/data/prearchive/projects/(?P<p>[^/]+)/(?P<ts>[^/]+)/(?P<f>[^/]+)"

# Content-Types that make a raw body an in-body file without inbody=true (exact match, so a
# "; param" suffix defeats it *(inferred)*) (facts 1.1: RU:36-67, 88-100; SR:1253).
INBODY_TYPES = {
    "text/*",
    "text/plain",
    "text/xml",
    "text/csv",
    "application/*",
    "application/dicom",
    "application/zip",
    "application/xar",
    "application/x-gtar",
    "application/x-gzip",
    "application/x-tar",
    "application/octet-stream",
    "application/pdf",
    "application/msword",
    "application/vnd.ms-excel",
    "application/vnd.ms-powerpoint",
    "image/*",
    "image/gif",
    "image/jpeg",
    "image/png",
    "image/tiff",
    "video/*",
    "video/mpeg",
    "video/mp4",
}
MSG_NO_FORMAT = "Unable to identify upload format."  # SR:1302-1305; Imp:199-202
MSG_ONE_FILE = "Importer is limited to one uploaded resource at a time."  # Imp:231-235
MSG_UNSUPPORTED = "Unsupported format UNKNOWN"  # DZI:140-158
MSG_STREAMING = (  # SR:1267-1269
    "In-body File posts must include the file directly as the body of the message. In this"
    " case, the request entity size is {size} but the media type is not application/zip"
    " (i.e. streaming compressed upload)."
)


def uri_answer(req: Request, uris: list[str], status: int = 200, crlf: bool = True) -> Response:
    """``text/uri-list``, one URI per line each ending CRLF (facts 1.3); ``format=txt`` →
    ``text/plain``, and a single URI then has no CRLF (Imp:339-344). ``crlf=False``: the
    prearchive actions' single URI without a line end (facts 3.3)."""
    txt = req.params.get("format") == "txt"
    if (txt and len(uris) == 1) or not crlf:
        body = "\r\n".join(uris)
    else:
        body = "".join(u + "\r\n" for u in uris)
    return respond(status, body, "text/plain" if txt else "text/uri-list")


def _user(req: Request) -> str | None:
    return req.principal.user if req.principal is not None else None


def _body_size(req: Request) -> int:
    """Restlet's entity size: -1 when unknown (chunked), else Content-Length (0 if none)."""
    if "chunked" in (req.headers.get("Transfer-Encoding") or "").lower():
        return -1
    try:
        return int(req.headers.get("Content-Length") or 0)
    except ValueError:
        return -1


# -- import ------------------------------------------------------------------------------------
@route("POST PUT", r"/data/services/import")
def import_service(req: Request, _: re.Match[str]) -> Response:
    params = dict(req.params)
    store = store_of(req)
    raw_type = req.content_type.strip()
    base = raw_type.split(";", 1)[0].strip().lower()
    multipart = base == "multipart/form-data"
    inbody = truthy(params.get("inbody")) or raw_type in INBODY_TYPES
    ImportParams.from_params(params, base)  # unknown handler, bad dest: before the body
    temp: list[Any] = []
    with cleanup(temp):
        if inbody:
            if multipart:
                # 406 is set, then the Importer meets a null file list (SR:1254-1256; Imp:161)
                # → 500 *(inferred)*.
                raise HttpError(500, "Internal Server Error")
            size = _body_size(req)
            if size < 1 and base != "application/zip":
                raise HttpError(400, MSG_STREAMING.format(size=size))
            name = RAW_NAMES.get(base, "upload.unsupported")
            body_path: Path | None = None  # read as it arrives
        elif multipart:
            boundary = boundary_of(raw_type)
            if boundary is None:
                raise HttpError(400, MSG_NO_FORMAT)
            form = parse_multipart(req.body, boundary, store.tmp_dir())
            temp.extend(part.path for part in form.files)
            for key, value in form.fields.items():
                params.setdefault(key, value)
            if len(form.files) > 1:
                raise HttpError(400, MSG_ONE_FILE)
            if not form.files:
                raise HttpError(400, MSG_NO_FORMAT)
            name, body_path = form.files[0].filename, form.files[0].path
        else:
            raise HttpError(400, MSG_NO_FORMAT)
        p = ImportParams.from_params(params, base)
        job = DicomImport(
            store,
            req.server.knob_box,
            p,
            req.path,
            _user(req),
            site_anon=req.server.site_anon,
            slots=req.server.import_slots,
        )
        source: Path | FullReader = body_path if body_path else FullReader(req.body)
        if p.handler == "gradual-DICOM":
            # A raw body is named "upload" + the type's extension (upload.dcm), and that name
            # is kept unless another instance holds it (facts 1.1 line 5, 1.2 "rename" row).
            entry_name = name

            def single() -> Any:
                if isinstance(source, Path):
                    with source.open("rb") as stream:
                        yield entry_name, stream
                else:
                    yield entry_name, source

            uris = job.run(single())
        else:
            kind = archive_kind(name)
            if kind is None:
                raise HttpError(400, MSG_UNSUPPORTED)
            workers = req.server.workers
            if body_path is not None or not _whole_body(req):
                workers = None
            with workers.choose() if workers is not None else contextlib.nullcontext() as worker:
                if workers is None or worker is None:
                    uris = job.run(iter_entries(source, kind, store.tmp_dir()))
                else:
                    # A worker reads this body (workers.py); the catalog's half is here.
                    sock, buffered = req.body_socket()
                    body = Body(
                        buffered,
                        req.body.length,
                        req.body.chunked,
                        kind,
                        store.tmp_path,
                        p.ignore_unparsable,
                        job.sleepy(),
                        sock.gettimeout(),
                    )
                    uris = import_elsewhere(job, workers, worker, sock, req.body, body)
        req.server.knob_box.count("files_imported", job.files_written)
    return uri_answer(req, uris)


def _whole_body(req: Request) -> bool:
    """Whether an import worker may read this body: nothing of it read yet, and no knob in the
    server's body reader (a cut, a bandwidth cap) applies to it, over a plain connection."""
    return (
        req.plain_connection
        and req.body.untouched
        and req.body.has_body
        and not req.body.will_be_cut
        and req.server.knob_box.live.bandwidth_mbps <= 0
    )


# -- prearchive --------------------------------------------------------------------------------
def _rows(req: Request, sessions: list[PrearcSession]) -> Response:
    auto = req.server.knobs.auto_archive_projects
    # format=json|xml|csv|html, as every XNAT listing (facts 4; routes.listing)
    rows = [views.prearc_row(s, auto) for s in sessions]
    return listing(req, rows, columns=views.PREARC_COLUMNS)


@route("GET", r"/data/prearchive(?:/projects)?")
def prearchive_all(req: Request, _: re.Match[str]) -> Response:
    return _rows(req, store_of(req).list_prearc())


@route("GET", r"/data/prearchive/projects/(?P<p>[^/]+)")
def prearchive_project(req: Request, m: re.Match[str]) -> Response:
    return _rows(req, store_of(req).list_prearc(m["p"]))


def _known_project(store: Store, project: str) -> bool:
    access = getattr(store, "access", None)
    if access is None or project == UNASSIGNED:
        return True
    return access.canonical_project(project) is not None


def _prearc(req: Request, m: re.Match[str], missing: int = 404) -> PrearcSession:
    """The row, after XNAT's checks: unknown project → 500, no edit right → 403, missing →
    ``missing`` (404; 500 for build) (facts 3.1, 3.3: PSR:104-112, 242-252; PU:236-282)."""
    store = store_of(req)
    if not _known_project(store, m["p"]):
        raise HttpError(500, "Internal Server Error")
    if not store.can_edit(_user(req), m["p"]):
        raise HttpError(403, "Forbidden")
    s = store.get_prearc(m["p"], m["ts"], m["f"])
    if s is None:
        raise HttpError(missing, "Not Found" if missing == 404 else "Internal Server Error")
    return s


@route("GET", _PREARC)
def prearchive_session(req: Request, m: re.Match[str]) -> Response:
    """``format=json`` → one row, an empty Result once gone *(inferred)*; no format → the
    session XML, 404 until built (facts 3.1: PSR:183-200; PDB:2276-2287)."""
    store = store_of(req)
    fmt = req.params.get("format")
    if fmt == "json":
        if not store.can_edit(_user(req), m["p"]):
            raise HttpError(403, "Forbidden")
        s = store.get_prearc(m["p"], m["ts"], m["f"])
        return _rows(req, [s] if s is not None else [])
    s = _prearc(req, m)
    if s.status != "READY":
        raise HttpError(404, "Not Found")
    return respond(200, _session_xml(store, s), "text/xml")


def _session_xml(store: Store, s: PrearcSession) -> str:
    scans = sorted({r["scan"] for r in store.prearc_files(s.id)})
    body = "".join(f'<xnat:scan ID="{scan}"/>' for scan in scans)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<xnat:imageSessionData xmlns:xnat="http://nrg.wustl.edu/xnat" label="{s.name}"'
        f' project="{s.project}" UID="{s.tag}"><xnat:subject_ID>{s.subject}</xnat:subject_ID>'
        f"<xnat:scans>{body}</xnat:scans></xnat:imageSessionData>"
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
    """Removes row and files (PSR:286-330)."""
    store_of(req).delete_prearc(_prearc(req, m))
    return respond(200, "", "text/plain")


def _auto_code(req: Request, s: PrearcSession) -> int:
    """The 3.2 rule: the row's own code, else ``AA``/``auto-archive``, else the project's."""
    if s.auto_archives:
        return s.code
    if truthy(req.params.get("AA")) or truthy(req.params.get("auto-archive")):
        return AUTO_ARCHIVE
    return store_of(req).project_code(s.project, req.server.knobs.auto_archive_projects)


@route("POST", _PREARC)
def prearchive_action(req: Request, m: re.Match[str]) -> Response:
    """``build`` → 200 one URI, no CRLF; ``commit`` → 301 ``text/plain`` archive URI without
    Location when it auto-archives (else 200 the prearchive URI), 500 "FAILED: …" when the
    archive fails; ``move`` → 301 (facts 3.3: PSR:332-435; QBIC:61-170)."""
    store = store_of(req)
    _json_body_params(req)
    action = req.params.get("action", "")
    s = _prearc(req, m, missing=500 if action == "build" else 404)
    if store.is_locked(s.id):
        raise HttpError(409, MSG_LOCKED)
    if action == "build":
        built = store.build(s)
        return uri_answer(req, [built.external_url], crlf=False)
    if action == "commit":
        built = store.build(s)
        code = _auto_code(req, built)
        if code >= AUTO_ARCHIVE and built.status == "READY":
            overwrite = code == AUTO_ARCHIVE_OVERWRITE or truthy(req.params.get("overwrite_files"))
            try:
                e = _archive_in_time(
                    req,
                    built,
                    lambda: store.archive(
                        built, merge=True, overwrite=overwrite, delay=_delay(req)
                    ),
                )
            except ArchiveFailure as exc:
                raise HttpError(500, f"FAILED: {exc.message}") from None
            # No Location header (SR:1007-1018): the body is the archive URI.
            return respond(301, e.archive_uri, "text/plain")
        return uri_answer(req, [built.external_url], crlf=False)
    if action == "move":
        target = req.params.get("newProject")
        if not target:
            raise HttpError(400, "Bad Request")
        readable = store.readable_project(_user(req), target)
        if readable is None or not store.can_edit(_user(req), readable):
            raise HttpError(403, "Forbidden")
        moved = store.move_prearc(s, readable)
        return uri_answer(req, [moved.external_url], 301, crlf=False)
    raise HttpError(400, "Bad Request")


def _archive_in_time(req: Request, s: PrearcSession, work: Callable[[], Experiment]) -> Experiment:
    """Run an archive as XNAT's QueueBasedImageCommit does: the request waits at most
    ``sessionArchiveTimeoutInterval`` (knob ``archive_timeout_seconds``), then answers 500 while
    the archive goes on (facts 3.3, 3.4: QBIC:140-170; Arch:137-142)."""
    done: list[Experiment] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(work())
        except BaseException as exc:  # handed to the request thread
            failed.append(exc)

    worker = threading.Thread(target=run, daemon=True, name="sandbox-archive")
    worker.start()
    worker.join(req.server.knobs.archive_timeout_seconds)
    if worker.is_alive():
        raise HttpError(
            500,
            f"The session {s.url} did not complete within the configured timeout interval.",
        )
    if failed:
        raise failed[0]
    return done[0]


def _json_body_params(req: Request) -> None:
    """A JSON object body counts as parameters, like a form body (facts 3.3: PSR:221-231)."""
    if not req.content_type.lower().startswith("application/json"):
        return
    raw = b""
    while chunk := req.body.read():
        raw += chunk
        if len(raw) > 1 << 20:
            raise HttpError(400, "Bad Request")
    try:
        values = json.loads(raw or b"{}")
    except ValueError:
        return  # XNAT logs an invalid JSON body and goes on (SecureResource.loadParams)
    if isinstance(values, dict):
        for key, value in values.items():
            req.params.setdefault(str(key), "" if value is None else str(value))


def _delay(req: Request) -> Callable[[], None]:
    def wait() -> None:
        ms = req.server.knobs.archive_ms
        if ms > 0:
            time.sleep(ms / 1000)

    return wait


# -- archive service ---------------------------------------------------------------------------
_SRC = re.compile(r"^/prearchive/projects/([^/]+)/([^/]+)/([^/]+)/?$")


@route("POST", r"/data/services/archive")
def archive_service(req: Request, _: re.Match[str]) -> Response:
    """``POST /data/services/archive?src=…`` (facts 3.4: Arch:64-172; BPA:103-174): always
    merges; ``overwrite=append|delete`` (or ``overwrite_files``, project code 5) overwrite
    clashing files; 200 ``"<archive URI>\\r\\n"``, 303 when ``redirect=true`` or the row is
    auto-archive; failures 500 "FAILED: …"."""
    store = store_of(req)
    src = req.params.get("src", "")
    if not src:
        raise HttpError(404, "Unknown prearchive session.")
    path = src[len("/data") :] if src.startswith("/data/") else src
    sm = _SRC.match(path)
    if not sm:
        raise HttpError(400, f"Invalid src URI ({src})")
    if sm[1] == UNASSIGNED:
        raise HttpError(400, MSG_UNASSIGNED)
    s = store.get_prearc(sm[1], sm[2], sm[3])
    if s is None:
        raise HttpError(404, f"{src} not found.")
    if not store.can_edit(_user(req), s.project):
        raise HttpError(403, "Invalid permissions for new project.")
    if store.is_locked(s.id):
        raise HttpError(403, MSG_OPERATION)
    if req.params.get("dest"):
        # dest + src puts a non-Serializable object into the JMS request (QBIC:93-95) → 500 and
        # the row ERROR *(inferred)*: the hardest answer the facts allow. Use subject=/session=.
        store._set_status(s.id, "ERROR")
        raise HttpError(500, "Internal Server Error")
    code = max(s.code, store.project_code(s.project, req.server.knobs.auto_archive_projects))
    overwrite = (
        req.params.get("overwrite") in ("append", "delete")
        or truthy(req.params.get("overwrite_files"))
        or code == AUTO_ARCHIVE_OVERWRITE
    )
    try:
        e = _archive_in_time(
            req,
            s,
            lambda: store.archive(
                s,
                merge=True,
                overwrite=overwrite,
                subject=req.params.get("subject") or None,
                label=req.params.get("session") or None,
                delay=_delay(req),
            ),
        )
    except ArchiveFailure as exc:
        raise HttpError(500, f"FAILED: {exc.message}") from None
    if truthy(req.params.get("redirect")) or s.auto_archives:
        return respond(303, "", "text/plain", {"Location": req.server.url + e.archive_uri})
    return respond(200, e.archive_uri + "\r\n", "text/uri-list")


# -- Direct-Archive ----------------------------------------------------------------------------
_DA = r"/xapi/direct-archive/(?P<p>[^/]+)/(?P<uid>[^/]+)/(?P<label>[^/]+)"


def _direct_row(s: PrearcSession) -> dict[str, Any]:
    """The DA row as the xapi serializes its ``SessionData`` (bean field names)."""
    return {
        "id": s.id,
        "project": s.project,
        "subject": s.subject,
        "name": s.name,
        "folderName": s.folder,
        "tag": s.tag,
        "timestamp": s.timestamp,
        "status": s.status,
        "url": s.url,
        "uploadDate": s.uploaded,
        "lastBuiltDate": dt.datetime.fromtimestamp(s.lastmod).isoformat(timespec="milliseconds"),
        "scan_date": s.scan_date,
        "autoArchive": "AutoArchive" if s.auto_archives else "Manual",
        "preventAnon": s.prevent_anon,
        "preventAutoCommit": s.prevent_auto_commit,
        "source": s.source or None,
    }


def _direct(req: Request, m: re.Match[str]) -> PrearcSession:
    store = store_of(req)
    project = store.readable_project(_user(req), m["p"])
    s = store.get_direct(project, m["uid"], m["label"]) if project else None
    if s is None:
        # Not (or no longer) a DA row: 404 (XapiRestControllerAdvice.java:141-144).
        raise HttpError(404, "Not Found")
    return s


@route("GET", _DA)
def direct_archive_get(req: Request, m: re.Match[str]) -> Response:
    """200 JSON while the DA row exists, 404 once it was archived (facts 1.6)."""
    return respond_json(_direct_row(_direct(req, m)))


@route("POST", _DA)
def direct_archive_post(req: Request, m: re.Match[str]) -> Response:
    """Archive now (403 without edit) (facts 1.6: DirectArchiveSessionApi.java:54-82)."""
    store = store_of(req)
    s = _direct(req, m)
    if not store.can_edit(_user(req), s.project):
        raise HttpError(403, "Forbidden")
    store.archive_direct(s, delay=_delay(req))
    return respond_json(_direct_row(s))
