"""The A-ASSOCIATE-RQ bytes the edge reads: AE titles, and known transfer syntaxes first in each context."""

from __future__ import annotations

import struct

import pytest

from dicom_router.associate_rq import MalformedRequest, ae_titles, prefer_transfer_syntaxes

MPEG2, EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def request(*contexts: list[str]) -> bytes:
    items = _item(0x10, _uid("1.2.840.10008.3.1.1.1"))
    for index, syntaxes in enumerate(contexts):
        sub = _item(0x30, _uid("1.2.840.10008.5.1.4.1.1.2")) + b"".join(_item(0x40, _uid(s)) for s in syntaxes)
        items += _item(0x20, bytes((2 * index + 1, 0, 0, 0)) + sub)
    body = b"\x00\x01\x00\x00" + b"PORTICO".ljust(16) + b"CT01".ljust(16) + bytes(32) + items
    return struct.pack(">BBL", 1, 0, len(body)) + body


def syntaxes_of(pdu: bytes) -> list[list[str]]:
    out, pos = [], 74
    while pos < len(pdu):
        kind, _, length = struct.unpack_from(">BBH", pdu, pos)
        if kind == 0x20:
            found, sub = [], pos + 8
            while sub < pos + 4 + length:
                sub_kind, _, sub_length = struct.unpack_from(">BBH", pdu, sub)
                if sub_kind == 0x40:
                    found.append(pdu[sub + 4:sub + 4 + sub_length].rstrip(b"\0").decode())
                sub += 4 + sub_length
            out.append(found)
        pos += 4 + length
    return out


def test_ae_titles() -> None:
    assert ae_titles(request([EXPLICIT])) == ("PORTICO", "CT01")


def test_known_syntaxes_come_first_in_the_senders_order() -> None:
    pdu = request([MPEG2, EXPLICIT, IMPLICIT], [MPEG2], [IMPLICIT, EXPLICIT])
    again = prefer_transfer_syntaxes(pdu, {EXPLICIT, IMPLICIT})
    assert len(again) == len(pdu)
    assert syntaxes_of(again) == [[EXPLICIT, IMPLICIT, MPEG2], [MPEG2], [IMPLICIT, EXPLICIT]]


def test_an_item_running_past_the_pdu_is_malformed() -> None:
    pdu = bytearray(request([EXPLICIT, IMPLICIT]))
    struct.pack_into(">H", pdu, 74 + 4 + len(_uid("1.2.840.10008.3.1.1.1")) + 2, 0xFFF0)  # context item length
    with pytest.raises(MalformedRequest):
        prefer_transfer_syntaxes(bytes(pdu), {EXPLICIT})
