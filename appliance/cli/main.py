"""The ``portico`` command: one console script, subcommands in small modules."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from appliance.file_modes import OWNER_ONLY_UMASK

COMMANDS = {
    "serve": ("appliance.cli.serve", "run the appliance (SCP, jobs, dispatch)"),
    "receive": ("appliance.cli.receive", "run only the receiving role (C-STORE SCP, STOW-RS, hand-off)"),
    "work": ("appliance.cli.work", "run only inference workers (jobs from the shared queue)"),
    "dispatch": ("appliance.cli.dispatch", "run only the dispatcher (results out, ATNA, retention)"),
    "demo": ("appliance.cli.demo", "start Orthanc + Portico, send a phantom study, show the results"),
    "echo": ("appliance.cli.echo", "C-ECHO a configured destination"),
    "send": ("appliance.cli.send", "C-STORE files to a configured destination"),
    "rules": ("appliance.cli.rules", "rules check FILE | explain STUDY_UID: validate rules, explain routing"),
    "models": ("appliance.cli.models", "models list | verify: installed model packages"),
    "fl": ("appliance.cli.fl", "fl enrol|request|status|approve|reject|cohort|export|run: federated learning"),
    "review": ("appliance.cli.review", "review list|show|approve|reject: results held for a reviewer"),
    "status": ("appliance.cli.status", "studies, jobs and outbox at a glance"),
    "audit": ("appliance.cli.audit", "audit verify | export: the tamper-evident audit trail"),
    "users": ("appliance.cli.users", "users add|list|disable|enable|passwd|roles|token|tokens|revoke|unlock: accounts"),
    "db": ("appliance.cli.db", "db status|migrate|backup|restore: the appliance database's version and backups"),
    "purge": ("appliance.cli.purge", "purge [--dry-run]: remove what storage.retention no longer keeps"),
    "doctor": ("appliance.cli.doctor", "check ports, certificates, peers, disk, permissions, models; say what to fix"),
}

USAGE = "usage: portico COMMAND [ARGS]\n\ncommands:\n" + "\n".join(
    f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE + "\n")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"portico: unknown command {name!r}\n{USAGE}\n")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # owner-only files and folders, whatever creates them (appliance.file_modes); children inherit it
    previous = os.umask(OWNER_ONLY_UMASK)
    try:
        result: int = module.main(rest)
    finally:
        os.umask(previous)
    return result
