"""Send a session to a DICOM SCP (XNAT's receiver, port 8104) over parallel C-STORE associations.

    Manifest --plan--> associations (<= 128 contexts each) --C-STORE--> peer --status--> Result

* C-ECHO first, so a wrong AE title or a closed port is one sentence before anything is sent.
* Each association proposes only the (SOP class, transfer syntax) pairs its files need: each
  file's own syntax and the two uncompressed ones, one syntax per context so that the peer's
  answer tells which it accepts. Files then go as they are on disk; only when the peer refused a
  file's own syntax is it re-encoded (decompressed when a pixel decoder is installed).
* Routing: XNAT files a received instance by ``Project:/Subject:/Session:`` entries in Patient
  Comments (0010,4000) (facts file, section 6), so that element is spliced into the sent bytes;
  the files on disk are never touched and pixel data leaves byte for byte.
* Every file ends with the status of its C-STORE-RSP. An association that is aborted, rejected or
  broken is opened again with backoff and resumes after the last confirmed file.
* One process, one thread per association: the sender spends ~0.1-0.2 ms of CPU per 130 KB file
  (measured against dcmtk's storescp on loopback), so the peer, not this side, is the limit;
  more processes would only add start-up and IPC. Only re-encoding (rare) is CPU-heavy.

Modules: ``send`` (the engine, :func:`send_associations`: C-ECHO, plan, run the associations,
the result; the public API is :func:`xnatio.uploaders.send_dicom_store`), ``plan``
(:class:`AssociationPlanner`: groups, contexts, routing text), ``worker`` (one association's
loop), ``ul`` / ``pdu`` (the DICOM upper layer), ``encode`` (bytes to send), ``source`` (files or
archive members), ``status`` (what a status code means).
"""

from xnatio.transports.dicom_store.plan import (
    AssociationPlanner,
    plan_associations,
    proposed_contexts,
    routing_comment,
)
from xnatio.transports.dicom_store.send import TRANSPORT, echo, send_associations

__all__ = [
    "TRANSPORT",
    "AssociationPlanner",
    "echo",
    "plan_associations",
    "proposed_contexts",
    "routing_comment",
    "send_associations",
]
