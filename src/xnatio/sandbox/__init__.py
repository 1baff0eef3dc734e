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
- Basic auth, ``/data/JSESSION`` with an idle timeout, the form login ``/data/services/auth``,
  alias tokens, ``/xapi/siteConfig/buildInfo`` — ``auth.py``;
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

Where the sandbox knowingly differs from XNAT: every project exists (no project set-up step);
files are stored byte for byte as sent (unless ``site_anonymization`` is on), while XNAT
re-serializes the header; files sent to a session that is being archived are refused with the
"Concurrent modification" conflict instead of being silently lost; Direct-Archive sessions are
visible in the archive at once; there is no XML, no ``/xapi/schemas`` (so xnatpy cannot build its
data model) and no DICOM C-STORE receiver.

    from xnatio.sandbox import SandboxServer, Knobs
    with SandboxServer(tmp_path, users={"admin": "secret"}, knobs=Knobs(latency_ms=20)) as server:
        print(server.url)                      # http://127.0.0.1:PORT
        server.set_knobs(fail_next=2, fail_status=503, retry_after=1)
        server.archived_files("P", "S", "E")   # {SOP Instance UID: FileRecord}
"""

from xnatio.sandbox.knobs import Knobs
from xnatio.sandbox.server import SandboxServer
from xnatio.sandbox.store import FileRecord, PrearcSession

__all__ = ["FileRecord", "Knobs", "PrearcSession", "SandboxServer"]
