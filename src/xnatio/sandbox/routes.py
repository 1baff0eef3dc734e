"""Route table and handlers of the sandbox's REST API (XNAT paths under ``/data`` and ``/xapi``,
sandbox administration under ``/_sandbox``, a path XNAT does not use)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from xnatio.sandbox.pages import HttpError
from xnatio.sandbox.store import Store

if TYPE_CHECKING:
    from xnatio.sandbox.server import Request, Response

Handler = Callable[["Request", "re.Match[str]"], "Response"]
_ROUTES: list[tuple[str, re.Pattern[str], Handler, str]] = []


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


def store_of(req: Request) -> Store:
    store = req.server.store
    assert store is not None
    return store


def respond(*args: Any, **kwargs: Any) -> Response:
    from xnatio.sandbox.server import Response

    return Response(*args, **kwargs)


def respond_json(data: Any, status: int = 200) -> Response:
    from xnatio.sandbox.server import json_response

    return json_response(data, status)


def listing(
    req: Request,
    rows: Iterable[dict[str, Any]],
    *,
    title: str | None = None,
    columns: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """A ResultSet in the requested ``format`` (json by default; xml, csv, html; facts 4)."""
    from xnatio.sandbox import views

    fmt = req.params.get("format", "json").lower()
    if fmt not in views.LISTING_FORMATS:
        fmt = "json"
    body, ctype = views.render_listing(rows, fmt, title=title, columns=columns, extra=extra)
    return respond(200, body, ctype)


def uri_list(req: Request, uris: list[str], status: int = 200, **headers: str) -> Response:
    """text/uri-list with CRLF line ends (``format=txt``: text/plain)."""
    body = "".join(u + "\r\n" for u in uris)
    ctype = "text/plain" if req.params.get("format") == "txt" else "text/uri-list"
    return respond(status, body, ctype, headers)


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
    return respond_json(req.server.knobs.to_json())


@route("GET POST", r"/_sandbox/stats", "/_sandbox/stats")
def stats_endpoint(req: Request, _: re.Match[str]) -> Response:
    """Request counters, ``inflight`` and ``inflight_peak``; a POST first resets the peak to what
    is in flight now (the start of a measurement)."""
    if req.method == "POST":
        req.body.drain()
        req.server.knob_box.reset_peak()
    return respond_json(req.server.stats())


# -- site and auth -----------------------------------------------------------------------------
@route("GET", r"/xapi/siteConfig/buildInfo")
def build_info(req: Request, _: re.Match[str]) -> Response:
    return respond_json(
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
    return respond(200, req.server.version, "text/plain")


@route("GET", r"/xapi/siteConfig/buildInfo/version")
def build_version(req: Request, _: re.Match[str]) -> Response:
    return respond(200, req.server.version, "text/plain")


@route("GET", r"/xapi/users/username")
def current_username(req: Request, _: re.Match[str]) -> Response:
    assert req.principal is not None
    return respond(200, req.principal.user, "text/plain")


@route("GET", r"/xapi/users/(?P<u>[^/]+)")
def user_details(req: Request, m: re.Match[str]) -> Response:
    access = req.server.access
    if not access.user_exists(m["u"]):
        raise HttpError(404, f"User {m['u']} not found")
    admin = access.is_admin(m["u"])
    return respond_json({"username": m["u"], "enabled": True, "verified": True, "admin": admin})


@route("GET", r"/data/auth")
def auth_status(req: Request, _: re.Match[str]) -> Response:
    """``csrf=true`` appends the session's CSRF token: "…; XNAT_CSRF=token" (UserAuthService)."""
    assert req.principal is not None
    text = f"User '{req.principal.user}' is logged in"
    if req.params.get("csrf") == "true":
        text += f"; XNAT_CSRF={req.server.auth.csrf_token(req.principal.session) or ''}"
    return respond(200, text, "text/plain")


@route("GET POST", r"/data/JSESSION")
def jsession(req: Request, _: re.Match[str]) -> Response:
    """The id of the request's session: the one this Basic request just opened, or the cookie's
    (a cookie-authenticated request opens none, so the per-user cap never refuses it)."""
    assert req.principal is not None
    sid = req.principal.session or req.server.auth.new_session(req.principal.user)
    req.principal.new_session = None
    return respond(
        200,
        sid,
        "text/plain",
        {"Set-Cookie": f"JSESSIONID={sid}; Path={req.server.cookie_path}; HttpOnly"},
    )


@route("DELETE", r"/data/JSESSION")
def jsession_delete(req: Request, _: re.Match[str]) -> Response:
    m = re.search(r"JSESSIONID=([0-9A-Fa-f]+)", req.headers.get("Cookie", ""))
    req.server.auth.end_session(m.group(1) if m else None)
    if req.principal is not None and req.principal.new_session:
        req.server.auth.end_session(req.principal.new_session)
        req.principal.new_session = None
    return respond(200, "", "text/plain")


@route("PUT POST", r"/data/services/auth")
def services_auth(req: Request, _: re.Match[str]) -> Response:
    """XNAT's form login (xnatpy uses it): username/password form fields → JSESSION id."""
    form = req.params  # the form body is merged into the parameters
    user = req.server.auth.login(form.get("username", ""), form.get("password", ""))
    if user is None:
        raise HttpError(401, "Login attempt failed. Please try again.")
    sid = req.server.auth.new_session(user)
    return respond(
        200,
        sid,
        "text/plain",
        {"Set-Cookie": f"JSESSIONID={sid}; Path={req.server.cookie_path}; HttpOnly"},
    )


@route("GET", r"/app/template/Login\.vm")
def login_form(req: Request, _: re.Match[str]) -> Response:
    """Where browsers without credentials are sent (no login needed to see it)."""
    from xnatio.sandbox.pages import login_page

    return respond(200, login_page(req.server.context_path), "text/html")


@route("GET", r"")
def root(req: Request, _: re.Match[str]) -> Response:
    return respond(200, "<html><body><h1>XNAT sandbox</h1></body></html>", "text/html")


@route("GET", r"/data/services/tokens/issue")
def token_issue(req: Request, _: re.Match[str]) -> Response:
    assert req.principal is not None
    t = req.server.auth.issue_token(req.principal.user)
    return respond_json(
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
    return respond_json({"valid": t.user})


@route("GET", r"/data/services/tokens/invalidate/(?P<a>[^/]+)/(?P<s>[^/]+)")
def token_invalidate(req: Request, m: re.Match[str]) -> Response:
    t = req.server.auth.get_token(m["a"])
    if t is None or t.secret != m["s"]:
        raise HttpError(404, "Token not found")
    req.server.auth.invalidate_token(m["a"])
    return respond(200, "", "text/plain")


# The API modules register their routes when imported (kept last: they import this module).
from xnatio.sandbox import api_archive, api_config, api_projects, api_upload  # noqa: E402

__all__ = [
    "api_archive",
    "api_config",
    "api_projects",
    "api_upload",
    "handle",
    "route",
    "route_name",
]
