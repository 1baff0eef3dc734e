"""Authentication (facts §2): JSESSION idle timeout and expiry, alias tokens, buildInfo."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from sandbox_helpers import client, h3

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration


def login(server: SandboxServer) -> dict[str, str]:
    r = requests.get(server.url + "/data/JSESSION", auth=(server.username, server.password))
    assert r.status_code == 200
    return {"JSESSIONID": r.text}


def test_cookie_expires_after_idle_timeout_but_basic_still_works(
    xnat_server: SandboxServer,
) -> None:
    xnat_server.set_knobs(session_timeout=0.3)
    cookies = login(xnat_server)
    assert requests.get(xnat_server.url + "/data/projects", cookies=cookies).status_code == 200
    time.sleep(0.6)
    r = requests.get(xnat_server.url + "/data/projects", cookies=cookies)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="XNAT"'  # facts 2: the site ID
    # An expired cookie next to valid Basic credentials: Basic wins and a new cookie is set.
    r = client(xnat_server).get(xnat_server.url + "/data/projects", cookies=cookies)
    assert r.status_code == 200
    assert "JSESSIONID=" in r.headers["Set-Cookie"]


def test_expire_sessions_knob(xnat_server: SandboxServer) -> None:
    cookies = login(xnat_server)
    r = requests.post(xnat_server.url + "/_sandbox/knobs", json={"expire_sessions": True})
    assert r.json()["expire_sessions"] is False  # one-shot
    assert requests.get(xnat_server.url + "/data/projects", cookies=cookies).status_code == 401


def test_alias_token_works_as_basic(xnat_server: SandboxServer) -> None:
    r = client(xnat_server).get(xnat_server.url + "/data/services/tokens/issue")
    assert r.status_code == 200
    token = r.json()
    auth = (token["alias"], token["secret"])
    assert requests.get(xnat_server.url + "/data/projects", auth=auth).status_code == 200
    bad = (token["alias"], token["secret"] + "x")
    assert requests.get(xnat_server.url + "/data/projects", auth=bad).status_code == 401


def test_build_info_and_whoami(xnat_server: SandboxServer) -> None:
    http = client(xnat_server)
    info = http.get(xnat_server.url + "/xapi/siteConfig/buildInfo").json()
    assert info["version"].startswith("1.8.")
    assert info["sandbox"] == "true"
    assert http.get(xnat_server.url + "/xapi/users/username").text == xnat_server.username


def test_no_credentials_is_401(xnat_server: SandboxServer) -> None:
    r = requests.post(xnat_server.url + "/data/services/import", data=b"x" * 10)
    assert r.status_code == 401


def test_form_login_as_xnatpy_does_it(xnat_server: SandboxServer) -> None:
    r = requests.put(
        xnat_server.url + "/data/services/auth",
        data={"username": xnat_server.username, "password": xnat_server.password},
    )
    assert r.status_code == 200 and len(r.text) == 32
    assert requests.get(xnat_server.url + "/data/projects", cookies={"JSESSIONID": r.text}).ok
    bad = requests.put(
        xnat_server.url + "/data/services/auth", data={"username": "admin", "password": "no"}
    )
    assert bad.status_code == 401


def test_session_cap_refuses_new_logins_and_keeps_old_sessions(tmp_path: Path) -> None:
    """Facts 2 (SecurityConfig.java:170-180, 298-304): every Basic request without a cookie opens
    a session; at the cap further logins get 401 and the old sessions keep working."""
    with SandboxServer(tmp_path / "d", users={"u": "p"}, max_sessions=3) as server:
        url = server.url + "/data/projects"
        cookies = [requests.get(url, auth=("u", "p")).cookies["JSESSIONID"] for _ in range(3)]
        assert len(set(cookies)) == 3  # one new HTTP session per cookie-less Basic request
        refused = requests.get(url, auth=("u", "p"))
        assert refused.status_code == 401
        assert "Maximum sessions of 3" in h3(refused)
        for sid in cookies:  # the old ones are kept
            assert requests.get(url, cookies={"JSESSIONID": sid}).status_code == 200
        # A cookie-authenticated /data/JSESSION names its session and opens none.
        jsession = requests.get(server.url + "/data/JSESSION", cookies={"JSESSIONID": cookies[1]})
        assert jsession.status_code == 200 and jsession.text == cookies[1]
        # Basic with one of its live cookies reuses that session: no new login needed.
        again = requests.get(url, auth=("u", "p"), cookies={"JSESSIONID": cookies[0]})
        assert again.status_code == 200 and "Set-Cookie" not in again.headers


def test_failed_logins_lock_the_account(tmp_path: Path) -> None:
    """Facts 2 (SCP:1573-1587, 1690-1691): N failed logins lock the account; then even the
    right password gets 401 until the lock expires."""
    with SandboxServer(
        tmp_path / "d", users={"u": "p"}, max_failed_logins=3, lockout_seconds=3600
    ) as server:
        url = server.url + "/data/projects"
        assert requests.get(url, auth=("u", "p")).status_code == 200
        for _ in range(3):
            assert requests.get(url, auth=("u", "wrong")).status_code == 401
        locked = requests.get(url, auth=("u", "p"))
        assert locked.status_code == 401
        assert h3(locked) == "User account is locked"
        server.auth.unlock("u")
        assert requests.get(url, auth=("u", "p")).status_code == 200


def test_a_success_resets_the_failure_count(tmp_path: Path) -> None:
    with SandboxServer(tmp_path / "d", users={"u": "p"}, max_failed_logins=2) as server:
        url = server.url + "/data/projects"
        for _ in range(3):
            assert requests.get(url, auth=("u", "wrong")).status_code == 401
            assert requests.get(url, auth=("u", "p")).status_code in (200, 401)
        server.auth.unlock("u")
        assert requests.get(url, auth=("u", "wrong")).status_code == 401
        assert requests.get(url, auth=("u", "p")).status_code == 200
        assert requests.get(url, auth=("u", "wrong")).status_code == 401
        assert requests.get(url, auth=("u", "p")).status_code == 200  # not 2 in a row


BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"


@pytest.mark.parametrize(
    ("agent", "needs_token"),
    [
        (BROWSER, True),
        ("", False),
        ("python-requests/2.32", False),
        ("Mozilla/5.0 XNATDesktopClient/1.3", False),
        ("Mozilla/5.0 (Java 17)", False),
        ("curl/8.5", False),
    ],
)
def test_csrf_for_browser_like_agents_even_with_basic(
    xnat_server: SandboxServer, agent: str, needs_token: bool
) -> None:
    """Facts 2 (XnatSecureGuard.java:92-106; SecureAction.java:185-220): POST/PUT/DELETE from a
    browser-like agent need XNAT_CSRF, even with Basic auth; the refusal is Restlet's 500."""
    url = xnat_server.url + "/data/projects/P/subjects/S_CSRF"
    auth = (xnat_server.username, xnat_server.password)
    r = requests.put(url, auth=auth, headers={"User-Agent": agent})
    assert r.status_code == (500 if needs_token else 201)
    assert requests.get(url, auth=auth, headers={"User-Agent": agent}).status_code == (
        404 if needs_token else 200
    )


def test_csrf_token_of_the_session_lets_a_browser_write(xnat_server: SandboxServer) -> None:
    http = requests.Session()
    http.headers["User-Agent"] = BROWSER
    http.auth = (xnat_server.username, xnat_server.password)
    r = http.get(xnat_server.url + "/data/auth", params={"csrf": "true"})
    assert r.status_code == 200 and "; XNAT_CSRF=" in r.text
    token = r.text.rsplit("=", 1)[1]
    url = xnat_server.url + "/data/projects/P/subjects/S_TOKEN"
    assert http.put(url).status_code == 500  # the session's token is missing
    assert http.put(url, params={"XNAT_CSRF": "0" * 32}).status_code == 500  # a wrong one
    assert http.put(url, params={"XNAT_CSRF": token}).status_code == 201
    # As a form field (request.getParameter reads the query string and the form body).
    form = http.put(url + "_FORM", data={"XNAT_CSRF": token})
    assert form.status_code == 201


def test_browser_without_credentials_is_sent_to_the_login_page(
    xnat_server: SandboxServer,
) -> None:
    r = requests.get(
        xnat_server.url + "/data/projects", headers={"User-Agent": BROWSER}, allow_redirects=False
    )
    assert r.status_code == 302
    assert r.headers["Location"].endswith("/app/template/Login.vm")
    page = requests.get(r.headers["Location"], headers={"User-Agent": BROWSER})
    assert page.status_code == 200 and "<form" in page.text
    script = requests.get(xnat_server.url + "/data/projects")
    assert script.status_code == 401 and script.headers["WWW-Authenticate"] == 'Basic realm="XNAT"'
