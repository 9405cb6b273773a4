"""Passwords: the policy a new one must meet, and argon2id hashes (argon2-cffi, RFC 9106 low-memory profile).

A hash is a self-describing PHC string (``$argon2id$v=19$m=65536,t=3,p=4$…``): stronger parameters
later re-hash a password at its next successful sign-in (:func:`needs_rehash`).
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 12
#: argon2 hashes whatever it is given: a cap keeps a sign-in request from costing more than it should
MAX_LENGTH = 1024

_HASHER = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4
#: verified against when the user does not exist, so an unknown name costs the same time as a wrong password
_DUMMY = _HASHER.hash("portico-no-such-user-dummy-password")


class PasswordPolicyError(ValueError):
    """A new password that does not meet the policy; the message says why, never the password."""


def check_policy(username: str, password: str) -> None:
    """Refuse a password that is too short, too long, or contains the user name.

    Raises
    ------
    PasswordPolicyError
        With the reason in words.
    """
    if len(password) < MIN_LENGTH:
        raise PasswordPolicyError(f"the password must be at least {MIN_LENGTH} characters long")
    if len(password) > MAX_LENGTH:
        raise PasswordPolicyError(f"the password must be at most {MAX_LENGTH} characters long")
    if username.casefold() in password.casefold():
        raise PasswordPolicyError("the password must not contain the user name")
    if not password.strip():
        raise PasswordPolicyError("the password must not be blank")


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` with a fresh salt."""
    return _HASHER.hash(password)


def verify_password(hashed: str | None, password: str) -> bool:
    """Whether ``password`` matches ``hashed``; ``None`` (no such user) costs one verification and fails."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(hashed if hashed is not None else _DUMMY, password) and hashed is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(hashed: str) -> bool:
    """Whether ``hashed`` was made with other parameters than today's."""
    return _HASHER.check_needs_rehash(hashed)
