"""The HTTP side of the sandbox: a threaded HTTP/1.1 server speaking XNAT's REST dialect.

Routing is by regular expression on the path; every request goes through the same gate:
latency knob → fault knobs (hang / reset / fail) → authentication → handler. Errors become
XNAT's HTML status page (``pages.error_page``). Bodies are streamed to temporary files.
"""

from __future__ import annotations

import html
import json
import logging
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from xnatio.sandbox import routes
from xnatio.sandbox.access import Access
from xnatio.sandbox.auth import (
    LOCKOUT_SECONDS,
    MAX_FAILED_LOGINS,
    MAX_SESSIONS_PER_USER,
    Authenticator,
    Principal,
    is_browser,
)
from xnatio.sandbox.bodies import DRAIN_LIMIT, RECV_BUFFER, BodyReader, ConnectionAborted
from xnatio.sandbox.knobs import KnobBox, Knobs
from xnatio.sandbox.pages import REASONS, HttpError, error_page, login_page
from xnatio.sandbox.slots import Slots
from xnatio.sandbox.store import FileRecord, PrearcSession, Store
from xnatio.sandbox.workers import ImportWorkers

log = logging.getLogger("xnatio.sandbox")

SANDBOX_VERSION = "1.8.10"
LOGIN_PATH = "/app/template/Login.vm"


class Response:
    def __init__(
        self,
        status: int = 200,
        body: bytes | str = b"",
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
        file: Path | None = None,
        remove_file: bool = False,
    ) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = dict(headers or {})
        self.file = file
        self.remove_file = remove_file


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data), "application/json")


class Request:
    """What a route handler gets: parsed URL, parameters, identity and the body reader."""

    def __init__(self, handler: Handler, principal: Principal | None) -> None:
        split = urlsplit(handler.path)
        self.method = handler.command
        self.path = unquote(handler.xnat_path)
        self.params: dict[str, str] = dict(parse_qsl(split.query, keep_blank_values=True))
        self.headers = handler.headers
        self.body: BodyReader = handler.body
        self.principal = principal
        self.server: SandboxServer = handler.server.sandbox  # type: ignore[attr-defined]
        self._handler = handler
        form = self.content_type.lower().startswith("application/x-www-form-urlencoded")
        if form and not self.path.startswith("/_sandbox/"):  # curl -d sends JSON knobs as a form
            # Restlet merges form fields into the request parameters (xnatctl's archive call
            # sends src/overwrite this way).
            raw = b""
            while chunk := self.body.read():
                raw += chunk
                if len(raw) > 1 << 20:
                    raise HttpError(400, "Form body too large")
            for key, value in parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True):
                self.params.setdefault(key, value)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "") or ""

    def tmp_path(self, prefix: str) -> Path:
        return self.server._store().tmp_dir() / f"{prefix}-{uuid.uuid4().hex}"

    @property
    def plain_connection(self) -> bool:
        """The connection is not TLS (a test may wrap the listening socket in TLS; an import
        worker reads the socket's bytes as they come, so it can take plain ones only)."""
        return not isinstance(self._handler.connection, ssl.SSLSocket)

    def body_socket(self) -> tuple[socket.socket, bytes]:
        """The connection, and the bytes of the (untouched) body already in its read buffer,
        taken out of it: for an import worker that reads the body itself (``workers.py``)."""
        sock: socket.socket = self._handler.connection
        rfile = self._handler.rfile
        timeout = sock.gettimeout()
        sock.settimeout(0)  # peek gives what is buffered; a read that would wait gives nothing
        try:
            buffered = rfile.peek()  # type: ignore[attr-defined]
        except BlockingIOError:
            buffered = b""
        finally:
            sock.settimeout(timeout)
        if buffered:
            rfile.read(len(buffered))
        return sock, bytes(buffered)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "XNAT-sandbox"
    disable_nagle_algorithm = True
    rbufsize = RECV_BUFFER
    timeout = 300  # idle keep-alive connections are closed after this
    body: BodyReader
    xnat_path: str = ""  # the request's path inside the context path
    _inflight: int = 0  # requests in flight when this one arrived, itself included

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        # Requests in flight (for the peak-concurrency statistic and the load knobs): from the
        # parsed request line to the answer sent; sandbox administration is not counted.
        box: KnobBox = self.server.sandbox.knob_box  # type: ignore[attr-defined]
        if "/_sandbox/" in urlsplit(self.path).path:
            self._dispatch()
            return
        self._inflight = box.enter()
        try:
            self._dispatch()
        finally:
            box.leave()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    # -- the gate --------------------------------------------------------------------------
    def _dispatch(self) -> None:
        sandbox: SandboxServer = self.server.sandbox  # type: ignore[attr-defined]
        knobs = sandbox.knob_box
        raw_path = urlsplit(self.path).path
        path = sandbox.inside_context(raw_path)
        self.xnat_path = path if path is not None else raw_path
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        chunked = "chunked" in te
        reset_at: int | None = None
        admin = self.xnat_path.startswith("/_sandbox/")
        if not admin and knobs.take("reset_next", self.xnat_path):
            reset_at = max(1, length // 2) if length else (1 if not chunked else 1 << 16)
            if not length and not chunked:
                self._reset()
                return
        self.body = BodyReader(
            self.rfile,  # type: ignore[arg-type]
            length=length,
            chunked=chunked,
            throttle=knobs.throttle,
            reset_at=reset_at,
            on_reset=self._reset,
        )
        knobs.count("requests")
        knobs.count(f"{self.command} {routes.route_name(self.xnat_path)}")
        k = knobs.get()
        try:
            if k.latency_ms > 0 and not admin:
                time.sleep(k.latency_ms / 1000)
            if not admin and 0 < k.overload_inflight < self._inflight:
                self.body.drain()
                headers = {"Retry-After": str(int(k.retry_after))} if k.retry_after else {}
                raise HttpError(
                    503, "The server is overloaded (sandbox overload_inflight)", headers
                )
            if not admin and knobs.take("hang_next", self.xnat_path):
                time.sleep(k.hang_seconds)
                self._reset()
                return
            if not admin and knobs.take("fail_next", self.xnat_path):
                self.body.drain()
                headers = {}
                if k.retry_after is not None and k.fail_status in (429, 503, 301, 302):
                    headers["Retry-After"] = str(int(k.retry_after))
                raise HttpError(
                    k.fail_status, f"Injected failure ({k.fail_status}) by the sandbox", headers
                )
            if path is None:
                # Outside the context path: the servlet container's own 404 (no XNAT there).
                self.body.drain()
                response = Response(404, tomcat_404(raw_path), "text/html")
                self._finish_body(response)
                self._send(response)
                return
            if not admin:
                proxied = proxy_answer(sandbox, k, self.path)
                if proxied is not None:
                    self.body.drain()
                    self._finish_body(proxied)
                    knobs.count(f"status.{proxied.status}")
                    self._send(proxied)
                    return
            public = admin or path.rstrip("/") in ("/data/services/auth", LOGIN_PATH)
            principal = None if public else self._authenticate(sandbox)
            request = Request(self, principal)  # form fields join the parameters here
            if principal is not None:
                self._check_csrf(sandbox, principal, request.params)
            response = routes.handle(request)
            if principal is not None and principal.new_session:
                response.headers.setdefault(
                    "Set-Cookie",
                    f"JSESSIONID={principal.new_session}; Path={sandbox.cookie_path}; HttpOnly",
                )
        except ConnectionAborted as exc:
            log.debug("connection dropped: %s", exc)
            self.close_connection = True
            return
        except HttpError as exc:
            response = Response(exc.status, error_page(exc.status, exc.message), "text/html")
            response.headers.update(exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as exc:  # a bug: answer like XNAT does (500 + message), keep serving
            if sandbox.stopping:  # stop() closed the index under this in-flight request
                self.close_connection = True
                return
            log.exception("sandbox handler failed")
            response = Response(500, error_page(500, f"Internal error: {exc}"), "text/html")
        if not admin and knobs.take("drop_response_next", self.xnat_path):
            # The work is done (archived, imported...) but the answer is lost on the way.
            self._reset()
            return
        self._finish_body(response)
        knobs.count(f"status.{response.status}")
        knobs.count("bytes_in", self.body.bytes_read)
        try:
            self._send(response)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _authenticate(self, sandbox: SandboxServer) -> Principal:
        authorization = self.headers.get("Authorization")
        cookie = self._cookie()
        try:
            return sandbox.auth.authenticate(authorization, cookie)
        except HttpError as exc:
            if exc.status == 401 and not authorization and is_browser(self.headers["User-Agent"]):
                # Browsers without credentials are sent to the login page, scripts get the
                # Basic challenge (XnatAuthenticationEntryPoint.java:66-71).
                raise HttpError(302, "", {"Location": sandbox.login_page_url}) from None
            raise

    def _check_csrf(
        self, sandbox: SandboxServer, principal: Principal, params: dict[str, str]
    ) -> None:
        """Facts 2: POST/PUT/DELETE from a browser-like agent need the session's XNAT_CSRF
        token, Basic auth or not; the refusal reaches the client as a 500 (see auth.py)."""
        if self.command not in ("POST", "PUT", "DELETE"):
            return
        if not is_browser(self.headers.get("User-Agent")):
            return
        # request.getParameter("XNAT_CSRF"): the query string or a form field.
        given = params.get("XNAT_CSRF") or ""
        expected = sandbox.auth.csrf_token(principal.session)
        if expected is None or given.lower() != expected.lower():
            raise HttpError(500, "Internal Server Error")

    def _finish_body(self, response: Response) -> None:
        """Swallow what the handler did not read, so the connection can be kept alive."""
        try:
            if not self.body.drain(DRAIN_LIMIT):
                response.headers["Connection"] = "close"
                self.close_connection = True
        except (ConnectionAborted, HttpError, OSError):
            response.headers["Connection"] = "close"
            self.close_connection = True

    def _cookie(self) -> str | None:
        raw = self.headers.get("Cookie")
        if not raw:
            return None
        try:
            jar = SimpleCookie(raw)
        except CookieError:
            return None
        morsel = jar.get("JSESSIONID")
        return morsel.value if morsel else None

    def _send(self, r: Response) -> None:
        self.send_response(r.status, REASONS.get(r.status))
        ctype = r.content_type
        if ctype.startswith("text/") and "charset" not in ctype:
            ctype += ";charset=UTF-8"
        self.send_header("Content-Type", ctype)
        size = r.file.stat().st_size if r.file is not None else len(r.body)
        self.send_header("Content-Length", str(size))
        for name, value in r.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if r.file is not None:
            with r.file.open("rb") as f:
                if r.remove_file:
                    r.file.unlink()  # gone from the tmp dir even if the client hangs up
                while self.command != "HEAD" and (block := f.read(1 << 20)):
                    self.wfile.write(block)
        elif self.command != "HEAD":
            self.wfile.write(r.body)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a crashed proxy would."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


def normalize_context_path(value: str) -> str:
    """``xnat``, ``/xnat/`` → ``/xnat``; ``""`` and ``/`` → ``""`` (the root)."""
    value = value.strip().strip("/")
    if not value:
        return ""
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"Invalid context path: {value!r}")
    return "/" + value


def tomcat_404(path: str) -> bytes:
    """What a servlet container (or a proxy) answers for a path outside XNAT's context."""
    return (
        '<!doctype html><html lang="en"><head><title>HTTP Status 404 – Not Found</title>'
        "</head><body><h1>HTTP Status 404 – Not Found</h1><p><b>Type</b> Status Report</p>"
        f"<p><b>Message</b> {html.escape(path)}</p><p><b>Description</b> The origin server did "
        "not find a current representation for the target resource or is not willing to "
        "disclose that one exists.</p></body></html>"
    ).encode()


def proxy_answer(sandbox: SandboxServer, k: Knobs, raw: str) -> Response | None:
    """The redirect knobs (``redirect_status``/``redirect_to``, ``login_page``): what a proxy or
    single-sign-on front answers instead of XNAT, for requests under ``fault_path``."""
    inner = sandbox.inside_context(urlsplit(raw).path) or ""
    if not inner.startswith(k.fault_path):
        return None
    if k.login_page or (k.redirect_status and inner.startswith(LOGIN_PATH)):
        # (The login page itself answers, so a client that follows the redirect stops there.)
        return Response(200, login_page(sandbox.context_path), "text/html")
    if k.redirect_status:
        target = k.redirect_to.rstrip("/") + raw if k.redirect_to else sandbox.login_page_url
        return Response(k.redirect_status, b"", "text/html", {"Location": target})
    return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    sandbox: SandboxServer


class SandboxServer:
    """A local XNAT-compatible server (see the package docstring for what it implements).

    ``users`` maps user names to passwords (default ``{"admin": "admin"}``): the first one (and
    any named ``admin``) is a site admin, the others ordinary users with no project access.
    ``projects`` are created at start, owned by the first user (facts 1.2: an upload to a project
    that does not exist goes to Unassigned). ``session_timeout`` is the JSESSION idle timeout in
    seconds; ``max_sessions`` (XNAT: 1000), ``max_failed_logins`` (20) and ``lockout_seconds``
    (3600) are facts 2's login limits, also settable later on ``server.auth``. ``context_path``
    (e.g. ``/xnat``) serves everything under that prefix. ``site_anon`` and ``idle_seconds`` set
    the ``site_anonymization`` and ``build_idle_seconds`` knobs. ``import_workers`` (default 0)
    starts that many processes that read raw import bodies, so imports use more than one core
    (``workers.py``). ``start()`` returns once the
    socket listens; ``url`` is then ``http://HOST:PORT`` + the context path. Usable as a context
    manager. ``access`` (once started) holds projects, users and roles (``access.Access``).

    ``default_import_workers`` is what ``import_workers=None`` means (0; the test suite's
    ``--import-workers`` option sets it for a whole run).

    Test helpers read the store directly (no HTTP): ``archived_files``, ``prearchive_sessions``,
    ``experiment_labels``.
    """

    default_import_workers = 0

    def __init__(
        self,
        data_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        users: dict[str, str] | None = None,
        projects: Iterable[str] = (),
        knobs: Knobs | None = None,
        session_timeout: float = 900.0,
        context_path: str = "",
        max_sessions: int = MAX_SESSIONS_PER_USER,
        max_failed_logins: int = MAX_FAILED_LOGINS,
        lockout_seconds: float = LOCKOUT_SECONDS,
        site_anon: bool | None = None,
        idle_seconds: float | None = None,
        import_workers: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self._port = port
        self.users = dict(users) if users is not None else {"admin": "admin"}
        self.projects = list(projects)
        self.context_path = normalize_context_path(context_path)
        self.knob_box = KnobBox(knobs)
        # The default site anonymization script (facts 1.7) and XNAT's idle interval (3.2).
        if site_anon is not None:
            self.knob_box.set(site_anonymization=site_anon)
        if idle_seconds is not None:
            self.knob_box.set(build_idle_seconds=idle_seconds)
        self.auth = Authenticator(
            self._check_password,
            session_timeout,
            max_sessions=max_sessions,
            max_failed_logins=max_failed_logins,
            lockout_seconds=lockout_seconds,
        )
        if knobs is not None and knobs.session_timeout is not None:
            self.auth.session_timeout = knobs.session_timeout
        self.store: Store | None = None
        # The request threads take turns at importing files (slots.py): what each file's
        # import does is unchanged, only how many threads do it at once.
        self.import_slots = Slots()
        # Processes that read import bodies (workers.py); 0: every body in its request thread.
        if import_workers is None:
            import_workers = self.default_import_workers
        self.import_workers = max(0, import_workers)
        self.workers: ImportWorkers | None = None
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.version = SANDBOX_VERSION

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> SandboxServer:
        self.store = Store(self.data_dir)
        self._set_up_access(self.store.access)
        httpd = _HTTPServer((self.host, self._port), Handler)
        if self.import_workers:
            try:
                self.workers = ImportWorkers(self.import_workers).start()
            except BaseException:
                httpd.server_close()
                raise
        httpd.sandbox = self
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._stopping.clear()
        serve = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name=f"xnat-sandbox-{self._port}",
        )
        sweep = threading.Thread(target=self._sweep, daemon=True, name="xnat-sandbox-sweeper")
        self._threads = [serve, sweep]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        if self.store is not None:
            self.store.close()

    def serve_forever(self) -> None:
        """Block until ``stop()`` is called from another thread (or KeyboardInterrupt)."""
        while not self._stopping.wait(0.5):
            pass

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _set_up_access(self, access: Access) -> None:
        """The users and projects named at start (kept in the index, so they add to those of an
        earlier run). The first user of ``users`` is a site admin, and so is a user named
        ``admin``; the others are ordinary users with no access until given a project role."""
        for i, (login, password) in enumerate(self.users.items()):
            access.add_user(login, password, admin=i == 0 or login == "admin")
        admin = self.username
        for project in self.projects:
            access.create_project(project, owner=admin)
        for project in self.knob_box.get().auto_archive_projects:
            access.create_project(project, owner=admin)
            access.set_prearchive_code(project, 4)

    @property
    def access(self) -> Access:
        """Projects, users and roles (``access.Access``); the sandbox must be started."""
        return self._store().access

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def username(self) -> str:
        """The first configured user (the fixture's and the CLI's login)."""
        return next(iter(self.users))

    @property
    def password(self) -> str:
        return self.users[self.username]

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The XNAT URL clients use: ``http://HOST:PORT`` + the context path."""
        return f"http://{self.host}:{self._port}{self.context_path}"

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (outside the context path, where a proxy would sit)."""
        return f"http://{self.host}:{self._port}"

    @property
    def cookie_path(self) -> str:
        return self.context_path or "/"

    @property
    def login_page_url(self) -> str:
        return f"{self.url}{LOGIN_PATH}"

    def inside_context(self, path: str) -> str | None:
        """The path inside the context path (``/xnat/data/x`` → ``/data/x``), None if outside.
        Sandbox administration (``/_sandbox/``) answers at the root too."""
        if not self.context_path or path.startswith("/_sandbox/"):
            return path
        if path == self.context_path:
            return ""
        if path.startswith(self.context_path + "/"):
            return path[len(self.context_path) :]
        return None

    @property
    def site_anon(self) -> bool:
        """Whether the site-wide anonymization script is enabled (facts 1.7, 5): the
        ``site_anonymization`` knob, which the importer applies and the config endpoints show."""
        return self.knob_box.get().site_anonymization

    @site_anon.setter
    def site_anon(self, enabled: bool) -> None:
        self.knob_box.set(site_anonymization=enabled)

    def _check_password(self, user: str, password: str) -> bool:
        store = self.store
        return store is not None and store.access.check_password(user, password)

    # -- knobs -----------------------------------------------------------------------------
    @property
    def knobs(self) -> Knobs:
        """A snapshot of the live knobs."""
        return self.knob_box.get()

    def set_knobs(self, **fields: Any) -> Knobs:
        """Change knobs now, from any thread (``expire_sessions=True`` fires once)."""
        expire = fields.pop("expire_sessions", False)
        before = set(self.knob_box.get().auto_archive_projects)
        k = self.knob_box.set(**fields)
        if "auto_archive_projects" in fields and self.store is not None:
            # The knob is the project's prearchive code (facts 3.5): listed projects get 4
            # (created if missing), projects taken off the list go back to 0.
            access = self.store.access
            for project in before - set(k.auto_archive_projects):
                if access.canonical_project(project) is not None:
                    access.set_prearchive_code(project, 0)
            for project in k.auto_archive_projects:
                access.create_project(project, owner=self.username)
                access.set_prearchive_code(project, 4)
        if k.session_timeout is not None:
            self.auth.session_timeout = k.session_timeout
        if expire:
            self.auth.expire_all()
        return k

    def stats(self) -> dict[str, int]:
        return self.knob_box.stats_json()

    # -- test helpers ----------------------------------------------------------------------
    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError("the sandbox is not started")
        return self.store

    def archived_files(self, project: str, subject: str, label: str) -> dict[str, FileRecord]:
        """DICOM files archived in an experiment, by SOP Instance UID (empty if none)."""
        store = self._store()
        e = store.experiment(project, label)
        if e is None or (subject and subject not in (e.subject_label, e.subject_id)):
            return {}
        out = {}
        for f in store.files(e, resource="DICOM"):
            if f["sop_uid"]:
                out[f["sop_uid"]] = FileRecord(
                    name=f["path"],
                    size=f["size"],
                    md5=f["md5"],
                    series_number=f["series_number"] or "",
                    scan_id=f["scan_id"],
                    path=store.resource_dir(e, f["scan_id"], "DICOM") / f["path"],
                )
        return out

    def prearchive_sessions(self, project: str | None = None) -> list[PrearcSession]:
        """Prearchive sessions (all projects when ``project`` is None), oldest first."""
        return self._store().list_prearc(project)

    def prearchive_files(self, session: PrearcSession) -> dict[str, FileRecord]:
        """Files of a prearchive session, by SOP Instance UID."""
        store = self._store()
        folder = store.prearc_dir(session)
        return {
            r["sop_uid"]: FileRecord(
                name=r["name"],
                size=r["size"],
                md5=r["md5"],
                series_number=r["series_number"] or "",
                scan_id=r["scan"],
                path=folder / "SCANS" / r["scan"] / "DICOM" / r["name"],
            )
            for r in store.prearc_files(session.id)
        }

    def experiment_labels(self, project: str) -> list[str]:
        return [e.label for e in self._store().experiments(project)]

    # -- background ------------------------------------------------------------------------
    def _sweep(self) -> None:
        """XNAT's idle builder (facts 3.2), run every N/5 s (XNAT: 60 s for N = 300):
        ``Store.run_idle`` builds idle RECEIVING rows and archives them by the 3.2 rule."""
        last = 0.0
        while not self._stopping.wait(0.1):
            store = self.store
            k = self.knob_box.get()
            if store is None or time.monotonic() - last < k.build_idle_seconds / 5:
                continue
            last = time.monotonic()
            try:
                store.run_idle(k.build_idle_seconds, k.auto_archive_projects, k.build_ms)
            except Exception:  # never let the timer thread die
                if not self.stopping:
                    log.exception("sandbox idle builder failed")
