"""``portico users``: accounts and roles for the API and dashboard, managed on the appliance itself.

    portico users add NAME --role ROLE [--role ROLE…] [--password-stdin]
    portico users list [--json]
    portico users disable NAME | enable NAME | unlock NAME
    portico users passwd NAME [--password-stdin]
    portico users roles NAME ROLE [ROLE…]
    portico users token NAME [--expires-days N] [--label TEXT]
    portico users tokens NAME
    portico users revoke NAME TOKEN_ID

There is no default account: the first admin is made here (``portico users add alice --role admin``).
A password is asked for twice on the terminal (never an argument: it would be in the shell history and
the process list), or read as one line from standard input with ``--password-stdin``. A token is printed
once, on standard output alone (its id and expiry go to standard error); only its hash is kept. Every
change is audited as ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from typing import Any

from appliance.cli.common import also_after, cli_actor, local_time, parser, settings_from
from appliance.identity import AccountError, User
from appliance.lockout import Lock, LockKind
from appliance.roles import Role, parse_roles
from appliance.store import Store
from appliance.users import Accounts


def _password(args: argparse.Namespace) -> str:
    """The new password: one line of standard input, or typed twice on the terminal."""
    if args.password_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass(f"New password for {args.name}: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("the two passwords differ; nothing was changed")
    return first


def _lock_state(lock: Lock | None, now: float) -> str:
    if lock is None:
        return "-"
    if lock.remaining(now):
        return f"locked {lock.remaining(now):.0f} s ({lock.failures} failures)"
    return f"{lock.failures} failure(s)"


def _as_json(user: User, lock: Lock | None, tokens: int, now: float) -> dict[str, Any]:
    return {"user": user.username, "roles": [str(r) for r in user.roles], "disabled": user.disabled,
            "created": user.created, "last_sign_in": user.last_sign_in, "last_sign_in_from": user.last_sign_in_from,
            "failures": lock.failures if lock else 0, "locked_until": lock.locked_until if lock and
            lock.remaining(now) else None, "live_tokens": tokens}


def _list(accounts: Accounts, as_json: bool) -> None:
    now = accounts.clock()
    rows = []
    for user in accounts.users():
        lock = accounts.lock(LockKind.USER, user.username)
        live = sum(1 for t in accounts.tokens(user.username) if t.revoked is None and t.expires > now)
        rows.append((user, lock, live))
    if as_json:
        sys.stdout.write(json.dumps([_as_json(u, lock, n, now) for u, lock, n in rows], indent=2) + "\n")
        return
    if not rows:
        sys.stdout.write("no users yet: portico users add NAME --role admin\n")
        return
    sys.stdout.write(f"{'USER':<24} {'ROLES':<28} {'STATE':<9} {'LAST SIGN-IN':<36} {'TOKENS':<6} LOCK\n")
    for user, lock, live in rows:
        last = f"{local_time(user.last_sign_in)} from {user.last_sign_in_from}" if user.last_sign_in else "never"
        sys.stdout.write(f"{user.username:<24} {','.join(user.roles):<28} "
                         f"{'disabled' if user.disabled else 'enabled':<9} {last:<36} {live:<6} "
                         f"{_lock_state(lock, now)}\n")


def _tokens(accounts: Accounts, name: str) -> None:
    if accounts.get(name) is None:
        raise AccountError(f"no user {name}")
    now = accounts.clock()
    sys.stdout.write(f"{'ID':<14} {'STATE':<8} {'EXPIRES':<20} {'LAST USED':<20} LABEL\n")
    for t in accounts.tokens(name):
        state = "revoked" if t.revoked is not None else "expired" if t.expires <= now else "live"
        sys.stdout.write(f"{t.id:<14} {state:<8} {local_time(t.expires):<20} {local_time(t.last_used):<20} {t.label}\n")


def main(argv: Sequence[str]) -> int:
    p = parser("users", "Accounts and roles for the API and the dashboard.")
    sub = p.add_subparsers(dest="action", required=True)
    roles = ", ".join(Role)
    add = also_after(sub.add_parser("add", help="add a user (the password is asked for twice)"))
    add.add_argument("name")
    add.add_argument("--role", action="append", required=True, help=f"one of {roles}; repeat for more")
    add.add_argument("--password-stdin", action="store_true", help="read the password as one line of stdin")
    ls = also_after(sub.add_parser("list", help="users, roles, last sign-in, lock state"))
    ls.add_argument("--json", action="store_true", dest="as_json")
    for name, help_ in (("disable", "refuse the user's sign-ins and tokens; end their sessions now"),
                        ("enable", "let a disabled user sign in again"),
                        ("unlock", "forget the user name's failed sign-ins and lift its lock")):
        also_after(sub.add_parser(name, help=help_)).add_argument("name")
    pw = also_after(sub.add_parser("passwd", help="set a new password (ends the user's sessions)"))
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password as one line of stdin")
    rl = also_after(sub.add_parser("roles", help="replace the user's roles"))
    rl.add_argument("name")
    rl.add_argument("roles", nargs="+", metavar="ROLE", help=roles)
    tk = also_after(sub.add_parser("token", help="issue an API token (printed once)"))
    tk.add_argument("name")
    tk.add_argument("--expires-days", type=float, default=90.0)
    tk.add_argument("--label", default="", help="what the token is for (shown in `portico users tokens`)")
    also_after(sub.add_parser("tokens", help="the user's API tokens (ids, not secrets)")).add_argument("name")
    rv = also_after(sub.add_parser("revoke", help="revoke one of the user's API tokens"))
    rv.add_argument("name")
    rv.add_argument("token_id")
    args = p.parse_args(argv)
    settings = settings_from(args)
    store = Store.from_settings(settings)
    actor = cli_actor()
    try:
        accounts = Accounts(store, settings.api)
        action = args.action
        if action == "add":
            wanted = parse_roles(args.role)
            user = accounts.add(args.name, _password(args), wanted, actor)
            sys.stdout.write(f"added {user.username} ({', '.join(user.roles)})\n")
        elif action == "list":
            _list(accounts, args.as_json)
        elif action in ("disable", "enable"):
            changed = accounts.set_disabled(args.name, action == "disable", actor)
            sys.stdout.write(f"{action}d {args.name}\n" if changed else f"{args.name} was {action}d already\n")
        elif action == "unlock":
            cleared = accounts.unlock(args.name, actor)
            sys.stdout.write(f"unlocked {args.name}\n" if cleared else f"{args.name} had no failed sign-ins\n")
        elif action == "passwd":
            if accounts.get(args.name) is None:
                raise AccountError(f"no user {args.name}")
            accounts.set_password(args.name, _password(args), actor)
            sys.stdout.write(f"password of {args.name} changed; their sessions ended\n")
        elif action == "roles":
            now_roles = accounts.set_roles(args.name, parse_roles(args.roles), actor)
            sys.stdout.write(f"{args.name}: {', '.join(now_roles)}\n")
        elif action == "token":
            issued = accounts.issue_token(args.name, actor, args.expires_days, args.label)
            sys.stderr.write(f"token {issued.id} for {args.name}, expires {local_time(issued.expires)}; "
                             "it is shown this once: send it as 'Authorization: Bearer <token>'\n")
            sys.stdout.write(issued.token + "\n")
        elif action == "tokens":
            _tokens(accounts, args.name)
        else:
            revoked = accounts.revoke_token(args.name, args.token_id, actor)
            sys.stdout.write(f"revoked token {args.token_id}\n" if revoked else
                             f"token {args.token_id} was revoked already\n")
    except (AccountError, ValueError) as exc:
        sys.stderr.write(f"portico users {args.action}: {exc}\n")
        return 1
    finally:
        store.close()
    return 0
