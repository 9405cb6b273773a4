"""``portico rules check FILE``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dicom_router.rules import main_check


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="portico rules")
    sub = p.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="validate a rules file")
    check.add_argument("file", type=Path)
    args = p.parse_args(argv)
    return main_check(args.file, sys.stdout, sys.stderr)
