"""The source's Specific Character Set: honoured when valid, else replaced by a default, with a warning.

The derived objects copy the source's character set (highdicom takes it from the first source
image), so a source with an empty or unknown one must never fail a job: an empty value (a CT seen
in the field) or an unknown defined term is replaced by :data:`DEFAULT_CHARACTER_SET`, which
decodes and re-encodes every byte; ``ISO_IR 6`` (the default repertoire, which the writers do not
accept written out) is removed, which means the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

#: Latin alphabet No. 1: a superset of the default repertoire in which every byte decodes
DEFAULT_CHARACTER_SET = "ISO_IR 100"
#: the terms the writers accept (highdicom's enumeration)
_WRITABLE = frozenset(v.value for v in hd.SpecificCharacterSetValues)


def honour_character_set(ds: Dataset, k: int) -> None:
    """Make ``ds``'s SpecificCharacterSet one the readers and writers accept, in place.

    Call before any text value of ``ds`` is read: pydicom decodes text with the character set it
    finds when a value is first accessed. ``k`` numbers the instance in log lines (no values).
    """
    if "SpecificCharacterSet" not in ds:
        return
    raw = ds["SpecificCharacterSet"].value
    terms = [str(raw)] if isinstance(raw, str | bytes) or raw is None else [str(t) for t in raw]
    if isinstance(raw, bytes):
        terms = [raw.decode("ascii", "replace")]
    terms = [t.strip() for t in terms] if terms else [""]
    fixed = _writable(terms)
    if fixed == terms:
        return
    if fixed is None:
        del ds.SpecificCharacterSet
    elif fixed == [DEFAULT_CHARACTER_SET]:
        logger.warning("instance %d: SpecificCharacterSet is empty or not a defined term; %s is assumed",
                       k, DEFAULT_CHARACTER_SET)
        ds.SpecificCharacterSet = DEFAULT_CHARACTER_SET
    else:
        ds.SpecificCharacterSet = fixed if len(fixed) > 1 else fixed[0]


def _writable(terms: Sequence[str]) -> list[str] | None:
    """``terms`` as the writers accept them with the same meaning; ``None`` for the default repertoire."""
    if len(terms) == 1:
        term = terms[0]
        if term == "ISO_IR 6":
            return None
        if term in _WRITABLE and not term.startswith("ISO 2022") and term in python_encoding:
            return [term]
        return [DEFAULT_CHARACTER_SET]
    # code extensions: an empty first value is the default repertoire
    out = ["ISO 2022 IR 6" if k == 0 and not t else t for k, t in enumerate(terms)]
    if all(t in _WRITABLE and t in python_encoding and t.startswith("ISO 2022") for t in out):
        return out
    return [DEFAULT_CHARACTER_SET]
