"""xnatio.sandbox: a local XNAT-compatible server, the oracle of every REST test and benchmark.

It implements, over real HTTP, what ``shared/xnat-api.md`` sections 1-5 describe: the import
service (DICOM-zip, gradual-DICOM), the prearchive and archive services, read-back of
experiments/scans/resources/files in XNAT's JSON shapes, resources, Basic/JSESSION/alias-token
authentication, XNAT's HTML error pages, and XNAT's concurrency races. ``Knobs`` add latency,
bandwidth caps and injected faults.

    from xnatio.sandbox import SandboxServer, Knobs
    with SandboxServer(tmp_path, users={"admin": "secret"}) as server:
        print(server.url)
"""

from xnatio.sandbox.knobs import Knobs
from xnatio.sandbox.server import SandboxServer
from xnatio.sandbox.store import FileRecord, PrearcSession

__all__ = ["FileRecord", "Knobs", "PrearcSession", "SandboxServer"]
