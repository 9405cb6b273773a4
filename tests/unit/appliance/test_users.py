"""Accounts (appliance.users) and ``portico users``: argon2id, no secret kept in clear, policy, the CLI end to end."""

from __future__ import annotations

import getpass
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from appliance.cli.main import USAGE, main
from appliance.db import accounts as stored_accounts
from appliance.db.engine import Dialect
from appliance.identity import SignInFailed, UserExists
from appliance.lockout import LockedOut, LockKind
from appliance.passwords import PasswordPolicyError, verify_password
from appliance.roles import Role
from appliance.settings import load_settings
from appliance.store import Store
from appliance.users import Accounts

PASSWORD = "correct horse battery staple"


@pytest.fixture
def config(tmp_path: Path, database_url: str | None) -> Path:
    path = tmp_path / "portico.yaml"  # the CLI tests open the same database through it
    path.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "var"), "fsync": False, "min_free_mb": 0,
                                                "database": database_url or "sqlite"}}))
    return path


@pytest.fixture
def store(config: Path) -> Iterator[Store]:
    store = Store.from_settings(load_settings(config), fsync=False)
    yield store
    store.close()


@pytest.fixture
def accounts(config: Path, store: Store) -> Accounts:
    return Accounts(store, load_settings(config).api)


def dump(store: Store) -> str:
    """Every row of every table, as text."""
    with store.reading() as tx:
        listing = ("SELECT name FROM sqlite_master WHERE type = 'table'" if tx.dialect is Dialect.SQLITE else
                   "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = current_schema()")
        tables = [r["name"] for r in tx.all(listing)]
        return "\n".join(str([tuple(row) for row in tx.all(f"SELECT * FROM {t}")]) for t in tables)


def test_passwords_are_argon2id_and_no_secret_is_kept_in_clear(accounts: Accounts, store: Store) -> None:
    accounts.add("alice", PASSWORD, [Role.ADMIN], actor="cli:test")
    with store.reading() as tx:
        alice = stored_accounts.account(tx, "alice")
    assert alice is not None and alice.password_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert verify_password(alice.password_hash, PASSWORD) and not verify_password(alice.password_hash, "x" * 20)
    token = accounts.issue_token("alice", actor="cli:test", label="ci").token
    _, session_id = accounts.sign_in("alice", PASSWORD, "10.0.0.1", "POST /auth/login")
    assert token.startswith("pt_") and len(token) > 50
    everything = dump(store)
    for secret in (PASSWORD, token, session_id):
        assert secret not in everything
    assert accounts.authenticate_token(token, "10.0.0.1", "GET /status").name == "alice"
    assert (who := accounts.session(session_id)) is not None and who.roles == (Role.ADMIN,)


@pytest.mark.parametrize(("name", "password", "problem"), [
    ("bob", "too short", "at least 12"),
    ("bob", "bob-is-my-password", "must not contain the user name"),
    ("bob", "x" * 1025, "at most 1024"),
    ("Bob Smith", PASSWORD, "a user name is"),
    ("api", PASSWORD, "reserved"),
    ("cli:bob", PASSWORD, "a user name is"),
])
def test_names_and_passwords_the_policy_refuses(accounts: Accounts, name: str, password: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        accounts.add(name, password, [Role.VIEWER], actor="cli:test")
    assert accounts.count() == 0


def test_a_user_needs_a_role_and_a_free_name(accounts: Accounts) -> None:
    with pytest.raises(ValueError, match="at least one role"):
        accounts.add("bob", PASSWORD, [], actor="cli:test")
    accounts.add("bob", PASSWORD, [Role.VIEWER], actor="cli:test")
    with pytest.raises(UserExists):
        accounts.add("BOB", PASSWORD, [Role.ADMIN], actor="cli:test")
    with pytest.raises(PasswordPolicyError):
        accounts.set_password("bob", "short", actor="cli:test")


def test_a_locked_user_name_is_refused_before_the_password_is_looked_at(accounts: Accounts) -> None:
    accounts.add("bob", PASSWORD, [Role.VIEWER], actor="cli:test")
    for n in range(5):
        with pytest.raises(SignInFailed):
            accounts.sign_in("bob", "wrong passphrase", f"10.9.0.{n}", "POST /auth/login")
    with pytest.raises(LockedOut) as locked:
        accounts.sign_in("bob", PASSWORD, "10.9.1.1", "POST /auth/login")
    assert locked.value.retry_after == 30
    assert accounts.unlock("bob", actor="cli:test")
    assert accounts.sign_in("bob", PASSWORD, "10.9.1.1", "POST /auth/login")[0].name == "bob"


# ---- the CLI ------------------------------------------------------------------------------------


def users(config: Path, *argv: str) -> int:
    return main(["users", *argv, "-c", str(config), "--log-level", "WARNING"])


def test_the_first_admin_is_made_on_the_command_line_with_the_password_typed_twice(
        config: Path, accounts: Accounts, store: Store, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert "users" in USAGE
    typed = iter([PASSWORD, PASSWORD + "!"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(typed))
    assert users(config, "add", "alice", "--role", "admin") == 1
    assert "the two passwords differ" in capsys.readouterr().err and accounts.count() == 0

    typed = iter([PASSWORD, PASSWORD])
    assert users(config, "add", "alice", "--role", "admin") == 0
    assert "added alice (admin)" in capsys.readouterr().out
    assert accounts.sign_in("alice", PASSWORD, "10.0.0.1", "POST /auth/login")[0].roles == (Role.ADMIN,)

    monkeypatch.setattr("sys.stdin", io.StringIO("a passphrase for automation\n"))
    assert users(config, "add", "bot", "--role", "viewer", "--role", "reviewer", "--password-stdin") == 0
    assert accounts.sign_in("bot", "a passphrase for automation", "10.0.0.1", "POST /auth/login")[0].roles == \
        (Role.VIEWER, Role.REVIEWER)
    added = [e for e in store.audit_events() if e["event"] == "user_changed"]
    assert [(e["actor"], e["detail"]["user"]) for e in added] == [(f"cli:{getpass.getuser()}", "alice"),
                                                                   (f"cli:{getpass.getuser()}", "bot")]
    assert PASSWORD not in capsys.readouterr().out + str(store.audit_events())


def test_list_shows_roles_last_sign_in_and_lock_state(config: Path, accounts: Accounts,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    accounts.add("alice", PASSWORD, [Role.ADMIN], actor="cli:test")
    accounts.add("bob", PASSWORD, [Role.REVIEWER, Role.FL_APPROVER], actor="cli:test")
    accounts.sign_in("alice", PASSWORD, "10.1.2.3", "POST /auth/login")
    for n in range(5):
        with pytest.raises(SignInFailed):
            accounts.sign_in("bob", "wrong passphrase", f"10.1.3.{n}", "POST /auth/login")
    assert users(config, "list") == 0
    out = capsys.readouterr().out
    alice = next(line for line in out.splitlines() if line.startswith("alice"))
    bob = next(line for line in out.splitlines() if line.startswith("bob"))
    assert "admin" in alice and "from 10.1.2.3" in alice and alice.rstrip().endswith("-")
    assert "reviewer,fl-approver" in bob and "never" in bob and "locked 30 s (5 failures)" in bob
    assert users(config, "list", "--json") == 0
    listed = {u["user"]: u for u in json.loads(capsys.readouterr().out)}
    assert listed["bob"]["failures"] == 5 and listed["bob"]["locked_until"] is not None
    assert listed["alice"]["last_sign_in_from"] == "10.1.2.3" and listed["alice"]["locked_until"] is None
    assert users(config, "unlock", "bob") == 0
    assert accounts.lock(LockKind.USER, "bob") is None


def test_disable_enable_passwd_roles(config: Path, accounts: Accounts, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    accounts.add("carol", PASSWORD, [Role.VIEWER], actor="cli:test")
    _, session_id = accounts.sign_in("carol", PASSWORD, "10.0.0.1", "POST /auth/login")
    assert users(config, "disable", "carol") == 0
    assert accounts.session(session_id) is None
    with pytest.raises(SignInFailed):
        accounts.sign_in("carol", PASSWORD, "10.0.0.2", "POST /auth/login")
    assert users(config, "disable", "carol") == 0 and "already" in capsys.readouterr().out
    assert users(config, "enable", "carol") == 0
    assert users(config, "roles", "carol", "model-admin", "reviewer") == 0
    assert "carol: reviewer, model-admin" in capsys.readouterr().out
    assert users(config, "roles", "carol", "root") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("a brand new passphrase, longer\n"))
    assert users(config, "passwd", "carol", "--password-stdin") == 0
    who, _ = accounts.sign_in("carol", "a brand new passphrase, longer", "10.0.0.3", "POST /auth/login")
    assert who.roles == (Role.REVIEWER, Role.MODEL_ADMIN)
    assert users(config, "disable", "nobody") == 1
    assert "no user nobody" in capsys.readouterr().err


def test_a_token_is_printed_once_listed_by_id_and_revoked(config: Path, accounts: Accounts, store: Store,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    accounts.add("bot", PASSWORD, [Role.VIEWER], actor="cli:test")
    assert users(config, "token", "bot", "--expires-days", "7", "--label", "nightly export") == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert token.startswith("pt_") and "\n" not in token and token not in captured.err
    (issued,) = accounts.tokens("bot")
    assert f"token {issued.id} for bot" in captured.err
    assert issued.label == "nightly export" and 6.99 * 86400 < issued.expires - issued.created <= 7 * 86400
    assert accounts.authenticate_token(token, "10.0.0.1", "GET /status").token_id == issued.id

    assert users(config, "tokens", "bot") == 0
    listing = capsys.readouterr().out
    assert issued.id in listing and "live" in listing and "nightly export" in listing and token not in listing
    assert users(config, "revoke", "bot", issued.id) == 0
    with pytest.raises(SignInFailed):
        accounts.authenticate_token(token, "10.0.0.1", "GET /status")
    assert users(config, "revoke", "bot", issued.id) == 0 and "revoked already" in capsys.readouterr().out
    assert users(config, "revoke", "bot", "000000000000") == 1
    assert users(config, "token", "bot", "--expires-days", "0") == 1
    events = [e["event"] for e in store.audit_events()]
    assert events.count("token_issued") == 1 and events.count("token_revoked") == 1
    assert token not in str(store.audit_events())
