"""``portico rules check FILE`` and ``portico rules explain STUDY_UID``."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from appliance.cli.common import also_after, parser, settings_from
from appliance.models import ModelRegistry
from appliance.routing_explain import explain_stored, modality_warnings
from appliance.store import Store
from dicom_router.errors import RulesError
from dicom_router.rules import load_rules, main_check


def main(argv: Sequence[str]) -> int:
    p = parser("rules", "Routing rules: validate a file, or explain how a stored study was routed.")
    sub = p.add_subparsers(dest="action", required=True)
    check = also_after(sub.add_parser("check", help="validate a rules file; warn where a rule can route a "
                                                   "modality its model does not accept"))
    check.add_argument("file", type=Path)
    check.add_argument("--models-dir", type=Path,
                       help="model packages to check the rules against (default: the configured models_dir)")
    explain = also_after(sub.add_parser("explain", help="each series, each rule, and why it matched or not"))
    explain.add_argument("study_uid")
    explain.add_argument("--rules", type=Path, help="rules file (default: the configured rules_file)")
    explain.add_argument("--json", action="store_true", dest="as_json")
    args = p.parse_args(argv)
    if args.action == "check":
        return _check(args)
    return _explain(args)


def _check(args: argparse.Namespace) -> int:
    out = io.StringIO()
    code = main_check(args.file, out, sys.stderr)
    sys.stdout.write(out.getvalue())
    if code != 0:
        return code
    rules = load_rules(args.file)
    models_dir: Path | None = args.models_dir
    if models_dir is None:
        try:
            models_dir = settings_from(args).models_dir
        except (SystemExit, OSError, ValueError):  # no usable configuration: the file alone was checked
            sys.stdout.write("  (models not checked: no configuration; give --models-dir or -c)\n")
            return 0
    for warning in modality_warnings(rules, ModelRegistry(models_dir)):
        sys.stdout.write(f"WARNING: {warning}\n")
    return 0


def _explain(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        rules = load_rules(args.rules or settings.rules_path)
    except RulesError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    store = Store.from_settings(settings, fsync=False)
    try:
        explanation = explain_stored(store, rules, args.study_uid)
    finally:
        store.close()
    if explanation is None:
        sys.stderr.write(f"portico rules explain: no stored instances of study {args.study_uid}\n")
        return 1
    if args.as_json:
        sys.stdout.write(json.dumps(explanation.as_dict(), indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(explanation.lines()) + "\n")
    return 0
