"""Reading (and one rewrite of) an A-ASSOCIATE-RQ PDU's bytes, before pynetdicom decodes it (PS3.8 9.3.2).

The edge holds the whole request before handing it on, so it can look at it cheaply: the AE
titles, and the transfer syntaxes proposed in each presentation context. Our SCP accepts every
storage-like context (see :func:`dicom_router.scp.serve_any_storage`), and pynetdicom then takes the
*first* transfer syntax proposed in it. :func:`prefer_transfer_syntaxes` moves the ones we know to
the front of each context, keeping the sender's order among them, so an odd first proposal (a video
syntax, a private one) is taken only when the sender offers nothing else. Item lengths do not change.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterator

_FIXED = 68  # protocol version, reserved, called AE, calling AE, reserved
_PRESENTATION_CONTEXT = 0x20
_TRANSFER_SYNTAX = 0x40
_ITEM = struct.Struct(">BBH")


class MalformedRequest(ValueError):
    """The A-ASSOCIATE-RQ's items do not add up."""


def ae_titles(pdu: bytes) -> tuple[str, str]:
    """The called and calling AE titles of a whole A-ASSOCIATE-RQ PDU (header included), stripped."""
    body = pdu[6:]
    return (body[4:20].decode("ascii", "replace").strip(), body[20:36].decode("ascii", "replace").strip())


def prefer_transfer_syntaxes(pdu: bytes, known: Collection[str]) -> bytes:
    """``pdu`` with each presentation context's known transfer syntaxes first, in the sender's order.

    Raises
    ------
    MalformedRequest
        When an item's length runs past its container.
    """
    out = bytearray(pdu)
    for item_type, pos, item_end in _items(pdu, 6 + _FIXED, len(pdu), "the PDU"):
        if item_type == _PRESENTATION_CONTEXT:
            _reorder(pdu, out, pos + 8, item_end, known)  # context id, 3 reserved bytes, then sub-items
    return bytes(out)


def _items(pdu: bytes, start: int, end: int, container: str) -> Iterator[tuple[int, int, int]]:
    """``(type, start, end)`` of each item (header included) between ``start`` and ``end``."""
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise MalformedRequest(f"an item header runs past {container}")
        item_type, _, length = _ITEM.unpack_from(pdu, pos)
        item_end = pos + 4 + length
        if item_end > end:
            raise MalformedRequest(f"an item runs past {container}")
        yield item_type, pos, item_end
        pos = item_end


def _reorder(pdu: bytes, out: bytearray, start: int, end: int, known: Collection[str]) -> None:
    syntaxes: list[tuple[bool, bytes]] = []
    first: int | None = None
    for sub_type, pos, sub_end in _items(pdu, start, end, "its presentation context"):
        if sub_type == _TRANSFER_SYNTAX:
            if first is None:
                first = pos
            elif pos != first + sum(len(raw) for _, raw in syntaxes):
                return  # transfer syntaxes not side by side: leave this context as it is
            uid = pdu[pos + 4:sub_end].rstrip(b"\0 ").decode("ascii", "replace")
            syntaxes.append((uid in known, pdu[pos:sub_end]))
    if first is None or len(syntaxes) < 2:
        return
    ordered = [raw for ok, raw in syntaxes if ok] + [raw for ok, raw in syntaxes if not ok]
    out[first:first + sum(len(raw) for raw in ordered)] = b"".join(ordered)
