"""What a C-STORE response status means (PS3.4 B.2.3 and PS3.7 Annex C).

The codes and their meanings come from pynetdicom's tables (``pynetdicom.status``), which cover
the general statuses and the Storage Service Class ranges (A7xx, A9xx, Cxxx, Bxxx); this module
only turns them into an outcome and one short sentence.
"""

from __future__ import annotations

from typing import NamedTuple

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category


class StatusMeaning(NamedTuple):
    stored: bool  # success or warning: the peer kept the instance
    reason: str  # empty for plain success, else one short sentence with the code


def meaning(status: int, error_comment: str = "") -> StatusMeaning:
    if status == 0x0000:
        return StatusMeaning(True, "")
    category = str(code_to_category(status))  # Warning, Failure, Cancel, Pending or Unknown
    known = STORAGE_SERVICE_CLASS_STATUS.get(status)
    description = str(known[1]) if known else ""
    text = category.lower() + (f": {description.lower()}" if description else "")
    if category == "Unknown":
        text = "failure: unknown status"
    reason = f"C-STORE status 0x{status:04X} ({text})"
    if error_comment:
        reason += f": {error_comment}"
    # PS3.7 C.3: 0x0001 and Bxxx are warnings; the instance was stored.
    return StatusMeaning(category == "Warning", reason)
