"""What the routers work on: settings, the store, accounts, and the running service when there is one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.health import Readiness
from appliance.metrics import Metrics, StateCollector
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
    _metrics: Metrics | None = field(default=None, repr=False)
    _readiness: Readiness | None = field(default=None, repr=False)

    @property
    def registry(self) -> ModelRegistry:
        """The service's registry (one verification cache), or one of our own, audited into the store."""
        if self.service is not None:
            return self.service.registry
        if self._registry is None:
            self._registry = ModelRegistry.from_settings(self.settings, audit=self.store.record,
                                                         database=self.store.db)
        return self._registry

    @property
    def metrics(self) -> Metrics:
        """The service's metrics (one registry per process), or the app's own over the store."""
        if self.service is not None:
            return self.service.metrics
        if self._metrics is None:
            self._metrics = Metrics()
            storage = self.settings.storage
            self._metrics.watch(StateCollector(self.store, self.settings.data_dir, storage.min_free_mb * 2**20,
                                               [d.name for d in self.settings.dispatch.destinations]))
        return self._metrics

    @property
    def readiness(self) -> Readiness:
        """The service's readiness checks (its listeners too), or the store's and the disk's alone."""
        if self.service is not None:
            return self.service.readiness
        if self._readiness is None:
            self._readiness = Readiness(self.store, self.settings.data_dir,
                                        self.settings.storage.min_free_mb * 2**20)
        return self._readiness
