"""Roles and what each may do, as data: a role is a set of permissions, a user holds one or more roles.

Roles are cumulative as they are listed: every role includes ``viewer``; ``admin`` holds every
permission. The table below is the whole policy; :mod:`appliance.api.permissions` names the
permission each route needs, and nothing else decides who may do what.

========================  ==============================================================
role                      permissions
========================  ==============================================================
``viewer``                ``status.read``, ``models.read``, ``review.read``
``reviewer``              viewer + ``review.decide``
``model-admin``           viewer + ``models.manage``
``fl-approver``           viewer + ``fl.decide``
``admin``                 every permission (+ ``audit.read``, ``jobs.manage``,
                          ``destinations.manage``, ``users.manage``, ``settings.manage``)
========================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum


class Permission(StrEnum):
    """One thing a signed-in user may do."""

    #: ``/status``, ``/overview``, ``/studies``, ``/jobs``, ``/fl/status``
    STATUS_READ = "status.read"
    #: the list of installed model versions
    MODELS_READ = "models.read"
    #: the review queue and decided reviews
    REVIEW_READ = "review.read"
    #: approve or reject a job's results
    REVIEW_DECIDE = "review.decide"
    #: promote, enable or disable a model version
    MODELS_MANAGE = "models.manage"
    #: approve or reject a federated-learning job at this site
    FL_DECIDE = "fl.decide"
    #: read and export the audit trail, sign-in events and locks
    AUDIT_READ = "audit.read"
    #: retry a failed job, send a study's results again
    JOBS_MANAGE = "jobs.manage"
    #: pause or resume sending to a destination
    DESTINATIONS_MANAGE = "destinations.manage"
    #: accounts, roles and tokens (today through ``portico users`` on the appliance itself)
    USERS_MANAGE = "users.manage"
    #: the appliance's configuration (today ``portico.yaml`` on the appliance itself)
    SETTINGS_MANAGE = "settings.manage"


class Role(StrEnum):
    VIEWER = "viewer"
    REVIEWER = "reviewer"
    MODEL_ADMIN = "model-admin"
    FL_APPROVER = "fl-approver"
    ADMIN = "admin"


_VIEWER = frozenset({Permission.STATUS_READ, Permission.MODELS_READ, Permission.REVIEW_READ})

#: the policy: role → every permission it grants (cumulative roles are spelled out, not inherited in code)
ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    Role.VIEWER: _VIEWER,
    Role.REVIEWER: _VIEWER | {Permission.REVIEW_DECIDE},
    Role.MODEL_ADMIN: _VIEWER | {Permission.MODELS_MANAGE},
    Role.FL_APPROVER: _VIEWER | {Permission.FL_DECIDE},
    Role.ADMIN: frozenset(Permission),
}


def permissions_of(roles: Iterable[Role]) -> frozenset[Permission]:
    """Everything ``roles`` together allow."""
    out: frozenset[Permission] = frozenset()
    for role in roles:
        out |= ROLE_PERMISSIONS[role]
    return out


def parse_roles(names: Iterable[str]) -> tuple[Role, ...]:
    """Role names as :class:`Role`, sorted and without repeats.

    Raises
    ------
    ValueError
        When a name is not a role; the message lists the roles there are.
    """
    out: set[Role] = set()
    for name in names:
        try:
            out.add(Role(name.strip().lower()))
        except ValueError:
            raise ValueError(f"{name!r} is not a role; roles: {', '.join(Role)}") from None
    return tuple(sorted(out, key=list(Role).index))
