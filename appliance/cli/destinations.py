"""Finding a configured destination by name, for ``portico echo`` and ``portico send``."""

from __future__ import annotations

import sys

from appliance.settings import Settings
from dicom_router.settings import DimseDestination, StowDestination


def find_destination(settings: Settings, name: str) -> DimseDestination | StowDestination | None:
    for dest in settings.dispatch.destinations:
        if dest.name == name:
            return dest
    known = ", ".join(d.name for d in settings.dispatch.destinations) or "none configured"
    sys.stderr.write(f"no destination {name!r} (known: {known})\n")
    return None
