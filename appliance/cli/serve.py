"""``portico serve``."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.cli.common import parser, settings_from
from appliance.service import Service


def main(argv: Sequence[str]) -> int:
    args = parser("serve", "Run the appliance until SIGTERM/Ctrl-C.").parse_args(argv)
    service = Service(settings_from(args))
    service.start()
    service.wait()
    return 0
