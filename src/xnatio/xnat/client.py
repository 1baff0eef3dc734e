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
* any other error → :class:`~xnatio.errors.ServerError` with XNAT's own message and status;
* a 3xx XNAT does not send for that request (a proxy's http→https or login redirect) →
  :class:`~xnatio.xnat.errors.RedirectError`, never followed; a 2xx HTML page where XNAT answers
  data (a login page answering 200) → :class:`~xnatio.xnat.errors.NotXnatError` (both exit 2);
* TLS failures say which one it is: plain HTTP on an https URL, a certificate for another host
  name, an unknown CA (then ``--ca-bundle`` is the fix), a CA bundle that is missing or not PEM.

``server`` may carry XNAT's context path (``https://host/xnat``): every path the client sends
(``/data/...``, ``/xapi/...``) is joined under it, and an absolute URL must lie under it too (the
session cookie is never sent anywhere else).

Requests carry ``User-Agent: xnatio/<version>``: XNAT asks browser-like agents for a CSRF token
even with Basic auth, never this one (facts 2).

The password (and any alias-token secret) never appears in exceptions, logs or ``repr``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from http.cookiejar import DefaultCookiePolicy
from types import TracebackType
from typing import Any
from urllib.parse import quote as _quote
from urllib.parse import urljoin, urlsplit

import requests

from xnatio import __version__, defaults
from xnatio import redact as scrubber
from xnatio.adaptive import AdaptiveLimit, Slot
from xnatio.errors import AuthError, ConfigError, ServerError, UnreachableError
from xnatio.retry import Reachability, RetryPolicy, Sleep, parse_retry_after
from xnatio.settings import Secret, is_loopback
from xnatio.xnat.errors import (
    NotXnatError,
    RedirectError,
    TransientError,
    error_message,
    is_transient,
    redact,
)
from xnatio.xnat.inflight import CancelScope, CuttableAdapter, cuttable

log = logging.getLogger(__name__)

# Not browser-like, so XNAT never asks for a CSRF token (facts 2: XnatSecureGuard 92-106).
USER_AGENT = f"xnatio/{__version__}"
Params = Mapping[str, str | int | float | bool] | None


def on_this_machine(host: str) -> bool:
    """Whether every address ``host`` resolves to is this machine's own (loopback, or the
    address of one of its interfaces): a connection to it crosses no network link, and its
    receiver shares this machine's CPU. An address is this machine's when a socket can be bound
    to it (the kernel's own answer, any interface, IPv4 or IPv6); a name that does not resolve
    is not."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return False
    if not infos:
        return False
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((address[0], 0, *address[2:]))
        except OSError:
            return False  # EADDRNOTAVAIL: another machine's address
    return True


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
        timeout: float = defaults.REQUEST_TIMEOUT,
        pool_size: int = 10,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        sleep: Sleep | None = None,
        limiter: AdaptiveLimit | None = None,
    ) -> None:
        parts = urlsplit(server if "://" in server else "https://" + server)
        if parts.username or parts.password:
            # Credentials in the URL would end up in every error message; refuse them.
            raise AuthError("put credentials in --user/XNAT_PASSWORD, not in the server URL")
        self.server = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
        # scheme://host[:port] and XNAT's context path ("" or "/xnat"): see url_for().
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.context_path = parts.path.rstrip("/")
        self.username = username
        self._password = password if isinstance(password, Secret) else Secret(password)
        self.verify = verify
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep
        # An adaptive limit on this client's requests in flight (xnatio.adaptive), under the
        # pool's fixed cap; None: the pool alone limits them. Settable after construction.
        self.limiter = limiter
        self._secrets: list[str] = [self._password.reveal()]
        # Held for the CLI's log filter while this client is open; forgotten in close().
        scrubber.hold(self, *self._secrets)
        self._lock = threading.Lock()
        self._jsession: str | None = None
        self._generation = 0  # bumped at each (re)login so concurrent 401s renew only once
        self._reached = False  # the server answered at least once
        # Answers counted, so that requests waiting out a broken connection (a server
        # restarting) retry as soon as another request reaches it (xnatio.retry).
        self.reachability = Reachability(probe=self._probe)
        self.session = session if session is not None else requests.Session()
        # Its connections let a cancel cut the request waiting on them (xnatio.xnat.inflight).
        adapter = CuttableAdapter(
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
        if parts.scheme == "http" and not is_loopback(host):
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
        """Open the JSESSION all later requests use (``POST /data/JSESSION`` with Basic auth).

        Retried like any request on 429/5xx and on connection failures once the server has
        answered (facts 2: a login is also what a 1000-session cap or a locked account refuses).
        """
        with self._lock:
            self._login_locked()

    def _login_locked(self) -> None:
        retry_number = 0
        since: float | None = None  # the first failure: retried within the retry budget
        while True:
            try:
                self._login_once()
                return
            except TransientError as exc:
                since = self.retry.clock() if since is None else since
                if retry_number >= self.retry.retries or self.retry.left(since) <= 0:
                    raise
                log.info(
                    "login to %s: %s; retrying (%d/%d)",
                    self.server,
                    exc.message,
                    retry_number + 1,
                    self.retry.retries,
                )
                self.retry.wait(retry_number, exc.retry_after, sleep=self._sleep, since=since)
                retry_number += 1

    def _login_once(self) -> None:
        url = self.url_for("/data/JSESSION")
        resp = self._send(
            "POST",
            "/data/JSESSION",
            auth=(self.username, self._password.reveal()),
            timeout=min(self.timeout, 120.0),
            use_cookie=False,
        )
        status = resp.status_code
        if status in (401, 403):
            raise AuthError(self._refused_login(resp))
        if 300 <= status < 400:
            raise self._redirect_error("POST", url, resp)
        if status in (404, 405, 501):
            raise NotXnatError(
                f"{self.server} is not an XNAT server: POST {url} answered "
                f"HTTP {status} {resp.reason or ''}".rstrip()
                + "; check --server: XNAT's address including its context path, e.g. "
                "https://host/xnat"
            )
        if status >= 400:
            self._raise_for(resp)
        token = resp.text.strip()
        if _is_html(resp):
            raise NotXnatError(
                f"POST {url} answered an HTML page (a login page or a proxy?), not an XNAT "
                "session id; check --server: XNAT's own address including its context path"
            )
        if not token or len(token) > 200 or any(c.isspace() for c in token):
            raise NotXnatError(
                f"POST {url} did not return a session id; is {self.server} an XNAT server?"
            )
        self._secrets.append(token)
        scrubber.hold(self, *self._secrets)  # all of them: a client may log in again after close
        self._jsession = token
        self._generation += 1
        log.debug("logged in to %s as %s", self.server, self.username)

    def _message_of(self, resp: requests.Response) -> str:
        content_type = resp.headers.get("Content-Type", "")
        text = error_message(resp.status_code, resp.text, content_type, resp.reason or "")
        return self._redact(text)

    def _refused_login(self, resp: requests.Response) -> str:
        """What a refused login means, in one line (facts 2)."""
        message = self._message_of(resp)
        who = f"user {self.username!r}"
        if _SESSION_CAP.search(message):
            return (
                f"{self.server} refused a new session for {who}: the account has reached "
                "XNAT's limit of open sessions (1000 per user; old sessions are kept until "
                "they have been idle 15 minutes, facts 2). Wait, or ask the XNAT administrator "
                "to end them; scripts that log in with Basic auth on every request open one "
                f"session each (XNAT: {message})"
            )
        if _LOCKED.search(message):
            return (
                f"{self.server} refused {who}: the account is locked, XNAT locks it for an hour "
                "after 20 failed logins (facts 2). Wait an hour or ask the XNAT administrator "
                f"to unlock it, and check the password xio is given (XNAT: {message})"
            )
        return f"{self.server} refused the credentials of {who} (HTTP {resp.status_code})"

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
                self.url_for("/data/JSESSION"),
                headers={"Cookie": f"JSESSIONID={token}"},
                verify=self.verify,
                timeout=(min(self.timeout, 30.0), min(self.timeout, 30.0)),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            log.debug("logout failed: %s", type(exc).__name__)

    def close(self) -> None:
        """Log out, close every pooled connection and stop holding this client's secrets."""
        try:
            self.logout()
            self.session.close()
        finally:
            scrubber.forget(self)

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
        cancel: CancelScope | None = None,
    ) -> requests.Response:
        """Send one request with the shared session; return the answer if below 400.

        ``path`` is relative to the server (``/data/...``) or a full URL on it. Redirects are not
        followed, and only XNAT's own (a commit's 301, the archive service's 303, facts 3.3/3.4)
        are returned; any other 3xx raises :class:`RedirectError`, a 2xx HTML page
        :class:`NotXnatError`. With ``idempotent_retry``
        transient failures are retried under ``self.retry``; without it (streamed bodies that
        cannot be replayed here) they are raised at once as :class:`TransientError`.

        ``cancel`` (an :class:`xnatio.coordinator.Coordinator`): a cancel while the request is
        in flight shuts its connection down, also after the body has gone out and the answer is
        awaited, so the call ends at once with a connection error (the caller, which cancelled,
        knows why) instead of at the read timeout.
        """
        if self._jsession is None:
            self.login()
        retry_number = 0
        since: float | None = None  # the first failure: retried within the retry budget
        while True:
            try:
                with cuttable(cancel):
                    return self._request_once(method, path, params, data, headers, timeout)
            except TransientError as exc:
                since = self.retry.clock() if since is None else since
                if (
                    not idempotent_retry
                    or retry_number >= self.retry.retries
                    or self.retry.left(since) <= 0
                ):
                    raise
                log.info(
                    "%s %s: %s; retrying (%d/%d)",
                    method,
                    path,
                    exc.message,
                    retry_number + 1,
                    self.retry.retries,
                )
                self.retry.wait(
                    retry_number,
                    exc.retry_after,
                    sleep=self._sleep,
                    since=since,
                    reach=self.reachability if exc.status is None else None,
                )
                retry_number += 1

    def _probe(self) -> None:
        """One cheap request while others wait out a broken connection (xnatio.retry): any
        answer, whatever its status, means the server is back and wakes them."""
        try:
            self.session.request(
                "GET",
                self.url_for("/data/version"),
                timeout=(2.0, 5.0),
                verify=self.verify,
                allow_redirects=False,
            )
        except requests.RequestException:
            return
        self.reachability.answered()

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
        if 300 <= resp.status_code < 400 and not _xnat_redirect(path, resp):
            raise self._redirect_error(method, resp.request.url or self.url_for(path), resp)
        if resp.status_code < 300 and _is_html(resp) and resp.content.strip():
            raise NotXnatError(
                f"{method} {_display(resp.request.url or self.url_for(path))} answered an HTML "
                "page (a login page or a proxy?) where XNAT answers data; check --server: "
                "XNAT's own address including its context path"
            )
        return resp

    def on_this_machine(self) -> bool:
        """Whether this client's requests go to this machine without a proxy: the server's
        host is this machine's own (:func:`on_this_machine`) and no
        proxy (the session's, or the environment's ``HTTPS_PROXY``/``NO_PROXY``) takes them."""
        if self.session.proxies.get(urlsplit(self.origin).scheme):
            return False
        if self.session.trust_env and requests.utils.get_environ_proxies(self.origin):
            return False
        return on_this_machine(urlsplit(self.origin).hostname or "")

    def url_for(self, path: str) -> str:
        """The full URL of ``path`` on this server.

        ``/data/...`` and ``/xapi/...`` are joined under the context path (``--server
        https://host/xnat`` → ``https://host/xnat/data/...``); a path that already starts with
        the context path, or a full URL under ``server``, is used as it is. A full URL anywhere
        else is refused: the session cookie is for this server only.
        """
        if path.startswith(("http://", "https://")):
            if path == self.server or path.startswith(self.server + "/"):
                return path
            raise ServerError(
                f"refusing to send the XNAT session to {_display(path)}: it is not under "
                f"{self.server}"
            )
        if not path.startswith("/"):
            path = "/" + path
        ctx = self.context_path
        if ctx and (
            path == ctx or path.startswith(ctx + "/data/") or path.startswith(ctx + "/xapi/")
        ):
            return self.origin + path
        return self.server + path

    def _redirect_error(self, method: str, url: str, resp: requests.Response) -> RedirectError:
        location = resp.headers.get("Location", "")
        target = urljoin(url, location) if location else ""
        shown = _display(url)
        where = f" to {_display(target)}" if target else " (no Location)"
        sent, to = urlsplit(url), urlsplit(target)
        rel = sent.path[len(self.context_path) :]  # the path below XNAT's root, /data/...
        same_origin = (to.scheme, to.netloc) == (sent.scheme, sent.netloc)
        if target and to.netloc == sent.netloc and (sent.scheme, to.scheme) == ("http", "https"):
            fix = "the server wants https: use --server " + "https://" + self.server[7:]
        elif target and _LOGIN.search(to.path + "?" + to.query):
            fix = (
                "a login page answered, not XNAT's REST API (a single sign-on proxy?): check "
                "--server, or ask the site for the address scripts use"
            )
        elif same_origin and to.path.endswith(rel) and len(to.path) > len(sent.path):
            ctx = to.path[: len(to.path) - len(rel)]
            fix = f"XNAT seems to be under {ctx}: use --server {self.origin}{ctx}"
        else:
            fix = "not followed: check --server (XNAT's own address and context path)"
        return RedirectError(
            f"{method} {shown} was redirected (HTTP {resp.status_code}){where}; {fix}",
            url=shown,
            location=_display(target) if target else "",
            status=resp.status_code,
        )

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
        url = self.url_for(path)
        send_headers = dict(headers or {})
        token = self._jsession
        if use_cookie and token is not None:
            send_headers["Cookie"] = f"JSESSIONID={token}"
        read_timeout = self.timeout if timeout is None else timeout
        limiter = self.limiter
        try:
            with limiter.slot(_kind(method, url)) if limiter else _no_limit() as slot:
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
                slot.answered(resp.status_code, resp.headers.get("Retry-After"))
            self.reachability.answered()  # wakes requests waiting out a broken connection
        except requests.exceptions.SSLError as exc:
            raise UnreachableError(self._tls_problem(exc)) from None
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
        except OSError as exc:
            if "CA certificate bundle" not in str(exc):
                raise
            # requests raises a plain OSError for a --ca-bundle path that does not exist.
            raise ConfigError(
                f"the CA bundle {self.verify} does not exist; pass --ca-bundle the PEM file of "
                "the CA that signed the server's certificate"
            ) from None
        self._reached = True
        return resp

    def _tls_problem(self, exc: BaseException) -> str:
        """One line naming the TLS failure and its fix (--ca-bundle only where it is the fix)."""
        text = str(exc)
        parts = urlsplit(self.server)
        host = parts.hostname or self.server
        bundle = self.verify if isinstance(self.verify, str) else None
        if _PLAIN_HTTP.search(text):
            port = parts.port or 443
            return (
                f"{host}:{port} answered plain HTTP, not TLS: use --server "
                f"http://{parts.netloc}{self.context_path} or the port XNAT serves https on"
            )
        if _HOSTNAME.search(text):
            return (
                f"the TLS certificate of {host} is for another host name (hostname mismatch); "
                "use the name on the certificate in --server"
            )
        if "expired" in text:
            return f"the TLS certificate of {host} has expired; ask the site to renew it"
        if bundle is not None and _BAD_BUNDLE.search(text):
            return (
                f"the CA bundle {bundle} holds no usable PEM certificate; pass --ca-bundle the "
                "PEM file of the CA that signed the server's certificate"
            )
        if "certificate verify failed" in text:
            why = _VERIFY_REASON.search(text)
            reason = why.group(1).strip() if why else "untrusted certificate"
            if bundle is not None:
                return (
                    f"the TLS certificate of {host} is not signed by a CA in {bundle} ({reason}); "
                    "pass --ca-bundle the CA that signed it"
                )
            return (
                f"TLS verification of {host} failed ({reason}): its certificate is signed by a "
                "CA this machine does not trust; pass --ca-bundle FILE with the site's CA"
            )
        return f"TLS handshake with {self.server} failed ({_short(exc)})"

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

    def current_user(self) -> str:
        """The login these credentials stand for: an alias token's owner, not the alias UUID.

        ``GET /xapi/users/username`` answers ``text/plain`` with the session user's login
        (NrgXnat/xnat-web UsersApi.getUsername: ``getSessionUser().getUsername()``, any
        authenticated user); an alias token logs in as the user who issued it
        (AliasTokenAuthenticationProvider.retrieveUser loads ``token.getXdatUserId()``). The
        facts file is silent on this (facts 2 covers the token's issue only). An XNAT without
        the endpoint (404) answers "": the caller keeps the name it logged in with.
        """
        try:
            return self.request("GET", "/xapi/users/username").text.strip()
        except ServerError as exc:
            if exc.status in (404, 405):
                return ""
            raise

    def issue_token(self) -> tuple[str, Secret]:
        """A new alias token (``GET /data/services/tokens/issue``): (alias, secret)."""
        data = self.get_json("/data/services/tokens/issue")
        try:
            alias, secret = str(data["alias"]), str(data["secret"])
        except (KeyError, TypeError):
            raise ServerError("the token service answered without alias/secret") from None
        self._secrets.append(secret)
        scrubber.hold(self, secret)
        return alias, Secret(secret)

    def put_subject(self, project: str, subject: str) -> None:
        """Create the subject if missing (``PUT``: 201 created, 200 already there)."""
        self.request("PUT", f"/data/projects/{quote(project)}/subjects/{quote(subject)}")


# https:// to a port that speaks plain HTTP (OpenSSL 1.1/3.0, 3.2+, LibreSSL wordings).
_PLAIN_HTTP = re.compile(
    r"wrong.version.number|record layer failure|packet length too long|unknown protocol|"
    r"http request",
    re.IGNORECASE,
)
_HOSTNAME = re.compile(r"hostname mismatch|doesn't match|IP address mismatch", re.IGNORECASE)
_BAD_BUNDLE = re.compile(r"NO_CERTIFICATE_OR_CRL_FOUND|PEM lib|no certificate", re.IGNORECASE)
_VERIFY_REASON = re.compile(r"certificate verify failed: ([^(')\]]+)")
# Refused logins that are not a wrong password (facts 2). Spring Security's wordings for the
# session cap ("Maximum sessions of 1000 for this principal exceeded") and a locked account
# ("User account is locked"); XNAT's own pages may word them differently, so loosely.
_SESSION_CAP = re.compile(r"maximum (?:number of )?sessions|sessions? .{0,40}exceeded", re.I)
_LOCKED = re.compile(r"\blocked\b|account.{0,40}disabled", re.IGNORECASE)
# A redirect to a login page (a single sign-on proxy, XNAT's own web login for browsers).
_LOGIN = re.compile(r"login|signin|sign-in|sso|auth", re.IGNORECASE)
_HTML_START = re.compile(r"^\s*(?:<!doctype html|<html)", re.IGNORECASE)


@contextlib.contextmanager
def _no_limit() -> Iterator[Slot]:
    yield Slot()


def _kind(method: str, url: str) -> str:
    """Requests whose latencies compare, for the adaptive limit: ``POST /data/services/import``,
    ``GET /data/archive/projects``... (method and the first three segments of the path)."""
    return f"{method} /" + "/".join(_path_of(url).lstrip("/").split("/")[:3])


def _is_html(resp: requests.Response) -> bool:
    """An HTML page, which XNAT never answers with 2xx on the endpoints xnatio uses."""
    if "html" in resp.headers.get("Content-Type", "").lower():
        return True
    return bool(_HTML_START.match(resp.text[:200]))


def _xnat_redirect(path: str, resp: requests.Response) -> bool:
    """Is this 3xx one XNAT itself sends (and means as success)?

    ``action=commit`` on an auto-archive project and ``action=move`` answer 301 with the URI in
    a ``text/plain`` body and **no** Location (facts 3.3); the archive service answers 303 to
    ``{siteUrl}/data/archive/…`` when asked or for an auto-archive row (facts 3.4; ``siteUrl`` is
    the site's setting, so its host may differ from ``--server``). A commit answer that also
    carries a Location into the archive of the same server is taken as XNAT's too. Any other
    3xx (a Location elsewhere, an HTML body) comes from something in front of XNAT.
    """
    if _is_html(resp):
        return False
    request_path = urlsplit(path).path
    location = resp.headers.get("Location")
    if not location:
        return resp.status_code == 301 and "/prearchive/" in request_path
    into_archive = "/data/archive/" in urlsplit(location).path
    if request_path.endswith("/data/services/archive"):
        return resp.status_code == 303 and into_archive
    same_server = not urlsplit(location).netloc or (
        urlsplit(location).netloc == urlsplit(resp.request.url or "").netloc
    )
    return "/prearchive/" in request_path and into_archive and same_server


def _display(url: str) -> str:
    """A URL as shown to users: without its query (tokens, parameters) and fragment."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path


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
