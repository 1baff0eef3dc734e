"""A C-STORE sender built on pynetdicom's ``Association``, N associations in N threads.

The benchmark's reference for xio's own upper-layer client: the same files, the same number of
parallel associations, the same receiver. Usage (run by the harness):

    python benchmarks/pynetdicom_parallel.py DIR HOST PORT CALLED_AET ASSOCIATIONS

Exits 0 only if every file was stored (status 0x0000); prints one summary line.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.presentation import build_context


def main() -> int:
    folder, host, port, called, n = sys.argv[1:6]
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    associations = max(1, min(int(n), len(files)))
    # The contexts the files need: (SOP Class, own transfer syntax), read once as pynetdicom's
    # own storescu app does.
    needed: dict[str, set[str]] = {}
    for p in files:
        ds = dcmread(p, stop_before_pixels=True)
        needed.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    contexts = [build_context(sop, sorted(ts)) for sop, ts in needed.items()]
    stored = 0
    lock = threading.Lock()

    def send(chunk: list[Path]) -> None:
        nonlocal stored
        ae = AE(ae_title="PYNETDICOM")
        ae.requested_contexts = contexts
        assoc = ae.associate(host, int(port), ae_title=called)
        if not assoc.is_established:
            return
        ok = 0
        for p in chunk:
            status = assoc.send_c_store(p)
            if status and status.Status == 0x0000:
                ok += 1
        assoc.release()
        with lock:
            stored += ok

    threads = [
        threading.Thread(target=send, args=(files[i::associations],)) for i in range(associations)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"stored {stored} of {len(files)} files over {associations} associations")
    return 0 if stored == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
