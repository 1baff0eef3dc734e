"""The C-STORE plan: which files share an association (:class:`AssociationPlanner`, the C-STORE
side of :class:`xnatio.plan.Planner`), what each association proposes, and the routing comment
XNAT reads (facts file, section 6)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from xnatio.errors import UsageError
from xnatio.models import Batch, DicomFile, Manifest, total_bytes
from xnatio.transports.dicom_store.encode import UNCOMPRESSED
from xnatio.transports.dicom_store.ul import ProposedContext

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context IDs 1..255
# XNAT's routing values match [\w-]* (facts file, section 6), a Java pattern whose \w is ASCII
# (java.util.regex.Pattern without UNICODE_CHARACTER_CLASS); the element is sent in ASCII too, so
# a non-ASCII letter is refused here instead of failing every file at send time.
_ROUTE_VALUE = re.compile(r"^[\w-]+$", re.ASCII)


def routing_comment(project: str | None, subject: str | None, session: str | None) -> str | None:
    """``Project:P Subject:S Session:E`` with the parts given, or None if none is."""
    parts = []
    for key, value in (("Project", project), ("Subject", subject), ("Session", session)):
        if value is None or value == "":
            continue
        if not _ROUTE_VALUE.match(value):
            raise UsageError(
                f"{key.lower()} {value!r} cannot be routed over C-STORE: XNAT reads only letters, "
                "digits, '_' and '-' in Patient Comments."
            )
        parts.append(f"{key}:{value}")
    return " ".join(parts) if parts else None


class AssociationPlanner:
    """C-STORE: one batch per association (:func:`plan_associations`: in discovery order, so
    series stay together, byte-balanced, at most 128 presentation contexts each)."""

    def plan(self, manifest: Manifest, parts: int) -> list[Batch]:
        groups = plan_associations(manifest.files, parts)
        return [Batch(index=i, files=tuple(group)) for i, group in enumerate(groups)]


def plan_associations(files: Sequence[DicomFile], count: int) -> list[list[DicomFile]]:
    """Split ``files`` (in order, so series stay together) into about ``count`` groups of similar
    byte size, then split any group that would need more than 128 presentation contexts."""
    if not files:
        return []
    count = max(1, min(count, len(files)))
    total = total_bytes(files) or len(files)
    groups: list[list[DicomFile]] = []
    current: list[DicomFile] = []
    done = 0
    for f in files:
        current.append(f)
        done += f.size or 1
        # Close the group when its share of the bytes is reached.
        if done * count >= total * (len(groups) + 1) and len(groups) < count - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    out: list[list[DicomFile]] = []
    for group in groups:
        keys: set[tuple[str, str]] = set()
        part: list[DicomFile] = []
        for f in group:
            need = _needed(f) - keys
            if part and len(keys) + len(need) > MAX_CONTEXTS:
                out.append(part)
                part, keys = [], set()
                need = _needed(f)
            part.append(f)
            keys |= need
        out.append(part)
    return out


def _needed(f: DicomFile) -> set[tuple[str, str]]:
    return {(f.sop_class_uid, ts) for ts in (f.transfer_syntax_uid, *UNCOMPRESSED)}


def proposed_contexts(files: Sequence[DicomFile]) -> list[ProposedContext]:
    """One context per (SOP class, transfer syntax), one syntax each, in first-seen order."""
    pairs: dict[tuple[str, str], None] = {}
    for f in files:
        for ts in (f.transfer_syntax_uid, *UNCOMPRESSED):
            pairs.setdefault((f.sop_class_uid, ts))
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} presentation contexts needed; the limit is 128")
    return [ProposedContext(2 * i + 1, sop, (ts,)) for i, (sop, ts) in enumerate(pairs)]
