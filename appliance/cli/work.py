"""``portico work``: one role of the appliance (:class:`appliance.service.Role`)."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.cli.serve import run
from appliance.service import Role

DESCRIPTION = "Run inference jobs from the shared queue (one process per GPU or machine)."


def main(argv: Sequence[str]) -> int:
    return run("work", DESCRIPTION, argv, frozenset({Role.WORK}))
