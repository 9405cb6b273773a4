"""Errors of the FL client, each with a stable ``code`` the appliance maps at its boundaries."""

from __future__ import annotations


class FLClientError(Exception):
    """Base of every FL client error."""

    code = "fl_error"


class KitError(FLClientError):
    """A startup kit (or signed enrolment zip) is invalid, incomplete or not trusted."""

    code = "fl_kit_invalid"


class NotEnrolledError(FLClientError):
    """The appliance holds no startup kit yet."""

    code = "fl_not_enrolled"


class PolicyError(FLClientError):
    """A job or a request violates the site policy."""

    code = "fl_policy"


class CohortError(FLClientError):
    """The local cohort cannot be built or read."""

    code = "fl_cohort"


class ExportError(FLClientError):
    """A global model cannot be turned into a candidate package."""

    code = "fl_export"


class BoxError(FLClientError):
    """The NVFlare client cannot be put in its own box (its OS user is missing, or cannot reach its folder)."""

    code = "fl_box"
