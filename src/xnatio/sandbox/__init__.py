"""xnatio.sandbox: a local XNAT-compatible server, the oracle of every REST test and benchmark.

It implements, over real HTTP (threaded HTTP/1.1, keep-alive, Content-Length and chunked
bodies), what ``shared/xnat-api.md`` sections 1-5 describe:

- ``POST /data/services/import`` (DICOM-zip, gradual-DICOM; XNAT's body rules of facts 1.1;
  nested archives; Ignore-Unparsable and partial writes; dest, overwrite, Direct-Archive,
  prevent_auto_commit; unknown or unreadable projects into Unassigned, facts 1.2; every data
  error a 400, facts 1.4; every stored file re-encoded and run through the default site
  anonymization script, facts 1.7) — ``importer.py``, ``api_upload.py``, ``dicom.py``, and
  ``fastdicom.py``, which gives ordinary files the same header fields and stored bytes without
  pydicom's full parse and re-serialization (what the server costs: ``docs/performance.md``);
- the prearchive and its life cycle (rows keyed by project, StudyInstanceUID and label and
  reused in any state; the idle builder every N/5 s, ``idle_seconds=``/``--idle-seconds``,
  default 300; CONFLICT/ERROR after a failed archive, facts 3.2), build/commit/move/delete,
  ``POST /data/services/archive`` with the merge/overwrite table of facts 1.5 and labels
  cleaned and subjects matched case-insensitively (facts 3.5), Direct-Archive rows archived
  only after the idle interval and ``/xapi/direct-archive/…`` (facts 1.6) — ``store.py``,
  ``api_upload.py``;
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
- optionally more than one core: ``import_workers=N``/``--import-workers N`` reads raw import
  bodies in N worker processes, the catalog staying in the server process (same answers and
  stored files) — ``workers.py``;
- XNAT's races, reproduced rather than avoided: the same-file race (400 "Concurrent file
  sends…"); an in-request build skipped while another request writes the row (200, empty
  body); a file sent while its row is being archived accepted and then lost with the folder
  (facts 1.2, the hardest reading); 403 "Operation already in progress…" and 409 "session
  document locked" for a row being archived; archive races ("…Concurrent modification is
  discouraged.", "Duplicate archive attempt…") as 400 "unable to archive for the Prearchive
  session" from the import service and 500 "FAILED: …" from the archive service.

Knobs (``Knobs``; ``SandboxServer.set_knobs``; ``GET``/``POST /_sandbox/knobs`` as JSON, no
login; request counters, and the requests in flight now and at their peak, ``inflight`` and
``inflight_peak``, at ``GET /_sandbox/stats``, whose POST resets the peak) add latency,
per-file processing time, archive time and a bandwidth cap, and inject failures (fail/reset/hang
the next N requests, optionally only under one path prefix; disk full; expired sessions; site
anonymization; 503 beyond ``overload_inflight`` requests in flight).

Users: the first user of ``users=`` (and any user named ``admin``) is a site admin who owns the
``projects=``; the others are ordinary users with no access. Projects, users and roles are kept
in the data dir's index and survive a restart.

Where the sandbox knowingly differs from XNAT: projects are created by a bare ``PUT`` (no
project XML); re-encoding is pydicom's, not dcm4che2's (same idea: new file meta with dcm4che2's
implementation UID, the header re-serialized, pixel data verbatim), and no project anonymization
script runs at archive; the session XML is a stub; there is no ``/xapi/schemas`` (so xnatpy
cannot build its data model) and no DICOM C-STORE receiver.

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
