"""``portico send DESTINATION FILE...``: C-STORE (or STOW-RS) files to a configured destination."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from appliance.cli.common import parser, settings_from
from appliance.cli.destinations import find_destination
from dicom_router.dispatch import send_files


def main(argv: Sequence[str]) -> int:
    p = parser("send", "Send DICOM files to a configured destination.")
    p.add_argument("destination")
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args(argv)
    settings = settings_from(args)
    dest = find_destination(settings, args.destination)
    if dest is None:
        return 2
    paths = [f for p_ in args.files for f in (sorted(p_.rglob("*")) if p_.is_dir() else [p_]) if f.is_file()]
    results = send_files(dest, paths, settings.router.ae_title, tls=settings.router.tls,
                         event_driven=settings.router.event_driven)
    failed = [r for r in results if not r.ok]
    for r in failed:
        sys.stderr.write(f"FAILED {r.path}: {r.error or ''} {'' if r.status is None else hex(r.status)}\n")
    sys.stdout.write(f"sent {len(results) - len(failed)}/{len(results)} to {dest.name}\n")
    return 1 if failed else 0
