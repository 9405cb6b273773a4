"""Part 10 bytes for a received dataset: the file meta header, and the four UIDs the store indexes.

Both run for every received instance, so they work on bytes directly: the file meta is a handful
of fixed elements, and the UIDs are found by walking element headers (skipping values, nested
sequences included) until the Series Instance UID. Anything the walk does not understand goes to
pydicom, which then decides whether the dataset is readable at all.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from dicom_router.uids import is_valid_uid

PREAMBLE = b"\x00" * 128 + b"DICM"

SOP_CLASS, SOP_INSTANCE, STUDY, SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
_WANTED = (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT",
                       b"SV", b"UV"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_NOT_WALKABLE = frozenset({ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
                           "1.2.840.10008.1.2.4.95"})  # JPIP Referenced Deflate
_HEADER_TAGS = [Tag(t) for t in _WANTED]
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")
_TAG = struct.Struct("<HH")
_META_UIDS = {0x00020002: 0, 0x00020003: 1, 0x00020010: 2}


class UnreadableHeader(Exception):
    """The dataset cannot be parsed, or lacks one of the four UIDs."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return _TAG.pack(group, elem) + vr + b"\x00\x00" + _U32.pack(len(value)) + value
    return _TAG.pack(group, elem) + vr + _U16.pack(len(value)) + value


def _text(value: str, pad: bytes) -> bytes:
    # "replace": a quarantined copy's meta may carry a sender's UID that is not even ASCII
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
              source_ae_title: str | None = None) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group, explicit VR little endian."""
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _text(sop_class_uid, b"\x00")),
        _element(0x00020003, b"UI", _text(sop_instance_uid, b"\x00")),
        _element(0x00020010, b"UI", _text(transfer_syntax_uid, b"\x00")),
        _element(0x00020012, b"UI", _text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x00020013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _element(0x00020016, b"AE", _text(source_ae_title, b" ")) if source_ae_title else b"",
    ))
    return PREAMBLE + _element(0x00020000, b"UL", _U32.pack(len(body))) + body



def read_file_meta(data: bytes) -> tuple[str, str, str, int]:
    """SOP class, SOP instance and transfer syntax from a Part 10 file's meta, and where its data set starts.

    The meta group is always explicit VR little endian; it is walked element by element (group 0002)
    rather than trusting its group length.

    Raises
    ------
    UnreadableHeader
        No ``DICM`` prefix, a damaged meta group, or one of the three UIDs missing or malformed
        (:func:`dicom_router.uids.is_valid_uid`).
    """
    if len(data) < len(PREAMBLE) or data[128:132] != b"DICM":
        raise UnreadableHeader("not a DICOM Part 10 file (no DICM prefix)")
    values = ["", "", ""]
    pos = len(PREAMBLE)
    while pos + 8 <= len(data) and _U16.unpack_from(data, pos)[0] == 0x0002:
        tag = 0x00020000 | _U16.unpack_from(data, pos + 2)[0]
        if data[pos + 4:pos + 6] in _LONG_VRS:
            length, header = (_U32.unpack_from(data, pos + 8)[0] if pos + 12 <= len(data) else _UNDEFINED), 12
        else:
            length, header = _U16.unpack_from(data, pos + 6)[0], 8
        if length == _UNDEFINED or pos + header + length > len(data):
            raise UnreadableHeader("the file meta is damaged (an element runs past the end)")
        if tag in _META_UIDS:
            values[_META_UIDS[tag]] = data[pos + header:pos + header + length].decode("ascii", "replace").strip("\0 ")
        pos += header + length
    if not all(values):
        raise UnreadableHeader("the file meta lacks a SOP Class, SOP Instance or Transfer Syntax UID",
                               missing=True)
    if not all(is_valid_uid(v) for v in values):
        raise UnreadableHeader("the file meta has a malformed SOP Class, SOP Instance or Transfer Syntax UID")
    return values[0], values[1], values[2], pos


class _Walk:
    """Element-header walker over one little endian dataset (explicit or implicit VR)."""

    def __init__(self, data: memoryview, implicit: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.found: dict[int, bytes] = {}

    def header(self, pos: int) -> tuple[int, int, int, bool]:
        """(tag, value length, value offset, is a sequence) of the element at ``pos``."""
        data = self.data
        if pos + 8 > len(data):
            raise ValueError("truncated element header")
        group, elem = _TAG.unpack_from(data, pos)
        tag = group << 16 | elem
        if self.implicit or group == 0xFFFE:
            length = _U32.unpack_from(data, pos + 4)[0]
            return tag, length, pos + 8, length == _UNDEFINED
        vr = bytes(data[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                raise ValueError("truncated element header")
            return tag, _U32.unpack_from(data, pos + 8)[0], pos + 12, vr == b"SQ"
        if not vr.isalpha() or not vr.isupper():
            raise ValueError("not explicit VR")
        return tag, _U16.unpack_from(data, pos + 6)[0], pos + 8, False

    def skip_undefined(self, pos: int) -> int:
        """Past an undefined-length value (sequence items, or fragments) starting at ``pos``."""
        while True:
            tag, length, start, _ = self.header(pos)
            if tag == _SEQUENCE_END:
                return start
            if tag != _ITEM:
                raise ValueError("expected an item")
            pos = start + length if length != _UNDEFINED else self.dataset(start, nested=True)

    def dataset(self, pos: int, *, nested: bool = False) -> int:
        """Walk elements from ``pos``; top level: stop after the Series Instance UID."""
        data = self.data
        while pos < len(data):
            tag, length, start, _sequence = self.header(pos)
            if nested and tag == _ITEM_END:
                return start
            if length == _UNDEFINED:
                pos = self.skip_undefined(start)
                continue
            end = start + length
            if end > len(data):
                raise ValueError("value runs past the end")
            if not nested and tag in _WANTED:
                self.found[tag] = bytes(data[start:end])
                if tag == SERIES:
                    return end
            elif not nested and tag > SERIES:
                return pos
            pos = end
        if nested:
            raise ValueError("item not closed")
        return pos


def _clean(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.strip(" \x00") or None


def read_uids(dataset: bytes | memoryview, transfer_syntax_uid: str, *,
              source: BinaryIO | None = None) -> tuple[str, str, str, str]:
    """SOP Class, SOP Instance, Study and Series Instance UIDs of an encoded dataset (no meta).

    Parameters
    ----------
    dataset
        The encoded data set, or its beginning: the walk stops after the Series Instance UID.
    transfer_syntax_uid
        How ``dataset`` is encoded.
    source
        The whole instance as a seekable Part 10 file, for when ``dataset`` is only its beginning:
        pydicom (the fallback for what the walk does not understand) then reads this instead.

    Raises
    ------
    UnreadableHeader
        The dataset cannot be parsed, or a UID is missing or malformed
        (:func:`dicom_router.uids.is_valid_uid`; the store names files after them).
    """
    values: list[str | None]
    try:
        if transfer_syntax_uid in _NOT_WALKABLE:
            raise ValueError("not walkable")
        walk = _Walk(memoryview(dataset), implicit=transfer_syntax_uid == ImplicitVRLittleEndian)
        walk.dataset(0)
        values = [_clean(walk.found.get(tag)) for tag in _WANTED]
        if None in values:
            raise ValueError("not all found")
    except (ValueError, struct.error):
        values = _read_with_pydicom(dataset, transfer_syntax_uid, source)
    names = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    missing = [name for name, value in zip(names, values, strict=True) if value is None]
    if missing:
        raise UnreadableHeader(f"missing {', '.join(missing)}", missing=True)
    malformed = [name for name, value in zip(names, values, strict=True) if not is_valid_uid(value or "")]
    if malformed:  # the attribute's name only: the value may be anything a sender chose
        raise UnreadableHeader(f"malformed {', '.join(malformed)} in header (not a DICOM UID)")
    return values[0] or "", values[1] or "", values[2] or "", values[3] or ""


def _read_with_pydicom(dataset: bytes | memoryview, transfer_syntax_uid: str,
                       source: BinaryIO | None) -> list[str | None]:
    stream = BytesIO(file_meta("1.2", "1.2", transfer_syntax_uid) + bytes(dataset)) if source is None else source
    try:
        stream.seek(0)
        ds = dcmread(stream, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        return [_clean(ds.get(keyword)) for keyword in
                ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    except Exception as exc:  # any parse failure (zlib, struct, pydicom) means "cannot understand"
        raise UnreadableHeader(f"dataset cannot be parsed ({type(exc).__name__})") from exc
