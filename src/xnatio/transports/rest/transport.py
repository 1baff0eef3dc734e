"""REST as a :class:`~xnatio.transports.base.Transport`: what resume needs, and nothing more.

The engine is :class:`xnatio.transports.rest.uploader.RestUploader` (one request per batch, commit);
this adds what a resumed run needs of the server: what the session already holds (facts 1.5),
which prearchive sessions still wait for a commit (facts 3.1), and the read-back (facts 4).
It was the REST half of ``xnatio.resume``; resume now calls only the protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence

from xnatio.coordinator import ExecutorFactory
from xnatio.errors import ServerError, UsageError
from xnatio.models import (
    DicomFile,
    FileTable,
    Manifest,
    ProgressCallback,
    ProgressEvent,
    SessionKind,
    SessionRef,
    UploadResult,
    total_bytes,
)
from xnatio.plan import Planner, RestPlanner
from xnatio.retry import RetryPolicy
from xnatio.transports.base import Confirmations, OnConfirmed, both_hooks
from xnatio.transports.rest.target import RestTarget
from xnatio.transports.rest.uploader import RestUploader
from xnatio.verify import (
    SentDigests,
    VerifyReport,
    already_on_server,
    read_server_session,
    server_rewrites,
    verify_session,
)
from xnatio.xnat.client import XnatClient, quote

log = logging.getLogger(__name__)


class RestTransport:
    """One REST upload's server side, for :func:`xnatio.resume.resumable_upload`.

    ``planner`` cuts each part the journal leaves to send into import requests (default:
    :class:`xnatio.plan.RestPlanner`).

    ``target.study_labels`` must hold the labels of the whole manifest (a resumed run sends a
    part of it, and each study keeps its label whatever is left to send).
    """

    name = "rest"
    needs_commit = True
    can_read_back = True

    def __init__(
        self,
        client: XnatClient,
        target: RestTarget,
        *,
        retry: RetryPolicy | None = None,
        progress_callback: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        notify: Callable[[str], None] | None = None,
        planner: Planner | None = None,
        on_confirmed: OnConfirmed | None = None,
        executor: ExecutorFactory | None = None,
        verify: bool = True,
    ) -> None:
        self.client = client
        # Read back after the upload: the MD5s of what is sent are kept for it (xnatio.verify)
        # unless XNAT will rewrite every file anyway (then it compares instances, facts 1.7).
        self.verify = verify
        self.digests: SentDigests | None = None
        self._asked_site_script = False
        self.executor = executor
        self.target = target
        self.retry = retry
        self.progress_callback = progress_callback
        self.cancel = cancel
        self.say = notify or (lambda msg: log.info("%s", msg))
        self.planner = planner if planner is not None else RestPlanner()
        self.on_confirmed = on_confirmed
        self.study_labels = dict(target.study_labels)
        self.existing: set[str] = set()  # labels whose session the server holds already

    def _label(self, f: DicomFile) -> str:
        return self.study_labels.get(f.study_uid, self.target.session)

    def _by_label(self, files: Sequence[DicomFile]) -> dict[str, Sequence[DicomFile]]:
        if isinstance(files, FileTable):
            # By the study column: no record made per file (it was 100,000 of them on the way to
            # the first request, issue 16); labels in order of first appearance, as below.
            codes, studies = files.codes("study_uid")
            label_of = [self.study_labels.get(s, self.target.session) for s in studies]
            positions: dict[str, list[int]] = {}
            for i, code in enumerate(codes):
                positions.setdefault(label_of[code], []).append(i)
            if len(positions) == 1:
                return {label: files for label in positions}
            return {label: files.take(p) for label, p in positions.items()}
        out: dict[str, list[DicomFile]] = {}
        for f in files:
            out.setdefault(self._label(f), []).append(f)
        return dict(out)

    def on_server(self, files: Sequence[DicomFile]) -> list[DicomFile]:
        t = self.target
        if t.overwrite == "delete":
            return []  # everything is sent and replaces the server's copies (facts 1.5)
        there: list[DicomFile] = []
        for label, part in self._by_label(files).items():
            try:
                server = read_server_session(self.client, t.project, t.subject, label)
            except ServerError as exc:
                # Unknown, so not "absent": sending all could re-send what is there (a 409 and a
                # CONFLICT entry on the server, facts 1.5). Nothing is sent.
                then = (  # a refusal stays: name what to change, not "again" (issue 13)
                    f"this account may not read it: ask for read access to project {t.project}"
                    if exc.status in (401, 403)
                    else "run the same command again"
                )
                raise ServerError(
                    f"could not read session {label} back before sending ({exc.message}); "
                    f"nothing was sent; {then}",
                    status=exc.status,
                ) from None
            if server is None:
                continue
            studies = {f.study_uid for f in part}
            if server.study_uid and server.study_uid not in studies:
                # XNAT refuses to merge another study into a session (facts 1.5, "Invalid
                # modification of session UID"); never send it there (the pre-flight says so
                # first on the command line).
                raise UsageError(
                    f"session {label} in project {t.project} holds another study "
                    f"(StudyInstanceUID {server.study_uid}); nothing was sent: choose another "
                    "session label"
                )
            self.existing.add(label)
            # Records made once (already_on_server tells files apart by identity).
            there.extend(already_on_server(server, list(part)))
        return there

    def send(
        self, part: Manifest, confirmations: Confirmations, overwrite: str | None
    ) -> UploadResult:
        t = self.target
        if overwrite is not None and t.overwrite != "delete":
            t = dataclasses.replace(t, overwrite=overwrite)
        if t.direct_archive and self.existing:
            self.say(
                "the session exists already and Direct-Archive never merges (facts 1.6): "
                "sending the missing files through the prearchive, committed into it"
            )
            t = dataclasses.replace(t, direct_archive=False)
        batches = self.planner.plan(part, t.num_batches)
        if self.verify and not self._asked_site_script:
            self._asked_site_script = True  # once per upload, not per resend
            self.digests = None if server_rewrites(self.client) else SentDigests()
        uploader = RestUploader(
            self.client,
            t,
            retry=self.retry,
            progress_callback=self.progress_callback,
            cancel=self.cancel,
            on_confirmed=both_hooks(confirmations.on_confirmed, self.on_confirmed),
            executor=self.executor,
            digests=self.digests,
        )
        return uploader.upload(part, batches)

    def commit(self, remembered: SessionRef | None) -> SessionRef | None:
        t = self.target
        if t.overwrite == "none":
            t = dataclasses.replace(t, overwrite="append")
        uploader = RestUploader(
            self.client,
            t,
            retry=self.retry,
            progress_callback=self.progress_callback,
            cancel=self.cancel,
        )
        if remembered is not None and remembered.kind is SessionKind.DIRECT_ARCHIVE:
            # Sent by an earlier run that stopped waiting: wait again (facts 1.6).
            return SessionRef.parse(uploader.await_direct_archive(remembered.uri, remembered.label))
        archived = ""
        # The server, not our memory, says what is waiting: every prearchive session of these
        # labels still receiving (facts 3.1), committed with the transport's own final step.
        for label in dict.fromkeys([t.session, *self.study_labels.values()]):
            for uri in waiting_prearchive_sessions(self.client, t.project, label):
                done = uploader.commit_session(uri, label)
                archived = archived or done
        return SessionRef.parse(archived)

    def read_back(self, files: Sequence[DicomFile]) -> VerifyReport:
        t = self.target
        # Several studies are archived under one label each (xnatio.transports.rest).
        by_label = self._by_label(files)
        if not by_label:
            return verify_session(self.client, t.project, t.subject, t.session, [])
        # One VERIFY count over all sessions: each one's events are shifted by those before it.
        totals = (len(files), total_bytes(files))
        done = (0, 0)
        reports: list[VerifyReport] = []
        for label, part in by_label.items():
            progress = _shifted(self.progress_callback, done, totals)
            reports.append(
                verify_session(
                    self.client,
                    t.project,
                    t.subject,
                    label,
                    part,
                    progress=progress,
                    sent=self.digests,
                )
            )
            done = (done[0] + len(part), done[1] + total_bytes(part))
        return merge_reports(reports) if len(reports) > 1 else reports[0]


def _shifted(
    callback: ProgressCallback | None, before: tuple[int, int], totals: tuple[int, int]
) -> ProgressCallback | None:
    """Phase.VERIFY events of one session of a multi-study upload, counted over all of them:
    ``before`` and ``totals`` are (files, bytes)."""
    if callback is None:
        return None

    def shifted(event: ProgressEvent) -> None:
        callback(
            dataclasses.replace(
                event,
                current=before[0] + event.current,
                total=totals[0],
                bytes_done=before[1] + event.bytes_done,
                bytes_total=totals[1],
            )
        )

    return shifted


def merge_reports(reports: Sequence[VerifyReport]) -> VerifyReport:
    """One report for the sessions of a multi-study upload (named after the first)."""
    first = reports[0]
    return VerifyReport(
        first.project,
        first.subject,
        first.session,
        found=all(r.found for r in reports),
        series=[s for r in reports for s in r.series],
        unmatched_scans=[x for r in reports for x in r.unmatched_scans],
        unreadable=[x for r in reports for x in r.unreadable],
    )


# Prearchive states in which a session still waits for a commit (facts 3.1, 3.2).
_WAITING = {"RECEIVING", "RECEIVING_INTERRUPT", "READY"}


def waiting_prearchive_sessions(client: XnatClient, project: str, label: str) -> list[str]:
    """``/data/prearchive/...`` URIs of the prearchive sessions named ``label`` awaiting commit."""
    data = client.get_json(f"/data/prearchive/projects/{quote(project)}")
    try:
        rows = data["ResultSet"]["Result"]
    except (KeyError, TypeError):
        return []
    out = []
    for row in rows:
        if not isinstance(row, dict) or row.get("name") != label:
            continue
        if str(row.get("status", "")) in _WAITING and row.get("url"):
            url = str(row["url"])
            out.append(url if url.startswith("/data/") else "/data" + url)
    return out
