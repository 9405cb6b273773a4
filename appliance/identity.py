"""Who acts: user names, the principal a request acts as, accounts and tokens as the rest of the appliance sees them.

No SQL and no secrets here: :mod:`appliance.users` stores accounts; this module is what it hands out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from appliance.roles import Permission, Role, permissions_of

USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
#: actors the appliance itself records (``api``: the deprecated ``api.token``; ``cli:…`` has a colon)
RESERVED_NAMES = frozenset({"api", "system", "anonymous"})
#: what a typed name is recorded as when it cannot be a user name (it may be a password typed in the wrong box)
NOT_A_NAME = "(not a user name)"


class Credential(StrEnum):
    """How a request proved who it acts as."""

    SESSION = "session"
    TOKEN = "token"
    #: the deprecated shared ``api.token``
    LEGACY_TOKEN = "api.token"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: recorded as the actor of whatever it changes."""

    name: str
    roles: tuple[Role, ...]
    via: Credential
    token_id: str | None = None
    #: when the session ends at the latest (sessions only)
    expires: float | None = None

    @property
    def permissions(self) -> frozenset[Permission]:
        return permissions_of(self.roles)

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions


@dataclass(frozen=True)
class User:
    username: str
    roles: tuple[Role, ...]
    disabled: bool
    created: float
    last_sign_in: float | None
    last_sign_in_from: str | None


@dataclass(frozen=True)
class TokenInfo:
    id: str
    username: str
    label: str
    created: float
    expires: float
    revoked: float | None
    last_used: float | None


@dataclass(frozen=True)
class IssuedToken:
    """A new API token: :attr:`token` is shown once and never stored."""

    id: str
    token: str
    expires: float


class AccountError(Exception):
    """An account action that cannot be done; ``code`` is stable."""

    code = "account_error"


class UserNotFound(AccountError):
    code = "not_found"


class UserExists(AccountError):
    code = "conflict"


class SignInFailed(AccountError):
    """Wrong credentials; the message never says which part was wrong."""

    code = "sign_in_failed"


def normalise(username: str) -> str:
    return username.strip().lower()


def check_username(username: str) -> str:
    """``username`` normalised (trimmed, lower case).

    Raises
    ------
    ValueError
        When it is not a valid user name or is reserved.
    """
    name = normalise(username)
    if not USERNAME.match(name):
        raise ValueError("a user name is 1-64 characters: a-z, 0-9 and . _ @ -, starting with a letter or digit")
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved")
    return name


def shown_name(username: str) -> str:
    """What a typed user name is recorded as: itself when it could be one, else :data:`NOT_A_NAME`."""
    name = normalise(username)
    return name if USERNAME.match(name) else NOT_A_NAME
