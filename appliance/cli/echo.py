"""``portico echo DESTINATION``: C-ECHO a configured destination."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from appliance.cli.common import parser, settings_from
from appliance.cli.destinations import find_destination
from dicom_router.dispatch import echo
from dicom_router.settings import DimseDestination


def main(argv: Sequence[str]) -> int:
    p = parser("echo", "C-ECHO a configured destination.")
    p.add_argument("destination")
    args = p.parse_args(argv)
    settings = settings_from(args)
    dest = find_destination(settings, args.destination)
    if dest is None:
        return 2
    if not isinstance(dest, DimseDestination):
        sys.stderr.write(f"{dest.name} is a STOW-RS destination; C-ECHO needs a DIMSE one\n")
        return 2
    ok = echo(dest, settings.router.ae_title, tls=settings.router.tls,
              event_driven=settings.router.event_driven)
    sys.stdout.write(f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}): {'OK' if ok else 'FAILED'}\n")
    return 0 if ok else 1
