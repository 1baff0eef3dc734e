"""PDU and command-set encoding for a DICOM SCU (PS3.8 section 9, PS3.7 section 9 and annex E).

Plain functions from values to bytes and back; :mod:`.ul` moves them over a socket.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
# Under pydicom's UID root, made as generate_uid(entropy_srcs=["xnatio", "implementation class"]).
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.88092232902743023334854365984733242511"
IMPLEMENTATION_VERSION = "XNATIO_01"


@dataclass(frozen=True, slots=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(slots=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(slots=True)
class Status:
    """What a DIMSE response said."""

    status: int
    error_comment: str = ""
    offending: str = ""


def _uid(value: str) -> bytes:
    # UIDs in PDU items are not padded (PS3.8 9.3.2.1); in command sets they are NUL-padded.
    return value.encode("ascii")


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _ae(title: str) -> bytes:
    raw = title.encode("ascii")
    if not 0 < len(raw) <= 16:
        raise ValueError(f"AE title must be 1-16 ASCII characters, not {title!r}")
    return raw.ljust(16, b" ")


def build_associate_rq(
    called_aet: str, calling_aet: str, contexts: Iterable[ProposedContext], max_pdu: int
) -> bytes:
    items = [_item(0x10, _uid(APPLICATION_CONTEXT))]
    for ctx in contexts:
        sub = _item(0x30, _uid(ctx.abstract_syntax))
        sub += b"".join(_item(0x40, _uid(ts)) for ts in ctx.transfer_syntaxes)
        items.append(_item(0x20, struct.pack(">BBBB", ctx.context_id, 0, 0, 0) + sub))
    user = _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode("ascii"))
    items.append(_item(0x50, user))
    body = struct.pack(">HH", 1, 0) + _ae(called_aet) + _ae(calling_aet) + bytes(32)
    body += b"".join(items)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _iter_items(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= len(data):
        item_type, _, length = struct.unpack_from(">BBH", data, offset)
        yield item_type, data[offset + 4 : offset + 4 + length]
        offset += 4 + length


def parse_associate_ac(
    body: bytes, proposed: dict[int, ProposedContext]
) -> tuple[dict[int, AcceptedContext], dict[int, tuple[str, int]], int]:
    """Accepted contexts by id, (abstract syntax, result) of the others, and the peer's maximum
    PDU length."""
    accepted: dict[int, AcceptedContext] = {}
    refused: dict[int, tuple[str, int]] = {}
    peer_max = 0
    for item_type, payload in _iter_items(body, 68):
        if item_type == 0x21:
            ctx_id, _, result, _ = struct.unpack_from(">BBBB", payload, 0)
            ts = ""
            for sub_type, sub in _iter_items(payload, 4):
                if sub_type == 0x40:
                    ts = sub.rstrip(b"\0 ").decode("ascii", "replace")
            if ctx_id not in proposed:
                continue
            if result == 0 and ts:
                accepted[ctx_id] = AcceptedContext(ctx_id, proposed[ctx_id].abstract_syntax, ts)
            else:
                refused[ctx_id] = (proposed[ctx_id].abstract_syntax, result)
        elif item_type == 0x50:
            for sub_type, sub in _iter_items(payload, 0):
                if sub_type == 0x51 and len(sub) == 4:
                    peer_max = struct.unpack(">I", sub)[0]
    return accepted, refused, peer_max


def _element(group: int, elem: int, value: bytes) -> bytes:
    # Command sets are always Implicit VR Little Endian (PS3.7 6.3.1).
    return struct.pack("<HHI", group, elem, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def us_value(value: int) -> bytes:
    return struct.pack("<H", value)


def build_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A group-0000 command set with its group length, elements given as (element, value)."""
    body = b"".join(_element(0, e, v) for e, v in sorted(elements))
    return _element(0, 0x0000, struct.pack("<I", len(body))) + body


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    # PS3.7 9.3.1.1: C-STORE-RQ; Command Data Set Type 0x0000 = a data set follows.
    return build_command(
        [
            (0x0002, _ui(sop_class)),
            (0x0100, us_value(0x0001)),
            (0x0110, us_value(message_id)),
            (0x0700, us_value(0x0000)),
            (0x0800, us_value(0x0000)),
            (0x1000, _ui(sop_instance)),
        ]
    )


def c_echo_rq(message_id: int) -> bytes:
    # PS3.7 9.3.5.1: C-ECHO-RQ; 0x0101 = no data set.
    return build_command(
        [
            (0x0002, _ui(VERIFICATION)),
            (0x0100, us_value(0x0030)),
            (0x0110, us_value(message_id)),
            (0x0800, us_value(0x0101)),
        ]
    )


def parse_command(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group == 0:
            out[elem] = data[offset : offset + length]
        offset += length
    return out


def text_value(raw: bytes | None) -> str:
    return raw.rstrip(b"\0 ").decode("ascii", "replace") if raw else ""
