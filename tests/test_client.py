"""XnatClient edge cases at the HTTP level, with ``responses`` (no network).

What the real server does end to end is covered against the sandbox in test_rest_upload.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import requests
import responses
from responses import matchers

from xnatio.errors import AuthError, ServerError, UnreachableError
from xnatio.retry import RetryPolicy
from xnatio.sandbox.pages import error_page
from xnatio.xnat.client import XnatClient
from xnatio.xnat.errors import TransientError, bad_member, error_message, is_transient

SERVER = "https://xnat.example.org"
PASSWORD = "pa55-w0rd-s3cret"
TOKEN1 = "A" * 32
TOKEN2 = "B" * 32


@pytest.fixture(autouse=True)
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sleeps: list[float]) -> XnatClient:
    return XnatClient(
        SERVER,
        username="alice",
        password=PASSWORD,
        retry=RetryPolicy(retries=3, base=1.0, cap=8.0, rng=lambda: 0.5),
        sleep=sleeps.append,
    )


def page(status: int, message: str) -> dict[str, object]:
    return {"status": status, "body": error_page(status, message), "content_type": "text/html"}


def add_login(mocked: responses.RequestsMock, *tokens: str) -> None:
    for token in tokens:
        mocked.add(responses.POST, f"{SERVER}/data/JSESSION", body=token, content_type="text/plain")


def test_login_uses_basic_once_then_the_session_cookie(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    add_login(mocked, TOKEN1)
    mocked.add(
        responses.GET,
        f"{SERVER}/data/projects",
        json={"ResultSet": {"Result": []}},
        match=[matchers.header_matcher({"Cookie": f"JSESSIONID={TOKEN1}"})],
    )
    assert client.get_json("/data/projects") == {"ResultSet": {"Result": []}}
    login, get = mocked.calls[0].request, mocked.calls[1].request
    assert login.headers["Authorization"].startswith("Basic ")
    assert "Authorization" not in get.headers
    assert get.url is not None and "format=json" in get.url


def test_401_renews_the_session_once_and_resends(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    add_login(mocked, TOKEN1, TOKEN2)
    url = f"{SERVER}/data/projects/P"
    mocked.add(
        responses.GET,
        url,
        status=401,
        match=[matchers.header_matcher({"Cookie": f"JSESSIONID={TOKEN1}"})],
    )
    mocked.add(
        responses.GET,
        url,
        json={"ok": 1},
        match=[matchers.header_matcher({"Cookie": f"JSESSIONID={TOKEN2}"})],
    )
    assert client.request("GET", "/data/projects/P").json() == {"ok": 1}
    assert [c.request.method for c in mocked.calls] == ["POST", "GET", "POST", "GET"]


def test_401_after_renewal_is_an_auth_error(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    add_login(mocked, TOKEN1, TOKEN2)
    mocked.add(responses.GET, f"{SERVER}/data/projects/P", status=401)
    with pytest.raises(AuthError):
        client.request("GET", "/data/projects/P")


def test_refused_login_names_the_user_not_the_password(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    mocked.add(
        responses.POST,
        f"{SERVER}/data/JSESSION",
        status=401,
        headers={"WWW-Authenticate": 'Basic realm="XNAT Protected Area"'},
    )
    with pytest.raises(AuthError) as info:
        client.login()
    assert "alice" in str(info.value)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(client)


def test_503_retry_after_is_honoured(
    client: XnatClient, mocked: responses.RequestsMock, sleeps: list[float]
) -> None:
    add_login(mocked, TOKEN1)
    url = f"{SERVER}/data/projects"
    mocked.add(responses.GET, url, headers={"Retry-After": "7"}, **page(503, "busy"))  # type: ignore[arg-type]
    mocked.add(responses.GET, url, status=502, body="bad gateway")
    mocked.add(responses.GET, url, json=[])
    client.request("GET", "/data/projects")
    # Retry-After wins for the first retry; the second falls back to jittered backoff (2 * 0.5).
    assert sleeps == [7.0, 1.0]


def test_transient_errors_give_up_after_the_policy(
    client: XnatClient, mocked: responses.RequestsMock, sleeps: list[float]
) -> None:
    add_login(mocked, TOKEN1)
    mocked.add(responses.GET, f"{SERVER}/data/x", **page(500, "NullPointerException"))  # type: ignore[arg-type]
    with pytest.raises(TransientError) as info:
        client.request("GET", "/data/x")
    assert info.value.status == 500
    assert info.value.message == "NullPointerException"
    assert len(sleeps) == 3


def test_not_idempotent_raises_transient_at_once(
    client: XnatClient, mocked: responses.RequestsMock, sleeps: list[float]
) -> None:
    add_login(mocked, TOKEN1)
    mocked.add(
        responses.POST,
        f"{SERVER}/data/services/import",
        **page(400, "Concurrent file sends of the same data is not supported."),
    )  # type: ignore[arg-type]
    with pytest.raises(TransientError):
        client.request("POST", "/data/services/import", data=b"x", idempotent_retry=False)
    assert sleeps == []


def test_transient_400_is_retried_and_other_400_is_final(
    client: XnatClient, mocked: responses.RequestsMock, sleeps: list[float]
) -> None:
    add_login(mocked, TOKEN1)
    url = f"{SERVER}/data/services/archive"
    mocked.add(
        responses.POST,
        url,
        **page(  # type: ignore[arg-type]
            423, "Duplicate archive attempt. Prearchive session already archiving."
        ),
    )
    mocked.add(responses.POST, url, **page(400, "Parameter dest format error"))  # type: ignore[arg-type]
    with pytest.raises(ServerError) as info:
        client.request("POST", "/data/services/archive")
    assert not isinstance(info.value, TransientError)
    assert info.value.status == 400
    assert info.value.message == "Parameter dest format error"
    assert len(sleeps) == 1


def test_error_page_message_and_status(client: XnatClient, mocked: responses.RequestsMock) -> None:
    add_login(mocked, TOKEN1)
    mocked.add(
        responses.GET,
        f"{SERVER}/data/projects/P/subjects/S/experiments/E",
        **page(404, "Unable to find the specified experiment."),
    )  # type: ignore[arg-type]
    with pytest.raises(ServerError) as info:
        client.get_json("/data/projects/P/subjects/S/experiments/E")
    assert (info.value.status, str(info.value)) == (404, "Unable to find the specified experiment.")


def test_secrets_are_redacted_from_server_messages(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    add_login(mocked, TOKEN1)
    mocked.add(
        responses.GET,
        f"{SERVER}/data/echo",
        **page(403, f"user alice with password {PASSWORD} and session {TOKEN1} denied"),
    )  # type: ignore[arg-type]
    with pytest.raises(ServerError) as info:
        client.request("GET", "/data/echo")
    text = str(info.value) + repr(info.value)
    assert PASSWORD not in text and TOKEN1 not in text
    assert "<hidden>" in text


def test_issued_token_is_a_secret_and_redacted(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    add_login(mocked, TOKEN1)
    mocked.add(
        responses.GET,
        f"{SERVER}/data/services/tokens/issue",
        json={"alias": "al-1", "secret": "tok-s3cret-value"},
    )
    mocked.add(responses.GET, f"{SERVER}/data/boom", **page(500, "bad tok-s3cret-value"))  # type: ignore[arg-type]
    alias, secret = client.issue_token()
    assert alias == "al-1" and secret.reveal() == "tok-s3cret-value"
    assert "tok-s3cret-value" not in repr(secret)
    client.retry = RetryPolicy(retries=0)
    with pytest.raises(ServerError) as info:
        client.request("GET", "/data/boom")
    assert "tok-s3cret-value" not in str(info.value)


def test_connection_refused_before_any_answer_is_unreachable(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    mocked.add(
        responses.POST,
        f"{SERVER}/data/JSESSION",
        body=requests.ConnectionError("[Errno 111] Connection refused"),
    )
    with pytest.raises(UnreachableError) as info:
        client.login()
    assert "xnat.example.org" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_connection_lost_after_reaching_the_server_is_retried(
    client: XnatClient, mocked: responses.RequestsMock, sleeps: list[float]
) -> None:
    add_login(mocked, TOKEN1)
    url = f"{SERVER}/data/projects"
    mocked.add(responses.GET, url, body=requests.ConnectionError("Connection reset by peer"))
    mocked.add(responses.GET, url, body=requests.exceptions.ReadTimeout("read timed out"))
    mocked.add(responses.GET, url, json=[])
    assert client.request("GET", "/data/projects").json() == []
    assert len(sleeps) == 2


def test_commit_redirect_is_not_followed(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    add_login(mocked, TOKEN1)
    archive = "/data/archive/projects/P/subjects/S/experiments/E"
    mocked.add(
        responses.POST,
        f"{SERVER}/data/prearchive/projects/P/20260101_000000000/E",
        status=301,
        headers={"Location": SERVER + archive},
        body=archive + "\r\n",
    )
    resp = client.request(
        "POST", "/data/prearchive/projects/P/20260101_000000000/E", params={"action": "commit"}
    )
    assert resp.status_code == 301
    assert len(mocked.calls) == 2


def test_logout_deletes_the_session(client: XnatClient, mocked: responses.RequestsMock) -> None:
    add_login(mocked, TOKEN1)
    mocked.add(responses.DELETE, f"{SERVER}/data/JSESSION", status=200)
    with client:
        assert client.logged_in
    assert not client.logged_in
    assert mocked.calls[-1].request.method == "DELETE"
    assert mocked.calls[-1].request.headers["Cookie"] == f"JSESSIONID={TOKEN1}"


def test_plain_http_to_a_remote_host_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="xnatio"):
        XnatClient("http://xnat.example.org", username="u", password=PASSWORD)
        XnatClient("http://127.0.0.1:8080", username="u", password=PASSWORD)
        XnatClient("http://localhost:8080", username="u", password=PASSWORD)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "xnat.example.org" in warnings[0] and PASSWORD not in warnings[0]


def test_credentials_in_the_url_are_refused() -> None:
    with pytest.raises(AuthError) as info:
        XnatClient(f"https://bob:{PASSWORD}@xnat.example.org", username="u", password="x")
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("status", "message", "transient"),
    [
        # Overload and gateways (a proxy's 504 while XNAT carries on, facts 7).
        (503, "anything", True),
        (429, "slow down", True),
        (502, "", True),
        (504, "", True),
        (500, "NullPointerException", True),
        # facts 1.4: GDI 370-379.
        (400, "Concurrent file sends of the same data is not supported.", True),
        # The archive races as PrearcSessionArchiver raises them (facts 1.4, 3.4).
        (
            409,
            "Session processing may already be in progress: Transfer.  Concurrent modification "
            "is discouraged.",
            True,
        ),
        (423, "Duplicate archive attempt. Prearchive session already archiving.", True),
        (423, "Duplicate archive attempt.  Destination session in use.", True),
        (403, "Operation already in progress on this prearchive entry.", True),
        (409, "session document locked", True),  # facts 3.3: a locked prearchive row
        # facts 1.4: DZI's in-request archive failure, cause dropped (maybe a race).
        (400, "unable to archive for the Prearchive session", True),
        # facts 3.4: the archive timed out waiting; the archive itself goes on.
        (500, "Session archive did not complete within the configured timeout interval.", True),
        # The archive's verdict is final with its text, unless a race failed it.
        (500, "FAILED: Invalid modification of session UID via archive process.", False),
        (500, "FAILED: Session already exists, retry with overwrite enabled", False),
        (500, "FAILED: Duplicate archive attempt. Prearchive session already archiving.", True),
        # Data errors (disk full and anonymization failures arrive so too, facts 1.4).
        (400, "unable to read DICOM object a/b.dcm", False),
        (400, "object DICOMDIR contains no SOP Class UID", False),
        (409, "Session already exists, retry with overwrite enabled", False),
        (409, "Invalid modification of session UID via archive process.", False),
        # A race text under a status XNAT does not send it with is not a race.
        (404, "Concurrent file sends of the same data is not supported.", False),
        (400, "Duplicate archive attempt. Prearchive session already archiving.", False),
        (403, "Invalid permissions for new project.", False),
        # Messages real XNAT never sends are no longer matched.
        (400, "Unable to lock session for archiving.", False),
        # No 507 reaches a client (facts 1.4): not transient.
        (507, "Insufficient storage", False),
    ],
)
def test_transient_classification(status: int, message: str, transient: bool) -> None:
    assert is_transient(status, message) is transient


def test_error_message_parsing() -> None:
    assert error_message(400, error_page(400, "a < b & c").decode(), "text/html") == "a < b & c"
    assert error_message(500, "<html><title>Oops</title><body>x</body></html>") == "Oops"
    assert error_message(502, "", "", "Bad Gateway") == "HTTP 502 Bad Gateway"
    assert error_message(400, "plain\n  text ") == "plain text"
    assert len(error_message(400, "x" * 5000)) == 500


def test_bad_member_names_the_archive_entry() -> None:
    assert bad_member("unable to read DICOM object series 1/a b.dcm") == "series 1/a b.dcm"
    assert bad_member("object DICOMDIR contains no SOP Class UID") == "DICOMDIR"
    assert bad_member("Session already exists") is None
