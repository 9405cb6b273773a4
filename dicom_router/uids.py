"""The one check of a DICOM UID's form, shared by every reader and the store (PS3.5 9.1).

A UID is at most 64 characters of components separated by ``.``; each component is ``0`` or digits
not starting with ``0``; no component is empty. The header reader (:mod:`dicom_router.part10`), the
store (which names files after UIDs) and STOW-RS all ask this function, so a UID one of them
accepts is never refused by another.
"""

from __future__ import annotations

import re

#: PS3.5 9.1: at most 64 characters
MAX_UID_LENGTH = 64

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a well-formed DICOM UID (PS3.5 9.1).

    Parameters
    ----------
    uid
        The UID without padding (a trailing NUL or space must be stripped first).

    Returns
    -------
    bool
        ``True`` for e.g. ``1.2.840.10008.1.2``; ``False`` for an empty string, ``1..2``, ``1.02``,
        ``.1``, ``1.``, anything but digits and dots, or more than 64 characters.
    """
    return len(uid) <= MAX_UID_LENGTH and _UID.fullmatch(uid) is not None
