"""The anonymization-script configuration XNAT exposes (facts 5), reflecting ``server.site_anon``.

- ``GET /data/config/anon/script?format=json`` → one ResultSet row (``tool``, ``path``,
  ``status`` "enabled"/"disabled", ``contents``…); ``?contents=true`` → the raw script, 404 when
  disabled (ConfigResource.java:56, 87-285; DicomEdit.java:75-86). The site script always exists
  here, since XNAT creates it at first start (GetSiteWideAnonScript.java:38-50).
- ``GET /data/projects/P/config/anon/projects/P?format=json``: the sandbox has no project
  scripts, so 404 (204 with ``accept-not-found=true``); 404 "The requested project P does not
  exist." / 403 "User U can not access project P" (ConfigResource.java:108-122, 450-459).
- ``GET /xapi/anonymize/site|site/enabled|projects/P|projects/P/enabled`` (AnonymizeApi.java:
  54-166); ``PUT /xapi/anonymize/site/enabled`` (a site admin) and ``PUT
  /data/config/anon/script?status=enabled|disabled`` switch the site script.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.routes import listing, respond, respond_json, route

if TYPE_CHECKING:
    from xnatio.sandbox.server import Request, Response

# XNAT's default site script (web/src/main/resources/META-INF/xnat/defaults/id.das:9-12; facts
# 1.7): Study Description := project (unless Unassigned), Patient Name := subject, Patient ID :=
# session.
SITE_SCRIPT = (
    "//\n"
    "// Default XNAT site-wide anonymization script (id.das)\n"
    "//\n"
    'version "6.1"\n'
    'project != "Unassigned" ? (0008,1030) := project\n'
    "(0010,0010) := subject\n"
    "(0010,0020) := session\n"
)
CREATED = "2026-01-01 00:00:00.0"


def _user(req: Request) -> str:
    assert req.principal is not None
    return req.principal.user


def _not_found(req: Request) -> Response:
    # ConfigResource: no configuration → 404, or 204 when the client says it can take that.
    if req.params.get("accept-not-found") == "true":
        return respond(204, b"", "text/plain")
    raise HttpError(404, "")


@route("GET", r"/data/config/anon/script")
def site_script(req: Request, _: re.Match[str]) -> Response:
    enabled = req.server.site_anon
    if req.params.get("contents") == "true":
        if not enabled:
            return _not_found(req)
        return respond(200, SITE_SCRIPT, "text/plain")
    row = {
        "tool": "anon",
        "path": "script",
        "project": "",
        "user": "admin",
        "create_date": CREATED,
        "reason": "Initial site-wide anonymization script",
        "contents": SITE_SCRIPT,
        "unversioned": "false",
        "version": "1",
        "status": "enabled" if enabled else "disabled",
    }
    return listing(req, [row])


@route("PUT", r"/data/config/anon/script")
def site_script_put(req: Request, _: re.Match[str]) -> Response:
    status = req.params.get("status")
    if not req.server.access.is_admin(_user(req)):
        raise HttpError(403, "")
    if status not in ("enabled", "disabled"):
        raise HttpError(400, "The sandbox only changes the site script's status.")
    req.server.site_anon = status == "enabled"
    return respond(200, "", "text/plain")


@route("GET", r"/data/(?:archive/)?projects/(?P<p>[^/]+)/config/anon/projects/(?P<q>[^/]+)")
def project_script(req: Request, m: re.Match[str]) -> Response:
    access = req.server.access
    pid = access.canonical_project(m["p"])
    if pid is None:
        raise HttpError(404, f"The requested project {m['p']} does not exist.")
    if not access.can_read(_user(req), pid):
        raise HttpError(403, f"User {_user(req)} can not access project {m['p']}")
    return _not_found(req)  # no project script in the sandbox


@route("GET", r"/xapi/anonymize/site")
def xapi_site(req: Request, _: re.Match[str]) -> Response:
    return respond(200, SITE_SCRIPT, "text/plain")


@route("GET", r"/xapi/anonymize/site/enabled")
def xapi_site_enabled(req: Request, _: re.Match[str]) -> Response:
    return respond_json(req.server.site_anon)


@route("PUT", r"/xapi/anonymize/site/enabled")
def xapi_site_enabled_put(req: Request, _: re.Match[str]) -> Response:
    if not req.server.access.is_admin(_user(req)):
        raise HttpError(403, "")
    raw = b""
    while chunk := req.body.read():
        raw += chunk
    try:
        value = json.loads(raw or req.params.get("enable", "true"))
    except ValueError:
        raise HttpError(400, "Expected true or false") from None
    if not isinstance(value, bool):
        raise HttpError(400, "Expected true or false")
    req.server.site_anon = value
    return respond(200, "", "text/plain")


def _readable(req: Request, project: str) -> str:
    access = req.server.access
    pid = access.canonical_project(project)
    if pid is None:
        raise HttpError(404, "")
    if not access.can_read(_user(req), pid):
        raise HttpError(403, "")
    return pid


@route("GET", r"/xapi/anonymize/projects/(?P<p>[^/]+)")
def xapi_project(req: Request, m: re.Match[str]) -> Response:
    _readable(req, m["p"])
    return respond(200, "", "text/plain")  # no project script: an empty one


@route("GET", r"/xapi/anonymize/projects/(?P<p>[^/]+)/enabled")
def xapi_project_enabled(req: Request, m: re.Match[str]) -> Response:
    _readable(req, m["p"])
    return respond_json(False)
