"""Pre-flight checks (facts 2, 3.5), unit level with ``responses`` answering as XNAT does.

End-to-end runs of the same checks against the local server are in test_preflight_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import responses
from responses import matchers

from xnatio.errors import EXIT_USAGE
from xnatio.preflight import (
    OTHER_SESSION_TYPE,
    PreflightError,
    check,
    check_labels,
    session_type,
)
from xnatio.retry import RetryPolicy
from xnatio.sandbox.pages import error_page
from xnatio.xnat.client import XnatClient

SERVER = "https://xnat.example.org"
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
PET = "1.2.840.10008.5.1.4.1.1.128"
UID = "1.2.3.4"


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.POST, f"{SERVER}/data/JSESSION", body="T" * 32)
        yield rsps


@pytest.fixture
def client() -> XnatClient:
    return XnatClient(SERVER, username="alice", password="secret", retry=RetryPolicy(retries=0))


def result_set(*rows: dict[str, str]) -> dict[str, Any]:
    return {"ResultSet": {"Result": list(rows), "totalRecords": str(len(rows))}}


def not_found(message: str = "Unable to find the specified experiment.") -> dict[str, Any]:
    return {"status": 404, "body": error_page(404, message), "content_type": "text/html"}


def xnat(
    mocked: responses.RequestsMock,
    *,
    project: str = "P",
    canonical: str = "P",
    create: tuple[str, ...] = ("P",),
    create_session: tuple[str, ...] | None = None,
    subjects: tuple[tuple[str, str], ...] = (),
    experiment: dict[str, Any] | None = None,
    experiments: tuple[str, ...] = (),
) -> None:
    """An XNAT holding ``canonical`` (reachable as ``project``) where we may create subjects in
    ``create`` and sessions in ``create_session`` (default: the same)."""
    if project:
        mocked.add(
            responses.GET,
            f"{SERVER}/data/projects/{project}",
            json={"items": [{"data_fields": {"ID": canonical, "secondary_ID": "Pee"}}]},
        )
    for data_type, ids in (
        ("xnat:subjectData", create),
        ("xnat:mrSessionData", create if create_session is None else create_session),
    ):
        mocked.add(
            responses.GET,
            f"{SERVER}/data/projects",
            match=[
                matchers.query_param_matcher(
                    {"permissions": "create", "dataType": data_type, "format": "json"}
                )
            ],
            json=result_set(*({"id": i, "secondary_id": i} for i in ids)),
        )
    mocked.add(
        responses.GET,
        f"{SERVER}/data/projects/{canonical}/subjects",
        json=result_set(*({"ID": i, "label": label} for label, i in subjects)),
    )
    url = f"{SERVER}/data/projects/{canonical}/experiments/E"
    if experiment is None:
        mocked.add(responses.GET, url, **not_found())  # type: ignore[arg-type]
    else:
        mocked.add(responses.GET, url, json={"items": [experiment]})
    mocked.add(
        responses.GET,
        f"{SERVER}/data/projects/{canonical}/experiments",
        json=result_set(*({"ID": f"X_{x}", "label": x} for x in experiments)),
    )


def run(client: XnatClient, subject: str = "S", label: str = "E", sop: str = MR) -> Any:
    return check(client, project="P", subject=subject, labels={UID: label}, sop_classes=[sop])


def refusal(client: XnatClient, **kw: Any) -> str:
    with pytest.raises(PreflightError) as info:
        run(client, **kw)
    assert info.value.exit_code == EXIT_USAGE
    line = str(info.value)
    assert "\n" not in line
    return line


# -- labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "session", "named"),
    [
        ("S", "MR.1", "'MR_1'"),
        ("S 01", "E", "'S_01'"),
        ("S", "a/b", "'a_b'"),
        ("S", "x(1)", "'x_1_'"),
    ],
)
def test_a_label_xnat_would_clean_is_refused_naming_xnat_s_label(
    subject: str, session: str, named: str
) -> None:
    with pytest.raises(PreflightError) as info:
        check_labels(subject, [session])
    assert named in str(info.value) and "facts 3.5" in str(info.value)


def test_labels_xnat_keeps_pass() -> None:
    check_labels("Sub-01_a", ["MR-1_b", "ñandú", 'q"!'])


def test_labels_are_checked_before_anything_is_sent(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    refusal(client, label="MR.1")
    assert len(mocked.calls) == 0


def test_session_type_follows_the_modality() -> None:
    assert session_type([MR, MR]) == "xnat:mrSessionData"
    assert session_type([CT, PET]) == "xnat:petSessionData"
    assert session_type(["1.2.840.10008.5.1.4.1.1.7"]) == OTHER_SESSION_TYPE


# -- project, permissions ----------------------------------------------------------------------


def test_ready_destination(client: XnatClient, mocked: responses.RequestsMock) -> None:
    xnat(mocked)
    found = run(client)
    assert (found.project, found.subject, found.subject_exists) == ("P", "S", False)
    assert found.session_type == "xnat:mrSessionData"
    assert [(s.label, s.exists) for s in found.sessions] == [("E", False)]
    assert found.notes == ()
    assert "session E: new" in found.describe()


def test_unknown_or_unreadable_project_is_refused(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    mocked.add(
        responses.GET,
        f"{SERVER}/data/projects/P",
        **not_found(),  # type: ignore[arg-type]
    )
    line = refusal(client)
    assert "project P does not exist" in line and "Unassigned" in line and "alice" in line


def test_an_alias_resolves_to_the_canonical_id(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, project="P", canonical="PROJ01", create=("PROJ01",))
    found = run(client)
    assert found.project == "PROJ01"
    assert found.notes == ("project P is an alias of PROJ01: using PROJ01",)


def test_a_project_we_can_read_but_not_write_is_refused(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, create=("OTHER",))
    line = refusal(client)
    assert "user alice may not create subjects (xnat:subjectData) in project P" in line


def test_creating_sessions_is_checked_for_the_session_type(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, create_session=())
    line = refusal(client)
    assert "may not create sessions (xnat:mrSessionData) in project P" in line


# -- subject -----------------------------------------------------------------------------------


def test_an_existing_subject_under_another_case_keeps_its_spelling(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, subjects=(("Sub01", "XNAT_S1"),))
    found = run(client, subject="SUB01")
    assert found.subject == "Sub01" and found.subject_exists
    assert found.notes == (
        "subject SUB01 exists as Sub01; XNAT matches subjects regardless of case (facts 3.5), "
        "so the session goes to Sub01",
    )


# -- session -----------------------------------------------------------------------------------


def experiment(
    uid: str, subject_id: str = "XNAT_S1", xsi: str = "xnat:mrSessionData"
) -> dict[str, Any]:
    return {
        "meta": {"xsi:type": xsi},
        "data_fields": {"ID": "XNAT_E1", "label": "E", "UID": uid, "subject_ID": subject_id},
    }


def test_an_existing_session_of_this_study_proceeds(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, subjects=(("S", "XNAT_S1"),), experiment=experiment(UID))
    (found,) = run(client).sessions
    assert found.exists and found.same_study and found.experiment_id == "XNAT_E1"


def test_another_study_under_an_existing_label_is_refused(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, subjects=(("S", "XNAT_S1"),), experiment=experiment("9.9.9"))
    line = refusal(client)
    assert "session E in project P already holds another study" in line
    assert "9.9.9" in line and UID in line and "another session label" in line


def test_an_existing_session_of_another_subject_is_refused(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(
        mocked, subjects=(("S", "XNAT_S1"), ("T", "XNAT_S2")), experiment=experiment(UID, "XNAT_S2")
    )
    assert "belongs to subject T, not S" in refusal(client)


def test_an_existing_session_of_another_modality_is_refused(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, subjects=(("S", "XNAT_S1"),), experiment=experiment(UID, xsi="xnat:ctSessionData"))
    assert "is an xnat:ctSessionData" in refusal(client)


def test_a_session_label_differing_only_in_case_is_refused(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, experiments=("e",))
    assert "holds session e, which differs from E only in case" in refusal(client)


def test_an_existing_session_without_uid_is_noted(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    xnat(mocked, subjects=(("S", "XNAT_S1"),), experiment=experiment(""))
    found = run(client)
    assert found.sessions[0].same_study is None
    assert "records no StudyInstanceUID" in found.notes[0]


# -- one round trip --------------------------------------------------------------------------


def test_the_project_reads_go_out_together() -> None:
    """After the project, the reads of steps 4-6 are in flight at once: each waits at a barrier
    for the other three, which a one-at-a-time check never reaches (BrokenBarrierError)."""
    import threading

    together = threading.Barrier(4, timeout=10)
    project = {"items": [{"data_fields": {"ID": "P"}}]}

    class Remote:
        logged_in = True
        username = "alice"
        server = SERVER

        def get_json(self, path: str, params: Any = None) -> Any:
            if path == "/data/projects/P":
                return project
            together.wait()
            if path == "/data/projects":
                return result_set({"id": "P"})
            if path == "/data/projects/P/subjects":
                return result_set({"ID": "XNAT_S1", "label": "S"})
            assert path == "/data/projects/P/experiments/E"
            return {"items": [experiment(UID)]}

    found = run(Remote())  # type: ignore[arg-type]
    (session,) = found.sessions
    assert session.exists and session.same_study and found.subject_exists


def test_with_several_refusals_the_first_in_the_order_of_the_checks_is_told(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    """Subjects may not be created, sessions may not be created, and the label holds another
    study: the answers arrive together, the subject's refusal is the one told (step 4 first)."""
    xnat(mocked, create=(), create_session=(), experiment=experiment("9.9.9"))
    assert "may not create subjects (xnat:subjectData)" in refusal(client)


def test_an_existing_subject_is_not_refused_for_the_right_to_create_subjects(
    client: XnatClient, mocked: responses.RequestsMock
) -> None:
    """The subject-creation right is asked for with the other reads, but judged only when the
    subject is new."""
    xnat(mocked, create=(), create_session=("P",), subjects=(("S", "XNAT_S1"),))
    (session,) = run(client).sessions
    assert not session.exists
