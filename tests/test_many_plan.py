"""Studies, plans and plan files of ``xio upload-many`` (xnatio.many.group and .plan).

Property tests on the grouping and the plan files, unit tests on the plan's rules, and tests on
synthetic trees on disk (xnatio.synth); one integration test sends two interleaved studies to
the local XNAT, each from its own plan row.
"""

from __future__ import annotations

import os
import random
import re
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnatio.errors import UsageError
from xnatio.many import (
    Plan,
    Status,
    Study,
    StudyPlan,
    build_plan,
    find_studies,
    read_plan,
    write_plan,
)
from xnatio.many.group import group_manifests, study_modality
from xnatio.many.plan import SAME_SESSION, SHARED_SUBJECT, parse_plan, plan_text
from xnatio.models import DicomFile, FileTable, Manifest, Phase, ProgressEvent
from xnatio.synth import generate_session

# Later than any file's ctime (which no test can set): only mtimes decide in the tests below
# that use it.
NOW = time.time() + 30 * 86400
SMALL = (8, 8)


def dicom_file(path: str, study: str, sop: str, series: str = "s1", mtime: float = 0) -> DicomFile:
    return DicomFile(
        path=Path(path),
        size=100,
        mtime_ns=int(mtime * 1e9),
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        series_number=1,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_id="P",
    )


def study(
    uid: str, attributes: dict[str, str], *, mtime: float = NOW - 3600, files: int = 2
) -> Study:
    s = Study(uid, folders=(Path("/data/out"),), attributes=attributes)
    s.files = FileTable(
        dicom_file(f"/data/out/{uid}.{i}", uid, f"{uid}.{i}", mtime=mtime) for i in range(files)
    )
    return s


def attrs(pid: str, date: str = "20260101", modality: str = "MR", **more: str) -> dict[str, str]:
    return {"PatientID": pid, "StudyDate": date, "Modality": modality, **more}


# -- grouping ------------------------------------------------------------------------------


@st.composite
def found_files(draw: st.DrawFn) -> list[list[DicomFile]]:
    """Files of up to 4 studies over up to 3 roots, some instances found twice (same SOP UID:
    a copy in another folder or root). A SOP Instance UID belongs to one study."""
    n_sops = draw(st.integers(1, 30))
    study_of = [draw(st.integers(0, 3)) for _ in range(n_sops)]
    copies = draw(st.lists(st.integers(0, n_sops - 1), max_size=8))
    roots = draw(st.integers(1, 3))
    out: list[list[DicomFile]] = [[] for _ in range(roots)]
    for n, sop in enumerate([*range(n_sops), *copies]):
        root = draw(st.integers(0, roots - 1))
        folder = draw(st.sampled_from(["a", "b", "a/x"]))
        out[root].append(
            dicom_file(f"/r{root}/{folder}/f{n}", f"study{study_of[sop]}", f"sop{sop}")
        )
    return out


def _manifests(groups: list[list[DicomFile]]) -> list[Manifest]:
    return [Manifest(root=Path(f"/r{i}"), files=list(files)) for i, files in enumerate(groups)]


def _shape(studies: list[Study]) -> dict[str, tuple[frozenset[str], int]]:
    return {
        s.study_uid: (frozenset(f.sop_instance_uid for f in s.files), len(s.duplicates))
        for s in studies
    }


@settings(max_examples=200, deadline=None)
@given(groups=found_files(), seed=st.integers(0, 2**32 - 1))
def test_grouping_partitions_the_files_whatever_order_they_are_found_in(
    groups: list[list[DicomFile]], seed: int
) -> None:
    studies, leftovers = group_manifests(_manifests(groups))
    everything = [f for g in groups for f in g]
    placed = [str(f.path) for s in studies for f in s.files]
    placed += [str(d.path) for s in studies for d in s.duplicates]
    placed += [str(d.path) for d in leftovers]
    assert sorted(placed) == sorted(str(f.path) for f in everything)  # each file exactly once
    for s in studies:
        assert {f.study_uid for f in s.files} == {s.study_uid}
        sops = [f.sop_instance_uid for f in s.files]
        assert len(sops) == len(set(sops))  # an instance is sent once
    assert {s.study_uid for s in studies} == {f.study_uid for f in everything}

    rng = random.Random(seed)
    shuffled = [rng.sample(g, len(g)) for g in groups]
    rng.shuffle(shuffled)
    again, _ = group_manifests(_manifests(shuffled))
    assert _shape(again) == _shape(studies)


def _everything(studies: list[Study]) -> list[tuple[object, ...]]:
    return [(s.study_uid, [str(f.path) for f in s.files], s.folders, s.duplicates) for s in studies]


@settings(max_examples=100, deadline=None)
@given(groups=found_files())
def test_grouping_one_discovered_root_without_an_index_is_the_same(
    groups: list[list[DicomFile]],
) -> None:
    """``unique=True`` (one root from discover(), whose files hold each SOP Instance UID once)
    groups by the study codes alone, with no index of the UIDs: the same studies, files, order
    and folders as grouping with the index (issue 16 item 4)."""
    files = [f for g in groups for f in g]
    firsts = list({f.sop_instance_uid: f for f in reversed(files)}.values())[::-1]
    table = FileTable(firsts)
    indexed, left = group_manifests([Manifest(root=Path("/r0"), files=table)])
    assert not left and sum(len(s.files) for s in indexed) == len(firsts)
    plain, left = group_manifests([Manifest(root=Path("/r0"), files=table)], unique=True)
    assert not left
    assert _everything(plain) == _everything(indexed)


def test_a_copy_under_another_study_uid_makes_no_empty_study() -> None:
    """The same SOP Instance UID under two StudyInstanceUIDs (a broken export): the first is
    sent, the copy is accounted for, and no study without files appears."""
    files = [[dicom_file("/r0/a", "A", "1")], [dicom_file("/r1/b", "B", "1")]]
    studies, leftovers = group_manifests(_manifests(files))
    assert [s.study_uid for s in studies] == ["A"]
    assert [str(d.path) for d in leftovers] == ["/r1/b"]
    assert "duplicate of /r0/a" in leftovers[0].reason


def test_a_study_keeps_its_folders_per_root() -> None:
    files = [
        [dicom_file("/r0/p1/s1/a", "A", "1"), dicom_file("/r0/p1/s2/b", "A", "2")],
        [dicom_file("/r1/x/c", "A", "3"), dicom_file("/r1/x/d", "B", "4")],
    ]
    studies, _ = group_manifests(_manifests(files))
    by = {s.study_uid: s for s in studies}
    assert by["A"].folders == (Path("/r0/p1"), Path("/r1/x"))
    assert by["B"].folders == (Path("/r1/x"),)
    (manifest,) = by["A"].manifests()
    assert manifest.root == Path("/") and len(manifest.files) == 3


@pytest.mark.parametrize(
    ("series", "files", "expected"),
    [
        ({"a": "MR", "b": "MR", "c": "PT"}, {}, "MR"),
        ({"a": "CT", "b": "PR", "c": "PR", "d": "SR"}, {}, "CT"),  # reports never name it
        ({"a": "SR"}, {}, "SR"),  # unless there is nothing else
        ({"a": "PT", "b": "CT"}, {"a": 300, "b": 10}, "PT"),  # a tie: more files
        ({"a": "PT", "b": "CT"}, {"a": 5, "b": 5}, "CT"),  # then alphabetical
        ({"a": ""}, {}, ""),
    ],
)
def test_the_modality_of_a_study_is_the_most_frequent_over_its_series(
    series: dict[str, str], files: dict[str, int], expected: str
) -> None:
    assert study_modality(series, files) == expected


# -- plan rules ----------------------------------------------------------------------------


def plan(*studies: Study, **kw: object) -> Plan:
    args: dict[str, object] = {
        "project": "PROJ",
        "subject": "{PatientID}",
        "session": "{PatientID}_{StudyDate}_{Modality}",
        "settle": 600.0,
        "now": NOW,
    }
    args.update(kw)
    return build_plan(list(studies), **args)  # type: ignore[arg-type]


def test_a_plan_row_per_study_with_cleaned_labels() -> None:
    p = plan(study("1.1", attrs("P 01", PatientName="Doe^Jane")), study("1.2", attrs("P02")))
    a, b = p.rows
    assert (a.project, a.subject, a.session, a.status) == (
        "PROJ",
        "P_01",
        "P_01_20260101_MR",
        Status.READY,
    )
    assert a.patient_name == "Doe^Jane" and a.study_date == "2026-01-01" and a.files == 2
    assert any("archived as 'P_01'" in w for w in a.warnings)
    assert (b.session, b.warnings) == ("P02_20260101_MR", ())
    assert p.study(a) is not None and p.ready == [a, b]


def test_two_studies_with_one_session_label_are_both_errors() -> None:
    """XNAT refuses a second StudyInstanceUID in a session (facts 1.5): never merged silently;
    labels that differ only in case count as the same."""
    p = plan(study("1.1", attrs("p01")), study("1.2", attrs("P01")), study("1.3", attrs("P02")))
    a, b, c = p.rows
    assert a.status is b.status is Status.ERROR and c.status is Status.READY
    assert a.reason.startswith(SAME_SESSION) and "facts 1.5" in a.reason
    assert "study 1.2;" in a.reason and "study 1.1;" in b.reason
    # Different projects do not clash.
    p = plan(
        study("1.1", attrs("P01", StudyDescription="A")),
        study("1.2", attrs("P01", StudyDescription="B")),
        project="{StudyDescription}",
    )
    assert [r.status for r in p.rows] == [Status.READY, Status.READY]


def test_one_subject_for_several_patients_is_a_warning() -> None:
    p = plan(
        study("1.1", attrs("P01", PatientName="Doe^Jane")),
        study("1.2", attrs("P02", PatientName="Doe^John")),
        subject="{PatientName[:3]}",
    )
    assert all(any(w.startswith(SHARED_SUBJECT) for w in r.warnings) for r in p.rows)
    assert all(r.status is Status.READY for r in p.rows)


def test_a_missing_attribute_is_that_studys_error_and_others_go_on() -> None:
    p = plan(study("1.1", attrs("P01")), study("1.2", {"PatientID": "P02", "Modality": "MR"}))
    a, b = p.rows
    assert a.status is Status.READY
    assert b.status is Status.ERROR and b.session == "" and b.subject == "P02"
    assert b.reason == "StudyDate is missing (template field {StudyDate})"


def test_an_unreadable_first_instance_says_so() -> None:
    s = study("1.1", {"Modality": "MR"})
    s.attributes_error = "/data/out/x: its header could not be read by pydicom (boom)"
    (row,) = plan(s).rows
    assert row.status is Status.ERROR and "could not be read by pydicom (boom)" in row.reason


def test_a_bad_template_stops_before_any_row() -> None:
    with pytest.raises(UsageError, match=re.escape("--session template '{PatientNmae}'")):
        plan(study("1.1", attrs("P01")), session="{PatientNmae}")


@pytest.mark.parametrize(
    ("age", "status", "reason"),
    [
        (601.0, Status.READY, ""),
        (599.0, Status.SETTLING, "changed 9m 59s ago, less than the settle time (10m)"),
        (-120.0, Status.SETTLING, "dated 2m in the future"),
    ],
)
def test_a_study_changed_less_than_settle_ago_waits(
    age: float, status: Status, reason: str
) -> None:
    (row,) = plan(study("1.1", attrs("P01"), mtime=NOW - age)).rows
    assert row.status is status and reason in row.reason


def test_an_error_wins_over_settling() -> None:
    (row,) = plan(study("1.1", {"Modality": "MR"}, mtime=NOW)).rows
    assert row.status is Status.ERROR


# -- plan files ----------------------------------------------------------------------------

line_text = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12),
    st.text(alphabet="=+-@'a ", max_size=4),  # what spreadsheets take for formulas
).map(str.strip)
rows_strategy = st.builds(
    StudyPlan,
    study_uid=st.from_regex(r"1\.2\.[0-9]{1,6}", fullmatch=True),
    project=line_text,
    subject=line_text,
    session=line_text,
    patient_id=line_text,
    patient_name=line_text,
    study_date=line_text,
    modality=line_text,
    series=st.integers(0, 10**4),
    files=st.integers(0, 10**6),
    bytes=st.integers(0, 10**13),
    folders=st.lists(line_text.filter(bool).map(lambda t: Path("/d") / t), max_size=3).map(tuple),
    newest_mtime=st.integers(0, 4 * 10**15).map(lambda us: us / 1e6),
    status=st.sampled_from(list(Status)),
    reason=line_text,
    warnings=st.lists(line_text.filter(bool), max_size=3).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(rows_strategy, max_size=5, unique_by=lambda r: r.study_uid), jsonl=st.booleans()
)
def test_a_plan_written_and_read_back_is_the_same_plan(rows: list[StudyPlan], jsonl: bool) -> None:
    text = plan_text(rows, jsonl=jsonl)
    if not rows and jsonl:
        with pytest.raises(UsageError, match="is empty"):
            parse_plan(text, name="plan.jsonl", jsonl=True)
        return
    back = [row for _, row in parse_plan(text, name="plan", jsonl=jsonl)]
    assert back == rows


def test_a_csv_plan_never_hands_a_spreadsheet_a_formula() -> None:
    """A Patient Name from a hostile export stays text in a spreadsheet, and reads back as is."""
    row = StudyPlan("1.2", "P", "S", "E", patient_name='=HYPERLINK("http://x","y")')
    text = plan_text([row], jsonl=False)
    assert ",\"'=HYPERLINK" in text
    assert ",=" not in text and ',"=' not in text
    assert parse_plan(text, name="p.csv", jsonl=False)[0][1] == row


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "plan.csv is empty"),
        ("study_uid,project,subject,session\n", "line 1: column 'folders' is missing"),
        ("study_uid,project,subject,session,folders,colour\n", "line 1: unknown column 'colour'"),
        ("study_uid,project,subject,session,folders\n1.2,P,S,E\n", "line 2: 4 cells where"),
        (
            "study_uid,project,subject,session,folders\n1.2,P,S,E,/d\n1.2,P,S,F,/d\n",
            "line 3: study 1.2 is already on line 2",
        ),
        (
            "study_uid,status,project,subject,session,folders\n1.2,done,P,S,E,/d\n",
            "line 2: status 'done'",
        ),
        (
            "study_uid,project,subject,session,folders,files\n1.2,P,S,E,/d,many\n",
            "line 2: files must be a whole number",
        ),
        ("study_uid,project,subject,session,folders\n,P,S,E,/d\n", "line 2: study_uid is empty"),
        ('study_uid,project,subject,session,folders\n"1.2,P,S,E,/d\n', "not valid CSV"),
    ],
)
def test_a_malformed_csv_plan_is_one_usage_line_naming_the_line(text: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem.replace("(", r"\(")) as err:
        parse_plan(text, name="plan.csv", jsonl=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"study_uid": "1.2"}\nnot json\n', "line 1: column 'project' is missing"),
        (
            '{"study_uid":"1.2","project":"P","subject":"S","session":"E","folders":[]}\n{oops\n',
            "line 2: not valid JSON",
        ),
        ("[1, 2]\n", "line 1: a plan line is a JSON object"),
        (
            '{"study_uid":"1.2","project":"P","subject":"S","session":"E","folders":"/d"}\n',
            "line 1: folders must be a list",
        ),
        (
            '{"study_uid":"1.2","project":7,"subject":"S","session":"E","folders":[]}\n',
            "line 1: project must be text",
        ),
    ],
)
def test_a_malformed_jsonl_plan_is_one_usage_line_naming_the_line(text: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem):
        parse_plan(text, name="plan.jsonl", jsonl=True)


def test_plan_files_are_private_and_written_whole(tmp_path: Path) -> None:
    target = tmp_path / "plan.csv"
    target.write_text("old")
    target.chmod(0o644)
    p = plan(study("1.1", attrs("P01")))
    write_plan(p, target)
    assert target.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["plan.csv"]  # no temporary file left behind
    write_plan(p, tmp_path / "plan.jsonl")
    assert (tmp_path / "plan.jsonl").stat().st_mode & 0o777 == 0o600
    with pytest.raises(UsageError, match="cannot write plan"):
        write_plan(p, tmp_path / "plan.csv" / "inside-a-file.csv")


# -- synthetic trees on disk ---------------------------------------------------------------


def age(path: Path, seconds: float) -> None:
    """Make every file under ``path`` last modified ``seconds`` before NOW."""
    for p in [path, *path.rglob("*")]:
        os.utime(p, (NOW - seconds, NOW - seconds))


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Path]:
    """An export of several patients and studies: P01 has two studies and P02 one, all three in
    the same series folders (S001, S002: files of different studies interleaved), a text side
    file, a study in another root, a study without StudyDate, one whose label XNAT cleans."""
    out = tmp_path / "outbox"
    generate_session(
        out,
        series=2,
        instances=3,
        patient_id="P01",
        seed=1,
        image_size=SMALL,
        header={"StudyDate": "20250102", "StudyDescription": "NEURO^Brain"},
    )
    generate_session(
        out,
        series=1,
        instances=2,
        patient_id="P01",
        seed=2,
        image_size=SMALL,
        modality="CT",
        header={"StudyDate": "20250301"},
    )
    generate_session(
        out, series=2, instances=2, patient_id="P02", seed=3, image_size=SMALL, extras=["txt"]
    )
    generate_session(
        tmp_path / "late",
        series=1,
        instances=2,
        patient_id="P 03.x",
        seed=4,
        image_size=SMALL,
        header={"StudyDate": None},
    )
    (out / "S001" / "Thumbs.db").write_bytes(b"\x00" * 64)
    age(tmp_path, 3600)
    yield tmp_path


def test_find_studies_groups_an_interleaved_export(outbox: Path) -> None:
    events: list[ProgressEvent] = []
    found = find_studies([outbox / "outbox", outbox / "late"], progress=events.append)
    reads = [e for e in events if "header attributes of 4 studies" in e.message]
    # One read per series: a study's first instance is its first series' first file.
    assert reads and reads[-1].current == reads[-1].total == 6
    assert all(e.phase is Phase.DISCOVER for e in events)
    assert [(s.patient_id, s.modality, s.file_count, s.series_count) for s in found.studies] == [
        ("P 03.x", "MR", 2, 1),
        ("P01", "MR", 6, 2),
        ("P01", "CT", 2, 1),
        ("P02", "MR", 4, 2),
    ]
    assert sorted(p.name for p in (s.path for s in found.skipped)) == ["Thumbs.db", "notes.txt"]
    assert all(s.reason for s in found.skipped)
    p01 = found.studies[1]
    assert p01.folders == (outbox / "outbox",)  # S001 and S002, shared with other studies
    assert p01.attributes["StudyDescription"] == "NEURO^Brain"
    assert p01.attributes["PatientName"] == "Synthetic^P01"
    (manifest,) = p01.manifests()
    assert {f.study_uid for f in manifest.files} == {p01.study_uid} and len(manifest.files) == 6
    assert found.file_count == 14


def test_a_plan_of_an_interleaved_export(outbox: Path) -> None:
    # One more study, still being written: its newest file is 30 s old.
    generate_session(
        outbox / "outbox", series=1, instances=2, patient_id="P04", seed=5, image_size=SMALL
    )
    for p in (outbox / "outbox").rglob("*"):
        if p.is_file() and p.stat().st_mtime != NOW - 3600:
            os.utime(p, (NOW - 30, NOW - 30))
    found = find_studies([outbox / "outbox", outbox / "late"])
    p = build_plan(
        found,
        project="PROJ",
        subject="{PatientID}",
        session="{PatientID}_{StudyDate:%Y-%m-%d}_{Modality}",
        settle=600.0,
        now=NOW,
    )
    by = {(r.patient_id, r.modality): r for r in p.rows}
    assert by[("P01", "MR")].session == "P01_2025-01-02_MR"
    assert by[("P01", "CT")].session == "P01_2025-03-01_CT"
    assert by[("P02", "MR")].status is Status.READY
    late = by[("P 03.x", "MR")]
    assert late.status is Status.ERROR and "StudyDate is missing" in late.reason
    assert late.subject == "P_03_x" and any("archived as 'P_03_x'" in w for w in late.warnings)
    new = by[("P04", "MR")]
    assert new.status is Status.SETTLING and "changed 30s ago" in new.reason
    assert len(p.skipped) == 2


def test_a_reviewed_plan_runs_with_its_edited_labels(outbox: Path, tmp_path: Path) -> None:
    found = find_studies([outbox / "outbox", outbox / "late"])
    p = build_plan(
        found, project="PROJ", subject="{PatientID}", session="{PatientID}", settle=600.0, now=NOW
    )
    # P01's two studies share the session label P01: both wait.
    assert [r.status for r in p.rows] == [Status.READY, Status.ERROR, Status.ERROR, Status.READY]
    path = tmp_path / "plan.csv"
    write_plan(p, path)
    back = read_plan(path, settle=600.0, now=NOW)
    assert back == p and back.notes == ()  # read back unedited: the same plan
    # A row deleted by the reviewer: that study is left out, and the run says so.
    kept = [
        t
        for t in path.read_text().splitlines(keepends=True)
        if not t.startswith(p.rows[3].study_uid)
    ]
    (tmp_path / "fewer.csv").write_text("".join(kept))
    fewer = read_plan(tmp_path / "fewer.csv", settle=600.0, now=NOW)
    assert len(fewer.rows) == 3 and p.rows[3].study_uid not in fewer.studies
    assert fewer.notes == (
        "1 other study is under the plan's folders but not in the plan: left out",
    )

    text = path.read_text()
    uid_mr, uid_ct = p.rows[1].study_uid, p.rows[2].study_uid
    lines = text.splitlines(keepends=True)
    edited = []
    for line in lines:
        if line.startswith(uid_ct):
            line = line.replace(",P01,P01,", ",P01,P01 ct/2,", 1)  # resolves the clash
        edited.append(line)
    path.write_text("".join(edited))
    again = read_plan(path, settle=600.0, now=NOW)
    by = {r.study_uid: r for r in again.rows}
    assert by[uid_mr].status is Status.READY
    assert by[uid_ct].status is Status.READY and by[uid_ct].session == "P01_ct_2"
    assert any("archived as 'P01_ct_2'" in w for w in by[uid_ct].warnings)
    # The files are found again, only this study's, though its folder holds others.
    study_ct = again.study(uid_ct)
    assert study_ct is not None and study_ct.file_count == 2
    assert {f.study_uid for f in study_ct.files} == {uid_ct}

    # An edited label that names nothing is an error for that row only.
    path.write_text(path.read_text().replace(",P01,P01 ct/2,", ",P01,...,", 1))
    by = {r.study_uid: r for r in read_plan(path, settle=600.0, now=NOW).rows}
    assert by[uid_ct].status is Status.ERROR and "has no letter or digit" in by[uid_ct].reason
    # The reason names the line as an editor shows it (a row with two warnings takes two).
    line = next(n for n, t in enumerate(path.read_text().splitlines(), 1) if t.startswith(uid_ct))
    assert f"plan.csv line {line} " in by[uid_ct].reason and line == 5
    assert by[uid_mr].status is Status.READY


def test_a_plan_row_whose_files_are_gone_is_an_error(outbox: Path, tmp_path: Path) -> None:
    found = find_studies([outbox / "outbox", outbox / "late"])
    p = build_plan(found, project="PROJ", settle=600.0, now=NOW)
    path = tmp_path / "plan.jsonl"
    write_plan(p, path)
    for f in (outbox / "late").rglob("*"):
        if f.is_file():
            f.unlink()
    import shutil

    shutil.rmtree(outbox / "late")
    rows = {r.patient_id: r for r in read_plan(path, settle=600.0, now=NOW).rows}
    assert rows["P 03.x"].status is Status.ERROR
    assert "does not exist any more" in rows["P 03.x"].reason
    assert rows["P02"].status is Status.READY


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_study_over_a_folder_and_an_archive_is_one_study(tmp_path: Path, suffix: str) -> None:
    s = generate_session(
        tmp_path / "x",
        series=2,
        instances=2,
        patient_id="P01",
        seed=1,
        image_size=SMALL,
        header={"StudyDescription": "from the archive"},
    )
    archive = tmp_path / f"second{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for sop in s.series[2]:
                zf.write(s.instances[sop], f"series2/{sop}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(s.instances[s.series[2][0]], "a/first")
            for sop in s.series[2][1:]:
                tf.add(s.instances[sop], f"series2/{sop}")
    for sop in s.series[2]:
        s.instances[sop].unlink()
    (tmp_path / "x" / "S002").rmdir()
    found = find_studies([tmp_path / "x", archive])
    (only,) = found.studies
    assert only.file_count == 4 and only.series_count == 2
    assert only.folders == (tmp_path / "x" / "S001", archive)
    parts = only.manifests()
    assert [m.source_archive for m in parts] == [None, archive]
    assert only.modality == "MR" and only.attributes["PatientID"] == "P01"
    # The first instance is in the folder; take it out and the archive's first one is read.
    for f in (tmp_path / "x").rglob("*"):
        if f.is_file():
            f.unlink()
    (from_archive,) = find_studies([archive]).studies
    assert from_archive.first_instance.startswith(str(archive))
    assert from_archive.attributes["StudyDescription"] == "from the archive"
    assert not from_archive.attributes_error


def test_an_empty_outbox_is_no_study_and_a_missing_one_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    found = find_studies([tmp_path / "empty"])
    assert found.studies == [] and found.skipped == []
    with pytest.raises(UsageError, match="does not exist"):
        find_studies([tmp_path / "nowhere"])


def test_a_file_copied_with_its_old_mtime_still_settles(outbox: Path) -> None:
    """cp -p and rsync -a keep the source's mtime: the copy's ctime says it is new."""
    old = time.time() - 3600
    for p in (outbox / "outbox").rglob("*"):
        os.utime(p, (old, old))  # an hour old by mtime, written (ctime) just now
    found = find_studies([outbox / "outbox"])
    rows = build_plan(found, project="PROJ", settle=600.0, now=time.time()).rows
    assert rows and all(r.status is Status.SETTLING for r in rows)
    assert all("ago, less than the settle time (10m)" in r.reason for r in rows)


# -- against the local XNAT ----------------------------------------------------------------


@pytest.mark.integration
def test_each_plan_row_sends_its_own_study_from_a_shared_folder(
    outbox: Path, tmp_path: Path
) -> None:
    """Two patients' studies interleaved in the same folders: each ready row's manifest goes to
    its own session through the pipeline, and each session holds exactly its study."""
    from upload_helpers import PASSWORD, TEST_PROJECTS, USER
    from xnatio.pipeline import ResumeOptions, resumable_rest_upload
    from xnatio.sandbox import SandboxServer
    from xnatio.transports.rest import RestTarget
    from xnatio.xnat.client import XnatClient

    found = find_studies([outbox / "outbox"])
    p = build_plan(found, project="PROJ", settle=600.0, now=NOW)
    assert len(p.ready) == 3
    with SandboxServer(tmp_path / "xnat", users={USER: PASSWORD}, projects=TEST_PROJECTS) as server:
        with XnatClient(server.url, username=USER, password=PASSWORD) as client:
            for row in p.ready:
                study_files = p.study(row)
                assert study_files is not None
                (manifest,) = study_files.manifests()
                target = RestTarget(
                    project=row.project,
                    subject=row.subject,
                    session=row.session,
                    upload_workers=2,
                    archive_workers=1,
                )
                result = resumable_rest_upload(
                    client,
                    manifest,
                    target,
                    options=ResumeOptions(journal=tmp_path / "journal.sqlite"),
                )
                assert result.success and result.verified, result.errors
        for row in p.ready:
            held = server.archived_files(row.project, row.subject, row.session)
            study_files = p.study(row)
            assert study_files is not None
            assert set(held) == {f.sop_instance_uid for f in study_files.files}


def test_a_root_inside_another_is_walked_once(outbox: Path) -> None:
    out = outbox / "outbox"
    found = find_studies([out / "S001", out, out])
    assert found.roots == (out,)
    assert len(found.notes) == 2 and all("walked once" in n for n in found.notes)
    assert found.file_count == 12 and not any(s.duplicates for s in found.studies)


def test_a_plan_saved_by_a_spreadsheet_reads(outbox: Path, tmp_path: Path) -> None:
    """Excel writes a byte-order mark and CRLF line ends, and a person may keep only the columns
    that matter, in another order."""
    found = find_studies([outbox / "outbox"])
    p = build_plan(found, project="PROJ", settle=600.0, now=NOW)
    lines = ["session,study_uid,folders,project,subject"]
    lines += [f"{r.session},{r.study_uid},{r.folders[0]},{r.project},{r.subject}" for r in p.rows]
    path = tmp_path / "edited.csv"
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    again = read_plan(path, settle=600.0, now=NOW)
    assert [(r.study_uid, r.session, r.status) for r in again.rows] == [
        (r.study_uid, r.session, r.status) for r in p.rows
    ]
    assert all(again.study(r) is not None for r in again.rows)


def test_a_dry_run_row_counts_the_series_of_every_manifest_of_its_study() -> None:
    """A study over a folder and an archive: the series of both manifests (their own tables,
    their own codes), each once, counted from the codes of the rows the views hold."""
    from xnatio.cli.upload_many import dry_run_row
    from xnatio.many.runner import StudyJob

    folder = FileTable(
        dicom_file(f"/r0/a/f{i}", "A", f"sop{i}", series=f"s{i % 3}") for i in range(9)
    )
    archive = FileTable(
        [dicom_file("/r1/x/g0", "B", "x0", series="s2"), dicom_file("/r1/x/g1", "A", "x1", "s7")]
    )
    # Views of some rows: s0 is in rows the first view leaves out.
    manifests = (
        Manifest(root=Path("/r0"), files=folder.take([1, 2, 4, 5])),
        Manifest(root=Path("/r1"), files=archive.take([1])),
    )
    job = StudyJob(study_uid="A", project="P", subject="S", session="E", manifests=manifests)
    expected = {f.series_uid for f in job.all_files}
    assert expected == {"s1", "s2", "s7"}
    assert job.series_count == 3
    assert dry_run_row(job, None)["series"] == 3


def test_the_plan_is_made_with_the_fixed_mmap_threshold_of_an_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """find_studies sets xnatio.malloc's fixed mmap threshold before the walk, as an upload
    does: the million-file plan's large blocks are then returned whole when freed (issue 16
    item 4; what the threshold does is tests/test_malloc.py's)."""
    import xnatio.many.group as grouping

    calls: list[str] = []
    monkeypatch.setattr(grouping, "cap_arenas", lambda: calls.append("cap") or True)

    def walk(root: Path) -> Manifest:
        calls.append("walk")
        return Manifest(root=root)

    grouping.find_studies([tmp_path], discover_manifest=walk)
    assert calls == ["cap", "walk"]
