"""The account tables: ``users``, ``api_tokens``, ``sessions`` and ``sign_in_failures`` (logic: appliance.users).

Secrets never reach these functions: tokens and session ids arrive as their SHA-256 hashes, passwords as argon2id
hashes. ``disabled`` is stored as an INTEGER (0/1) and every time as seconds since the epoch (a float).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from appliance.db.engine import Row, Tx
from appliance.identity import TokenInfo, User
from appliance.lockout import Lock, LockKind
from appliance.roles import Role, parse_roles


@dataclass(frozen=True)
class Account:
    """A ``users`` row, with the password hash that only the sign-in logic reads."""

    username: str
    password_hash: str
    roles: tuple[Role, ...]
    disabled: bool
    created: float
    password_changed: float
    last_sign_in: float | None
    last_sign_in_from: str | None

    @property
    def user(self) -> User:
        """What may be shown of the account."""
        return User(self.username, self.roles, self.disabled, self.created, self.last_sign_in,
                    self.last_sign_in_from)


@dataclass(frozen=True)
class TokenHolder:
    """An API token and the state of the user it belongs to."""

    token: TokenInfo
    roles: tuple[Role, ...]
    disabled: bool


@dataclass(frozen=True)
class SessionHolder:
    """A dashboard session and the state of the user it belongs to."""

    username: str
    roles: tuple[Role, ...]
    disabled: bool
    created: float
    expires: float
    last_seen: float
    address: str


def _roles(text: str) -> tuple[Role, ...]:
    return parse_roles(r for r in text.split(",") if r)


def _account(r: Row) -> Account:
    return Account(r["username"], r["password_hash"], _roles(r["roles"]), bool(r["disabled"]), float(r["created"]),
                   float(r["password_changed"]), r["last_sign_in"], r["last_sign_in_from"])


def _token(r: Row) -> TokenInfo:
    return TokenInfo(r["id"], r["username"], r["label"], r["created"], r["expires"], r["revoked"], r["last_used"])


def _lock(r: Row) -> Lock:
    return Lock(LockKind(r["kind"]), r["key"], int(r["failures"]), float(r["last_failure"]),
                float(r["locked_until"]), int(r["refused"]))


# ---- users -----------------------------------------------------------------------------------------

def add_user(tx: Tx, username: str, password_hash: str, roles: Sequence[Role], now: float) -> bool:
    """Insert an enabled user; ``False`` when the name is taken (nothing changed)."""
    cur = tx.execute("INSERT INTO users (username, password_hash, roles, disabled, created, password_changed) "
                     "VALUES (?,?,?,?,?,?) ON CONFLICT (username) DO NOTHING",
                     (username, password_hash, ",".join(roles), 0, now, now))
    return cur.rowcount > 0


def account(tx: Tx, username: str) -> Account | None:
    row = tx.one("SELECT * FROM users WHERE username = ?", (username,))
    return None if row is None else _account(row)


def users(tx: Tx) -> list[User]:
    return [_account(r).user for r in tx.execute("SELECT * FROM users ORDER BY username")]


def user_count(tx: Tx) -> int:
    return int(tx.scalar("SELECT COUNT(*) FROM users"))


def set_disabled(tx: Tx, username: str, disabled: bool) -> None:
    tx.execute("UPDATE users SET disabled = ? WHERE username = ?", (int(disabled), username))


def set_password(tx: Tx, username: str, password_hash: str, now: float) -> None:
    """A new password: its hash and when it was set."""
    tx.execute("UPDATE users SET password_hash = ?, password_changed = ? WHERE username = ?",
               (password_hash, now, username))


def rehash_password(tx: Tx, username: str, password_hash: str) -> None:
    """The same password under a stronger hash (``password_changed`` stays)."""
    tx.execute("UPDATE users SET password_hash = ? WHERE username = ?", (password_hash, username))


def set_roles(tx: Tx, username: str, roles: Sequence[Role]) -> None:
    tx.execute("UPDATE users SET roles = ? WHERE username = ?", (",".join(roles), username))


def signed_in(tx: Tx, username: str, now: float, address: str) -> None:
    tx.execute("UPDATE users SET last_sign_in = ?, last_sign_in_from = ? WHERE username = ?",
               (now, address, username))


# ---- API tokens ------------------------------------------------------------------------------------

def add_token(tx: Tx, token_id: str, username: str, token_hash: str, label: str, now: float,
              expires: float) -> None:
    tx.execute("INSERT INTO api_tokens (id, username, token_hash, label, created, expires) VALUES (?,?,?,?,?,?)",
               (token_id, username, token_hash, label, now, expires))


def tokens(tx: Tx, username: str) -> list[TokenInfo]:
    """``username``'s tokens, oldest first (revoked and expired ones too)."""
    return [_token(r) for r in tx.execute("SELECT * FROM api_tokens WHERE username = ? ORDER BY created",
                                          (username,))]


def token(tx: Tx, username: str, token_id: str) -> TokenInfo | None:
    row = tx.one("SELECT * FROM api_tokens WHERE id = ? AND username = ?", (token_id, username))
    return None if row is None else _token(row)


def token_by_hash(tx: Tx, token_hash: str) -> TokenHolder | None:
    row = tx.one("SELECT t.*, u.roles, u.disabled FROM api_tokens t JOIN users u ON u.username = t.username "
                 "WHERE t.token_hash = ?", (token_hash,))
    return None if row is None else TokenHolder(_token(row), _roles(row["roles"]), bool(row["disabled"]))


def revoke_token(tx: Tx, token_id: str, now: float) -> None:
    tx.execute("UPDATE api_tokens SET revoked = ? WHERE id = ?", (now, token_id))


def token_used(tx: Tx, token_id: str, now: float) -> None:
    tx.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now, token_id))


# ---- sessions --------------------------------------------------------------------------------------

def add_session(tx: Tx, id_hash: str, username: str, now: float, expires: float, address: str) -> None:
    tx.execute("INSERT INTO sessions (id_hash, username, created, expires, last_seen, address) VALUES (?,?,?,?,?,?)",
               (id_hash, username, now, expires, now, address))


def session(tx: Tx, id_hash: str) -> SessionHolder | None:
    row = tx.one("SELECT s.*, u.roles, u.disabled FROM sessions s JOIN users u ON u.username = s.username "
                 "WHERE s.id_hash = ?", (id_hash,))
    if row is None:
        return None
    return SessionHolder(row["username"], _roles(row["roles"]), bool(row["disabled"]), float(row["created"]),
                         float(row["expires"]), float(row["last_seen"]), row["address"])


def session_seen(tx: Tx, id_hash: str, now: float) -> None:
    tx.execute("UPDATE sessions SET last_seen = ? WHERE id_hash = ?", (now, id_hash))


def end_session(tx: Tx, id_hash: str) -> str | None:
    """Delete one session; whose it was, or ``None`` when there was none."""
    row = tx.one("DELETE FROM sessions WHERE id_hash = ? RETURNING username", (id_hash,))
    return None if row is None else str(row["username"])


def end_sessions_of(tx: Tx, username: str) -> None:
    tx.execute("DELETE FROM sessions WHERE username = ?", (username,))


def sweep_sessions(tx: Tx, now: float, seen_before: float) -> None:
    """Forget sessions that expired by ``now`` or were idle since before ``seen_before``."""
    tx.execute("DELETE FROM sessions WHERE expires <= ? OR last_seen < ?", (now, seen_before))


# ---- sign-in failures ------------------------------------------------------------------------------

def failure(tx: Tx, kind: LockKind, key: str) -> Lock | None:
    """``key``'s failure count and lock (forgotten or not: the caller decides)."""
    row = tx.one("SELECT * FROM sign_in_failures WHERE kind = ? AND key = ?", (str(kind), key))
    return None if row is None else _lock(row)


def failures(tx: Tx) -> list[Lock]:
    """Every failure count, locked ones first, then the most recent; at a tie user names before addresses."""
    return [_lock(r) for r in tx.execute("SELECT * FROM sign_in_failures "
                                         "ORDER BY locked_until DESC, last_failure DESC, kind DESC, key")]


def put_failure(tx: Tx, lock: Lock) -> None:
    """Store ``lock``'s count and lock, with its refusals counted afresh (from 0)."""
    tx.execute("INSERT INTO sign_in_failures (kind, key, failures, last_failure, locked_until, refused) "
               "VALUES (?,?,?,?,?,0) ON CONFLICT (kind, key) DO UPDATE SET failures = excluded.failures, "
               "last_failure = excluded.last_failure, locked_until = excluded.locked_until, refused = 0",
               (str(lock.kind), lock.key, lock.failures, lock.last_failure, lock.locked_until))


def count_refusal(tx: Tx, kind: LockKind, key: str) -> None:
    """One more attempt refused while ``key`` was locked."""
    tx.execute("UPDATE sign_in_failures SET refused = refused + 1 WHERE kind = ? AND key = ?", (str(kind), key))


def clear_failures(tx: Tx, kind: LockKind, key: str) -> bool:
    """Forget ``key``'s failures and lock; whether there were any."""
    return tx.execute("DELETE FROM sign_in_failures WHERE kind = ? AND key = ?", (str(kind), key)).rowcount > 0


def sweep_failures(tx: Tx, now: float, failed_before: float) -> None:
    """Forget unlocked failure counts whose last failure was before ``failed_before``."""
    tx.execute("DELETE FROM sign_in_failures WHERE locked_until <= ? AND last_failure < ?", (now, failed_before))

