"""Label templates: project, subject and session labels made from a study's DICOM attributes.

A template is text with fields in braces, each naming a DICOM attribute by its keyword::

    {PatientID}_{StudyDate:%Y-%m-%d}_{Modality}

A field is ``{Keyword}``, optionally followed by a slice ``[start:stop]`` (or one character
``[i]``), then optionally by either a date/time format ``:FORMAT`` (strftime, for DA, TM and DT
attributes only) or a regular expression ``~REGEX`` (the first group if it has one, else the
whole match); the parts apply left to right. ``{{`` and ``}}`` are literal braces.

Values come from the study's first instance (:mod:`xnatio.many.group`), ``Modality`` being the
study's most frequent. A template that does not parse is a :class:`~xnatio.errors.UsageError`
(one line naming the template); an attribute that is missing or empty, or a value a field cannot
use, is a :class:`LabelError` for that study only: its reason goes into the plan, never a label
such as ``_`` or ``None``. Subject and session labels are then cleaned as XNAT cleans them
(facts 3.5) and the plan shows the cleaned label, with a warning when cleaning changed it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time

from xnatio.errors import UsageError
from xnatio.xnat.labels import clean_label

TEMPLATE_HELP = (
    "Label templates: text with {Keyword} fields over the DICOM attributes of each study's "
    "first instance, e.g. {PatientID}, {PatientName}, {StudyDate}, {StudyTime}, {StudyID}, "
    "{AccessionNumber}, {StudyInstanceUID}, {StudyDescription}, or {Modality} (the study's most "
    "frequent). {StudyDate:%Y-%m-%d} formats a date or time (strftime); {StudyInstanceUID[-8:]} "
    "takes part of a value; {StudyDescription~^(\\w+)} keeps the first group a regular "
    "expression finds. Subject and session labels are cleaned as XNAT cleans them (each of "
    "` ~ @ # $ % ^ & * ( ) + = [ ] { } | \\ / ? : ; ' , . < > and space becomes _); a study "
    "whose attribute is missing or empty waits in the plan with the reason."
)

_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")
_SLICE = re.compile(r"\[(-?\d+)?(?:(:)(-?\d+)?)?\]")
_DATE_VRS = frozenset({"DA", "TM", "DT"})


class LabelError(Exception):
    """A template cannot give a label for one study; ``str()`` is the reason (one sentence)."""


@dataclass(frozen=True, slots=True)
class Field:
    """One ``{...}`` of a template."""

    text: str  # as written, braces included
    keyword: str
    vr: str
    start: int | None = None
    stop: int | None = None
    index: int | None = None  # [i]: one character
    sliced: bool = False
    date_format: str | None = None
    regex: re.Pattern[str] | None = None

    def value(self, attributes: Mapping[str, str]) -> str:
        raw = attributes.get(self.keyword)
        if raw is None:
            raise LabelError(f"{self.keyword} is missing (template field {self.text})")
        value = raw.strip()
        if not value:
            raise LabelError(f"{self.keyword} is empty (template field {self.text})")
        if self.index is not None:
            if not -len(value) <= self.index < len(value):
                raise LabelError(
                    f"{self.keyword} {value!r} has no character {self.index} "
                    f"(template field {self.text})"
                )
            value = value[self.index]
        elif self.sliced:
            value = value[self.start : self.stop]
        if self.date_format is not None:
            value = _format_date(value, self.vr, self.date_format, self)
        elif self.regex is not None:
            m = self.regex.search(value)
            if m is None:
                raise LabelError(
                    f"{self.keyword} {value!r} does not match {self.regex.pattern!r} "
                    f"(template field {self.text})"
                )
            got = m.group(1) if self.regex.groups else m.group(0)
            value = got or ""
        value = value.strip()
        if not value:
            raise LabelError(f"template field {self.text} gives nothing for {raw!r}")
        return value


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and fields, in order."""

    source: str
    parts: tuple[str | Field, ...]

    @property
    def keywords(self) -> frozenset[str]:
        return frozenset(p.keyword for p in self.parts if isinstance(p, Field))

    def render(self, attributes: Mapping[str, str]) -> str:
        """The text for one study's attributes (not cleaned); LabelError when it cannot."""
        return "".join(p if isinstance(p, str) else p.value(attributes) for p in self.parts)


@dataclass(frozen=True, slots=True)
class Label:
    """A rendered label: what XNAT will archive, and a warning when cleaning changed it."""

    value: str
    warning: str = ""


def parse_template(text: str, *, what: str = "label template") -> Template:
    """Parse ``text``; UsageError (one line naming ``what`` and the template) when it is wrong."""

    def fail(problem: str) -> UsageError:
        return UsageError(f"{what} {text!r}: {problem}")

    parts: list[str | Field] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "{" and text.startswith("{{", i):
            literal.append("{")
            i += 2
        elif ch == "}" and text.startswith("}}", i):
            literal.append("}")
            i += 2
        elif ch == "}":
            raise fail(f"'}}' at position {i + 1} closes no field (write }}}} for a brace)")
        elif ch == "{":
            end = _field_end(text, i)
            if end < 0:
                raise fail(f"the field opened at position {i + 1} is not closed with '}}'")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_parse_field(text[i : end + 1], fail))
            i = end + 1
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    if not parts:
        raise fail("the template is empty")
    return Template(text, tuple(parts))


def _field_end(text: str, start: int) -> int:
    """The index of the brace closing the field opened at ``start`` (-1 if none).

    Braces inside the field nest (a regular expression's ``{2,4}``) and a backslash escapes the
    next character.
    """
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _parse_field(field: str, fail: Callable[[str], UsageError]) -> Field:
    body = field[1:-1]
    m = _KEYWORD.match(body)
    if m is None:
        raise fail(f"field {field} does not start with a DICOM keyword such as PatientID")
    keyword = m.group(0)
    vr = _keyword_vr(keyword)
    if vr is None:
        close = difflib.get_close_matches(keyword, _all_keywords(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise fail(f"field {field}: {keyword} is not a DICOM keyword{hint}")
    rest = body[m.end() :]
    kwargs: dict[str, object] = {}
    s = _SLICE.match(rest)
    if s is not None:
        a, colon, b = s.group(1), s.group(2), s.group(3)
        if colon is None:
            if a is None:
                raise fail(f"field {field}: [] takes a position or a slice such as [-8:]")
            kwargs["index"] = int(a)
        else:
            kwargs["sliced"] = True
            kwargs["start"] = int(a) if a is not None else None
            kwargs["stop"] = int(b) if b is not None else None
        rest = rest[s.end() :]
    if rest.startswith(":"):
        fmt = rest[1:]
        if vr not in _DATE_VRS:
            raise fail(
                f"field {field}: a :format applies to dates and times only, and {keyword} "
                f"is not one (its VR is {vr}); use [start:stop] or ~regex to take part of it"
            )
        if "%" not in fmt:
            raise fail(f"field {field}: the format {fmt!r} has no %-directive such as %Y")
        try:
            datetime(2000, 1, 2, 3, 4, 5).strftime(fmt)
        except ValueError as exc:
            raise fail(f"field {field}: the format {fmt!r} is not valid ({exc})") from None
        kwargs["date_format"] = fmt
    elif rest.startswith("~"):
        pattern = rest[1:]
        if not pattern:
            raise fail(f"field {field}: ~ needs a regular expression after it")
        try:
            kwargs["regex"] = re.compile(pattern)
        except re.error as exc:
            raise fail(f"field {field}: the regular expression is not valid ({exc})") from None
    elif rest:
        raise fail(
            f"field {field}: unexpected {rest!r} after {keyword} "
            "(expected [start:stop], :date-format or ~regex)"
        )
    return Field(field, keyword, vr, **kwargs)  # type: ignore[arg-type]


def _keyword_vr(keyword: str) -> str | None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _all_keywords() -> list[str]:
    from pydicom.datadict import keyword_dict

    return list(keyword_dict)


def _format_date(value: str, vr: str, fmt: str, field: Field) -> str:
    from pydicom.valuerep import DA, DT, TM

    parsed: date | time | datetime | None
    try:
        if vr == "DA":
            parsed = DA(value)
        elif vr == "TM":
            parsed = TM(value)
        else:
            parsed = DT(value)
    except (ValueError, TypeError, OverflowError):
        parsed = None
    if parsed is None:
        raise LabelError(
            f"{field.keyword} {value!r} is not a valid DICOM {vr} value "
            f"(template field {field.text})"
        )
    try:
        return parsed.strftime(fmt)
    except ValueError as exc:
        raise LabelError(f"template field {field.text} cannot format {value!r} ({exc})") from None


def render_label(template: Template, attributes: Mapping[str, str], *, what: str) -> Label:
    """A subject or session label for one study: rendered, cleaned as XNAT cleans it (facts 3.5).

    LabelError when an attribute is missing or empty, or when the cleaned label has no letter or
    digit (``_``, ``___``): such a label names nothing and would gather unrelated studies.
    """
    raw = template.render(attributes)
    return check_label(raw, what=what, origin=f"template {template.source!r}")


def check_label(raw: str, *, what: str, origin: str) -> Label:
    """``raw`` cleaned as XNAT cleans labels (facts 3.5); LabelError when it names nothing."""
    raw = raw.strip()
    if not raw:
        raise LabelError(f"the {what} label from {origin} is empty")
    cleaned = clean_label(raw)
    if not any(ch.isalnum() for ch in cleaned):
        raise LabelError(f"the {what} label {raw!r} from {origin} has no letter or digit")
    warning = ""
    if cleaned != raw:
        warning = f"{what} label {raw!r} is archived as {cleaned!r} (XNAT cleans labels, facts 3.5)"
    return Label(cleaned, warning)


def render_project(template: Template, attributes: Mapping[str, str]) -> str:
    """The project for one study, as rendered: XNAT finds a project by its ID or alias as given
    (facts 1.2), so it is not cleaned; a project that does not exist is the pre-flight's to say."""
    raw = template.render(attributes).strip()
    if not raw:
        raise LabelError(f"the project from template {template.source!r} is empty")
    return raw
