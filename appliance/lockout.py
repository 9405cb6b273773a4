"""How long repeated sign-in failures lock a user name or a client address out: arithmetic only, no state.

With the defaults (``api.lockout``: 5 per user name, 10 per address, 30 s first, 900 s cap) the 5th
wrong password for a user name locks it for 30 s: the next attempt within that time is refused (429,
``Retry-After``) without looking at the password. The 6th failure (after the wait) locks for 60 s, then
120, 240, 480 and 900 s from the 10th on. A user name's count is cleared by a successful sign-in; both
counts are forgotten after ``forget_after_seconds`` without a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from appliance.settings import LockoutSettings


class LockKind(StrEnum):
    """What a failure is counted against."""

    USER = "user"
    ADDRESS = "address"


@dataclass(frozen=True)
class Lock:
    """A user name's or an address's failure count, and how long it is locked."""

    kind: LockKind
    key: str
    failures: int
    last_failure: float
    #: refused until then (0: not locked)
    locked_until: float
    #: attempts refused while locked since the last audit row about this key
    refused: int = 0

    def remaining(self, now: float) -> float:
        """Seconds until the lock ends (0 when not locked)."""
        return max(0.0, self.locked_until - now)


class LockedOut(Exception):
    """Too many failed sign-ins: refused without checking the credential until ``retry_after`` seconds pass."""

    code = "locked"

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"too many failed sign-ins; try again in {self.retry_after} s")


def threshold(settings: LockoutSettings, kind: LockKind) -> int:
    """The failures that start a lock for ``kind``."""
    return settings.user_failures if kind is LockKind.USER else settings.address_failures


def lock_seconds(settings: LockoutSettings, kind: LockKind, failures: int) -> float:
    """How long ``failures`` consecutive failures lock a key of ``kind`` (0: not yet)."""
    over = failures - threshold(settings, kind)
    if over < 0:
        return 0.0
    # a big exponent is capped before it is computed
    return settings.max_seconds if over > 30 else min(settings.first_seconds * 2.0**over, settings.max_seconds)


def after_failure(settings: LockoutSettings, kind: LockKind, key: str, before: Lock | None, now: float) -> Lock:
    """The count and lock once one more failure for ``key`` happened at ``now``."""
    failures = 1
    if before is not None and not forgotten(settings, before, now):
        failures = before.failures + 1
    wait = lock_seconds(settings, kind, failures)
    return Lock(kind, key, failures, now, now + wait if wait else 0.0, before.refused if before else 0)


def forgotten(settings: LockoutSettings, lock: Lock, now: float) -> bool:
    """Whether ``lock``'s failures are old enough to start counting again."""
    return now >= lock.locked_until and now - lock.last_failure > settings.forget_after_seconds
