"""Labels as XNAT archives them.

XNAT cleans subject and session labels when it archives a session: each of the characters
`` ` ~ @ # $ % ^ & * ( ) + = [ ] { } | \\ / ? : ; ' , . < > `` and the space becomes ``_``;
``-``, ``_``, ``"``, ``!`` and non-ASCII characters are kept (facts 3.5: PrearcSessionArchiver
189-263, ``OmUtils.cleanValue``). Subjects are then matched case-insensitively to an existing
label (facts 3.5).

The uploader uses this to refuse, before sending, a label XNAT would archive under another
name; the local server uses the same function to archive as XNAT does (its contract tests pin the
behaviour to the facts file character by character).
"""

from __future__ import annotations

# The characters OmUtils.cleanValue replaces with "_" (facts 3.5).
REPLACED = frozenset("`~@#$%^&*()+=[]{}|\\/?:;',.<> ")


def clean_label(value: str) -> str:
    """The label XNAT archives for ``value`` (facts 3.5)."""
    return "".join("_" if ch in REPLACED else ch for ch in value)


def is_clean(value: str) -> bool:
    """True when XNAT would archive ``value`` unchanged."""
    return clean_label(value) == value


def same_subject(a: str, b: str) -> bool:
    """XNAT matches subject labels case-insensitively (facts 3.5)."""
    return a.casefold() == b.casefold()
