"""The plan of an ``upload-many`` run: one row per study, with its labels and whether it can go.

    StudySet -build_plan-> Plan (StudyPlan rows: ready | settling | error) -write_plan-> FILE
    FILE (reviewed, labels edited) -read_plan-> Plan

A row is ``ready`` when its labels rendered and its files have settled, ``settling`` when its
newest file changed less than the settle time ago (it waits for a later run), and ``error`` when
it cannot be sent as it is (an attribute missing, two studies with one session label, ...), with
the reason. Nothing here talks to a server: what the server already holds is the runner's.

Plan files are CSV (or JSON lines when the name ends ``.jsonl``), written atomically and 0600
(they hold patient identifiers). Read back, the labels in the file win: a person may edit
project, subject and session; they are cleaned and checked again, and the status and reason are
worked out anew from the files found now (the file's status column is for people to read).
"""

from __future__ import annotations

import csv
import enum
import io
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xnatio import defaults
from xnatio.config_file import write_private
from xnatio.errors import UsageError
from xnatio.many.group import Study, StudySet, find_studies
from xnatio.many.templates import (
    LabelError,
    Template,
    check_label,
    parse_template,
    render_label,
    render_project,
)
from xnatio.models import ProgressCallback, SkippedFile


class Status(str, enum.Enum):
    READY = "ready"  # labels known, files settled: send it
    SETTLING = "settling"  # files changed too recently: a later run sends it
    ERROR = "error"  # cannot be sent as it is; the reason says why


@dataclass(frozen=True, slots=True)
class StudyPlan:
    """One study of a plan (one row of a plan file)."""

    study_uid: str
    project: str
    subject: str
    session: str
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    modality: str = ""
    series: int = 0
    files: int = 0
    bytes: int = 0
    folders: tuple[Path, ...] = ()
    newest_mtime: float = 0.0  # seconds since the epoch, to the microsecond
    status: Status = Status.READY
    reason: str = ""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The rows, and (not compared) the studies they describe and the files in none of them."""

    rows: tuple[StudyPlan, ...]
    # Study UID -> the study found on disk (rows whose files were not found have none).
    studies: Mapping[str, Study] = field(default_factory=dict, compare=False)
    # Files under the roots that are in no study (not DICOM, unreadable, ...), with reasons.
    skipped: tuple[SkippedFile, ...] = field(default=(), compare=False)
    # Things a person reviewing the plan should know that belong to no row (one line each).
    notes: tuple[str, ...] = field(default=(), compare=False)

    def study(self, row: StudyPlan | str) -> Study | None:
        return self.studies.get(row if isinstance(row, str) else row.study_uid)

    def with_status(self, status: Status) -> list[StudyPlan]:
        return [r for r in self.rows if r.status is status]

    @property
    def ready(self) -> list[StudyPlan]:
        return self.with_status(Status.READY)


# -- durations ---------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])\s*", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``10m``, ``1h``, ``2d``, ``1h 30m``, or a plain number of
    seconds. UsageError (one line) for anything else."""
    s = text.strip()
    if _NUMBER.fullmatch(s):
        return float(s)
    total, pos = 0.0, 0
    while s and pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            break
        total += float(m.group(1)) * _UNIT[m.group(2).lower()]
        pos = m.end()
    if not s or pos != len(s):
        raise UsageError(
            f"{text!r} is not a duration: write a number with s, m, h or d (e.g. 90s, 10m, 1h)"
        )
    return total


def format_duration(seconds: float) -> str:
    """``1h 5m``, ``10m``, ``42s``: how long, for people."""
    s = max(0, round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{v}{u}" for v, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if v]
    return " ".join(parts[:2]) or "0s"


# -- building ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Templates:
    project: Template
    subject: Template
    session: Template


def _templates(
    project: str | Template, subject: str | Template, session: str | Template
) -> _Templates:
    def parse(t: str | Template, what: str) -> Template:
        return t if isinstance(t, Template) else parse_template(t, what=what)

    return _Templates(
        parse(project, "--project template"),
        parse(subject, "--subject template"),
        parse(session, "--session template"),
    )


def build_plan(
    studies: StudySet | Iterable[Study],
    *,
    project: str | Template,
    subject: str | Template = defaults.MANY_SUBJECT_TEMPLATE,
    session: str | Template = defaults.MANY_SESSION_TEMPLATE,
    settle: float = defaults.MANY_SETTLE,
    now: float | None = None,
) -> Plan:
    """One row per study: labels from the templates, cleaned (facts 3.5), and a status.

    ``now`` (seconds since the epoch; default the clock) and ``settle`` (seconds) decide which
    studies are still settling. A template that does not parse raises UsageError before any
    row is made; everything that concerns one study only is that row's error.
    """
    t = _templates(project, subject, session)
    when = time.time() if now is None else now
    found = list(studies.studies if isinstance(studies, StudySet) else studies)
    rows = [_study_row(s, t, settle, when) for s in found]
    return Plan(
        tuple(cross_check(rows)),
        studies={s.study_uid: s for s in found},
        skipped=tuple(studies.skipped) if isinstance(studies, StudySet) else (),
        notes=tuple(studies.notes) if isinstance(studies, StudySet) else (),
    )


def _study_row(study: Study, t: _Templates, settle: float, now: float) -> StudyPlan:
    errors: list[str] = []
    warnings: list[str] = []
    labels = {"project": "", "subject": "", "session": ""}
    a = study.attributes
    try:
        labels["project"] = render_project(t.project, a)
    except LabelError as exc:
        errors.append(str(exc))
    for what, template in (("subject", t.subject), ("session", t.session)):
        try:
            label = render_label(template, a, what=what)
        except LabelError as exc:
            errors.append(str(exc))
            continue
        labels[what] = label.value
        if label.warning:
            warnings.append(label.warning)
    if errors and study.attributes_error:
        errors = [f"the header of its first instance could not be read: {study.attributes_error}"]
    return _with_status(
        _describe(study, labels["project"], labels["subject"], labels["session"], warnings),
        errors,
        study,
        settle,
        now,
    )


def _describe(
    study: Study, project: str, subject: str, session: str, warnings: Sequence[str]
) -> StudyPlan:
    a = study.attributes
    return StudyPlan(
        study_uid=study.study_uid,
        project=project,
        subject=subject,
        session=session,
        patient_id=study.patient_id,
        patient_name=a.get("PatientName", ""),
        study_date=_iso_date(a.get("StudyDate", "")),
        modality=study.modality,
        series=study.series_count,
        files=study.file_count,
        bytes=study.total_bytes,
        folders=tuple(study.folders),
        newest_mtime=round(study.newest_mtime, 6),
        warnings=tuple(warnings),
    )


def _with_status(
    row: StudyPlan, errors: Sequence[str], study: Study | None, settle: float, now: float
) -> StudyPlan:
    if errors:
        return replace(row, status=Status.ERROR, reason="; ".join(errors))
    if study is not None:
        waiting = settling_reason(row.newest_mtime, settle, now)
        if waiting:
            return replace(row, status=Status.SETTLING, reason=waiting)
    return replace(row, status=Status.READY, reason="")


def settling_reason(newest_mtime: float, settle: float, now: float) -> str:
    """Why a study whose newest file changed at ``newest_mtime`` must wait ("" when it need not)."""
    age = now - newest_mtime
    if age < 0:
        return (
            f"its newest file is dated {format_duration(-age)} in the future (a clock is wrong?); "
            f"it waits until {format_duration(settle)} after that date"
        )
    if age < settle:
        return (
            f"its newest file changed {format_duration(age)} ago, less than the settle time "
            f"({format_duration(settle)}): a later run sends it"
        )
    return ""


SHARED_SUBJECT = "shared subject: "
SAME_SESSION = "same session: "


def cross_check(rows: Sequence[StudyPlan]) -> list[StudyPlan]:
    """Checks across rows: one session label for two studies is an error for both; one subject
    for several patients is a warning on each. What this adds starts ``SAME_SESSION`` (reasons)
    or ``SHARED_SUBJECT`` (warnings), so checking again replaces it."""
    rows = [
        replace(r, warnings=tuple(w for w in r.warnings if not w.startswith(SHARED_SUBJECT)))
        for r in rows
    ]
    sessions: dict[tuple[str, str], list[int]] = {}
    patients: dict[tuple[str, str], set[str]] = {}
    for i, r in enumerate(rows):
        # Case folded: XNAT matches subject labels ignoring case; for session labels that is
        # unconfirmed (facts 3.5), so two labels differing only in case are taken as one.
        if r.project and r.session:
            sessions.setdefault((r.project.casefold(), r.session.casefold()), []).append(i)
        if r.project and r.subject:
            patients.setdefault((r.project.casefold(), r.subject.casefold()), set()).add(
                r.patient_id
            )
    for same in sessions.values():
        if len(same) < 2:
            continue
        for i in same:
            r = rows[i]
            others = ", ".join(rows[j].study_uid for j in same if j != i)
            clash = (
                f"{SAME_SESSION}session {r.session!r} in project {r.project} is also the label "
                f"of study {others}; XNAT refuses a second StudyInstanceUID in one session "
                "(facts 1.5): give each study its own label (edit the plan, or change --session)"
            )
            reason = f"{r.reason}; {clash}" if r.status is Status.ERROR and r.reason else clash
            rows[i] = replace(r, status=Status.ERROR, reason=reason)
    for i, r in enumerate(rows):
        ids = patients.get((r.project.casefold(), r.subject.casefold()), set())
        if len(ids) > 1:
            listed = ", ".join(sorted(p or "(none)" for p in ids))
            warning = (
                f"{SHARED_SUBJECT}subject {r.subject!r} in project {r.project} gets the studies "
                f"of several PatientIDs ({listed}); XNAT matches subject labels ignoring case "
                "(facts 3.5)"
            )
            rows[i] = replace(r, warnings=(*r.warnings, warning))
    return rows


def _own_reason(reason: str) -> str:
    """``reason`` without what :func:`cross_check` added (it is checked again)."""
    if reason.startswith(SAME_SESSION):
        return ""
    return reason.split("; " + SAME_SESSION, 1)[0]


def _iso_date(value: str) -> str:
    """A DICOM date (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    if len(value) == 8 and value.isdigit():
        try:
            return datetime.strptime(value, "%Y%m%d").date().isoformat()
        except ValueError:
            return value
    return value


# -- plan files --------------------------------------------------------------------------------

COLUMNS = (
    "study_uid",
    "status",
    "project",
    "subject",
    "session",
    "patient_id",
    "patient_name",
    "study_date",
    "modality",
    "series",
    "files",
    "bytes",
    "newest_mtime",
    "folders",
    "reason",
    "warnings",
)
REQUIRED = ("study_uid", "project", "subject", "session", "folders")
_INTS = ("series", "files", "bytes")
_LISTS = ("folders", "warnings")


def is_plan_file(path: Path | str) -> bool:
    """True when ``path`` names a plan file (``.csv`` or ``.jsonl``) rather than a DICOM root."""
    return Path(path).suffix.lower() in (".csv", ".jsonl")


def write_plan(plan: Plan | Iterable[StudyPlan], path: Path | str) -> None:
    """Write the plan to ``path``: JSON lines when it ends ``.jsonl``, else CSV; atomic, 0600."""
    path = Path(path)
    rows = plan.rows if isinstance(plan, Plan) else tuple(plan)
    text = plan_text(rows, jsonl=path.suffix.lower() == ".jsonl")
    try:
        write_private(path, text)
    except OSError as exc:
        raise UsageError(f"cannot write plan {path}: {exc.strerror or exc}") from None


def plan_text(rows: Iterable[StudyPlan], *, jsonl: bool) -> str:
    out = io.StringIO()
    if jsonl:
        for r in rows:
            out.write(json.dumps(_row_dict(r, lists=True), ensure_ascii=False) + "\n")
        return out.getvalue()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        d = _row_dict(r, lists=False)
        writer.writerow([_defuse(d[c]) for c in COLUMNS])
    return out.getvalue()


# A spreadsheet runs a cell that starts with one of these as a formula ("CSV injection"): a
# Patient Name from another site's export is not to be trusted. Such cells are written with a
# leading apostrophe, which spreadsheets take as "text", and read back without it (a value that
# already starts with apostrophes before such a character gets one more, so reading is exact).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _formula_like(value: str) -> bool:
    return value.lstrip("'").startswith(_FORMULA_START)


def _defuse(value: object) -> object:
    return "'" + value if isinstance(value, str) and _formula_like(value) else value


def _restore(cell: str) -> str:
    return cell[1:] if cell.startswith("'") and _formula_like(cell) else cell


def _row_dict(r: StudyPlan, *, lists: bool) -> dict[str, Any]:
    folders = [str(f) for f in r.folders]
    return {
        "study_uid": r.study_uid,
        "status": r.status.value,
        "project": r.project,
        "subject": r.subject,
        "session": r.session,
        "patient_id": r.patient_id,
        "patient_name": r.patient_name,
        "study_date": r.study_date,
        "modality": r.modality,
        "series": r.series,
        "files": r.files,
        "bytes": r.bytes,
        "newest_mtime": _iso_time(r.newest_mtime),
        # One per line inside the cell: paths may hold any other separator.
        "folders": folders if lists else "\n".join(folders),
        "reason": r.reason,
        "warnings": list(r.warnings) if lists else "\n".join(r.warnings),
    }


def _iso_time(t: float) -> str:
    return (
        datetime.fromtimestamp(t, timezone.utc)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


def _parse_time(text: str) -> float:
    if not text:
        return 0.0
    value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return round(value.timestamp(), 6)


def parse_plan(text: str, *, name: str, jsonl: bool) -> list[tuple[int, StudyPlan]]:
    """The rows of a plan file as written, each with its line number; UsageError naming the
    line for an unknown or missing column, a malformed line or value, or a repeated study."""
    records = _jsonl_records(text, name) if jsonl else _csv_records(text, name)
    rows: list[tuple[int, StudyPlan]] = []
    seen: dict[str, int] = {}
    for line, record in records:
        row = _record_row(record, name, line)
        if row.study_uid in seen:
            raise UsageError(
                f"{name} line {line}: study {row.study_uid} is already on line "
                f"{seen[row.study_uid]}; a study has one row"
            )
        seen[row.study_uid] = line
        rows.append((line, row))
    return rows


def _check_columns(columns: Iterable[str], name: str, line: int) -> None:
    cols = list(columns)
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown:
        raise UsageError(
            f"{name} line {line}: unknown column {unknown[0]!r} (a plan has the columns "
            f"{', '.join(COLUMNS)})"
        )
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise UsageError(f"{name} line {line}: column {missing[0]!r} is missing")


def _csv_records(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise UsageError(f"{name} is empty: it holds no plan")
        if len(set(header)) != len(header):
            raise UsageError(f"{name} line 1: a column is named twice")
        _check_columns(header, name, 1)
        start = reader.line_num
        for cells in reader:
            line = start + 1
            start = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise UsageError(
                    f"{name} line {line}: {len(cells)} cells where the header has {len(header)}"
                )
            record: dict[str, Any] = dict(zip(header, map(_restore, cells), strict=True))
            for c in _LISTS:
                if c in record:
                    record[c] = [v for v in record[c].split("\n") if v.strip()]
            yield line, record
    except csv.Error as exc:
        raise UsageError(f"{name} line {reader.line_num}: not valid CSV ({exc})") from None


def _jsonl_records(text: str, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    any_row = False
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{name} line {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{name} line {n}: a plan line is a JSON object, one per study")
        _check_columns(record, name, n)
        for c in _LISTS:
            if c in record and not (
                isinstance(record[c], list) and all(isinstance(v, str) for v in record[c])
            ):
                raise UsageError(f"{name} line {n}: {c} must be a list of strings")
        any_row = True
        yield n, record
    if not any_row:
        raise UsageError(f"{name} is empty: it holds no plan")


def _record_row(record: Mapping[str, Any], name: str, line: int) -> StudyPlan:
    def text(c: str) -> str:
        v = record.get(c, "")
        if v is None:
            return ""
        if not isinstance(v, str):
            raise UsageError(f"{name} line {line}: {c} must be text, not {v!r}")
        return v.strip()

    def number(c: str) -> int:
        v = record.get(c, 0)
        if isinstance(v, bool):
            raise UsageError(f"{name} line {line}: {c} must be a whole number, not {v!r}")
        if isinstance(v, int):
            return v
        try:
            return int(str(v).strip() or 0)
        except ValueError:
            raise UsageError(f"{name} line {line}: {c} must be a whole number, not {v!r}") from None

    uid = text("study_uid")
    if not uid:
        raise UsageError(f"{name} line {line}: study_uid is empty")
    try:
        status = Status(text("status") or Status.READY.value)
    except ValueError:
        raise UsageError(
            f"{name} line {line}: status {text('status')!r} is not one of "
            f"{', '.join(s.value for s in Status)}"
        ) from None
    try:
        newest = _parse_time(text("newest_mtime"))
    except ValueError:
        raise UsageError(
            f"{name} line {line}: newest_mtime {text('newest_mtime')!r} is not a date and time"
        ) from None
    return StudyPlan(
        study_uid=uid,
        project=text("project"),
        subject=text("subject"),
        session=text("session"),
        patient_id=text("patient_id"),
        patient_name=text("patient_name"),
        study_date=text("study_date"),
        modality=text("modality"),
        series=number("series"),
        files=number("files"),
        bytes=number("bytes"),
        folders=tuple(Path(f) for f in record.get("folders", [])),
        newest_mtime=newest,
        status=status,
        reason=text("reason"),
        warnings=tuple(record.get("warnings", [])),
    )


def read_plan(
    path: Path | str,
    *,
    settle: float = defaults.MANY_SETTLE,
    now: float | None = None,
    progress: ProgressCallback | None = None,
) -> Plan:
    """The plan in ``path`` (CSV, or JSON lines for ``.jsonl``), ready to run.

    The labels in the file win: edited ones are cleaned as XNAT cleans them (facts 3.5, with a
    warning) and an unusable one makes its row an error. Each row's files are found again under
    its folders (only that StudyInstanceUID's), so the row describes what is there now, and
    the status is worked out again (``settle``, ``now`` as for :func:`build_plan`). A file that
    cannot be read or parsed raises UsageError naming the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"plan {path} does not exist") from None
    except UnicodeDecodeError:
        raise UsageError(f"plan {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"plan {path} cannot be read: {exc.strerror or exc}") from None
    written = parse_plan(text, name=str(path), jsonl=path.suffix.lower() == ".jsonl")
    when = time.time() if now is None else now
    roots = list(dict.fromkeys(f for _, r in written for f in r.folders))
    present = [r for r in roots if r.exists()]
    found = find_studies(present, progress=progress) if present else StudySet(roots=())
    studies = found.by_uid()
    rows = [
        _edited_row(line, r, studies.get(r.study_uid), str(path), settle, when)
        for line, r in written
    ]
    planned = {r.study_uid for _, r in written}
    # (found.notes only say that nested folders of several rows were walked once.)
    notes: list[str] = []
    left_out = [s for s in found.studies if s.study_uid not in planned]
    if left_out:
        n = len(left_out)
        notes.append(
            f"{n} other {'study is' if n == 1 else 'studies are'} under the plan's folders but "
            "not in the plan: left out"
        )
    return Plan(
        tuple(cross_check(rows)),
        studies={uid: studies[uid] for uid in planned if uid in studies},
        skipped=tuple(found.skipped),
        notes=tuple(notes),
    )


def _edited_row(
    line: int, written: StudyPlan, study: Study | None, name: str, settle: float, now: float
) -> StudyPlan:
    errors: list[str] = []
    warnings = [w for w in written.warnings if not w.startswith(SHARED_SUBJECT)]
    origin = f"{name} line {line}"
    labels = {"subject": written.subject, "session": written.session}
    for what, raw in labels.items():
        if not raw and written.status is Status.ERROR and written.reason:
            continue  # the reason it is empty is already in the row
        try:
            label = check_label(raw, what=what, origin=origin)
        except LabelError as exc:
            errors.append(str(exc))
            labels[what] = ""
            continue
        labels[what] = label.value
        if label.warning and label.warning not in warnings:
            warnings.append(label.warning)
    if not written.project and not (written.status is Status.ERROR and written.reason):
        errors.append(f"the project on {origin} is empty")
    if (not written.project or not all(labels.values())) and not errors:
        errors.append(_own_reason(written.reason) or f"a label on {origin} is empty")
    if study is None:
        missing = [str(f) for f in written.folders if not f.exists()]
        where = ", ".join(str(f) for f in written.folders) or "(no folders in the row)"
        errors.append(
            f"folder {missing[0]} does not exist any more"
            if missing
            else f"no DICOM file of this study is under {where} any more"
        )
        row = replace(
            written,
            subject=labels["subject"],
            session=labels["session"],
            warnings=tuple(warnings),
        )
        return replace(row, status=Status.ERROR, reason="; ".join(errors))
    row = _describe(study, written.project, labels["subject"], labels["session"], warnings)
    return _with_status(row, errors, study, settle, now)
