"""C-STORE as a :class:`~xnatio.transports.base.Transport`: what resume asks of it, and no more.

Every C-STORE success response is a confirmation; there is no commit step (XNAT's receiver
builds the session itself) and no read-back right after the run (it does so only after an idle
period, facts 3.2, 6). No overwrite either: XNAT files a re-sent instance over the same one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from xnatio.models import DicomFile, Manifest, SessionRef, UploadResult
from xnatio.plan import Planner
from xnatio.transports.base import Confirmations, OnConfirmed, both_hooks
from xnatio.transports.dicom_store.plan import AssociationPlanner
from xnatio.transports.dicom_store.send import send_associations

if TYPE_CHECKING:
    from xnatio.verify import VerifyReport


class DicomStoreTransport:
    """One C-STORE upload's peer side, for :func:`xnatio.resume.resumable_upload`.

    ``send_options`` go to :func:`~xnatio.transports.dicom_store.send.send_associations`
    (calling AE title, batches, timeouts, routing, retries, progress, executor); ``planner``
    groups each part into associations (default: :class:`AssociationPlanner`).
    """

    name = "dicom-store"
    needs_commit = False
    can_read_back = False

    def __init__(
        self,
        host: str,
        port: int,
        called_aet: str,
        *,
        project: str,
        subject: str,
        session: str,
        on_confirmed: OnConfirmed | None = None,
        planner: Planner | None = None,
        send_options: dict[str, Any],
    ) -> None:
        self.host, self.port, self.called_aet = host, port, called_aet
        self.project, self.subject, self.session = project, subject, session
        self.on_confirmed = on_confirmed
        self.planner = planner if planner is not None else AssociationPlanner()
        self.send_options = send_options

    def send(
        self, part: Manifest, confirmations: Confirmations, overwrite: str | None
    ) -> UploadResult:
        return send_associations(
            part.root,
            self.host,
            self.port,
            self.called_aet,
            project=self.project,
            subject=self.subject,
            session=self.session,
            manifest=part,
            on_confirmed=both_hooks(confirmations.on_confirmed, self.on_confirmed),
            planner=self.planner,
            **self.send_options,
        )

    def commit(self, remembered: SessionRef | None) -> SessionRef | None:
        return remembered  # nothing to commit: XNAT's receiver files the session itself

    def on_server(self, files: Sequence[DicomFile]) -> list[DicomFile]:
        return []  # not asked over DICOM; a re-sent instance replaces the same one

    def read_back(self, files: Sequence[DicomFile]) -> VerifyReport:
        raise NotImplementedError("C-STORE sessions are read back later with `xio verify`")
