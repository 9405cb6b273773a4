"""``portico dispatch``: one role of the appliance (:class:`appliance.service.Role`)."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.cli.serve import run
from appliance.service import Role

DESCRIPTION = ("Send results to every destination, forward audit to ATNA and apply retention (one "
               "per site).")


def main(argv: Sequence[str]) -> int:
    return run("dispatch", DESCRIPTION, argv, frozenset({Role.DISPATCH}))
