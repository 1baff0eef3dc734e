"""Pre-flight: everything about the destination that can be checked before a byte of DICOM is sent.

A real XNAT accepts an upload it will file somewhere the user did not mean, and says so only by
the URI it answers with (facts 1.2, 3.5), so these checks run first, in this order:

1. **labels** (no network): XNAT cleans subject and session labels when it archives
   (:func:`xnatio.xnat.labels.clean_label`, facts 3.5: ``MR.1`` becomes ``MR_1``). A label it would
   change is refused, naming the label XNAT would make, so nothing lands under a name the user
   did not choose and the read-back is not looking for a session that does not exist;
2. **the server is an XNAT** and takes our credentials: the login (``POST /data/JSESSION``) with
   :class:`~xnatio.xnat.client.XnatClient`'s checks (a plain web server, a login page or a
   redirect is a one-line error, exit 2);
3. **the project** exists and we can read it: ``GET /data/projects/P?format=json`` (200, or 404
   for missing *and* unreadable, facts 2). An unknown or unreadable project is otherwise a 200
   into **Unassigned** (facts 1.2). A project alias resolves to the canonical ID, which the
   upload then uses (facts 3.5: the archive URI carries the ID);
4. **we may create** a subject (``xnat:subjectData``, unless it exists) and a session of the data
   type the files make (``xnat:mrSessionData``…): ``GET /data/projects?permissions=create&dataType=
   T&format=json`` lists the projects where we may (facts 2; read ≠ write);
5. **the subject**: XNAT matches subject labels case-insensitively (facts 3.5), so a subject that
   exists as ``S01`` when ``s01`` was asked for is used with the existing spelling (one line says
   so);
6. **each session label**: ``GET /data/projects/P/experiments/LABEL?format=json`` (200/404, facts
   3.5). An existing session must hold the same study (its ``UID`` field, ``xnat:imageSessionData/
   UID``, is the StudyInstanceUID), the same subject and the same data type: XNAT refuses to merge
   another StudyInstanceUID, subject or modality into it with 409 (facts 1.5; PrearcSessionArchiver
   ``checkForConflicts`` read in NrgXnat/xnat-web), whatever ``overwrite`` says. Whether
   experiment labels match case-insensitively is *(unconfirmed)* (facts 3.5); the hardest case
   is assumed: a session whose label differs only in case is treated as a clash and refused.

The reads of steps 4-6 (the subjects, both create permissions, each session label) go to the
server together once the project's ID is known, and their answers are judged in the order above,
so a remote XNAT costs about three round trips (login, project, the rest), not one per read; the
project's session list (the case check of step 6) is read once, when a label is new.

Every refusal is a :class:`PreflightError` (exit 2) whose one line names what is missing and what
to do. What was found is a :class:`Preflight`; ``xio upload-dicom --dry-run`` prints it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from xnatio.defaults import PREFLIGHT_READS
from xnatio.errors import ServerError, UsageError
from xnatio.models import Manifest
from xnatio.xnat.client import XnatClient, quote
from xnatio.xnat.labels import clean_label, same_subject

log = logging.getLogger(__name__)

SUBJECT_TYPE = "xnat:subjectData"

# SOP Class UID → the session data type XNAT builds for it (its default DICOM mapping, as in
# the local server's catalog). *(inferred)*: XNAT takes the type from the study's modality;
# a study holding several picks by SESSION_PRIORITY (PET/CT studies are PET sessions).
_SOP_MODALITY = {
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",
    "1.2.840.10008.5.1.4.1.1.4.2": "MR",
    "1.2.840.10008.5.1.4.1.1.4.3": "MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "MR",
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",
    "1.2.840.10008.5.1.4.1.1.128": "PT",
    "1.2.840.10008.5.1.4.1.1.128.1": "PT",
    "1.2.840.10008.5.1.4.1.1.130": "PT",
    "1.2.840.10008.5.1.4.1.1.6.1": "US",
    "1.2.840.10008.5.1.4.1.1.3.1": "US",
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",
}
_SESSION_TYPES = {
    "MR": "xnat:mrSessionData",
    "CT": "xnat:ctSessionData",
    "PT": "xnat:petSessionData",
    "US": "xnat:usSessionData",
    "CR": "xnat:crSessionData",
    "DX": "xnat:dxSessionData",
}
SESSION_PRIORITY = ("PT", "MR", "CT", "US", "DX", "CR")
OTHER_SESSION_TYPE = "xnat:otherDicomSessionData"


class PreflightError(UsageError):
    """The destination is not ready for this upload; nothing was sent. Exit 2 (a usage error:
    the user fixes the label, the project or the rights)."""


@dataclass(frozen=True, kw_only=True)
class SessionFound:
    """What the server holds under one session label this upload sends to."""

    label: str
    study_uid: str  # the StudyInstanceUID of the files to send
    exists: bool
    server_uid: str = ""  # the StudyInstanceUID the existing session holds ("" unknown)
    experiment_id: str = ""

    @property
    def same_study(self) -> bool | None:
        """True/False when the session exists and its UID is known, else None."""
        if not self.exists or not self.server_uid:
            return None
        return self.server_uid == self.study_uid

    def describe(self) -> str:
        if not self.exists:
            return f"session {self.label}: new"
        if self.same_study:
            return f"session {self.label}: exists ({self.experiment_id}) and holds this study"
        return f"session {self.label}: exists ({self.experiment_id}), study UID not recorded"


@dataclass(frozen=True, kw_only=True)
class Preflight:
    """What the checks found: where the upload will really go."""

    server: str
    project: str  # the canonical project ID (an alias resolved)
    subject: str  # the subject label to use (an existing subject's own spelling)
    subject_exists: bool
    session_type: str
    sessions: tuple[SessionFound, ...] = ()
    notes: tuple[str, ...] = field(default=())  # lines worth telling the user

    def describe(self) -> str:
        lines = [
            f"pre-flight on {self.server}: project {self.project}, subject {self.subject} "
            f"({'exists' if self.subject_exists else 'new'}), {self.session_type}",
            *(s.describe() for s in self.sessions),
            *self.notes,
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "project": self.project,
            "subject": self.subject,
            "subject_exists": self.subject_exists,
            "session_type": self.session_type,
            "sessions": [
                {
                    "label": s.label,
                    "study_uid": s.study_uid,
                    "exists": s.exists,
                    "server_uid": s.server_uid,
                    "experiment_id": s.experiment_id,
                    "same_study": s.same_study,
                }
                for s in self.sessions
            ],
            "notes": list(self.notes),
        }


# -- 1. labels ---------------------------------------------------------------------------------


def check_labels(subject: str, labels: Iterable[str]) -> None:
    """Refuse a subject or session label XNAT would archive under another name (facts 3.5)."""
    for kind, label in [("subject", subject), *(("session", x) for x in labels)]:
        cleaned = clean_label(label)
        if cleaned != label:
            raise PreflightError(
                f"XNAT would archive {kind} label {label!r} as {cleaned!r} (it replaces spaces "
                f"and most punctuation with _, facts 3.5); use {cleaned!r} or another label "
                "made of letters, digits, - and _"
            )


def session_type(sop_classes: Iterable[str]) -> str:
    """The XNAT session data type of files with these SOP Class UIDs (see SESSION_PRIORITY)."""
    counts = Counter(_SOP_MODALITY.get(uid, "") for uid in sop_classes)
    for modality in SESSION_PRIORITY:
        if counts[modality]:
            return _SESSION_TYPES[modality]
    return OTHER_SESSION_TYPE


# -- 2-6. the server ---------------------------------------------------------------------------


def check(
    client: XnatClient,
    *,
    project: str,
    subject: str,
    labels: Mapping[str, str],
    sop_classes: Iterable[str] = (),
) -> Preflight:
    """Run every check against ``client``'s server; raise :class:`PreflightError` on the first
    refusal. ``labels``: StudyInstanceUID → the session label it is sent under."""
    check_labels(subject, labels.values())
    if not client.logged_in:
        client.login()  # 2: is it XNAT, and does it take these credentials
    who = client.username
    notes: list[str] = []
    canonical = _project(client, project)
    if canonical != project:
        notes.append(f"project {project} is an alias of {canonical}: using {canonical}")
    kind = session_type(sop_classes)
    # Steps 4-6 read independent resources of the project: their GETs go out together (each
    # costs a round trip, 50 ms or more to a remote XNAT), and their answers are judged in the
    # order above, so the first refusal is the one a one-at-a-time check would give. The
    # subject-creation check is asked for every time and judged only when the subject is new.
    with ThreadPoolExecutor(max_workers=PREFLIGHT_READS, thread_name_prefix="preflight") as pool:
        subjects_read = pool.submit(_subjects, client, canonical)
        may_create_subject = pool.submit(_may_create, client, canonical, SUBJECT_TYPE)
        may_create_session = pool.submit(_may_create, client, canonical, kind)
        sessions_read = [
            (uid, label, pool.submit(_read_session, client, canonical, label))
            for uid, label in labels.items()
        ]
        subjects = subjects_read.result()
        spelled = _existing_subject(subjects, subject)
        if spelled is not None and spelled != subject:
            notes.append(
                f"subject {subject} exists as {spelled}; XNAT matches subjects regardless of "
                f"case (facts 3.5), so the session goes to {spelled}"
            )
        if spelled is None:
            _require(may_create_subject.result(), canonical, SUBJECT_TYPE, "subjects", who)
        _require(may_create_session.result(), canonical, kind, "sessions", who)
        subject_label = spelled if spelled is not None else subject
        subject_id = subjects.get(subject_label, "")
        twins = _CaseTwins(client, canonical)
        found = tuple(
            _session(
                data.result(),
                twins,
                canonical,
                subject_label,
                subject_id,
                subjects,
                label,
                uid,
                kind,
            )
            for uid, label, data in sessions_read
        )
    for s in found:
        if s.exists and s.same_study is None:
            notes.append(
                f"session {s.label} exists but the server records no StudyInstanceUID for it; "
                "XNAT then merges without comparing studies (facts 1.5)"
            )
    return Preflight(
        server=client.server,
        project=canonical,
        subject=subject_label,
        subject_exists=spelled is not None,
        session_type=kind,
        sessions=found,
        notes=tuple(notes),
    )


def check_manifest(
    client: XnatClient,
    manifest: Manifest,
    *,
    project: str,
    subject: str,
    labels: Mapping[str, str],
) -> Preflight:
    """:func:`check` for the files of ``manifest`` (their SOP classes give the session type)."""
    return check(
        client,
        project=project,
        subject=subject,
        labels=labels,
        sop_classes=set(manifest.files.codes("sop_class_uid")[1]),  # no record per file
    )


def _project(client: XnatClient, project: str) -> str:
    """The canonical ID of ``project`` (an ID or an alias), or PreflightError if unreadable."""
    try:
        data = client.get_json(f"/data/projects/{quote(project)}")
    except ServerError as exc:
        if exc.status != 404:
            raise
        raise PreflightError(
            f"project {project} does not exist on {client.server}, or user {client.username} "
            "may not read it (XNAT answers 404 to both, facts 2); XNAT would put the files in "
            "its Unassigned prearchive (facts 1.2). Check the project ID, or ask a project "
            "owner for access"
        ) from None
    try:
        ident = str(data["items"][0]["data_fields"]["ID"])
    except (KeyError, IndexError, TypeError):
        raise ServerError(
            f"GET /data/projects/{project} answered without items[0].data_fields.ID"
        ) from None
    return ident or project


def _may_create(client: XnatClient, project: str, data_type: str) -> set[str]:
    """The projects where the user may create ``data_type`` (facts 2)."""
    data = client.get_json(
        "/data/projects", params={"permissions": "create", "dataType": data_type}
    )
    return {_field(row, "id") for row in _rows(data, "/data/projects?permissions=create")}


def _require(allowed: set[str], project: str, data_type: str, what: str, who: str) -> None:
    """PreflightError unless ``project`` is among the projects ``who`` may create
    ``data_type`` in (:func:`_may_create`, facts 2)."""
    if project not in allowed:
        raise PreflightError(
            f"user {who} may not create {what} ({data_type}) in project {project}; ask a "
            "project owner for the Member or Owner role (read access is not enough, facts 2)"
        )


def _subjects(client: XnatClient, project: str) -> dict[str, str]:
    """Subject label → subject ID (accession number) in ``project``."""
    data = client.get_json(f"/data/projects/{quote(project)}/subjects")
    out: dict[str, str] = {}
    for row in _rows(data, f"/data/projects/{project}/subjects"):
        label = _field(row, "label")
        if label:
            out[label] = _field(row, "id")
    return out


def _existing_subject(subjects: Mapping[str, str], subject: str) -> str | None:
    if subject in subjects:
        return subject
    return next((s for s in subjects if same_subject(s, subject)), None)


def _read_session(client: XnatClient, project: str, label: str) -> Any:
    """The experiment ``label`` of ``project`` as XNAT answers it, or None if it does not exist
    (404, facts 3.5)."""
    try:
        return client.get_json(f"/data/projects/{quote(project)}/experiments/{quote(label)}")
    except ServerError as exc:
        if exc.status != 404:
            raise
        return None


def _session(
    data: Any,
    twins: _CaseTwins,
    project: str,
    subject: str,
    subject_id: str,
    subjects: Mapping[str, str],
    label: str,
    study_uid: str,
    kind: str,
) -> SessionFound:
    path = f"/data/projects/{quote(project)}/experiments/{quote(label)}"
    if data is None:
        twins.refuse(label)
        return SessionFound(label=label, study_uid=study_uid, exists=False)
    try:
        item = data["items"][0]
        fields: Mapping[str, Any] = item["data_fields"]
        xsi = str(item.get("meta", {}).get("xsi:type", ""))
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ServerError(f"GET {path} answered without items[0].data_fields") from None
    found = SessionFound(
        label=label,
        study_uid=study_uid,
        exists=True,
        server_uid=_field(fields, "UID"),
        experiment_id=_field(fields, "ID"),
    )
    where = f"session {label} in project {project}"
    if found.same_study is False:
        raise PreflightError(
            f"{where} already holds another study (StudyInstanceUID {found.server_uid}; these "
            f"files are {study_uid}): XNAT refuses to merge a different study into it (409, "
            "facts 1.5), with or without --overwrite. Send it under another session label, "
            "or delete that session first if it is wrong"
        )
    owner = _field(fields, "subject_ID")
    if owner and owner != subject_id:  # subject_id "" (a new subject): someone else's session
        other = next((s for s, i in subjects.items() if i == owner), owner)
        raise PreflightError(
            f"{where} belongs to subject {other}, not {subject}: XNAT refuses to move it to "
            f"another subject (409, facts 1.5). Use subject {other}, or another session label"
        )
    if xsi and xsi != kind:
        raise PreflightError(
            f"{where} is an {xsi}, and these files make an {kind}: XNAT refuses to merge "
            "another modality into a session (409, facts 1.5). Use another session label"
        )
    return found


class _CaseTwins:
    """The project's session labels, read once when the first new label needs them: a new
    label is refused when the project holds one differing only in case."""

    def __init__(self, client: XnatClient, project: str) -> None:
        self._client = client
        self._project = project
        self._labels: list[str] | None = None

    def refuse(self, label: str) -> None:
        if self._labels is None:
            project = self._project
            data = self._client.get_json(f"/data/projects/{quote(project)}/experiments")
            rows = _rows(data, f"/data/projects/{project}/experiments")
            self._labels = [_field(row, "label") for row in rows]
        for other in self._labels:
            if other != label and other.casefold() == label.casefold():
                raise PreflightError(
                    f"project {self._project} holds session {other}, which differs from "
                    f"{label} only in case; whether XNAT tells them apart is not confirmed "
                    f"(facts 3.5), so use {other} to add to it, or a clearly different label"
                )


def _rows(data: Any, what: str) -> Sequence[Mapping[str, Any]]:
    try:
        rows = data["ResultSet"]["Result"]
    except (KeyError, TypeError):
        raise ServerError(f"GET {what} answered without ResultSet.Result") from None
    return [r for r in rows if isinstance(r, dict)]


def _field(row: Mapping[str, Any], name: str) -> str:
    """A listing field by name, in any case (XNAT's listings mix ``id``/``ID``)."""
    if name in row:
        return str(row[name] or "")
    lowered = name.lower()
    for key, value in row.items():
        if key.lower() == lowered:
            return str(value or "")
    return ""


def before_sending(
    client: XnatClient,
    manifest: Manifest,
    *,
    project: str,
    subject: str,
    labels: Mapping[str, str],
    notify: Callable[[str], None] | None = None,
) -> Preflight:
    """The library's one pre-flight call (both transports, before any DICOM byte): the checks
    of :func:`check_manifest`, each note told through ``notify``. The caller then sends to
    ``result.project`` / ``result.subject`` (an alias resolved, an existing subject's spelling)."""
    found = check_manifest(client, manifest, project=project, subject=subject, labels=labels)
    say = notify or (lambda line: log.info("%s", line))
    for line in found.notes:
        say(line)
    return found
