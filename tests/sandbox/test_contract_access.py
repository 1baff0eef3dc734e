"""Contract tests over real HTTP: one per row of facts sections 2 (authentication and pre-flight
checks), 3.5 (prearchive_code) and 5 (anonymization scripts), each citing the facts line it
checks (``shared/xnat-api.md``), plus the HTTP surface in front of XNAT (context path, proxy)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sandbox_helpers import h3

from xnatio.sandbox import SandboxServer

pytestmark = pytest.mark.integration

ADMIN, ADMIN_PW = "admin", "admin-pw"
USERS = {"owner": "o-pw", "member": "m-pw", "collab": "c-pw", "outsider": "x-pw"}
NOT_FOUND = "Unable to find the specified experiment."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxServer]:
    with SandboxServer(
        tmp_path_factory.mktemp("contract"),
        users={ADMIN: ADMIN_PW, **USERS},
        projects=["PRIV", "PROT", "PUB"],
    ) as srv:
        admin = http_as(srv, ADMIN)
        for project, access in (("PROT", "protected"), ("PUB", "public")):
            r = admin.put(f"{srv.url}/data/projects/{project}/accessibility/{access}")
            assert r.status_code == 200, r.text
        for user, group in (
            ("owner", "Owners"),
            ("member", "Members"),
            ("collab", "Collaborators"),
        ):
            r = admin.put(f"{srv.url}/data/projects/PRIV/users/{group}/{user}")
            assert r.status_code == 200, r.text
        yield srv


def http_as(server: SandboxServer, user: str) -> requests.Session:
    http = requests.Session()
    http.auth = (user, ADMIN_PW if user == ADMIN else USERS[user])
    return http


# -- facts 2: authentication -------------------------------------------------------------------
def test_bad_credentials_401_with_site_realm(server: SandboxServer) -> None:
    # facts 2, "Bad credentials → 401 … realm="{siteId}" (default XNAT)"
    r = requests.get(server.url + "/data/projects", auth=("owner", "nope"))
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="XNAT"'
    r = requests.get(server.url + "/data/projects")  # no credentials, non-browser agent
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="XNAT"'


def test_jsession_is_a_text_session_id(server: SandboxServer) -> None:
    # facts 2, "GET /data/JSESSION → text/plain session id" (UserSession.java:55-62)
    r = http_as(server, "member").get(server.url + "/data/JSESSION")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert len(r.text) == 32 and r.cookies["JSESSIONID"] == r.text


def test_alias_token_is_basic_credentials(server: SandboxServer) -> None:
    # facts 2, "GET /data/services/tokens/issue → JSON alias/secret" (AliasTokenRestlet:114-117)
    t = http_as(server, "member").get(server.url + "/data/services/tokens/issue").json()
    r = requests.get(server.url + "/data/projects/PRIV", auth=(t["alias"], t["secret"]))
    assert r.status_code == 200


def test_every_cookieless_basic_request_opens_a_session(server: SandboxServer) -> None:
    # facts 2, "Every Basic-auth request without a session cookie opens a new HTTP session"
    before = server.auth.session_count("collab")
    for _ in range(3):
        r = requests.get(server.url + "/data/projects", auth=("collab", USERS["collab"]))
        assert "JSESSIONID=" in r.headers["Set-Cookie"]
    assert server.auth.session_count("collab") == before + 3


def test_csrf_needed_from_browser_agents_even_with_basic(server: SandboxServer) -> None:
    # facts 2, "CSRF: POST/PUT/DELETE from browser-like UAs need XNAT_CSRF, even with Basic"
    url = server.url + "/data/projects/PRIV/subjects/CSRF1"
    browser = {"User-Agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Firefox/128.0"}
    assert http_as(server, "member").put(url, headers=browser).status_code == 500
    desktop = {"User-Agent": "Mozilla/5.0 XNATDesktopClient/1.3.3 Electron"}
    assert http_as(server, "member").put(url, headers=desktop).status_code == 201


# -- facts 2: the pre-flight checks (one test per row of the table) ----------------------------
@pytest.mark.parametrize(
    ("user", "project", "status"),
    [
        ("member", "PRIV", 200),
        ("collab", "PRIV", 200),
        (ADMIN, "PRIV", 200),
        ("outsider", "PRIV", 404),  # private, not a member
        ("outsider", "PROT", 200),  # protected: readable project (not its data)
        ("outsider", "PUB", 200),
        ("member", "NOPE", 404),  # missing
    ],
)
def test_get_project(server: SandboxServer, user: str, project: str, status: int) -> None:
    # facts 2 table, row 1: GET /data/projects/P?format=json → 200 items[0].data_fields if
    # readable (incl. public/protected non-member); 404 "Unable to find the specified
    # experiment." if missing or private (ProjectResource.java:76, 304-333)
    r = http_as(server, user).get(
        f"{server.url}/data/projects/{project}", params={"format": "json"}
    )
    assert r.status_code == status
    if status == 200:
        assert r.json()["items"][0]["data_fields"]["ID"] == project
    else:
        assert h3(r) == NOT_FOUND


@pytest.mark.parametrize(
    ("user", "right", "expected"),
    [
        ("owner", "create", ["PRIV"]),
        ("member", "edit", ["PRIV"]),
        ("collab", "create", []),  # collaborators read only
        ("outsider", "edit", []),
        (ADMIN, "create", ["PRIV", "PROT", "PUB"]),  # data admins get all
    ],
)
def test_project_list_by_permission(
    server: SandboxServer, user: str, right: str, expected: list[str]
) -> None:
    # facts 2 table, row 2: GET /data/projects?permissions=create&dataType=…&format=json → rows
    # {id, secondary_id} where the user has that right (ProjectListResource.java:499-520)
    r = http_as(server, user).get(
        server.url + "/data/projects",
        params={"permissions": right, "dataType": "xnat:subjectData", "format": "json"},
    )
    rows = r.json()["ResultSet"]["Result"]
    assert [row["id"] for row in rows] == expected
    assert all(set(row) == {"id", "secondary_id"} for row in rows)


def test_xapi_access_projects_lists_roles(server: SandboxServer) -> None:
    # facts 2 table, row 2: GET /xapi/access/projects lists group roles (DataAccessApi:69-78)
    rows = http_as(server, "collab").get(server.url + "/xapi/access/projects").json()
    assert [(r["project"], r["role"]) for r in rows] == [("PRIV", "collaborator")]
    assert http_as(server, "outsider").get(server.url + "/xapi/access/projects").json() == []


@pytest.mark.parametrize(
    ("user", "project", "status", "text"),
    [
        ("member", "PRIV", 201, None),
        ("owner", "PRIV", 200, None),  # the member's subject exists by then
        ("member", "NOPE", 422, "Submitted subject record must include the project attribute."),
        ("outsider", "PRIV", 422, "Submitted subject record must include the project attribute."),
        ("collab", "PRIV", 403, None),
        ("outsider", "PUB", 403, None),  # readable, but no create right
    ],
)
def test_put_subject(
    server: SandboxServer, user: str, project: str, status: int, text: str | None
) -> None:
    # facts 2 table, row 3: PUT /data/projects/P/subjects/S → 201 + subject ID (text/plain) new,
    # 200 existing; 422 "Submitted subject record must include the project attribute." if P
    # missing/unreadable; 403 without create right (SubjectResource.java:203-242, 264-272, 372)
    r = http_as(server, user).put(f"{server.url}/data/projects/{project}/subjects/SUBJ_PUT")
    assert r.status_code == status
    if status in (200, 201):
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.text.startswith("XNAT_S")
    if text:
        assert h3(r) == text


# -- facts 3.5: prearchive_code ----------------------------------------------------------------
def test_prearchive_code_get_and_put(server: SandboxServer) -> None:
    # facts 3.5, "GET /data/projects/P/prearchive_code → 0 prearchive, 4 auto-archive, 5
    # auto-archive + file overwrite" (ProjectResource.java:365-372; PrearchiveCode.java:19-21)
    owner = http_as(server, "owner")
    url = server.url + "/data/projects/PRIV/prearchive_code"
    assert owner.get(url).text == "0"
    for code in ("4", "5", "0"):
        assert owner.put(f"{url}/{code}").status_code == 200
        assert owner.get(url).text == code
        assert server.access.prearchive_code("PRIV") == int(code)
    assert owner.put(f"{url}/3").status_code == 400
    assert http_as(server, "member").put(f"{url}/4").status_code == 403  # owners only
    assert http_as(server, "outsider").get(url).status_code == 404


# -- facts 5: anonymization scripts -------------------------------------------------------------
def test_site_script_listing_and_contents(server: SandboxServer) -> None:
    # facts 5, "Site: GET /data/config/anon/script?format=json → ResultSet … status
    # enabled|disabled; ?contents=true → raw text, 404 if disabled" (CfgR:56, 87-285)
    http = http_as(server, "member")
    url = server.url + "/data/config/anon/script"
    row = http.get(url, params={"format": "json"}).json()["ResultSet"]["Result"][0]
    assert {"tool", "path", "project", "user", "create_date", "reason", "contents"} <= set(row)
    assert {"unversioned", "version", "status"} <= set(row)
    assert (row["tool"], row["path"], row["status"]) == ("anon", "script", "enabled")
    text = http.get(url, params={"contents": "true"})
    assert text.status_code == 200 and "(0010,0020) := session" in text.text
    server.site_anon = False
    try:
        row = http.get(url, params={"format": "json"}).json()["ResultSet"]["Result"][0]
        assert row["status"] == "disabled"
        assert http.get(url, params={"contents": "true"}).status_code == 404
        assert http.get(server.url + "/xapi/anonymize/site/enabled").json() is False
    finally:
        server.site_anon = True
    assert http.get(server.url + "/xapi/anonymize/site/enabled").json() is True


def test_site_script_off_at_start(tmp_path: Path) -> None:
    # facts 5 with the site script disabled (xio sandbox --no-site-anon): status "disabled",
    # ?contents=true → 404 (CfgR:87-285).
    with SandboxServer(tmp_path / "d", users={"u": "p"}, site_anon=False) as srv:
        url = srv.url + "/data/config/anon/script"
        rows = requests.get(url, auth=("u", "p"), params={"format": "json"}).json()
        assert rows["ResultSet"]["Result"][0]["status"] == "disabled"
        assert requests.get(url, auth=("u", "p"), params={"contents": "true"}).status_code == 404
        # A site admin switches it on (PUT …?status=enabled); the importer follows the knob.
        assert requests.put(url, auth=("u", "p"), params={"status": "enabled"}).status_code == 200
        assert srv.knobs.site_anonymization is True


def test_project_script(server: SandboxServer) -> None:
    # facts 5, "Project: GET /data/projects/P/config/anon/projects/P?format=json; 404 'The
    # requested project P does not exist.'; 403 'User U can not access project P'" (CfgR:108-122)
    def get(user: str, project: str, **params: str) -> requests.Response:
        url = f"{server.url}/data/projects/{project}/config/anon/projects/{project}"
        return http_as(server, user).get(url, params={"format": "json", **params})

    assert get("member", "PRIV").status_code == 404  # no project script
    assert get("member", "PRIV", **{"accept-not-found": "true"}).status_code == 204
    missing = get("member", "NOPE")
    assert (
        missing.status_code == 404 and h3(missing) == "The requested project NOPE does not exist."
    )
    denied = get("outsider", "PRIV")
    assert denied.status_code == 403 and h3(denied) == "User outsider can not access project PRIV"


def test_xapi_anonymize(server: SandboxServer) -> None:
    # facts 5, "GET /xapi/anonymize/site|site/enabled|projects/P|projects/P/enabled"
    http = http_as(server, "member")
    assert "(0010,0010) := subject" in http.get(server.url + "/xapi/anonymize/site").text
    assert http.get(server.url + "/xapi/anonymize/projects/PRIV/enabled").json() is False
    assert http.get(server.url + "/xapi/anonymize/projects/PRIV").status_code == 200
    assert (
        http_as(server, "outsider").get(server.url + "/xapi/anonymize/projects/PRIV").status_code
        == 403
    )


# -- projects and roles (issue 11: "Projects and users are real") --------------------------------
def test_only_admins_create_projects_and_owners_give_roles(server: SandboxServer) -> None:
    owner, admin = http_as(server, "owner"), http_as(server, ADMIN)
    assert owner.put(server.url + "/data/projects/NEWP").status_code == 403
    r = admin.put(server.url + "/data/projects/NEWP", params={"accessibility": "private"})
    assert r.status_code == 201
    assert server.access.canonical_project("NEWP") == "NEWP"
    assert admin.put(server.url + "/data/projects/NEWP").status_code == 200  # exists
    # ProjectMemberResource: 403 unless owner/admin, 404 for an unknown group.
    assert owner.put(server.url + "/data/projects/NEWP/users/Members/member").status_code == 404
    assert admin.put(server.url + "/data/projects/NEWP/users/Admins/member").status_code == 404
    assert admin.put(server.url + "/data/projects/NEWP/users/Members/member").status_code == 200
    member = http_as(server, "member")
    assert member.put(server.url + "/data/projects/NEWP/users/Owners/member").status_code == 403
    listing = admin.get(server.url + "/data/projects/NEWP/users").json()["ResultSet"]["Result"]
    assert {(r["login"], r["displayname"]) for r in listing} == {
        (ADMIN, "Owners"),
        ("member", "Members"),
    }


def test_project_found_by_alias(server: SandboxServer) -> None:
    # facts 3.5, "canonical project ID even for an alias" (UPC:246-281)
    admin = http_as(server, ADMIN)
    assert admin.put(server.url + "/data/projects/ALIASED", params={"alias": "AKA"}).ok
    r = admin.get(server.url + "/data/projects/AKA", params={"format": "json"})
    assert r.json()["items"][0]["data_fields"]["ID"] == "ALIASED"


# -- HTTP in front of XNAT (issue 11, item 9) --------------------------------------------------
def test_context_path_serves_everything_under_it_and_nothing_outside(tmp_path: Path) -> None:
    with SandboxServer(
        tmp_path / "d", users={"u": "p"}, projects=["P"], context_path="/xnat/"
    ) as srv:
        assert srv.url.endswith("/xnat")
        r = requests.get(srv.url + "/data/JSESSION", auth=("u", "p"))
        assert r.status_code == 200 and "Path=/xnat" in r.headers["Set-Cookie"]
        assert requests.get(srv.url + "/data/projects/P", auth=("u", "p")).status_code == 200
        outside = requests.get(srv.root_url + "/data/JSESSION", auth=("u", "p"))
        assert outside.status_code == 404
        assert "HTTP Status 404" in outside.text and "<h3>" not in outside.text
        assert (
            requests.get(srv.root_url + "/xnatx/data/projects", auth=("u", "p")).status_code == 404
        )
        # Sandbox administration answers inside and outside the context path.
        assert requests.get(srv.root_url + "/_sandbox/knobs").status_code == 200
        assert requests.get(srv.url + "/_sandbox/knobs").status_code == 200


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_knob(tmp_path: Path, status: int) -> None:
    with SandboxServer(tmp_path / "d", users={"u": "p"}) as srv:
        srv.set_knobs(redirect_status=status, redirect_to="https://127.0.0.1:1")
        r = requests.post(
            srv.url + "/data/services/import?x=1",
            data=b"abc",
            auth=("u", "p"),
            allow_redirects=False,
        )
        assert r.status_code == status
        assert r.headers["Location"] == "https://127.0.0.1:1/data/services/import?x=1"
        srv.set_knobs(redirect_status=0)
        assert requests.get(srv.url + "/data/projects", auth=("u", "p")).status_code == 200


def test_redirect_to_login_page_and_login_page_knob(tmp_path: Path) -> None:
    with SandboxServer(tmp_path / "d", users={"u": "p"}) as srv:
        srv.set_knobs(redirect_status=302, fault_path="/data/services")
        r = requests.post(srv.url + "/data/services/import", auth=("u", "p"), allow_redirects=False)
        assert r.status_code == 302 and r.headers["Location"].endswith("/app/template/Login.vm")
        # A client that follows it lands on the login page (200 HTML), not in a loop.
        followed = requests.post(srv.url + "/data/services/import", auth=("u", "p"))
        assert followed.status_code == 200 and 'type="password"' in followed.text
        assert requests.get(srv.url + "/data/projects", auth=("u", "p")).status_code == 200
        srv.set_knobs(redirect_status=0, login_page=True, fault_path="")
        r = requests.get(srv.url + "/data/JSESSION", auth=("u", "p"))
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
        assert "<form" in r.text and 'type="password"' in r.text


def test_basic_header_is_never_echoed(server: SandboxServer) -> None:
    secret = base64.b64encode(b"owner:nope").decode()
    r = requests.get(server.url + "/data/projects", headers={"Authorization": f"Basic {secret}"})
    assert r.status_code == 401 and secret not in r.text and "nope" not in r.text
