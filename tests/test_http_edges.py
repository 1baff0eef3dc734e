"""HTTP in front of XNAT (issue 11, item 9): redirects, login pages, plain web servers, context
paths, TLS mistakes, refused logins. Unit level with ``responses``; the TLS cases and the plain web
server run against real local servers (http.server, an ``ssl`` wrapped one).
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import responses

from upload_helpers import self_signed_certificate
from xnatio import __version__
from xnatio.errors import EXIT_USAGE, AuthError, ConfigError, ServerError, UnreachableError
from xnatio.retry import RetryPolicy
from xnatio.sandbox.pages import error_page
from xnatio.xnat.client import XnatClient
from xnatio.xnat.errors import NotXnatError, RedirectError

SERVER = "https://xnat.example.org"
PASSWORD = "pa55-w0rd-s3cret"
TOKEN = "C" * 32
PREARC = "/data/prearchive/projects/P/20260101_000000000/E"


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(
    server: str = SERVER, sleeps: list[float] | None = None, **kw: object
) -> XnatClient:
    return XnatClient(
        server,
        username="alice",
        password=PASSWORD,
        retry=RetryPolicy(retries=3, base=1.0, cap=8.0, rng=lambda: 0.5),
        sleep=(sleeps if sleeps is not None else []).append,
        **kw,  # type: ignore[arg-type]
    )


def login_ok(mocked: responses.RequestsMock, server: str = SERVER) -> None:
    mocked.add(responses.POST, f"{server}/data/JSESSION", body=TOKEN, content_type="text/plain")


# -- who we say we are, and where we send it ---------------------------------------------------


def test_user_agent_is_not_browser_like(mocked: responses.RequestsMock) -> None:
    """XNAT asks browser-like agents for a CSRF token even with Basic auth (facts 2)."""
    login_ok(mocked)
    mocked.add(responses.GET, f"{SERVER}/data/projects", json={})
    make_client().get_json("/data/projects")
    agents = {c.request.headers["User-Agent"] for c in mocked.calls}
    assert agents == {f"xnatio/{__version__}"}


def test_context_path_is_kept_for_every_request(mocked: responses.RequestsMock) -> None:
    base = "https://host.example.org/xnat"
    login_ok(mocked, base)
    mocked.add(responses.GET, f"{base}/data/projects/P", json={})
    mocked.add(responses.POST, f"{base}{PREARC}", body="/data/archive/x", status=301)
    mocked.add(responses.DELETE, f"{base}/data/JSESSION")
    with make_client(base + "/") as client:
        assert client.url_for("/data/x") == f"{base}/data/x"
        # A URI that already carries the context path is not prefixed twice.
        assert client.url_for("/xnat/data/x") == f"{base}/data/x"
        assert client.url_for("/xapi/x") == f"{base}/xapi/x"
        client.get_json("/data/projects/P")
        client.request("POST", PREARC, params={"action": "commit"})
    urls = [c.request.url or "" for c in mocked.calls]
    assert all(u.startswith(base + "/data/") for u in urls), urls


def test_session_cookie_is_never_sent_to_another_server(mocked: responses.RequestsMock) -> None:
    login_ok(mocked)
    client = make_client()
    with pytest.raises(ServerError, match=r"not under https://xnat\.example\.org"):
        client.request("GET", "https://elsewhere.example.org/data/projects")
    assert [c.request.url for c in mocked.calls] == [f"{SERVER}/data/JSESSION"]


# -- login: retried, and what a refusal means --------------------------------------------------


def test_login_is_retried_on_503_and_429(
    mocked: responses.RequestsMock, sleeps: list[float]
) -> None:
    url = f"{SERVER}/data/JSESSION"
    mocked.add(responses.POST, url, status=503, headers={"Retry-After": "2"})
    mocked.add(responses.POST, url, status=429)
    login_ok(mocked)
    client = make_client(sleeps=sleeps)
    client.login()
    assert client.logged_in
    assert sleeps == [2.0, 1.0]


def test_login_renewal_is_retried_after_a_connection_error(
    mocked: responses.RequestsMock, sleeps: list[float]
) -> None:
    login_ok(mocked)
    mocked.add(responses.GET, f"{SERVER}/data/projects", status=401)
    mocked.add(
        responses.POST, f"{SERVER}/data/JSESSION", body=requests.ConnectionError("reset by peer")
    )
    login_ok(mocked)
    mocked.add(responses.GET, f"{SERVER}/data/projects", json={"ok": 1})
    client = make_client(sleeps=sleeps)
    assert client.get_json("/data/projects") == {"ok": 1}
    assert len(sleeps) == 1


def test_session_cap_says_what_happened_and_what_to_do(mocked: responses.RequestsMock) -> None:
    mocked.add(
        responses.POST,
        f"{SERVER}/data/JSESSION",
        status=401,
        body=error_page(401, "Maximum sessions of 1000 for this principal exceeded"),
        content_type="text/html",
    )
    with pytest.raises(AuthError) as info:
        make_client().login()
    line = str(info.value)
    assert "limit of open sessions" in line and "1000" in line and "Wait" in line
    assert PASSWORD not in line and "\n" not in line


def test_locked_account_says_what_happened_and_what_to_do(mocked: responses.RequestsMock) -> None:
    mocked.add(
        responses.POST,
        f"{SERVER}/data/JSESSION",
        status=401,
        body=error_page(401, "User account is locked"),
        content_type="text/html",
    )
    with pytest.raises(AuthError) as info:
        make_client().login()
    assert "locked" in str(info.value) and "an hour" in str(info.value)


def test_a_wrong_password_is_still_just_refused(mocked: responses.RequestsMock) -> None:
    mocked.add(responses.POST, f"{SERVER}/data/JSESSION", status=401)
    with pytest.raises(AuthError, match="refused the credentials of user 'alice'"):
        make_client().login()


# -- not XNAT: plain web servers, login pages, redirects ---------------------------------------


def test_login_page_answering_200_is_not_a_session_id(mocked: responses.RequestsMock) -> None:
    mocked.add(
        responses.POST,
        f"{SERVER}/data/JSESSION",
        body="<!DOCTYPE html><html><head><title>Sign in</title></head></html>",
        content_type="text/html",
    )
    with pytest.raises(NotXnatError) as info:
        make_client().login()
    assert info.value.exit_code == EXIT_USAGE
    assert f"POST {SERVER}/data/JSESSION answered an HTML page" in str(info.value)


@pytest.mark.parametrize(
    ("location", "advice"),
    [
        ("https://xnat.example.org/data/JSESSION", "use --server https://xnat.example.org"),
        ("https://sso.example.org/login?next=/data/JSESSION", "a login page answered"),
        (
            "/xnat/data/JSESSION",
            "XNAT seems to be under /xnat: use --server http://xnat.example.org/xnat",
        ),
        ("http://other.example.org/", "not followed"),
    ],
)
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirected_login_is_an_error_naming_the_url(
    mocked: responses.RequestsMock, status: int, location: str, advice: str
) -> None:
    server = "http://xnat.example.org"
    mocked.add(
        responses.POST, f"{server}/data/JSESSION", status=status, headers={"Location": location}
    )
    with pytest.raises(RedirectError) as info:
        make_client(server).login()
    line = str(info.value)
    assert line.startswith(f"POST {server}/data/JSESSION was redirected (HTTP {status}) to ")
    assert advice in line
    assert "?next" not in line  # queries (tokens) are not echoed
    assert len(mocked.calls) == 1  # never followed


@pytest.mark.parametrize("status", [301, 302, 303, 307])
def test_redirected_import_is_never_taken_as_a_uri_list(
    mocked: responses.RequestsMock, status: int
) -> None:
    """Issue 11 item 9: a 3xx on import was read as session URIs ("archived as </html>")."""
    login_ok(mocked)
    mocked.add(
        responses.POST,
        f"{SERVER}/data/services/import",
        status=status,
        headers={"Location": f"{SERVER}/login"},
        body="<html><head></head><body>Moved</body></html>",
        content_type="text/html",
    )
    with pytest.raises(RedirectError) as info:
        make_client().request("POST", "/data/services/import", data=b"x", idempotent_retry=False)
    assert f"POST {SERVER}/data/services/import was redirected" in str(info.value)
    assert info.value.location == f"{SERVER}/login"


def test_html_200_where_data_is_expected_is_an_error(mocked: responses.RequestsMock) -> None:
    login_ok(mocked)
    mocked.add(
        responses.POST,
        f"{SERVER}/data/services/import",
        body="<html><body><form action='/login'></form></body></html>",
        content_type="text/html;charset=UTF-8",
    )
    with pytest.raises(NotXnatError, match="answered an HTML page"):
        make_client().request("POST", "/data/services/import", data=b"x")


def test_xnat_s_own_commit_301_and_archive_303_pass(mocked: responses.RequestsMock) -> None:
    """facts 3.3: commit on an auto-archive project → 301 text/plain, no Location; facts 3.4: the
    archive service → 303 to {siteUrl}/data/archive/… (the site URL may differ from ours)."""
    login_ok(mocked)
    archive = "/data/archive/projects/P/subjects/S/experiments/E"
    mocked.add(
        responses.POST, f"{SERVER}{PREARC}", status=301, body=archive, content_type="text/plain"
    )
    mocked.add(
        responses.POST,
        f"{SERVER}/data/services/archive",
        status=303,
        headers={"Location": "http://xnat-internal:8080" + archive},
    )
    client = make_client()
    assert client.request("POST", PREARC, params={"action": "commit"}).status_code == 301
    assert client.request("POST", "/data/services/archive").status_code == 303


def test_a_proxy_redirect_of_a_commit_is_an_error(mocked: responses.RequestsMock) -> None:
    login_ok(mocked)
    mocked.add(
        responses.POST,
        f"{SERVER}{PREARC}",
        status=302,
        headers={"Location": f"{SERVER}/app/template/Login.vm"},
    )
    with pytest.raises(RedirectError, match="login page"):
        make_client().request("POST", PREARC, params={"action": "commit"})


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def plain_web_server(tmp_path: Path) -> Iterator[str]:
    """Python's own http.server: a web server that is not XNAT (answers 501 to POST)."""
    handler = lambda *a: _Quiet(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_plain_web_server_is_not_xnat(plain_web_server: str) -> None:
    """Issue 11 item 9: it gave "error: Error response", exit 1."""
    with pytest.raises(NotXnatError) as info:
        make_client(f"http://{plain_web_server}/xnat").login()
    line = str(info.value)
    assert line.startswith(f"http://{plain_web_server}/xnat is not an XNAT server: ")
    assert f"POST http://{plain_web_server}/xnat/data/JSESSION answered HTTP 501" in line
    assert "Error response" not in line and info.value.exit_code == EXIT_USAGE


# -- TLS: each mistake says which it is --------------------------------------------------------


def test_https_to_a_plain_http_port_says_so(plain_web_server: str) -> None:
    with pytest.raises(UnreachableError) as info:
        make_client(f"https://{plain_web_server}/xnat").login()
    line = str(info.value)
    assert f"{plain_web_server} answered plain HTTP, not TLS" in line
    assert f"use --server http://{plain_web_server}/xnat" in line
    assert "--ca-bundle" not in line


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for another host name (other.example.org)."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(certificate: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    handler = lambda *a: _Quiet(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_unknown_ca_is_where_ca_bundle_is_the_fix(tls_server: str) -> None:
    with pytest.raises(UnreachableError) as info:
        make_client(f"https://{tls_server}").login()
    line = str(info.value)
    assert "signed by a CA this machine does not trust" in line and "--ca-bundle" in line


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # IP and DNS-name wordings
def test_a_hostname_mismatch_says_so(
    tls_server: str, certificate: tuple[Path, Path], host: str
) -> None:
    port = tls_server.rsplit(":", 1)[1]
    with pytest.raises(UnreachableError) as info:
        make_client(f"https://{host}:{port}", verify=str(certificate[0])).login()
    line = str(info.value)
    assert "hostname mismatch" in line and "--ca-bundle" not in line


def test_a_ca_bundle_that_is_not_pem_says_so(tls_server: str, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    with pytest.raises(UnreachableError, match=f"the CA bundle {bundle} holds no usable PEM"):
        make_client(f"https://{tls_server}", verify=str(bundle)).login()


def test_a_missing_ca_bundle_says_so(tls_server: str, tmp_path: Path) -> None:
    bundle = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=f"the CA bundle {bundle} does not exist"):
        make_client(f"https://{tls_server}", verify=str(bundle)).login()


@pytest.mark.parametrize("row_listed", [False, True])
def test_a_build_of_a_row_that_is_gone_is_not_retried(
    mocked: responses.RequestsMock, sleeps: list[float], row_listed: bool
) -> None:
    """XNAT answers a build of a missing prearchive row with 500 (facts 3.3), which looks like
    any transient error: after a 500 the row is looked up, and once it is gone (another request
    archived the session meanwhile) the build is not retried; the session is read back instead.
    A row still listed is retried as before."""
    import threading

    from xnatio.transports.rest.commit import Committer
    from xnatio.transports.rest.target import RestTarget

    login_ok(mocked)
    build = mocked.add(
        responses.POST, f"{SERVER}{PREARC}", status=500, body="Internal Server Error"
    )
    row = {"url": PREARC, "status": "READY"}
    mocked.add(
        responses.GET,
        f"{SERVER}/data/prearchive/projects/P",
        json={"ResultSet": {"Result": [row] if row_listed else []}},
    )
    mocked.add(responses.GET, f"{SERVER}/data/projects/P/subjects/S/experiments/E", json={})
    client = make_client(sleeps=sleeps)
    committer = Committer(
        client,
        RestTarget(project="P", subject="S", session="E", overwrite="append"),
        retry=RetryPolicy(retries=3, base=1.0, cap=8.0, rng=lambda: 0.5),
        cancel=threading.Event(),
        clock=lambda: 0.0,
        sleep=sleeps.append,
    )
    if row_listed:
        with pytest.raises(ServerError):
            committer.commit_session(PREARC)
        assert build.call_count == 4  # the first try and 3 retries
    else:
        assert (
            committer.commit_session(PREARC) == "/data/archive/projects/P/subjects/S/experiments/E"
        )
        assert build.call_count == 1
