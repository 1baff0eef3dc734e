"""XNAT-style error pages and the exception that carries an HTTP error through the handler.

XNAT's REST layer (Restlet) answers errors with an HTML "status page" whose only meaningful content
is the message inside ``<h3>…</h3>``; clients (xnatpy, xnatctl, the Desktop Client) scrape it from
there, so the sandbox renders the same shape.
"""

from __future__ import annotations

import html

REASONS = {
    200: "OK",
    201: "Created",
    301: "Moved Permanently",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    415: "Unsupported Media Type",
    423: "Locked",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    507: "Insufficient Storage",
}


class HttpError(Exception):
    """An error answer: ``status``, XNAT's ``message`` (goes into ``<h3>``) and extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def error_page(status: int, message: str) -> bytes:
    """The HTML status page XNAT sends with an error; the message is HTML-escaped in ``<h3>``."""
    reason = REASONS.get(status, "Error")
    return (
        "<html>\n<head>\n   <title>Status page</title>\n</head>\n"
        '<body style="font-family: sans-serif;">\n'
        '<p style="font-size: 1.2em;font-weight: bold;margin: 1em 0px;">'
        f"{html.escape(reason)}</p>\n"
        f"<h3>{html.escape(message)}</h3>\n"
        '<p>You can get technical details <a href="http://www.w3.org/Protocols/rfc2616/'
        f'rfc2616-sec10.html">here</a>.<br>\n'
        'Please continue your visit at our <a href="/">home page</a>.\n'
        "</p>\n</body>\n</html>\n"
    ).encode()


LOGIN_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>XNAT</title></head><body>"
    '<form name="form1" method="post" action="{action}">'
    '<input type="text" name="username"/><input type="password" name="password"/>'
    '<input type="submit" value="Login"/></form></body></html>\n'
)


def login_page(context_path: str) -> str:
    """XNAT's login form (what browsers are sent to, and what an SSO proxy answers)."""
    return LOGIN_PAGE.format(action=html.escape(f"{context_path}/login"))
