"""``portico models list | verify [PATH]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from appliance.cli.common import parser, settings_from
from appliance.models import ModelRegistry
from inference.errors import PackageError
from inference.packages import load_package


def main(argv: Sequence[str]) -> int:
    p = parser("models", "Installed model packages.")
    p.add_argument("action", choices=["list", "verify"])
    p.add_argument("path", nargs="?", type=Path, help="package folder (verify); default: every installed one")
    args = p.parse_args(argv)
    settings = settings_from(args)
    folders = [args.path] if args.path else ModelRegistry(settings.models_dir).folders()
    failed = 0
    for folder in folders:
        try:
            package = load_package(folder)
        except PackageError as exc:
            failed += 1
            sys.stdout.write(f"FAILED  {folder}: {exc}\n")
            continue
        m = package.manifest
        if args.action == "list":
            sys.stdout.write(f"{m.name:<28} {m.version:<10} {m.task:<13} {m.input.modality:<4} "
                             f"sha256:{package.package_hash[:12]}  {folder}\n")
        else:
            sys.stdout.write(f"OK      {package.ref} ({len(m.files)} files verified)\n")
    return 1 if failed else 0
