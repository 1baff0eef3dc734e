"""Committing a REST upload: the prearchive session archived once, or Direct-Archive awaited.

::

    POST {URI}?action=commit ─▶ 301 text/plain archive URI (auto-archive project)
                             └▶ 200 ─▶ POST /data/services/archive?src=…&subject=…&session=…
                                       (200 or 303)
    (--overwrite append|delete: POST {URI}?action=build, then the archive service with
     overwrite=…, the one path on which XNAT overwrites clashing files, facts 1.5)

A commit or archive request whose success answer is lost (reset, timeout) is retried and may then
fail ("Session already exists", the prearchive entry 404). After any such error the session is
looked up (:meth:`Committer.archived_anyway`): when the experiment exists at
PROJECT/SUBJECT/label and the prearchive entry is gone, the server did the work and the commit
counts as done.

Direct-Archive (facts 1.6): the import answers ``/xapi/direct-archive/{P}/{UID}/{label}`` and the
experiment appears only after XNAT's idle interval (5 min, checked every 60 s).
:meth:`Committer.wait_for_experiment` polls that URI until it answers 404, then the experiment,
for at most ``archive_wait`` seconds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import requests

from xnatio.errors import ServerError, XnatioError
from xnatio.models import Phase
from xnatio.retry import RetryPolicy, Sleep
from xnatio.transports.rest.answers import (
    final_archive_failure,
    prearchive_path,
    redirected,
    session_uris,
    uri_list,
    wait_to_retry,
)
from xnatio.transports.rest.target import ARCHIVE_PATH, RestTarget
from xnatio.xnat.client import XnatClient, quote
from xnatio.xnat.errors import TransientError

log = logging.getLogger(__name__)

DIRECT_ARCHIVE_POLL = 5.0  # seconds between reads while Direct-Archive's experiment is awaited

# (phase, current, total, message): how the commit reports what it waits for
PhaseReport = Callable[[Phase, int, int, str], None]


class Committer:
    """The commit step of one REST target: archive a prearchive session, await Direct-Archive."""

    def __init__(
        self,
        client: XnatClient,
        target: RestTarget,
        *,
        retry: RetryPolicy,
        cancel: threading.Event,
        clock: Callable[[], float],
        sleep: Sleep | None = None,
    ) -> None:
        self.client = client
        self.target = target
        self.retry = retry
        self.cancel = cancel
        self.clock = clock
        self.sleep = sleep

    def commit_session(self, uri: str, label: str | None = None) -> str:
        """Build and archive one prearchive session as ``label`` (default: the target's session);
        return its archive URI.

        ``--overwrite none``: ``POST {uri}?action=commit`` answers 301 ``text/plain`` with the
        archive URI and no Location when the project auto-archives (facts 3.3; the Desktop
        Client reads it so), else 200 and the session waits in the prearchive, so it is archived
        with ``POST /data/services/archive?src=…&subject=…&session=…`` (facts 3.4: ``dest`` with
        ``src`` is suspect, the label overrides are not). Both merge into an existing session
        (facts 1.5). ``append``/``delete``: ``action=build`` (never archives, facts 1.3), then the
        archive service with ``overwrite``, which is what makes XNAT overwrite clashing files;
        ``action=commit`` would archive without it on an auto-archive project (facts 1.5).

        The archive service answers 200 ``text/uri-list`` or 303 to ``{siteUrl}/data/archive/…``
        (facts 3.4). A failure "FAILED: …" (500) is final, with XNAT's text; other transient
        errors are retried. When a request still fails, the session is read back
        (:meth:`archived_anyway`): a success whose answer was lost counts as a success. Any other
        redirect (a proxy, a login page) is an error naming the URL. Also the way to finish a
        resumed upload with nothing left to send.
        """
        if "/prearchive/" not in uri:
            return uri  # already in the archive (Direct-Archive, or a site routing rule)
        label = label or self.target.session
        t = self.target
        action = "commit" if t.overwrite == "none" else "build"
        try:
            # A build of a row that is gone answers 500 like a transient error (facts 3.3): on a
            # 500 the row is looked up, and a missing one is not retried.
            resp = self._archive_request(
                uri, {"action": action}, row=uri if action == "build" else None
            )
            if action == "commit" and resp.status_code == 301:
                archived = [u for u in uri_list(resp.text) if u.startswith("/data/archive/")]
                if archived:
                    return archived[0]
            if resp.status_code != 200:
                raise redirected(resp, f"{action} of {uri}")
            params = {"src": prearchive_path(uri), "subject": t.subject, "session": label}
            if t.overwrite != "none":
                params["overwrite"] = t.overwrite
            resp = self._archive_request(ARCHIVE_PATH, params)
        except ServerError:
            archived_uri = self.archived_anyway(uri, label)
            if archived_uri is None:
                raise
            return archived_uri
        if resp.status_code == 303:
            location = resp.headers.get("Location", "")
            if "/data/archive/" in location:
                return location[location.index("/data/archive/") :].split("?", 1)[0]
        if resp.status_code != 200:
            raise redirected(resp, f"archiving {uri}")
        found = [u for u in session_uris(resp, f"archiving {uri}") if "/archive/" in u]
        if not found:
            raise ServerError(f"archiving {uri} returned no archive URI", status=resp.status_code)
        return found[0]

    def _archive_request(
        self, path: str, params: dict[str, str], row: str | None = None
    ) -> requests.Response:
        """One commit/build/archive POST, retried on transient errors except XNAT's final
        archive failures: "FAILED: …" and the archive timeout (facts 3.3, 3.4). ``row``: the
        prearchive session a build is for; XNAT answers a build of a missing row with 500
        (facts 3.3: PSR:242-252), so after a 500 the row is looked up, and a row that is gone
        (archived by another request meanwhile) ends the retries at once."""
        retry_number = 0
        since: float | None = None  # the first failure: retried within the retry budget
        while True:
            try:
                return self.client.request("POST", path, params=params, idempotent_retry=False)
            except TransientError as err:
                if final_archive_failure(err.message):
                    raise ServerError(err.message, status=err.status) from None
                if row is not None and err.status == 500 and self.in_prearchive(row) is False:
                    raise ServerError(err.message, status=err.status) from None
                since = self.retry.clock() if since is None else since
                if not wait_to_retry(
                    err,
                    retry_number,
                    f"POST {path}",
                    retry=self.retry,
                    cancel=self.cancel,
                    sleep=self.sleep,
                    since=since,
                    reach=self.client.reachability,
                ):
                    raise
                retry_number += 1

    def archived_anyway(self, uri: str, label: str) -> str | None:
        """After a failed commit/archive of ``uri``: its archive URI if the server did it anyway.

        A retried commit or archive whose first answer was lost (connection reset, timeout)
        fails ("Session already exists", prearchive entry 404) although the server archived the
        session. It counts as archived when the experiment exists at PROJECT/SUBJECT/``label``
        (section 4) and the prearchive entry is gone (section 3: archiving removes it). An
        experiment that was already there (a refused second upload) leaves the entry in place,
        so that stays a failure. None when not archived, or when the read-back itself fails.
        """
        t = self.target
        try:
            self.client.get_json(t.experiment_path(label))
        except XnatioError:
            return None
        if self.in_prearchive(uri) is not False:
            return None  # still waiting in the prearchive (not archived), or unknown
        log.info("%s: the answer was lost, but the session is archived as %s", uri, label)
        return "/data" + t.archive_dest_for(label)

    def in_prearchive(self, uri: str) -> bool | None:
        """Whether the prearchive lists the session of ``uri`` (facts 3.1); None when the
        listing cannot be read."""
        try:
            listing = self.client.get_json(
                f"/data/prearchive/projects/{quote(self.target.project)}"
            )
            rows = listing["ResultSet"]["Result"]
        except (XnatioError, KeyError, TypeError):
            return None
        src = prearchive_path(uri)
        return any(isinstance(r, dict) and prearchive_path(str(r.get("url"))) == src for r in rows)

    # -- Direct-Archive ---------------------------------------------------------------------

    def await_direct_archive(self, uri: str, label: str, report: PhaseReport) -> str:
        """Wait up to ``archive_wait`` for the experiment of a Direct-Archive ``uri`` an earlier
        run sent (facts 1.6); its archive URI, or ``uri`` itself when still not archived."""
        started = self.clock()
        archived = self.wait_for_experiment(
            uri, label, started, started + self.target.archive_wait, report
        )
        return archived or uri

    def wait_for_experiment(
        self, uri: str, label: str, started: float, deadline: float, report: PhaseReport
    ) -> str | None:
        """The archive URI of Direct-Archive ``uri`` once XNAT has archived it (facts 1.6), or
        None at ``deadline`` or on cancel; raises when XNAT moved it to the prearchive.

        ``GET /xapi/direct-archive/…`` answers 200 while the session waits for XNAT's idle
        interval (5 minutes, checked every 60 s) and 404 once done; then the experiment exists.
        """
        t = self.target
        row_gone = False
        while True:
            waited = self.clock() - started
            report(
                Phase.COMMIT,
                0,
                1,
                f"waiting for XNAT to archive {label} (Direct-Archive archives after the session "
                f"has been idle, about 5-6 min; {waited:.0f} of {t.archive_wait:.0f} s)",
            )
            if not row_gone:
                try:
                    self.client.request("GET", uri)
                except ServerError as exc:
                    if exc.status != 404:
                        raise
                    row_gone = True
            if row_gone:
                try:
                    self.client.get_json(t.experiment_path(label))
                except ServerError as exc:
                    if exc.status != 404:
                        raise
                    self._moved_to_prearchive(label)
                else:
                    return "/data" + t.archive_dest_for(label)
            if self.clock() >= deadline or self.cancel.is_set():
                return None
            self.cancel.wait(min(DIRECT_ARCHIVE_POLL, max(0.0, deadline - self.clock())))

    def _moved_to_prearchive(self, label: str) -> None:
        """Raise when XNAT moved the Direct-Archive session to the prearchive (facts 1.6)."""
        listing = self.client.get_json(f"/data/prearchive/projects/{quote(self.target.project)}")
        try:
            rows = listing["ResultSet"]["Result"]
        except (KeyError, TypeError):
            return
        for row in rows:
            if isinstance(row, dict) and row.get("name") == label:
                raise ServerError(
                    f"XNAT could not archive it and moved it to the prearchive "
                    f"(status {row.get('status', '?')}): see {row.get('url', '')}"
                )
