"""``portico serve``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from appliance.api_server import ApiTlsError
from appliance.cli.common import parser, settings_from
from appliance.file_modes import make_private_dirs, secret_file_problems, tighten_tree
from appliance.service import Service
from appliance.settings import Mode, Settings, config_path

log = logging.getLogger(__name__)


def main(argv: Sequence[str]) -> int:
    args = parser("serve", "Run the appliance until SIGTERM/Ctrl-C.").parse_args(argv)
    settings = settings_from(args)
    if not secrets_are_private(settings, config_path(args.config)):
        return 1
    make_private_dirs(settings.data_dir)
    tighten_tree(settings.data_dir)
    try:
        service = Service(settings)
    except ApiTlsError as exc:
        log.error("not starting: %s", exc)
        return 1
    service.start()
    service.wait()
    return 0


def secrets_are_private(settings: Settings, config: Path | None) -> bool:
    """False (and each problem logged) when group/others can read a secret's file; ``mode: dev`` only warns."""
    problems = secret_file_problems(settings, config)
    for problem in problems:
        if settings.mode is Mode.PRODUCTION:
            log.error("not starting: %s", problem)
        else:
            log.warning("%s (allowed in mode: dev only)", problem)
    return settings.mode is not Mode.PRODUCTION or not problems
