"""Errors raised by the DICOM router, each with a stable code."""

from __future__ import annotations

from collections.abc import Sequence


class RouterError(Exception):
    """Base of every error the router raises on purpose."""

    code = "router_error"


class RulesError(RouterError):
    """A routing rules file is invalid; ``problems`` has one line per problem."""

    code = "rules_invalid"

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class DispatchError(RouterError):
    """Sending results to a destination failed (retryable unless ``permanent``)."""

    code = "dispatch_failed"

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class QueryError(RouterError):
    """A C-FIND to the sending PACS failed."""

    code = "query_failed"


class DestinationConfigError(DispatchError):
    """A destination's own settings keep us from sending (a secret or CA file missing or unreadable).

    Retryable: the items wait, and go once the configuration is fixed. The message names the
    setting at fault, never a secret.
    """

    code = "destination_misconfigured"


class TlsConfigError(RouterError):
    """A DICOM TLS certificate, key or CA file is missing, unreadable or does not fit."""

    code = "tls_config"
