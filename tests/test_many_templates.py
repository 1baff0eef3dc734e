"""Label templates of ``xio upload-many`` (xnatio.many.templates) and durations: unit and
property tests, no files, no network."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xnatio import defaults
from xnatio.errors import UsageError
from xnatio.many.plan import format_duration, parse_duration
from xnatio.many.templates import (
    TEMPLATE_HELP,
    LabelError,
    check_label,
    parse_template,
    render_label,
    render_project,
)
from xnatio.xnat.labels import REPLACED, clean_label, is_clean

STUDY = {
    "PatientID": "P001",
    "PatientName": "Doe^Jane",
    "StudyDate": "20260102",
    "StudyTime": "093015.25",
    "StudyID": "42",
    "AccessionNumber": "ACC-7",
    "StudyInstanceUID": "1.2.840.99.1234567890",
    "Modality": "MR",
    "StudyDescription": "NEURO research^Brain 3T",
    "AcquisitionDateTime": "20260102093015",
}


def render(template: str, attributes: dict[str, str] = STUDY) -> str:
    return parse_template(template).render(attributes)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{PatientID}", "P001"),
        ("{PatientID}_{StudyDate}_{Modality}", "P001_20260102_MR"),
        ("{StudyDate:%Y-%m-%d}", "2026-01-02"),
        ("{StudyTime:%H%M}", "0930"),
        ("{AcquisitionDateTime:%Y%m%d-%H}", "20260102-09"),
        ("{StudyInstanceUID[-8:]}", "34567890"),
        ("{StudyInstanceUID[:3]}", "1.2"),
        ("{PatientID[0]}", "P"),
        ("{StudyDescription~^(\\w+)}", "NEURO"),
        ("{StudyDescription~\\d+T}", "3T"),
        ("{AccessionNumber~\\d{1,3}}", "7"),  # braces inside a field nest
        ("{{{PatientID}}}", "{P001}"),
        ("site-{StudyID}", "site-42"),
        ("{StudyDate[:4]}", "2026"),
        ("{StudyDescription[:5]~E(.)}", "U"),  # slice, then the expression
    ],
)
def test_fields_render(template: str, expected: str) -> None:
    assert render(template) == expected


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{PatientNmae}", "PatientNmae is not a DICOM keyword (did you mean PatientName?)"),
        ("{PatientID", "is not closed"),
        ("x}", "closes no field"),
        ("{}", "does not start with a DICOM keyword"),
        ("{PatientID:%Y}", "applies to dates and times only"),
        ("{StudyDate:YYYY}", "has no %-directive"),
        ("{StudyDescription~(}", "regular expression is not valid"),
        ("{StudyDescription~}", "needs a regular expression"),
        ("{PatientID[]}", "takes a position or a slice"),
        ("{PatientID[-]}", "unexpected '[-]'"),
        ("{PatientID x}", "unexpected ' x'"),
        ("", "the template is empty"),
    ],
)
def test_a_template_that_does_not_parse_is_one_usage_line(template: str, problem: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_template(template, what="--session template")
    message = str(err.value)
    assert message.startswith(f"--session template {template!r}: ")
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("template", "attributes", "reason"),
    [
        ("{AccessionNumber}", {}, "AccessionNumber is missing"),
        ("{PatientID}", {"PatientID": "   "}, "PatientID is empty"),
        ("{StudyDate:%Y}", {"StudyDate": "2026-13-45"}, "is not a valid DICOM DA value"),
        ("{StudyDescription~^(\\d+)}", {"StudyDescription": "abc"}, "does not match"),
        ("{PatientID[9]}", {"PatientID": "P1"}, "has no character 9"),
        ("{PatientID[5:]}", {"PatientID": "P1"}, "gives nothing"),
    ],
)
def test_a_value_that_cannot_make_a_label_is_that_studys_error(
    template: str, attributes: dict[str, str], reason: str
) -> None:
    with pytest.raises(LabelError, match=reason):
        render_label(parse_template(template), attributes, what="session")


def test_labels_are_cleaned_as_xnat_cleans_them_with_a_warning() -> None:
    label = render_label(parse_template("{PatientName} {StudyID}"), STUDY, what="subject")
    assert label.value == "Doe_Jane_42"
    assert "archived as 'Doe_Jane_42'" in label.warning and "facts 3.5" in label.warning
    assert render_label(parse_template("{PatientID}"), STUDY, what="subject").warning == ""


@pytest.mark.parametrize("raw", ["_", " . ", "^^^", "None."])
def test_a_label_with_no_letter_or_digit_is_refused(raw: str) -> None:
    if raw == "None.":  # letters: a real value, kept (cleaned); only nothing-labels are refused
        assert check_label(raw, what="session", origin="x").value == "None_"
        return
    with pytest.raises(LabelError, match="has no letter or digit"):
        check_label(raw, what="session", origin="x")


def test_the_project_is_used_as_rendered() -> None:
    """XNAT finds a project by ID or alias as given (facts 1.2): no cleaning, but never empty."""
    assert render_project(parse_template("{StudyDescription~^(\\w+)}"), STUDY) == "NEURO"
    assert render_project(parse_template("A B"), STUDY) == "A B"
    with pytest.raises(LabelError, match="AccessionNumber is missing"):
        render_project(parse_template("{AccessionNumber}"), {})


def test_defaults_and_help_parse() -> None:
    for text in (defaults.MANY_SUBJECT_TEMPLATE, defaults.MANY_SESSION_TEMPLATE):
        parse_template(text)
    assert "{StudyDate:%Y-%m-%d}" in TEMPLATE_HELP
    assert render(defaults.MANY_SESSION_TEMPLATE) == "P001_20260102_MR"


# -- properties ----------------------------------------------------------------------------

values = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=20
)


@settings(max_examples=300, deadline=None)
@given(
    pid=values,
    desc=values,
    literal=st.text(alphabet="ab_-. :/", max_size=4),
)
def test_rendering_never_gives_an_empty_label_or_one_xnat_would_change(
    pid: str, desc: str, literal: str
) -> None:
    """Whatever the header holds, a label is either refused with a reason or non-empty, has a
    letter or digit, and is one XNAT archives unchanged (cleaning it again changes nothing)."""
    template = parse_template(
        "{PatientID}" + literal.replace("{", "").replace("}", "") + "{StudyDescription[:12]}"
    )
    try:
        label = render_label(template, {"PatientID": pid, "StudyDescription": desc}, what="session")
    except LabelError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert label.value
    assert any(ch.isalnum() for ch in label.value)
    assert is_clean(label.value)
    assert clean_label(label.value) == label.value
    assert not set(label.value) & REPLACED


template_like = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="{}[]:~%^()-_.\\ 0123456789PatientIDStudyate", max_size=30),
    st.lists(
        st.sampled_from(
            ["{", "}", "PatientID", "StudyDate", "[", "]", ":", "~", "-", "8", "%", "Y", "(", "x"]
        ),
        max_size=8,
    ).map("".join),
)


@settings(max_examples=500, deadline=None)
@given(template_like)
def test_any_text_parses_or_is_one_usage_line(text: str) -> None:
    try:
        parse_template(text)
    except UsageError as exc:
        assert "\n" not in str(exc).replace(repr(text), "")


# -- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("2d", 172800),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("45", 45),
        ("0", 0),
        ("1.5h", 5400),
        (" 10M ", 600),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "m", "-5m", "10 minutes", "1e9h", "5 10", "nan"])
def test_a_bad_duration_is_one_usage_line(text: str) -> None:
    with pytest.raises(UsageError, match="is not a duration"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_reads_back(seconds: int) -> None:
    """Two units at most: exact below an hour, to the minute below a day, to the hour above."""
    back = parse_duration(format_duration(seconds))
    if seconds < 3600:
        assert back == seconds
    elif seconds < 86400:
        assert 0 <= seconds - back < 60
    else:
        assert 0 <= seconds - back < 3600
