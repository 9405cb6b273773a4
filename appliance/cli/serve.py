"""``portico serve``: the whole appliance in one process; ``portico receive|work|dispatch``: one role of it.

The roles share the database (``storage.database``: PostgreSQL when they run on several machines) and the
data folder (a shared POSIX path). Each role process serves the API too when ``api.enabled`` (health,
``/metrics``; give each process its own ``PORTICO_API__PORT``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from appliance.api_server import ApiTlsError
from appliance.cli.common import parser, settings_from
from appliance.file_modes import make_private_dirs, secret_file_problems, tighten_tree
from appliance.fl import fl_user
from appliance.service import ALL_ROLES, Role, Service
from appliance.settings import Mode, Settings, config_path
from fl_client.box import GROUP_TRAVERSE

log = logging.getLogger(__name__)


def main(argv: Sequence[str]) -> int:
    return run("serve", "Run the appliance until SIGTERM/Ctrl-C.", argv, ALL_ROLES)


def run(name: str, description: str, argv: Sequence[str], roles: frozenset[Role]) -> int:
    """Start ``roles`` and wait for SIGTERM/Ctrl-C."""
    args = parser(name, description).parse_args(argv)
    settings = settings_from(args)
    if not secrets_are_private(settings, config_path(args.config)):
        return 1
    make_private_dirs(settings.data_dir)
    # a boxed FL client reaches its folder through the data folder (group x only; fl_client.box)
    boxed = settings.fl.enabled and fl_user(settings) is not None
    tighten_tree(settings.data_dir, root_keeps=GROUP_TRAVERSE if boxed else 0)
    try:
        service = Service(settings, roles)
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
