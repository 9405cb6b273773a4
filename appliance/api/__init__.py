"""The appliance's HTTP API: thin FastAPI routers over the store, the registry and FL approvals.

Build it with :func:`appliance.api.app.create_app`; ``portico serve`` runs it through
:class:`appliance.api_server.ApiServer` when ``api.enabled`` is set.
"""
