"""Options every subcommand shares."""

from __future__ import annotations

import argparse
import getpass
import time
from pathlib import Path

from pydantic import ValidationError

from appliance.logs import configure
from appliance.settings import Settings, load_settings


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"portico {prog}", description=description)
    p.add_argument("-c", "--config", type=Path, help="portico.yaml (default: $PORTICO_CONFIG or ./portico.yaml)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--json-logs", action="store_true")
    return p


def also_after(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept the shared options after a sub-action too (``portico review approve 7 -c portico.yaml``)."""
    # SUPPRESS: an option not given after the action keeps what was given (or defaulted) before it
    sub.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS)
    sub.add_argument("--log-level", default=argparse.SUPPRESS)
    sub.add_argument("--json-logs", action="store_true", default=argparse.SUPPRESS)
    return sub


def settings_from(args: argparse.Namespace) -> Settings:
    """Configure logging and load the settings; an invalid configuration exits with its problems listed."""
    configure(args.log_level, args.json_logs)
    try:
        return load_settings(args.config)
    except ValidationError as exc:
        raise SystemExit(config_problems(exc)) from None


def config_problems(exc: ValidationError) -> str:
    """The problems in words, one a line, without the values given (they may be secrets)."""
    lines = ["portico: the configuration is invalid:"]
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        where = ".".join(str(part) for part in error["loc"]) or "(settings)"
        lines.append(f"  {where}: {error['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def cli_actor() -> str:
    """``cli:<login name>``: who an action taken on the command line is recorded as."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def local_time(ts: float | None) -> str:
    """A timestamp as local ``YYYY-MM-DD HH:MM:SS``, or ``-``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"
