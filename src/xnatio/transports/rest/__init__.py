"""REST transport: stream series-aligned archives into XNAT's import service, then archive once.

The shape of one upload (sections 1 and 3 of ``shared/xnat-api.md``, "facts")::

    PUT subject ─▶ N × POST /data/services/import (prevent_auto_commit, no dest)
                ─▶ the same prearchive URI from every batch (facts 1.2: one row per study+label)
                ─▶ POST {URI}?action=commit ─▶ 301 text/plain archive URI (auto-archive project)
                                             └▶ 200 ─▶ POST /data/services/archive?src=…
                                                       &subject=…&session=… (200 or 303)
    (--overwrite append|delete: POST {URI}?action=build, then the archive service with
     overwrite=…, the one path on which XNAT overwrites clashing files, facts 1.5)

Where each part lives:

* :mod:`.target` — :class:`RestTarget` (project/subject/session and the knobs) and the label each
  study goes under;
* :mod:`.bodies` — streamed request bodies (counted, cancellable) and archive-PATH members;
* :mod:`.send` — the batch sender: bounded workers, one import request per batch, retries, and
  files XNAT refused dropped one by one;
* :mod:`.answers` — reading XNAT's answers (URI lists, the one file an error names, final failures);
* :mod:`.commit` — the commit/archive step and the wait for Direct-Archive;
* :mod:`.state` — every file's outcome while the upload runs;
* :mod:`.uploader` — :class:`RestUploader`, the stages in order and the result;
* :mod:`.transport` — :class:`RestTransport`, what resume asks of REST (on the server already,
  commit what earlier runs left, read back).

Every instance is sent as ``{series}/{SOP Instance UID}.dcm``: XNAT keeps that name (facts 1.2)
while it rewrites the bytes (facts 1.7), so read-back finds each instance by it
(:mod:`xnatio.verify`), and a re-run finds what the session already holds (:mod:`xnatio.resume`).

Direct-Archive (facts 1.6): the import answers ``/xapi/direct-archive/{P}/{UID}/{label}`` and the
experiment appears only after XNAT's idle interval (5 min, checked every 60 s). The uploader polls
that URI until it answers 404, then the experiment, for at most ``archive_wait`` seconds; when the
bound is reached, the result lists the URI in ``pending`` (sent, not yet archived).

Sending every batch to the prearchive without ``dest`` and committing once is what the XNAT Desktop
Client does: with an ``/archive`` dest every request would build and archive the same session and
concurrent requests would race ("Unable to lock session for archiving", lost files).

Several studies (``allow_multiple_studies``): XNAT keys prearchive sessions by StudyInstanceUID
(section 1), so each study becomes a session of its own, and two of them under one label would
collide in the archive ("Session already exists", or a CONFLICT entry left in the prearchive). So
each study gets its own label (:func:`session_labels`): the largest study (most files; the first
found on a tie) keeps SESSION, the others become SESSION_2, SESSION_3, … in that order; every
request carries the files of one study only, and every session is committed and archived.
``UploadResult.session_uris`` lists them all, the SESSION one first (``session_uri``).
"""

from xnatio.transports.rest.answers import UnassignedError, session_uris
from xnatio.transports.rest.commit import Committer
from xnatio.transports.rest.send import BAD_MEMBERS_IN_A_ROW, BatchSender
from xnatio.transports.rest.target import (
    ARCHIVE_FORMATS,
    ARCHIVE_PATH,
    IMPORT_PATH,
    OVERWRITE_MODES,
    RestTarget,
    session_labels,
)
from xnatio.transports.rest.uploader import RestUploader

__all__ = [
    "ARCHIVE_FORMATS",
    "ARCHIVE_PATH",
    "BAD_MEMBERS_IN_A_ROW",
    "IMPORT_PATH",
    "OVERWRITE_MODES",
    "BatchSender",
    "Committer",
    "RestTarget",
    "RestUploader",
    "UnassignedError",
    "session_labels",
    "session_uris",
]
