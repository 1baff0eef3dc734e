"""The HTTP client every xnatio command talks to XNAT through.

One authenticated JSESSION (``POST /data/JSESSION`` with Basic auth, then the ``JSESSIONID``
cookie; section 2 of ``shared/xnat-api.md``) shared by every worker thread, over one
``requests.Session`` whose connection pool is sized to the workers and blocks rather than opening
extra connections. Sending Basic auth on every request instead would make XNAT create one server
session per request, and past 1000 per account it evicts older ones (401s mid-upload).

:meth:`XnatClient.request` is the single place where an HTTP answer becomes data or an exception:

* 401 → the session is renewed once (by one thread; the others reuse the new cookie), then
  :class:`~xnatio.errors.AuthError`;
* connection failures → :class:`~xnatio.errors.UnreachableError` while the server has never
  answered, afterwards a retryable :class:`~xnatio.xnat.errors.TransientError`;
* 429/5xx and XNAT's transient race messages → retried with backoff (honouring ``Retry-After``)
  when the request may be repeated, else raised as ``TransientError`` for the caller to retry;
* any other error → :class:`~xnatio.errors.ServerError` with XNAT's own message and status.

The password (and any alias-token secret) never appears in exceptions, logs or ``repr``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Mapping
from http.cookiejar import DefaultCookiePolicy
from types import TracebackType
from typing import Any
from urllib.parse import quote as _quote
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from xnatio import redact as scrubber
from xnatio.errors import AuthError, ServerError, UnreachableError
from xnatio.retry import RetryPolicy, Sleep, parse_retry_after
from xnatio.settings import Secret
from xnatio.xnat.errors import TransientError, error_message, is_transient, redact

log = logging.getLogger(__name__)

USER_AGENT = "xnatio"
Params = Mapping[str, str | int | float | bool] | None


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class XnatClient:
    """An authenticated connection to one XNAT server, safe to share between threads.

    ``verify``: True, False, or the path of a CA bundle. ``timeout``: seconds per request (for
    reading an answer; connecting gives up after ``min(timeout, 30)``). ``pool_size``: the most
    connections kept and used at once; a worker beyond it waits for a free one. ``retry``: the
    policy for requests that may be repeated (default 5 retries). ``sleep``: replaces the backoff
    sleep in tests.
    """

    def __init__(
        self,
        server: str,
        *,
        username: str,
        password: str | Secret,
        verify: bool | str = True,
        timeout: float = 10800.0,
        pool_size: int = 10,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        parts = urlsplit(server if "://" in server else "https://" + server)
        if parts.username or parts.password:
            # Credentials in the URL would end up in every error message; refuse them.
            raise AuthError("put credentials in --user/XNAT_PASSWORD, not in the server URL")
        self.server = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
        self.username = username
        self._password = password if isinstance(password, Secret) else Secret(password)
        self.verify = verify
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep
        self._secrets: list[str] = [self._password.reveal()]
        scrubber.register(self._password.reveal())  # the process-wide log safety net
        self._lock = threading.Lock()
        self._jsession: str | None = None
        self._generation = 0  # bumped at each (re)login so concurrent 401s renew only once
        self._reached = False  # the server answered at least once
        self.session = session if session is not None else requests.Session()
        adapter = HTTPAdapter(
            pool_connections=1, pool_maxsize=max(1, pool_size), pool_block=True, max_retries=0
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # The JSESSIONID is sent explicitly (below); refuse the cookies servers set so a stray
        # Set-Cookie (e.g. a fresh session from a Basic-auth answer) cannot shadow ours.
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        self.session.trust_env = True
        self.session.headers["User-Agent"] = USER_AGENT
        host = parts.hostname or ""
        if parts.scheme == "http" and not _is_loopback(host):
            log.warning(
                "sending credentials to %s over plain http: anyone on the network can read them; "
                "use https",
                host,
            )

    def __repr__(self) -> str:
        return f"XnatClient({self.server!r}, username={self.username!r}, password=<hidden>)"

    # -- session ---------------------------------------------------------------------------

    def __enter__(self) -> XnatClient:
        self.login()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def logged_in(self) -> bool:
        return self._jsession is not None

    def login(self) -> None:
        """Open the JSESSION all later requests use (``POST /data/JSESSION`` with Basic auth)."""
        with self._lock:
            self._login_locked()

    def _login_locked(self) -> None:
        resp = self._send(
            "POST",
            "/data/JSESSION",
            auth=(self.username, self._password.reveal()),
            timeout=min(self.timeout, 120.0),
            use_cookie=False,
        )
        if resp.status_code in (401, 403):
            raise AuthError(
                f"{self.server} refused the credentials of user {self.username!r} "
                f"(HTTP {resp.status_code})"
            )
        if resp.status_code >= 400:
            self._raise_for(resp)
        token = resp.text.strip()
        if not token or len(token) > 200 or any(c.isspace() for c in token):
            raise ServerError(
                f"{self.server}/data/JSESSION did not return a session id; is this an XNAT server?",
                status=resp.status_code,
            )
        self._secrets.append(token)
        scrubber.register(token)
        self._jsession = token
        self._generation += 1
        log.debug("logged in to %s as %s", self.server, self.username)

    def _renew(self, seen_generation: int) -> None:
        with self._lock:
            if self._generation != seen_generation and self._jsession is not None:
                return  # another worker already renewed it
            log.info("XNAT session expired; logging in again")
            self._login_locked()

    def logout(self) -> None:
        """End the JSESSION on the server (``DELETE /data/JSESSION``); errors are ignored."""
        with self._lock:
            token, self._jsession = self._jsession, None
        if token is None:
            return
        try:
            self.session.delete(
                self.server + "/data/JSESSION",
                headers={"Cookie": f"JSESSIONID={token}"},
                verify=self.verify,
                timeout=(min(self.timeout, 30.0), min(self.timeout, 30.0)),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            log.debug("logout failed: %s", type(exc).__name__)

    def close(self) -> None:
        """Log out and close every pooled connection."""
        self.logout()
        self.session.close()

    # -- requests --------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        idempotent_retry: bool = True,
    ) -> requests.Response:
        """Send one request with the shared session; return the answer if below 400.

        ``path`` is relative to the server (``/data/...``) or a full URL on it. Redirects are not
        followed (XNAT's 301 from a commit carries the archive URI). With ``idempotent_retry``
        transient failures are retried under ``self.retry``; without it (streamed bodies that
        cannot be replayed here) they are raised at once as :class:`TransientError`.
        """
        if self._jsession is None:
            self.login()
        retry_number = 0
        while True:
            try:
                return self._request_once(method, path, params, data, headers, timeout)
            except TransientError as exc:
                if not idempotent_retry or retry_number >= self.retry.retries:
                    raise
                log.info(
                    "%s %s: %s; retrying (%d/%d)",
                    method,
                    path,
                    exc.message,
                    retry_number + 1,
                    self.retry.retries,
                )
                self.retry.wait(retry_number, exc.retry_after, sleep=self._sleep)
                retry_number += 1

    def _request_once(
        self,
        method: str,
        path: str,
        params: Params,
        data: Any,
        headers: Mapping[str, str] | None,
        timeout: float | None,
    ) -> requests.Response:
        renewed = False
        while True:
            generation = self._generation
            resp = self._send(
                method, path, params=params, data=data, headers=headers, timeout=timeout
            )
            if resp.status_code != 401:
                break
            if renewed:
                raise AuthError(f"{self.server} refused the renewed session of {self.username!r}")
            # The JSESSION expired or was evicted (section 2): log in again, resend once.
            self._renew(generation)
            renewed = True
        if resp.status_code >= 400:
            self._raise_for(resp)
        return resp

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Params = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        auth: tuple[str, str] | None = None,
        use_cookie: bool = True,
    ) -> requests.Response:
        url = path if path.startswith(("http://", "https://")) else self.server + path
        send_headers = dict(headers or {})
        token = self._jsession
        if use_cookie and token is not None:
            send_headers["Cookie"] = f"JSESSIONID={token}"
        read_timeout = self.timeout if timeout is None else timeout
        try:
            resp = self.session.request(
                method,
                url,
                params=params,
                data=data,
                headers=send_headers,
                auth=auth,
                verify=self.verify,
                timeout=(min(read_timeout, 30.0), read_timeout),
                allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            raise UnreachableError(
                f"TLS verification of {self.server} failed ({_short(exc)}); "
                "pass --ca-bundle FILE for a private CA"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            what = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
            message = f"{method} {_path_of(url)}: {what} ({_short(exc)})"
            if not self._reached:
                raise UnreachableError(f"cannot reach {self.server}: {_short(exc)}") from None
            raise TransientError(self._redact(message)) from None
        except requests.RequestException as exc:  # broken chunked answer, too many redirects...
            if not self._reached:
                raise UnreachableError(f"cannot reach {self.server}: {_short(exc)}") from None
            raise TransientError(f"{method} {_path_of(url)}: {_short(exc)}") from None
        self._reached = True
        return resp

    def _raise_for(self, resp: requests.Response) -> None:
        message = self._redact(
            error_message(
                resp.status_code,
                resp.text,
                resp.headers.get("Content-Type", ""),
                resp.reason or "",
            )
        )
        if is_transient(resp.status_code, message):
            raise TransientError(
                message,
                status=resp.status_code,
                retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            )
        if resp.status_code == 401:
            raise AuthError(f"{self.server}: {message}")
        raise ServerError(message, status=resp.status_code)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    # -- small endpoint helpers -------------------------------------------------------------

    def get_json(self, path: str, params: Params = None) -> Any:
        """GET ``path`` with ``format=json`` and decode it."""
        merged: dict[str, str | int | float | bool] = {"format": "json"}
        merged.update(params or {})
        resp = self.request("GET", path, params=merged)
        try:
            return resp.json()
        except ValueError:
            raise ServerError(
                f"{_path_of(resp.url)} did not answer JSON", status=resp.status_code
            ) from None

    def build_info(self) -> dict[str, Any]:
        """The server's version record (``GET /xapi/siteConfig/buildInfo``), a connection test."""
        info = self.request("GET", "/xapi/siteConfig/buildInfo").json()
        return dict(info) if isinstance(info, dict) else {"value": info}

    def issue_token(self) -> tuple[str, Secret]:
        """A new alias token (``GET /data/services/tokens/issue``): (alias, secret)."""
        data = self.get_json("/data/services/tokens/issue")
        try:
            alias, secret = str(data["alias"]), str(data["secret"])
        except (KeyError, TypeError):
            raise ServerError("the token service answered without alias/secret") from None
        self._secrets.append(secret)
        scrubber.register(secret)
        return alias, Secret(secret)

    def put_subject(self, project: str, subject: str) -> None:
        """Create the subject if missing (``PUT``: 201 created, 200 already there)."""
        self.request("PUT", f"/data/projects/{quote(project)}/subjects/{quote(subject)}")


def quote(segment: str) -> str:
    """One URL path segment (project, subject and session labels)."""
    return _quote(segment, safe="")


def _path_of(url: str) -> str:
    return urlsplit(url).path or "/"


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def _short(exc: BaseException) -> str:
    """A one-line cause for a requests/urllib3 exception, without its nested repr noise."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, requests.Timeout):
        return "no answer in time"
    text = str(exc)
    match = _ERRNO.search(text)
    if match:
        return match.group(1).strip()
    for phrase in (
        "Connection aborted",
        "Connection reset",
        "RemoteDisconnected",
        "Connection refused",
        "Name or service not known",
        "certificate verify failed",
    ):
        if phrase in text:
            return phrase
    return type(exc).__name__
