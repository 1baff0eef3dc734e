"""xnatio.sandbox: a local XNAT-compatible server, the oracle of every REST test and benchmark.

It implements, over real HTTP (threaded HTTP/1.1, keep-alive, Content-Length and chunked
bodies), what ``shared/xnat-api.md`` sections 1-5 describe:

- ``POST /data/services/import`` (DICOM-zip, gradual-DICOM; raw and multipart bodies; nested
  archives; Ignore-Unparsable and partial writes; dest, overwrite, Direct-Archive,
  prevent_auto_commit; text/uri-list answers with CRLF) — ``importer.py``, ``api_upload.py``;
- the prearchive (listing, build/commit/move/delete, an idle timer that builds RECEIVING
  sessions) and ``POST /data/services/archive`` — ``store.py``;
- read-back of projects, subjects, experiments, scans, resources and files in XNAT's JSON
  shapes with MD5 ``digest``s, file and zip downloads, resources with overwrite/extract,
  PUT/DELETE of subjects and experiments — ``catalog.py``, ``api_archive.py``;
- projects, users and project roles as XNAT has them (facts 1.2, 2, 3.5): a project exists once
  created (``projects=``/``--project``, or ``PUT /data/projects/ID`` by a site admin), users
  have no access until given a role (Owners/Members/Collaborators), reads of what a user may not
  see answer 404, writes 403; ``GET /data/projects?permissions=…``, ``prearchive_code``,
  ``/xapi/access/projects`` — ``access.py``, ``api_projects.py``;
- listings in ``format=json|xml|csv|html`` (facts 4), file listings with XNAT's columns and
  numeric resource ids; the anonymization-script configuration (facts 5) — ``views.py``,
  ``api_config.py``;
- Basic auth (realm ``XNAT``), a new HTTP session per cookie-less Basic request with XNAT's cap of
  sessions per user, the lockout after failed logins, CSRF for browser-like agents,
  ``/data/JSESSION`` with an idle timeout, the form login ``/data/services/auth``, alias tokens,
  ``/xapi/siteConfig/buildInfo`` — ``auth.py``;
- a context path (``context_path=``/``--context-path``: everything under it, 404 outside) and
  the knobs of a proxy in front of XNAT (redirects, a login page) — ``server.py``;
- XNAT's HTML error pages (message in ``<h3>``) — ``pages.py``;
- XNAT's races, reproduced rather than avoided: the same-file race (400 "Concurrent file
  sends…"), and, when requests archive one session at once, "Unable to lock session for
  archiving." / "Duplicate archive attempt…" / "…Concurrent modification is discouraged."
  (400 from the import service), 403 "Operation already in progress…", 409 "session document
  locked", 423 "…Destination session in use.", 409 "Session already exists…".

Knobs (``Knobs``; ``SandboxServer.set_knobs``; ``GET``/``POST /_sandbox/knobs`` as JSON, no
login; request counters at ``GET /_sandbox/stats``) add latency, per-file processing time,
archive time and a bandwidth cap, and inject failures (fail/reset/hang the next N requests,
optionally only under one path prefix; disk full; expired sessions; site anonymization).

Users: the first user of ``users=`` (and any user named ``admin``) is a site admin who owns the
``projects=``; the others are ordinary users with no access. Projects, users and roles are kept
in the data dir's index and survive a restart.

Where the sandbox knowingly differs from XNAT: projects are created by a bare ``PUT`` (no
project XML); files are stored byte for byte as sent (unless ``site_anonymization`` is on), while
XNAT re-serializes the header; files sent to a session that is being archived are refused with
the "Concurrent modification" conflict instead of being silently lost; Direct-Archive sessions
are visible in the archive at once; there is no XML, no ``/xapi/schemas`` (so xnatpy cannot build
its data model) and no DICOM C-STORE receiver.

    from xnatio.sandbox import SandboxServer, Knobs
    with SandboxServer(
        tmp_path, users={"admin": "secret"}, projects=["P"], knobs=Knobs(latency_ms=20)
    ) as server:
        print(server.url)                      # http://127.0.0.1:PORT
        server.set_knobs(fail_next=2, fail_status=503, retry_after=1)
        server.archived_files("P", "S", "E")   # {SOP Instance UID: FileRecord}
"""

from xnatio.sandbox.knobs import Knobs
from xnatio.sandbox.server import SandboxServer
from xnatio.sandbox.store import FileRecord, PrearcSession

__all__ = ["FileRecord", "Knobs", "PrearcSession", "SandboxServer"]
