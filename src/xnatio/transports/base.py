"""What a transport is to the stages above it: send a batch and confirm it; commit; read back.

Resume (the journal and the lock, :mod:`xnatio.resume`), verification and reporting call only
this protocol; they know nothing of REST, the prearchive or DICOM networking. REST implements it
in :class:`xnatio.transports.rest.transport.RestTransport`, C-STORE in
:class:`xnatio.transports.dicom_store.transport.DicomStoreTransport`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from xnatio.models import DicomFile, FileOutcome, Manifest, SessionRef, UploadResult

if TYPE_CHECKING:
    from xnatio.plan import Planner
    from xnatio.verify import VerifyReport


OnConfirmed = Callable[[Sequence[FileOutcome]], None]


def both_hooks(journal: OnConfirmed, caller: OnConfirmed | None) -> OnConfirmed:
    """The journal's hook, then the caller's own (the Python API's ``on_confirmed``)."""
    if caller is None:
        return journal

    def both(outcomes: Sequence[FileOutcome]) -> None:
        journal(outcomes)
        caller(outcomes)

    return both


class Confirmations(Protocol):
    """What a transport reports into, from its worker threads, as the server confirms files."""

    def on_confirmed(self, outcomes: Sequence[FileOutcome]) -> None: ...


class Transport(Protocol):
    """One way of sending a session, seen from resume.

    ``needs_commit``: the files wait for a commit after they are sent (REST's prearchive); the
    result of :meth:`send` says in ``committed`` whether that commit happened.
    ``can_read_back``: the session can be read back right after the run (REST; not C-STORE,
    whose session XNAT builds only after an idle period, facts 3.2, 6).
    ``planner``: how :meth:`send` cuts a part into batches (REST requests, C-STORE
    associations), through the one interface of :mod:`xnatio.plan`.
    """

    name: str
    needs_commit: bool
    can_read_back: bool
    planner: Planner

    def send(
        self, part: Manifest, confirmations: Confirmations, overwrite: str | None
    ) -> UploadResult:
        """Send ``part``, reporting each confirmed file into ``confirmations`` as it goes, and
        commit what it sent. ``overwrite`` is None for a first run; ``"append"`` when files of
        this session were sent by an earlier run (the session must merge, not answer 409), and
        ``"delete"`` when files changed since an earlier run sent them (the server's copies are
        replaced). A user's own ``delete`` wins over ``append``."""
        ...

    def commit(self, remembered: SessionRef | None) -> SessionRef | None:
        """Commit what earlier runs sent when nothing is left to send; ``remembered`` is what
        the journal kept. Returns the committed session, or a Direct-Archive one still to be
        archived by XNAT; raises :class:`~xnatio.errors.ServerError` (404) when what waited
        is gone."""
        ...

    def on_server(self, files: Sequence[DicomFile]) -> list[DicomFile]:
        """The files (of those given) whose instances the server's session already holds."""
        ...

    def read_back(self, files: Sequence[DicomFile]) -> VerifyReport:
        """Read the session back and compare it with ``files``."""
        ...
