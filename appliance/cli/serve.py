"""``portico serve``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from appliance.api_server import ApiTlsError
from appliance.cli.common import parser, settings_from
from appliance.service import Service

log = logging.getLogger(__name__)


def main(argv: Sequence[str]) -> int:
    args = parser("serve", "Run the appliance until SIGTERM/Ctrl-C.").parse_args(argv)
    settings = settings_from(args)
    try:
        service = Service(settings)
    except ApiTlsError as exc:
        log.error("not starting: %s", exc)
        return 1
    service.start()
    service.wait()
    return 0
