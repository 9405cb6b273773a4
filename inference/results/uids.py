"""Deterministic UIDs for derived objects.

A derived object's UIDs are a hash of what it was made from (source series and instances, model
name and version, run version, object kind) under the organisation's UID root, so rebuilding or
resending a result always gives the same SOP Instance and Series UIDs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: the longest UID DICOM allows
MAX_UID_LENGTH = 64
#: a derived UID keeps at least this many hashed digits (~66 bits)
MIN_HASH_DIGITS = 20
_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?$")


def _encode(parts: Iterable[str]) -> bytes:
    # length-prefixed, so ("ab", "c") and ("a", "bc") hash differently
    return b"".join(f"{len(p.encode())}:".encode() + p.encode() for p in parts)


def derive_uid(root: str, *parts: str) -> str:
    """A valid UID (≤ 64 characters) under ``root``: the SHA-256 of ``parts`` as decimal digits.

    Raises
    ------
    ValueError
        When ``root`` is not a UID prefix, leaves fewer than ``MIN_HASH_DIGITS`` digits, or no parts
        are given.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    if not _ROOT.match(root):
        raise ValueError(f"{root!r} is not a UID root (digits and dots, no leading zeros)")
    prefix = root if root.endswith(".") else root + "."
    room = MAX_UID_LENGTH - len(prefix)
    if room < MIN_HASH_DIGITS:
        raise ValueError(f"UID root {root!r} is too long: {room} digits left, {MIN_HASH_DIGITS} needed")
    number = int.from_bytes(hashlib.sha256(_encode(parts)).digest(), "big") % 10**room
    return prefix + str(number)


def make_run_key(source_series_uid: str, source_instance_uids: Iterable[str], model_name: str,
                 model_version: str, run_version: int = 1) -> str:
    """A stable key for one run of one model version on one set of source instances.

    The instance UIDs are sorted, so the order the files arrived in does not matter.
    """
    digest = hashlib.sha256(_encode([source_series_uid, *sorted(source_instance_uids), model_name,
                                     model_version, str(run_version)]))
    return digest.hexdigest()


@dataclass(frozen=True)
class DerivedUids:
    series_instance_uid: str
    sop_instance_uid: str


def derived_uids(root: str, run_key: str, model_name: str, model_version: str, kind: str) -> DerivedUids:
    """Series and SOP Instance UIDs of the derived object ``kind`` (``"SEG"``, ``"SR"``) of a run."""
    return DerivedUids(
        series_instance_uid=derive_uid(root, run_key, model_name, model_version, kind, "series"),
        sop_instance_uid=derive_uid(root, run_key, model_name, model_version, kind, "instance"),
    )
