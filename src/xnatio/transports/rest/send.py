"""The batch sender: every batch streamed into ``POST /data/services/import`` until it lands.

Each batch is one request (facts 1.1) into the prearchive without ``dest`` (``prevent_auto_commit``,
facts 1.2/1.3), or with ``Direct-Archive=true`` (facts 1.6); every instance goes as
``{series}/{SOP Instance UID}.dcm``, the name XNAT keeps (facts 1.2) and read-back finds it by.

Concurrency and memory (s3transfer-style bounds, taken where work is submitted):

* Each batch is one task (prepare, then send) in an :class:`xnatio.coordinator.BoundedExecutor`
  of ``upload_workers + archive_workers`` slots: a slot is taken before the batch is submitted
  (the submitter blocks while all are taken) and given back when its upload ends, so at most that
  many batches exist at once.
* A gate of ``upload_workers`` lets only that many tasks send: never more import requests in
  flight, and the connection pool of the client is sized to it. The other tasks prepare the next
  batches meanwhile (stat every source file against discovery, lay out the archive); packing
  itself (tar/zip headers, deflate for zip-deflated) happens inside the streaming request body, so
  nothing is built ahead in memory or on disk.
* One :class:`xnatio.coordinator.Coordinator` per upload is the one cancel path (Ctrl-C, SIGTERM
  turned into KeyboardInterrupt by the CLI, ``cancel`` set from outside, an unhandled error in a
  task): bodies check its event mid-read and backoffs wait on it.

Peak memory ≈ manifest (~1 KiB per file) + (upload_workers + archive_workers) × (~1 KiB per file
in a batch, its archive layout) + upload_workers × (2 × ``bodies.CHUNK``, 64 KiB [+ ~256 KiB
deflater for zip-deflated]). For 15,000 files in 42 batches with 42 + 5 workers: ~15 MB + ~17 MB
+ ~5 MB (~16 MB deflating). No
temporary copy of the dataset is ever written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import requests

from xnatio.archive import ArchiveStream, check_sources, instance_member_names, make_archive_stream
from xnatio.compress import Compression
from xnatio.coordinator import BoundedExecutor, Coordinator, ExecutorFactory, thread_pool
from xnatio.errors import ServerError
from xnatio.events import ProgressCounter
from xnatio.models import Batch, DicomFile, Manifest, file_path, total_bytes
from xnatio.retry import RetryPolicy, Sleep
from xnatio.transports.rest.answers import (
    culprit,
    reason,
    refused_in_a_row,
    session_uris,
    wait_to_retry,
)
from xnatio.transports.rest.bodies import (
    ArchiveMembers,
    SizedBody,
    StreamBody,
    UploadCancelled,
)
from xnatio.transports.rest.state import OnConfirmed, UploadRun
from xnatio.transports.rest.target import IMPORT_PATH, RestTarget
from xnatio.verify import SentDigests
from xnatio.xnat.client import XnatClient
from xnatio.xnat.errors import TransientError

log = logging.getLogger(__name__)


class Packed(Protocol):
    """A batch's files as an archive, re-iterable once per attempt: a streamed archive of files
    (:class:`xnatio.archive.ArchiveStream`) or the members of an archive PATH
    (:class:`ArchiveMembers`)."""

    content_type: str

    @property
    def size(self) -> int | None: ...  # None: sent chunked (zip-deflated)

    @property
    def members(self) -> Sequence[tuple[str, DicomFile]]: ...  # (entry name, file)

    def __iter__(self) -> Iterator[bytes]: ...


# XNAT answers a full disk or a failing anonymization script as 400 "unable to read DICOM object
# NAME" (facts 1.4), like a file that is not DICOM. Files discovery read as DICOM refused this many
# times in a row stop the batch: the cause is the server, and one request per file would follow.
BAD_MEMBERS_IN_A_ROW = 3


class BatchSender:
    """Sends the batches of one upload into ``run``; :meth:`send_all` returns once all ended."""

    def __init__(
        self,
        client: XnatClient,
        target: RestTarget,
        run: UploadRun,
        progress: ProgressCounter,
        *,
        coordinator: Coordinator,
        retry: RetryPolicy,
        sleep: Sleep | None = None,
        executor: ExecutorFactory | None = None,
        on_confirmed: OnConfirmed | None = None,
        compression: Compression | None = None,
        digests: SentDigests | None = None,
    ) -> None:
        self.client = client
        # MD5 of each file's bytes as sent, for read-back (xnatio.verify); None: not computed.
        self.digests = digests
        self.target = target
        self.run = run
        self.progress = progress
        self.coordinator = coordinator
        self.cancel = coordinator.event
        self.retry = retry
        self.sleep = sleep
        self.executor = executor
        self.on_confirmed = on_confirmed
        # One decision for every batch of the upload: the wire rate is that of all its bodies.
        self.compression = compression or Compression(target.compress)

    def send_all(self, manifest: Manifest, batches: list[Batch]) -> None:
        if manifest.source_archive is not None:
            for batch in batches:  # one, or one per study
                self.send_archive_file(manifest.source_archive, batch)
        else:
            self._pipeline(manifest.root, batches)

    def _pipeline(self, root: Path, batches: list[Batch]) -> None:
        """Prepare and send every batch under the coordinator; return once all have ended.

        One task per batch (prepare, then send) in a :class:`BoundedExecutor` of
        ``upload_workers + archive_workers`` slots: submitting blocks while that many batches are
        in the pipeline (no polling), and a gate of ``upload_workers`` lets only that many send at
        once while the others are prepared ahead. The one cancel path: Ctrl-C or SIGTERM here
        (KeyboardInterrupt), ``cancel`` set from outside, or an exception a task did not handle
        cancels the coordinator; streaming bodies and backoffs see its event and stop mid-read, the
        pool is waited for (promptly), and the exception re-raised. Outcomes are read only after
        the pool has ended.
        """
        t = self.target
        coordinator = self.coordinator
        sending = threading.BoundedSemaphore(t.upload_workers)
        # The first batch is prepared alone, then the others together: its request leaves
        # first, not once every batch's files are checked (issue 16: 0.4-0.9 s at 100,000
        # files). Set once the first batch is prepared (or fails, or its task ends early), and
        # before a cancelled pool is shut.
        first_prepared = threading.Event()

        def task(batch: Batch) -> None:
            try:
                if coordinator.cancelled:
                    return
                if batch is not batches[0]:
                    first_prepared.wait()
                    if coordinator.cancelled:
                        return
                try:
                    files = self.prepare(batch)
                except Exception as exc:  # the batch is reported, others go on
                    self.run.fail(batch.files, f"could not prepare the batch: {exc}", batch.index)
                    self.progress.update(batch_done=True, failed=True)
                    return
                finally:
                    if batch is batches[0]:
                        first_prepared.set()
                with sending:
                    if coordinator.cancelled:
                        return
                    self.send_guarded(batch, files, root)
            except BaseException as exc:
                coordinator.cancel(exc)
                raise
            finally:
                if batch is batches[0]:
                    first_prepared.set()

        workers = t.upload_workers + t.archive_workers
        pool = BoundedExecutor(workers, self.executor or thread_pool("xnatio-rest"))
        try:
            for batch in batches:
                if coordinator.cancelled:
                    break
                pool.submit(task, batch)  # blocks while `workers` batches are in flight
            pool.shutdown()  # waits for the last batches (Ctrl-C here cancels them too)
        except BaseException as exc:
            # Cuts every request in flight, even one whose answer is awaited (its connection is
            # shut down), so the pool ends promptly; then the exception goes on.
            coordinator.cancel(exc)
            first_prepared.set()  # a task waiting for a first batch that will not run
            pool.shutdown(cancel_futures=True)
            raise
        if coordinator.exception is not None:
            raise coordinator.exception

    def prepare(self, batch: Batch) -> Sequence[DicomFile]:
        """Check the batch's files against discovery; return those still fit to send (the
        batch's own view of the manifest when all are: no record per file held)."""
        ok, bad = check_sources(batch.files)
        for f, why in bad:
            self.run.fail([f], why, batch.index)
        return ok

    def send_guarded(self, batch: Batch, files: Sequence[DicomFile], root: Path) -> None:
        """:meth:`send_batch`, with a bug in it reported on the batch's files, not lost."""
        try:
            self.send_batch(batch, files, root)
        except Exception as exc:
            log.exception("batch %d: unexpected error", batch.index + 1)
            left = self.run.not_sent(files)
            self._give_up(left, RuntimeError(f"internal error: {exc!r}"), 0, batch.index)

    def send_batch(self, batch: Batch, files: Sequence[DicomFile], root: Path) -> None:
        """Send one batch of files under ``root``, each packed as it is read into a
        ``wire_format`` archive (:func:`xnatio.archive.make_archive_stream`)."""

        def pack(left: Sequence[DicomFile]) -> Packed:
            names = instance_member_names(left)
            return make_archive_stream(
                left,
                self.target.wire_format,
                root=root,
                names=names,
                compression=self.compression,
                on_digest=self.digests.record if self.digests is not None else None,
            )

        self._send_until_done(batch, files, pack, f"batch {batch.index + 1}")

    def send_archive_file(self, archive: Path, batch: Batch) -> None:
        """PATH is an archive: its DICOM members (of one study, ``batch`` being one of the
        requests when it holds several) re-packed into a tar on the fly (:class:`ArchiveMembers`),
        each under its instance name so that read-back finds it (facts 1.2), never extracted to
        disk.
        """

        def pack(left: Sequence[DicomFile]) -> Packed:
            on_digest = self.digests.record if self.digests is not None else None
            return ArchiveMembers(archive, left, instance_member_names(left), on_digest)

        self._send_until_done(batch, batch.files, pack, archive.name)

    def _send_until_done(
        self,
        batch: Batch,
        files: Sequence[DicomFile],
        pack: Callable[[Sequence[DicomFile]], Packed],
        what: str,
    ) -> None:
        """Send ``files`` of ``batch`` until they land, fail for good, or the upload is cancelled.

        Files XNAT cannot read as DICOM, and files that vanish or change while streaming, are
        failed one by one with their reason and the rest is packed and sent again (no
        ``Ignore-Unparsable``: every file must be accounted for). Transient failures are retried
        with backoff; anything else fails the rest with XNAT's message.
        """
        remaining = files
        partial = len(remaining) < len(batch.files)
        label = self.run.label_of(batch.files, self.target.session)
        retry_number = 0
        since: float | None = None  # when this batch first failed (the retry budget's start)
        refused = 0  # files XNAT could not read, in a row
        while remaining and not self.cancel.is_set():
            try:
                packed = pack(remaining)
            except OSError as exc:  # an archive PATH that can no longer be read
                self._give_up(remaining, exc, 0, batch.index)
                return
            payload = total_bytes(remaining)
            body = (
                SizedBody(packed, payload, self.progress, self.cancel, packed.size)
                if packed.size is not None
                else StreamBody(
                    packed,
                    payload,
                    self.progress,
                    self.cancel,
                    raw_sent=_raw_sent(packed),
                    link=self.compression,
                )
            )
            # The display shows these files as in flight until the request ends.
            self.progress.update(in_flight=len(remaining))
            try:
                resp = self._post_import(body, packed.content_type, label)
            except Exception as exc:  # classified below; the files are always accounted for
                self.progress.update(in_flight=-len(remaining))
                err = body.failure(exc)
                if isinstance(err, UploadCancelled) or self.cancel.is_set():
                    return
                one = culprit(err, packed.members)
                if one is not None:
                    self.run.fail([one[0]], one[1], batch.index)
                    gone = file_path(one[0])
                    remaining = [f for f in remaining if file_path(f) != gone]
                    partial = True
                    refused = refused + 1 if isinstance(err, ServerError) else 0
                    if refused >= BAD_MEMBERS_IN_A_ROW and remaining:
                        self._give_up(remaining, refused_in_a_row(err, refused), 0, batch.index)
                        return
                    continue
                since = self.retry.clock() if since is None else since
                if self._wait_to_retry(err, retry_number, what, since):
                    retry_number += 1
                    continue
                self._give_up(remaining, err, retry_number, batch.index)
                return
            body.received()  # XNAT answered: it read the whole body
            self.progress.update(in_flight=-len(remaining))
            self._landed(remaining, resp, batch.index, partial, label)
            return
        if not self.cancel.is_set():  # every file failed on its own
            self.progress.update(batch_done=True, failed=True)

    def _params(self, label: str) -> dict[str, str]:
        t = self.target
        params = {
            "import-handler": "DICOM-zip",
            "PROJECT_ID": t.project,
            "SUBJECT_ID": t.subject,
            "EXPT_LABEL": label or t.session,
            "inbody": "true",
        }
        # No "overwrite" here: the import's overwrite only matters when it archives in the
        # request (facts 1.5), and xio archives in a separate step (or Direct-Archive does).
        if t.direct_archive:
            params["Direct-Archive"] = "true"
        else:
            # No dest: the batch stays RECEIVING in the prearchive until our single commit.
            params["prevent_auto_commit"] = "true"
        return params

    def _post_import(self, body: StreamBody, content_type: str, label: str) -> requests.Response:
        # Not retried inside the client: a streamed body is rebuilt (and its files re-checked)
        # by the caller for every attempt.
        # A cancel cuts it at any point: mid-body (the body checks the event) and while XNAT's
        # answer is awaited (the coordinator shuts the connection down).
        return self.client.request(
            "POST",
            IMPORT_PATH,
            params=self._params(label),
            data=body,
            headers={"Content-Type": content_type},
            idempotent_retry=False,
            cancel=self.coordinator,
        )

    def _wait_to_retry(
        self, err: BaseException, retry_number: int, what: str, since: float | None = None
    ) -> bool:
        return wait_to_retry(
            err,
            retry_number,
            what,
            retry=self.retry,
            cancel=self.cancel,
            sleep=self.sleep,
            since=since,
            reach=self.client.reachability,
        )

    def _give_up(
        self, files: Sequence[DicomFile], err: BaseException, retry_number: int, batch: int
    ) -> None:
        why = reason(err)
        if isinstance(err, TransientError) and retry_number:
            why = f"{why} (gave up after {retry_number + 1} attempts)"
        self.run.fail(files, why, batch)
        self.run.error(f"batch {batch + 1}: {why}")
        self.progress.update(batch_done=True, failed=True)

    def _landed(
        self,
        files: Sequence[DicomFile],
        resp: requests.Response,
        batch: int,
        partial: bool,
        label: str,
    ) -> None:
        try:
            uris = session_uris(resp, f"batch {batch + 1}")
        except ServerError as exc:
            self.run.fail(files, exc.message, batch)
            self.run.error(f"batch {batch + 1}: {exc.message}")
            self.progress.update(batch_done=True, failed=True)
            return
        if not uris:
            # 200 with an empty body: a series filter or the site script's "reject" dropped
            # every file, or a skipped in-request build (facts 1.3); nothing stored.
            why = (
                "XNAT answered 200 with no session URI: it stored none of these files (a series "
                "filter or anonymization 'reject' on the server drops them, facts 1.3)"
            )
            self.run.fail(files, why, batch)
            self.run.error(f"batch {batch + 1}: {why}")
            self.progress.update(batch_done=True, failed=True)
            return
        # Every URI: a request can fill several sessions (one per study XNAT found in it).
        confirmed = self.run.confirm(files, uris, batch, label)
        if self.on_confirmed is not None:
            self.on_confirmed(confirmed)
        self.progress.update(files=len(files), batch_done=True, failed=partial)


def _raw_sent(packed: Packed) -> Callable[[], int] | None:
    """How many uncompressed bytes a chunked (compressed) stream has produced so far."""
    if isinstance(packed, ArchiveStream):
        stream: ArchiveStream[DicomFile] = packed
        return lambda: stream.raw_sent
    return None
