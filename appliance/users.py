"""Accounts: users with roles and argon2id passwords, their API tokens, dashboard sessions, sign-in failures.

There is no default account and no default password: the first admin is made on the appliance with
``portico users add NAME --role admin``. Session ids and API tokens are 256-bit random strings stored
only as SHA-256 hashes, so the database never holds a usable credential; logging out, disabling a user,
changing their password or revoking a token takes effect at the next request.

Every sign-in, failure, lock and account change is audited in the same transaction as the change,
with the user name, the client address and the route, never a password or a token. The SQL for these
tables is in :mod:`appliance.db.accounts`; they live in the store's database (created by its migrations).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from appliance import audit_chain
from appliance.audit import AuditEvent, AuditRecord
from appliance.db import accounts
from appliance.db.engine import Tx
from appliance.identity import (
    NOT_A_NAME,
    Credential,
    IssuedToken,
    Principal,
    SignInFailed,
    TokenInfo,
    User,
    UserExists,
    UserNotFound,
    check_username,
    normalise,
    shown_name,
)
from appliance.lockout import Lock, LockedOut, LockKind, after_failure, forgotten
from appliance.passwords import check_policy, hash_password, needs_rehash, verify_password
from appliance.roles import Role, parse_roles
from appliance.settings import ApiSettings
from appliance.store import Store

log = logging.getLogger(__name__)

TOKEN_PREFIX = "pt_"
MAX_TOKEN_DAYS = 3650
#: a session's or token's last use is written at most this often (each write takes the store's lock)
TOUCH_SECONDS = 15.0

#: the audit events :meth:`Accounts.events` shows an administrator
SIGN_IN_EVENTS = (AuditEvent.SIGNED_IN, AuditEvent.SIGNED_OUT, AuditEvent.SIGN_IN_FAILED, AuditEvent.SIGN_IN_LOCKED,
                  AuditEvent.USER_CHANGED, AuditEvent.TOKEN_ISSUED, AuditEvent.TOKEN_REVOKED)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Accounts:
    """Users, tokens, sessions and sign-in failures in ``store``'s database.

    Parameters
    ----------
    store
        The appliance store; its transactions hold these tables' changes and their audit rows.
    settings
        ``api`` settings: session lifetimes and lockout.
    clock
        Seconds since the epoch; tests pass a controllable one.
    """

    def __init__(self, store: Store, settings: ApiSettings, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock

    # ---- users -----------------------------------------------------------------------------------

    def add(self, username: str, password: str, roles: Iterable[Role], actor: str) -> User:
        """Create an enabled user.

        Raises
        ------
        ValueError
            A bad user name, no role, or a password the policy refuses (:class:`PasswordPolicyError`).
        UserExists
            When the name is taken.
        """
        name = check_username(username)
        wanted = parse_roles(roles)
        if not wanted:
            raise ValueError("a user needs at least one role")
        check_policy(name, password)
        hashed = hash_password(password)
        now = self.clock()
        with self.store.transaction() as tx:
            if not accounts.add_user(tx, name, hashed, wanted, now):
                raise UserExists(f"user {name} exists already")
            self._audit(tx, AuditEvent.USER_CHANGED, actor, {"user": name, "change": "added",
                                                             "roles": [str(r) for r in wanted]})
        log.info("user %s added with roles %s by %s", name, ",".join(wanted), actor)
        user = self.get(name)
        assert user is not None
        return user

    def get(self, username: str) -> User | None:
        with self.store.reading() as tx:
            found = accounts.account(tx, normalise(username))
        return None if found is None else found.user

    def users(self) -> list[User]:
        with self.store.reading() as tx:
            return accounts.users(tx)

    def count(self) -> int:
        with self.store.reading() as tx:
            return accounts.user_count(tx)

    def set_disabled(self, username: str, disabled: bool, actor: str) -> bool:
        """Disable (ending every session at once) or enable a user; whether anything changed.

        Raises
        ------
        UserNotFound
        """
        name = normalise(username)
        with self.store.transaction() as tx:
            if self._require(tx, name).disabled == disabled:
                return False
            accounts.set_disabled(tx, name, disabled)
            if disabled:
                accounts.end_sessions_of(tx, name)
            self._audit(tx, AuditEvent.USER_CHANGED, actor, {"user": name,
                                                             "change": "disabled" if disabled else "enabled"})
        log.info("user %s %s by %s", name, "disabled" if disabled else "enabled", actor)
        return True

    def set_password(self, username: str, password: str, actor: str) -> None:
        """Set a new password; the user's sessions end (their API tokens stay).

        Raises
        ------
        UserNotFound
        PasswordPolicyError
        """
        name = normalise(username)
        check_policy(name, password)
        hashed = hash_password(password)
        with self.store.transaction() as tx:
            self._require(tx, name)
            accounts.set_password(tx, name, hashed, self.clock())
            accounts.end_sessions_of(tx, name)
            accounts.clear_failures(tx, LockKind.USER, name)
            self._audit(tx, AuditEvent.USER_CHANGED, actor, {"user": name, "change": "password"})
        log.info("password of user %s changed by %s", name, actor)

    def set_roles(self, username: str, roles: Iterable[Role], actor: str) -> tuple[Role, ...]:
        """Replace a user's roles (effective at their next request).

        Raises
        ------
        UserNotFound
        ValueError
            When no role is given.
        """
        name = normalise(username)
        wanted = parse_roles(roles)
        if not wanted:
            raise ValueError("a user needs at least one role; disable the user instead")
        with self.store.transaction() as tx:
            before = self._require(tx, name).roles
            accounts.set_roles(tx, name, wanted)
            self._audit(tx, AuditEvent.USER_CHANGED, actor, {"user": name, "change": "roles",
                                                             "before": [str(r) for r in before],
                                                             "roles": [str(r) for r in wanted]})
        log.info("roles of user %s set to %s by %s", name, ",".join(wanted), actor)
        return wanted

    def unlock(self, username: str, actor: str) -> bool:
        """Clear a user name's failures and lock; whether there were any."""
        name = normalise(username)
        with self.store.transaction() as tx:
            cleared = accounts.clear_failures(tx, LockKind.USER, name)
            if cleared:
                self._audit(tx, AuditEvent.USER_CHANGED, actor, {"user": name, "change": "unlocked"})
        return cleared

    # ---- tokens ----------------------------------------------------------------------------------

    def issue_token(self, username: str, actor: str, days: float = 90, label: str = "") -> IssuedToken:
        """A new bearer token for ``username``, valid ``days`` days.

        Raises
        ------
        UserNotFound
        ValueError
            When ``days`` is not in (0, :data:`MAX_TOKEN_DAYS`] or the label is over 100 characters.
        """
        if not 0 < days <= MAX_TOKEN_DAYS:
            raise ValueError(f"a token lasts more than 0 and at most {MAX_TOKEN_DAYS} days")
        if len(label) > 100:
            raise ValueError("a token's label is at most 100 characters")
        name = normalise(username)
        token_id = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        now = self.clock()
        expires = now + days * 86400
        with self.store.transaction() as tx:
            self._require(tx, name)
            accounts.add_token(tx, token_id, name, _digest(token), label, now, expires)
            self._audit(tx, AuditEvent.TOKEN_ISSUED, actor, {"user": name, "token_id": token_id, "label": label,
                                                             "expires": expires})
        log.info("API token %s issued to %s by %s", token_id, name, actor)
        return IssuedToken(token_id, token, expires)

    def tokens(self, username: str) -> list[TokenInfo]:
        with self.store.reading() as tx:
            return accounts.tokens(tx, normalise(username))

    def revoke_token(self, username: str, token_id: str, actor: str) -> bool:
        """Revoke one of ``username``'s tokens; whether it was live.

        Raises
        ------
        UserNotFound
            When the user has no token ``token_id``.
        """
        name = normalise(username)
        with self.store.transaction() as tx:
            found = accounts.token(tx, name, token_id)
            if found is None:
                raise UserNotFound(f"user {name} has no token {token_id}")
            if found.revoked is not None:
                return False
            accounts.revoke_token(tx, token_id, self.clock())
            self._audit(tx, AuditEvent.TOKEN_REVOKED, actor, {"user": name, "token_id": token_id})
        log.info("API token %s of %s revoked by %s", token_id, name, actor)
        return True

    def authenticate_token(self, token: str, address: str, route: str, request_id: str = "-") -> Principal:
        """The user a bearer token belongs to.

        A valid token is accepted even from a locked address (a 256-bit token cannot be guessed; the lock
        is there to slow guessing and bound the audit). A wrong one counts against the address.

        Raises
        ------
        LockedOut
            When the token is wrong and the address is locked out.
        SignInFailed
            When the token is unknown, expired or revoked, or its user is disabled.
        """
        now = self.clock()
        with self.store.reading() as tx:
            held = accounts.token_by_hash(tx, _digest(token))
        reason = "unknown_token"
        if held is not None:
            found = held.token
            reason = ("revoked_token" if found.revoked is not None else "expired_token" if now >= found.expires
                      else "disabled_user" if held.disabled else "")
        if held is not None and not reason:
            found = held.token
            if found.last_used is None or now - found.last_used >= TOUCH_SECONDS:
                with self.store.transaction() as tx:
                    accounts.token_used(tx, found.id, now)
            return Principal(found.username, held.roles, Credential.TOKEN, token_id=found.id)
        user = held.token.username if held is not None else "anonymous"
        self._fail(address, None, route, request_id, now, {"user": user, "credential": "bearer token", "reason": reason,
                                               "token_id": held.token.id if held is not None else None})
        raise SignInFailed("the bearer token is not valid")

    # ---- sessions --------------------------------------------------------------------------------

    def sign_in(self, username: str, password: str, address: str, route: str,
                request_id: str = "-") -> tuple[Principal, str]:
        """Check a password and begin a session; (who, the session id for the cookie).

        Raises
        ------
        LockedOut
            When the user name or the address is locked out (the password is not checked).
        SignInFailed
            Unknown user, wrong password or disabled user (the same answer for each).
        """
        name = normalise(username)
        shown = shown_name(username)
        now = self.clock()
        self._refuse_if_locked(((LockKind.USER, name), (LockKind.ADDRESS, address)), now)
        with self.store.reading() as tx:
            found = accounts.account(tx, name)
        matched = verify_password(found.password_hash if found is not None else None, password)
        now = self.clock()
        if found is None or not matched or found.disabled:
            reason = "unknown_user" if found is None else "wrong_password" if not matched else "disabled_user"
            # an unknown but possible name is counted too: locking only real names would tell which exist
            self._fail(address, name if shown != NOT_A_NAME else None, route, request_id, now,
                       {"user": shown, "credential": "password", "reason": reason})
            raise SignInFailed("the user name or password is wrong")
        session_id = secrets.token_urlsafe(32)
        lifetime = self.settings.sessions.absolute_hours * 3600
        rehashed = hash_password(password) if needs_rehash(found.password_hash) else None
        with self.store.transaction() as tx:
            self._sweep(tx, now)
            accounts.add_session(tx, _digest(session_id), name, now, now + lifetime, address)
            accounts.signed_in(tx, name, now, address)
            if rehashed is not None:
                accounts.rehash_password(tx, name, rehashed)
            accounts.clear_failures(tx, LockKind.USER, name)
            self._audit(tx, AuditEvent.SIGNED_IN, name, {"user": name, "address": address, "route": route,
                                                         "credential": "password", "request_id": request_id})
        log.info("user %s signed in from %s on %s (request %s)", name, address, route, request_id)
        return Principal(name, found.roles, Credential.SESSION, expires=now + lifetime), session_id

    def session(self, session_id: str) -> Principal | None:
        """Who session ``session_id`` is, or ``None`` when it ended (logged out, expired, idle, user disabled)."""
        now = self.clock()
        key = _digest(session_id)
        with self.store.reading() as tx:
            found = accounts.session(tx, key)
        if found is None:
            return None
        idle = self.settings.sessions.idle_minutes * 60
        if found.disabled or now >= found.expires or now - found.last_seen > idle:
            with self.store.transaction() as tx:
                accounts.end_session(tx, key)
            return None
        if now - found.last_seen >= TOUCH_SECONDS:
            with self.store.transaction() as tx:
                accounts.session_seen(tx, key, now)
        return Principal(found.username, found.roles, Credential.SESSION, expires=found.expires)

    def sign_out(self, session_id: str, address: str, route: str, request_id: str = "-") -> bool:
        """End session ``session_id``; whether it was live."""
        with self.store.transaction() as tx:
            user = accounts.end_session(tx, _digest(session_id))
            if user is None:
                return False
            self._audit(tx, AuditEvent.SIGNED_OUT, user, {"user": user, "address": address, "route": route,
                                                          "request_id": request_id})
        return True

    # ---- failures and locks ------------------------------------------------------------------------

    def lock(self, kind: LockKind, key: str) -> Lock | None:
        """``key``'s failure count and lock, if any failure is remembered."""
        with self.store.reading() as tx:
            found = accounts.failure(tx, kind, key)
        return None if found is None or forgotten(self.settings.lockout, found, self.clock()) else found

    def locks(self) -> list[Lock]:
        """Every remembered failure count, locked ones first."""
        now = self.clock()
        with self.store.reading() as tx:
            every = accounts.failures(tx)
        return [lock for lock in every if not forgotten(self.settings.lockout, lock, now)]

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` audit rows about sign-ins and accounts, newest first."""
        with self.store.reading() as tx:
            rows = audit_chain.events(tx, kinds=tuple(map(str, SIGN_IN_EVENTS)), limit=limit)
        return [{"ts": r["ts"], "event": r["event"], "actor": r["actor"], "detail": r["detail"]}
                for r in reversed(rows)]

    def _refuse_if_locked(self, keys: Iterable[tuple[LockKind, str]], now: float) -> None:
        """Raise :class:`LockedOut` when any of ``keys`` is locked, counting the refusal against it."""
        waits: dict[tuple[LockKind, str], float] = {}
        with self.store.reading() as tx:
            for kind, key in keys:
                found = accounts.failure(tx, kind, key)
                if found is not None and found.locked_until > now:
                    waits[(kind, key)] = found.locked_until - now
        if not waits:
            return
        with self.store.transaction() as tx:
            for kind, key in waits:
                accounts.count_refusal(tx, kind, key)
        raise LockedOut(max(waits.values()))

    def _fail(self, address: str, user: str | None, route: str, request_id: str, now: float,
              detail: dict[str, Any]) -> None:
        """Count a failure against ``address`` (and ``user``), audit it, and lock what reached its limit.

        Raises
        ------
        LockedOut
            When the address (or user) was locked already: the attempt is counted, not audited.
        """
        keys = [(LockKind.ADDRESS, address)] + ([(LockKind.USER, user)] if user else [])
        self._refuse_if_locked(keys, now)
        settings = self.settings.lockout
        with self.store.transaction() as tx:
            refused = 0
            locked: list[Lock] = []
            for kind, key in keys:
                after = after_failure(settings, kind, key, accounts.failure(tx, kind, key), now)
                refused += after.refused
                accounts.put_failure(tx, after)
                if after.locked_until:
                    locked.append(after)
            actor = str(detail.get("user") or "anonymous")
            self._audit(tx, AuditEvent.SIGN_IN_FAILED, actor, {
                **detail, "address": address, "route": route, "request_id": request_id,
                **({"refused_while_locked": refused} if refused else {})})
            for lock in locked:
                self._audit(tx, AuditEvent.SIGN_IN_LOCKED, actor, {
                    "kind": str(lock.kind), "key": lock.key, "failures": lock.failures, "address": address,
                    "route": route, "seconds": round(lock.locked_until - now, 3)})
        log.warning("sign-in failed from %s on %s: %s (user %s, request %s)", address, route, detail.get("reason"),
                    detail.get("user"), request_id)
        for lock in locked:
            log.warning("%s %s locked out for %.0f s after %d failed sign-ins", lock.kind, lock.key,
                        lock.locked_until - now, lock.failures)

    def _sweep(self, tx: Tx, now: float) -> None:
        """Forget ended sessions and old failures."""
        accounts.sweep_sessions(tx, now, now - self.settings.sessions.idle_minutes * 60)
        accounts.sweep_failures(tx, now, now - self.settings.lockout.forget_after_seconds)

    # ---- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _require(tx: Tx, name: str) -> accounts.Account:
        found = accounts.account(tx, name)
        if found is None:
            raise UserNotFound(f"no user {name}")
        return found

    @staticmethod
    def _audit(tx: Tx, event: AuditEvent, actor: str, detail: dict[str, Any]) -> None:
        Store.audit_in(tx, AuditRecord(event, actor=actor, detail=detail))
