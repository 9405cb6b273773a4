"""Accounts: users with roles and argon2id passwords, their API tokens, dashboard sessions, sign-in failures.

There is no default account and no default password: the first admin is made on the appliance with
``portico users add NAME --role admin``. Session ids and API tokens are 256-bit random strings stored
only as SHA-256 hashes, so the database never holds a usable credential; logging out, disabling a user,
changing their password or revoking a token takes effect at the next request.

Every sign-in, failure, lock and account change is audited in the same transaction as the change,
with the user name, the client address and the route, never a password or a token. All SQL for these
tables is in this module (:data:`SCHEMA` and :class:`Accounts`); they live in the store's database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from appliance.audit import AuditEvent, AuditRecord
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    password_changed REAL NOT NULL,
    last_sign_in REAL,
    last_sign_in_from TEXT
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked REAL,
    last_used REAL
);
CREATE INDEX IF NOT EXISTS api_tokens_user ON api_tokens(username);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    last_seen REAL NOT NULL,
    address TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(username);
CREATE TABLE IF NOT EXISTS sign_in_failures (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    failures INTEGER NOT NULL,
    last_failure REAL NOT NULL,
    locked_until REAL NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, key)
);
"""

#: the audit events :meth:`Accounts.events` shows an administrator
SIGN_IN_EVENTS = (AuditEvent.SIGNED_IN, AuditEvent.SIGNED_OUT, AuditEvent.SIGN_IN_FAILED, AuditEvent.SIGN_IN_LOCKED,
                  AuditEvent.USER_CHANGED, AuditEvent.TOKEN_ISSUED, AuditEvent.TOKEN_REVOKED)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _roles(text: str) -> tuple[Role, ...]:
    return parse_roles(r for r in text.split(",") if r)


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
        with store.transaction() as db:
            for statement in filter(str.strip, SCHEMA.split(";")):  # executescript() would commit
                db.execute(statement)

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
        with self.store.transaction() as db:
            try:
                db.execute("INSERT INTO users (username, password_hash, roles, created, password_changed) "
                           "VALUES (?,?,?,?,?)", (name, hashed, ",".join(wanted), now, now))
            except sqlite3.IntegrityError:
                raise UserExists(f"user {name} exists already") from None
            self._audit(db, AuditEvent.USER_CHANGED, actor, {"user": name, "change": "added",
                                                             "roles": [str(r) for r in wanted]})
        log.info("user %s added with roles %s by %s", name, ",".join(wanted), actor)
        user = self.get(name)
        assert user is not None
        return user

    def get(self, username: str) -> User | None:
        rows = self.store.query("SELECT * FROM users WHERE username = ?", (normalise(username),))
        return self._user(rows[0]) if rows else None

    def users(self) -> list[User]:
        return [self._user(r) for r in self.store.query("SELECT * FROM users ORDER BY username")]

    def count(self) -> int:
        return int(self.store.query("SELECT COUNT(*) FROM users")[0][0])

    def set_disabled(self, username: str, disabled: bool, actor: str) -> bool:
        """Disable (ending every session at once) or enable a user; whether anything changed.

        Raises
        ------
        UserNotFound
        """
        name = normalise(username)
        with self.store.transaction() as db:
            row = self._require(db, name)
            if bool(row["disabled"]) == disabled:
                return False
            db.execute("UPDATE users SET disabled = ? WHERE username = ?", (int(disabled), name))
            if disabled:
                db.execute("DELETE FROM sessions WHERE username = ?", (name,))
            self._audit(db, AuditEvent.USER_CHANGED, actor, {"user": name,
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
        with self.store.transaction() as db:
            self._require(db, name)
            db.execute("UPDATE users SET password_hash = ?, password_changed = ? WHERE username = ?",
                       (hashed, self.clock(), name))
            db.execute("DELETE FROM sessions WHERE username = ?", (name,))
            db.execute("DELETE FROM sign_in_failures WHERE kind = ? AND key = ?", (LockKind.USER, name))
            self._audit(db, AuditEvent.USER_CHANGED, actor, {"user": name, "change": "password"})
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
        with self.store.transaction() as db:
            before = _roles(self._require(db, name)["roles"])
            db.execute("UPDATE users SET roles = ? WHERE username = ?", (",".join(wanted), name))
            self._audit(db, AuditEvent.USER_CHANGED, actor, {"user": name, "change": "roles",
                                                             "before": [str(r) for r in before],
                                                             "roles": [str(r) for r in wanted]})
        log.info("roles of user %s set to %s by %s", name, ",".join(wanted), actor)
        return wanted

    def unlock(self, username: str, actor: str) -> bool:
        """Clear a user name's failures and lock; whether there were any."""
        name = normalise(username)
        with self.store.transaction() as db:
            cur = db.execute("DELETE FROM sign_in_failures WHERE kind = ? AND key = ?", (LockKind.USER, name))
            if cur.rowcount:
                self._audit(db, AuditEvent.USER_CHANGED, actor, {"user": name, "change": "unlocked"})
        return bool(cur.rowcount)

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
        with self.store.transaction() as db:
            self._require(db, name)
            db.execute("INSERT INTO api_tokens (id, username, token_hash, label, created, expires) "
                       "VALUES (?,?,?,?,?,?)", (token_id, name, _digest(token), label, now, expires))
            self._audit(db, AuditEvent.TOKEN_ISSUED, actor, {"user": name, "token_id": token_id, "label": label,
                                                             "expires": expires})
        log.info("API token %s issued to %s by %s", token_id, name, actor)
        return IssuedToken(token_id, token, expires)

    def tokens(self, username: str) -> list[TokenInfo]:
        rows = self.store.query("SELECT * FROM api_tokens WHERE username = ? ORDER BY created",
                                (normalise(username),))
        return [TokenInfo(r["id"], r["username"], r["label"], r["created"], r["expires"], r["revoked"],
                          r["last_used"]) for r in rows]

    def revoke_token(self, username: str, token_id: str, actor: str) -> bool:
        """Revoke one of ``username``'s tokens; whether it was live.

        Raises
        ------
        UserNotFound
            When the user has no token ``token_id``.
        """
        name = normalise(username)
        with self.store.transaction() as db:
            row = db.execute("SELECT revoked FROM api_tokens WHERE id = ? AND username = ?",
                             (token_id, name)).fetchone()
            if row is None:
                raise UserNotFound(f"user {name} has no token {token_id}")
            if row["revoked"] is not None:
                return False
            db.execute("UPDATE api_tokens SET revoked = ? WHERE id = ?", (self.clock(), token_id))
            self._audit(db, AuditEvent.TOKEN_REVOKED, actor, {"user": name, "token_id": token_id})
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
        rows = self.store.query(
            "SELECT t.*, u.roles, u.disabled FROM api_tokens t JOIN users u ON u.username = t.username "
            "WHERE t.token_hash = ?", (_digest(token),))
        row = rows[0] if rows else None
        reason = "unknown_token"
        if row is not None:
            reason = ("revoked_token" if row["revoked"] is not None else "expired_token" if now >= row["expires"]
                      else "disabled_user" if row["disabled"] else "")
        if row is not None and not reason:
            if row["last_used"] is None or now - row["last_used"] >= TOUCH_SECONDS:
                with self.store.transaction() as db:
                    db.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now, row["id"]))
            return Principal(row["username"], _roles(row["roles"]), Credential.TOKEN, token_id=row["id"])
        user = row["username"] if row is not None else "anonymous"
        self._fail(address, None, route, request_id, now, {"user": user, "credential": "bearer token", "reason": reason,
                                               "token_id": row["id"] if row is not None else None})
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
        rows = self.store.query("SELECT * FROM users WHERE username = ?", (name,))
        row = rows[0] if rows else None
        matched = verify_password(row["password_hash"] if row is not None else None, password)
        now = self.clock()
        if row is None or not matched or row["disabled"]:
            reason = "unknown_user" if row is None else "wrong_password" if not matched else "disabled_user"
            # an unknown but possible name is counted too: locking only real names would tell which exist
            self._fail(address, name if shown != NOT_A_NAME else None, route, request_id, now,
                       {"user": shown, "credential": "password", "reason": reason})
            raise SignInFailed("the user name or password is wrong")
        session_id = secrets.token_urlsafe(32)
        lifetime = self.settings.sessions.absolute_hours * 3600
        rehashed = hash_password(password) if needs_rehash(row["password_hash"]) else None
        with self.store.transaction() as db:
            self._sweep(db, now)
            db.execute("INSERT INTO sessions (id_hash, username, created, expires, last_seen, address) "
                       "VALUES (?,?,?,?,?,?)", (_digest(session_id), name, now, now + lifetime, now, address))
            db.execute("UPDATE users SET last_sign_in = ?, last_sign_in_from = ? WHERE username = ?",
                       (now, address, name))
            if rehashed is not None:
                db.execute("UPDATE users SET password_hash = ? WHERE username = ?", (rehashed, name))
            db.execute("DELETE FROM sign_in_failures WHERE kind = ? AND key = ?", (LockKind.USER, name))
            self._audit(db, AuditEvent.SIGNED_IN, name, {"user": name, "address": address, "route": route,
                                                         "credential": "password", "request_id": request_id})
        log.info("user %s signed in from %s on %s (request %s)", name, address, route, request_id)
        roles = _roles(row["roles"])
        return Principal(name, roles, Credential.SESSION, expires=now + lifetime), session_id

    def session(self, session_id: str) -> Principal | None:
        """Who session ``session_id`` is, or ``None`` when it ended (logged out, expired, idle, user disabled)."""
        now = self.clock()
        key = _digest(session_id)
        rows = self.store.query("SELECT s.*, u.roles, u.disabled FROM sessions s JOIN users u "
                                "ON u.username = s.username WHERE s.id_hash = ?", (key,))
        if not rows:
            return None
        row = rows[0]
        idle = self.settings.sessions.idle_minutes * 60
        if row["disabled"] or now >= row["expires"] or now - row["last_seen"] > idle:
            with self.store.transaction() as db:
                db.execute("DELETE FROM sessions WHERE id_hash = ?", (key,))
            return None
        if now - row["last_seen"] >= TOUCH_SECONDS:
            with self.store.transaction() as db:
                db.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?", (now, key))
        return Principal(row["username"], _roles(row["roles"]), Credential.SESSION, expires=row["expires"])

    def sign_out(self, session_id: str, address: str, route: str, request_id: str = "-") -> bool:
        """End session ``session_id``; whether it was live."""
        key = _digest(session_id)
        with self.store.transaction() as db:
            row = db.execute("SELECT username FROM sessions WHERE id_hash = ?", (key,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM sessions WHERE id_hash = ?", (key,))
            self._audit(db, AuditEvent.SIGNED_OUT, row["username"], {"user": row["username"], "address": address,
                                                                     "route": route, "request_id": request_id})
        return True

    # ---- failures and locks ------------------------------------------------------------------------

    def lock(self, kind: LockKind, key: str) -> Lock | None:
        """``key``'s failure count and lock, if any failure is remembered."""
        rows = self.store.query("SELECT * FROM sign_in_failures WHERE kind = ? AND key = ?", (kind, key))
        found = _lock(rows[0]) if rows else None
        return None if found is None or forgotten(self.settings.lockout, found, self.clock()) else found

    def locks(self) -> list[Lock]:
        """Every remembered failure count, locked ones first."""
        now = self.clock()
        rows = self.store.query("SELECT * FROM sign_in_failures ORDER BY locked_until DESC, last_failure DESC")
        return [lock for lock in map(_lock, rows) if not forgotten(self.settings.lockout, lock, now)]

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` audit rows about sign-ins and accounts, newest first."""
        marks = ",".join("?" * len(SIGN_IN_EVENTS))
        rows = self.store.query(f"SELECT ts, event, actor, detail FROM audit WHERE event IN ({marks}) "
                                "ORDER BY id DESC LIMIT ?", (*map(str, SIGN_IN_EVENTS), limit))
        return [{"ts": r["ts"], "event": r["event"], "actor": r["actor"], "detail": json.loads(r["detail"])}
                for r in rows]

    def _refuse_if_locked(self, keys: Iterable[tuple[LockKind, str]], now: float) -> None:
        """Raise :class:`LockedOut` when any of ``keys`` is locked, counting the refusal against it."""
        waits: dict[tuple[LockKind, str], float] = {}
        for kind, key in keys:
            rows = self.store.query("SELECT locked_until FROM sign_in_failures WHERE kind = ? AND key = ?",
                                    (kind, key))
            if rows and rows[0]["locked_until"] > now:
                waits[(kind, key)] = rows[0]["locked_until"] - now
        if not waits:
            return
        with self.store.transaction() as db:
            for kind, key in waits:
                db.execute("UPDATE sign_in_failures SET refused = refused + 1 WHERE kind = ? AND key = ?",
                           (kind, key))
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
        with self.store.transaction() as db:
            refused = 0
            locked: list[Lock] = []
            for kind, key in keys:
                row = db.execute("SELECT * FROM sign_in_failures WHERE kind = ? AND key = ?", (kind, key)).fetchone()
                after = after_failure(settings, kind, key, _lock(row) if row is not None else None, now)
                refused += after.refused
                db.execute("INSERT OR REPLACE INTO sign_in_failures (kind, key, failures, last_failure, "
                           "locked_until, refused) VALUES (?,?,?,?,?,0)",
                           (kind, key, after.failures, after.last_failure, after.locked_until))
                if after.locked_until:
                    locked.append(after)
            actor = str(detail.get("user") or "anonymous")
            self._audit(db, AuditEvent.SIGN_IN_FAILED, actor, {
                **detail, "address": address, "route": route, "request_id": request_id,
                **({"refused_while_locked": refused} if refused else {})})
            for lock in locked:
                self._audit(db, AuditEvent.SIGN_IN_LOCKED, actor, {
                    "kind": str(lock.kind), "key": lock.key, "failures": lock.failures, "address": address,
                    "route": route, "seconds": round(lock.locked_until - now, 3)})
        log.warning("sign-in failed from %s on %s: %s (user %s, request %s)", address, route, detail.get("reason"),
                    detail.get("user"), request_id)
        for lock in locked:
            log.warning("%s %s locked out for %.0f s after %d failed sign-ins", lock.kind, lock.key,
                        lock.locked_until - now, lock.failures)

    def _sweep(self, db: sqlite3.Connection, now: float) -> None:
        """Forget ended sessions and old failures."""
        idle = self.settings.sessions.idle_minutes * 60
        db.execute("DELETE FROM sessions WHERE expires <= ? OR last_seen < ?", (now, now - idle))
        db.execute("DELETE FROM sign_in_failures WHERE locked_until <= ? AND last_failure < ?",
                   (now, now - self.settings.lockout.forget_after_seconds))

    # ---- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _require(db: sqlite3.Connection, name: str) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute("SELECT * FROM users WHERE username = ?", (name,)).fetchone()
        if row is None:
            raise UserNotFound(f"no user {name}")
        return row

    @staticmethod
    def _audit(db: sqlite3.Connection, event: AuditEvent, actor: str, detail: dict[str, Any]) -> None:
        Store.audit_in(db, AuditRecord(event, actor=actor, detail=detail))

    @staticmethod
    def _user(row: sqlite3.Row) -> User:
        return User(row["username"], _roles(row["roles"]), bool(row["disabled"]), row["created"],
                    row["last_sign_in"], row["last_sign_in_from"])


def _lock(row: sqlite3.Row) -> Lock:
    return Lock(LockKind(row["kind"]), row["key"], int(row["failures"]), float(row["last_failure"]),
                float(row["locked_until"]), int(row["refused"]))
