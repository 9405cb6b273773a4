"""One UID check (PS3.5 9.1) for the header reader, the store and STOW-RS."""

from __future__ import annotations

import pytest

from dicom_router.uids import is_valid_uid


@pytest.mark.parametrize("uid", [
    "0",
    "1.2",
    "1.2.840.10008.1.2.1",
    "1.2.0.3",
    "2.25.329800735698586629295641978511506172918",
    "1." + "2" * 62,  # 64 characters
])
def test_valid(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", [
    "",
    "1..2",  # an empty component: passed the old header reader, failed the store
    ".1.2",
    "1.2.",
    "1.02",  # a leading zero in a multi-digit component
    "01.2",
    "1.2.00",
    "1." + "2" * 63,  # 65 characters
    "1.2a",
    "1.2 ",
    "1.2\x00",
    "../../etc/passwd",
    "1.2/3",
    "-1.2",
    "1,2",
    "١.٢",  # Unicode digits are not DICOM digits
])
def test_invalid(uid: str) -> None:
    assert not is_valid_uid(uid)
