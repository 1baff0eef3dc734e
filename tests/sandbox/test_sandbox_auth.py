"""Authentication (facts §2): JSESSION idle timeout and expiry, alias tokens, buildInfo."""

from __future__ import annotations

import time

import pytest
import requests
from sandbox_helpers import client

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
    assert r.headers["WWW-Authenticate"] == 'Basic realm="XNAT Protected Area"'
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


def test_oldest_sessions_are_evicted_beyond_the_per_account_limit() -> None:
    from xnatio.sandbox.auth import MAX_SESSIONS_PER_USER, Authenticator

    auth = Authenticator({"u": "p"}, session_timeout=900)
    first = auth.new_session("u")
    others = [auth.new_session("u") for _ in range(MAX_SESSIONS_PER_USER)]
    assert auth.touch(first) is None  # evicted: a client holding it now gets 401
    assert auth.touch(others[0]) == "u" and auth.touch(others[-1]) == "u"
    assert auth.session_count() == MAX_SESSIONS_PER_USER
