"""Options every subcommand shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.logs import configure
from appliance.settings import Settings, load_settings


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"portico {prog}", description=description)
    p.add_argument("-c", "--config", type=Path, help="portico.yaml (default: $PORTICO_CONFIG or ./portico.yaml)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--json-logs", action="store_true")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    configure(args.log_level, args.json_logs)
    return load_settings(args.config)
