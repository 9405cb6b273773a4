"""``portico receive``: one role of the appliance (:class:`appliance.service.Role`)."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.cli.serve import run
from appliance.service import Role

DESCRIPTION = ("Receive studies (C-STORE SCP, STOW-RS), decide completeness and route them; several "
               "receivers may share one address.")


def main(argv: Sequence[str]) -> int:
    return run("receive", DESCRIPTION, argv, frozenset({Role.RECEIVE}))
