"""What the routers work on: settings, the store, accounts, and the running service when there is one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.models import ModelRegistry
from appliance.settings import Settings
from appliance.store import Store
from appliance.users import Accounts

if TYPE_CHECKING:  # the service builds the app: importing it here at run time would be circular
    from appliance.service import Service

#: who the audit records for changes made with the deprecated shared ``api.token``
ACTOR = "api"


@dataclass
class ApiContext:
    """Shared by every router of one app.

    Parameters
    ----------
    settings, store
        The appliance's settings and state store.
    accounts
        Users, tokens and sessions, in the store's database.
    service
        The running ``portico serve`` service; ``None`` for an API beside no service (tests, tools).
    """

    settings: Settings
    store: Store
    accounts: Accounts
    service: Service | None = None
    _registry: ModelRegistry | None = field(default=None, repr=False)

    @property
    def registry(self) -> ModelRegistry:
        """The service's registry (one verification cache), or one of our own, audited into the store."""
        if self.service is not None:
            return self.service.registry
        if self._registry is None:
            self._registry = ModelRegistry.from_settings(self.settings, audit=self.store.record)
        return self._registry
