"""What a C-STORE response status means (PS3.4 B.2.3 and PS3.7 Annex C)."""

from __future__ import annotations

from typing import NamedTuple


class StatusMeaning(NamedTuple):
    stored: bool  # success or warning: the peer kept the instance
    reason: str  # empty for plain success, else one short sentence with the code


_EXACT = {
    0x0001: "warning: requested optional attributes are not supported",
    0x0107: "warning: attribute list error",
    0x0116: "warning: attribute value out of range",
    0xB000: "warning: coercion of data elements",
    0xB006: "warning: elements discarded",
    0xB007: "warning: data set does not match SOP class",
    0x0110: "failure: processing failure",
    0x0117: "failure: invalid SOP instance",
    0x0122: "failure: SOP class not supported",
    0x0124: "failure: not authorised",
    0x0210: "failure: duplicate invocation",
    0x0211: "failure: unrecognised operation",
    0x0212: "failure: mistyped argument",
    0x0213: "failure: resource limitation",
    0xFE00: "cancelled",
}
_RANGES = (
    (0xA700, 0xA7FF, "failure: refused, out of resources"),
    (0xA900, 0xA9FF, "failure: data set does not match SOP class"),
    (0xC000, 0xCFFF, "failure: cannot understand"),
    (0xB000, 0xBFFF, "warning"),
)


def meaning(status: int, error_comment: str = "") -> StatusMeaning:
    if status == 0x0000:
        return StatusMeaning(True, "")
    text = _EXACT.get(status)
    if text is None:
        text = next((t for lo, hi, t in _RANGES if lo <= status <= hi), "failure: unknown status")
    reason = f"C-STORE status 0x{status:04X} ({text})"
    if error_comment:
        reason += f": {error_comment}"
    # PS3.7 C.3: 0x0001 and Bxxx are warnings; the instance was stored.
    stored = status == 0x0001 or 0xB000 <= status <= 0xBFFF or text.startswith("warning")
    return StatusMeaning(stored, reason)
