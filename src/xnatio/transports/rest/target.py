"""Where a REST upload goes and how: :class:`RestTarget`, and the label each study goes under."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xnatio import defaults
from xnatio.compress import COMPRESS_MODES
from xnatio.errors import UsageError
from xnatio.models import StudySummary
from xnatio.xnat.client import quote

IMPORT_PATH = "/data/services/import"
ARCHIVE_PATH = "/data/services/archive"
OVERWRITE_MODES = ("none", "append", "delete")
# "tgz" is kept for older scripts and sends "zip-deflated": XNAT refuses a chunked body of any type
# but application/zip (facts 1.1), and a gzip'd tar's length is known only once it is compressed.
ARCHIVE_FORMATS = ("tar", "zip", "zip-deflated", "tgz")
WIRE_FORMATS = {"tar": "tar", "zip": "zip", "zip-deflated": "zip-deflated", "tgz": "zip-deflated"}


@dataclass(frozen=True, kw_only=True)
class RestTarget:
    """Where a session goes and how: the knobs of one REST upload.

    ``overwrite`` is what the archive step sends (facts 1.5; the import's own ``overwrite`` only
    matters when the import archives in the request, which xio never asks for, so it is never
    sent): ``none`` commits with ``action=commit`` / the archive service without ``overwrite``,
    which merge into an existing session and refuse (409) an instance it already holds;
    ``append`` and ``delete`` build, then archive with ``overwrite=append|delete``, which merges
    and overwrites clashing files. What is *sent* is decided above (:mod:`xnatio.resume`: only
    instances the session lacks, all of them with ``delete``). ``direct_archive``: XNAT ≥ 1.8.3
    Direct-Archive; ``archive_wait``: seconds to wait for its experiment (facts 1.6).
    ``study_labels``: (StudyInstanceUID, session label) pairs when the upload holds several
    studies; empty means :func:`session_labels` of the manifest being sent. A resumed run passes
    the labels of the whole manifest, so a study keeps its label whatever is left to send.
    """

    project: str
    subject: str
    session: str
    num_batches: int = defaults.REST_BATCHES
    upload_workers: int = defaults.UPLOAD_WORKERS
    archive_workers: int = defaults.ARCHIVE_WORKERS
    archive_format: str = defaults.ARCHIVE_FORMAT
    compress: str = defaults.COMPRESS
    overwrite: str = defaults.OVERWRITE
    direct_archive: bool = False
    archive_wait: float = defaults.ARCHIVE_WAIT
    study_labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("project", "subject", "session"):
            if not getattr(self, name).strip():
                raise UsageError(f"the XNAT {name} label must not be empty")
        if self.archive_format not in ARCHIVE_FORMATS:
            raise UsageError(f"archive format must be one of {', '.join(ARCHIVE_FORMATS)}")
        if self.compress not in COMPRESS_MODES:
            raise UsageError(f"--compress must be one of {', '.join(COMPRESS_MODES)}")
        if self.overwrite not in OVERWRITE_MODES:
            raise UsageError(f"--overwrite must be one of {', '.join(OVERWRITE_MODES)}")
        for name in ("num_batches", "upload_workers", "archive_workers"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1")
        if self.archive_wait < 0:
            raise UsageError("--archive-wait must not be negative")

    @property
    def wire_format(self) -> str:
        """The archive actually sent (``tgz`` sends a deflated zip, see ARCHIVE_FORMATS).

        ``compress`` applies to the default tar: ``always`` sends a deflated zip, ``auto`` a zip
        whose entries are deflated while the link is slower than the compressor
        (:mod:`xnatio.compress`; a chunked body must be ``application/zip``, facts 1.1),
        ``never`` the tar. A zip format asked for by name is sent as named.
        """
        if self.archive_format == "tar" and self.compress != "never":
            return "zip-deflated" if self.compress == "always" else "zip-auto"
        return WIRE_FORMATS[self.archive_format]

    def archive_dest_for(self, label: str) -> str:
        return (
            f"/archive/projects/{quote(self.project)}/subjects/{quote(self.subject)}"
            f"/experiments/{quote(label)}"
        )

    def experiment_path(self, label: str) -> str:
        """The REST path of the experiment ``label`` of this project and subject (facts 4)."""
        return (
            f"/data/projects/{quote(self.project)}/subjects/{quote(self.subject)}"
            f"/experiments/{quote(label)}"
        )


def session_labels(studies: Sequence[StudySummary], session: str) -> dict[str, str]:
    """StudyInstanceUID -> archive label: the first study (``Manifest.studies()`` puts the largest
    first, ties in the order found) keeps ``session``, the others get ``session_2``, ``_3``…"""
    return {s.study_uid: session if i == 0 else f"{session}_{i + 1}" for i, s in enumerate(studies)}
