"""``portico rules check FILE``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_router.errors import RulesError
from dicom_router.rules import load_rules


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="portico rules")
    sub = p.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate a rules file")
    check.add_argument("file", type=Path)
    args = p.parse_args(argv)
    try:
        ruleset = load_rules(args.file)
    except RulesError as exc:
        sys.stderr.write(f"{args.file}: INVALID\n{exc}\n")
        return 1
    sys.stdout.write(f"{args.file}: OK, {len(ruleset.rules)} rule(s)\n")
    for rule in ruleset.rules:
        sys.stdout.write(f"  {rule.name}: model {rule.model}\n")
    return 0
