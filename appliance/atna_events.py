"""Which audit rows become IHE ATNA messages, and as what: a table, not code.

Each :class:`~appliance.audit.AuditEvent` value sent to the collector maps to an :class:`AtnaEvent`: the
DICOM PS3.15 A.5 EventID (CID 400), the EventTypeCode when there is one (CID 401/403, possibly chosen
by a detail value), the EventActionCode, the outcome rule and the message's :class:`Shape` (which
participants and objects it names, built by :mod:`appliance.atna_message`). Events in neither
:data:`EVENTS` nor :data:`PREFIXES` stay in the local audit trail only.

To send a new event: add a line to :data:`EVENTS`. Events named like a sign-in, sign-out or deletion are
picked up by :data:`PREFIXES` until they get a line of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from appliance.audit import AuditEvent

Action = Literal["C", "R", "U", "D", "E"]

#: EventOutcomeIndicator values (PS3.15 A.5.1)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12


@dataclass(frozen=True)
class Code:
    """A coded value: ``csd-code``, ``codeSystemName``, ``originalText``."""

    code: str
    meaning: str
    system: str = "DCM"


# CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
AUDIT_LOG_USED = Code("110101", "Audit Log Used")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
QUERY = Code("110112", "Query")
STUDY_DELETED = Code("110105", "DICOM Study Deleted")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATION = Code("110114", "User Authentication")
# CID 401 Audit Event Type Code / CID 403 Security Alert Type
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
SECURITY_CONFIGURATION = Code("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "Software Configuration")
RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = Code("110133", "Audit Recording Stopped")
AUDIT_RECORDING_STARTED = Code("110134", "Audit Recording Started")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", "User Security Attributes Changed")


class Shape(StrEnum):
    """Who and what a message names (:mod:`appliance.atna_message` builds each)."""

    #: the application started or stopped; the actor launched it
    APPLICATION = "application"
    #: instances came in: the actor (calling AE title, STOW-RS sender) is the source, we are the destination
    RECEIVED = "received"
    #: instances went out: we are the source, ``detail.destination`` the destination
    SENT = "sent"
    #: the actor (a reviewer, or the application running a model) used a study's instances
    ACCESSED = "accessed"
    #: the study's instances were deleted by the actor
    DELETED = "deleted"
    #: the actor signed in or out; we authenticated them
    AUTHENTICATION = "authentication"
    #: a security alert about the actor (a node, a sender, a user); details in an Alert Description
    ALERT = "alert"
    #: a security alert about the audit trail itself
    AUDIT_ALERT = "audit_alert"
    #: the actor read the audit trail (verify, export)
    AUDIT_LOG = "audit_log"
    #: we queried a peer (``detail.peer``) about a study (C-FIND); the query keys hold no patient data
    QUERY = "query"


class Subject(StrEnum):
    """What an :attr:`Shape.ALERT` is about (its Alert Subject object, with the detail as Alert Description)."""

    #: the actor: a network address, calling AE title or STOW-RS sender (Node ID)
    NODE = "node"
    #: the account ``detail.user`` (User Identifier)
    USER = "user"
    #: the model version ``detail.model`` @ ``detail.version``
    MODEL = "model"
    #: no object
    NONE = "none"


@dataclass(frozen=True)
class AtnaEvent:
    """How one audit event becomes an ATNA message."""

    event_id: Code
    action: Action
    shape: Shape
    type_code: Code | None = None
    #: EventTypeCode by a detail value: ``(key, value, code)``, first match wins, else :attr:`type_code`
    type_by_detail: tuple[tuple[str, Any, Code], ...] = ()
    outcome: int = SUCCESS
    #: outcome by a detail value: ``(key, value, outcome)``, first match wins, else :attr:`outcome`
    outcome_by_detail: tuple[tuple[str, Any, int], ...] = ()
    #: rows of one study, actor and destination drained together become one message
    aggregate: bool = False
    #: for :attr:`Shape.ALERT`: what the alert is about
    subject: Subject = Subject.NONE

    def event_type(self, detail: dict[str, Any]) -> Code | None:
        for key, value, code in self.type_by_detail:
            if detail.get(key) == value:
                return code
        return self.type_code

    def outcome_of(self, detail: dict[str, Any]) -> int:
        for key, value, outcome in self.outcome_by_detail:
            if detail.get(key) == value:
                return outcome
        return self.outcome


_ALERT = SECURITY_ALERT
_MODEL_CHANGE = AtnaEvent(_ALERT, "U", Shape.ALERT, SOFTWARE_CONFIGURATION, subject=Subject.MODEL)
_USER_CHANGE = AtnaEvent(_ALERT, "U", Shape.ALERT, USER_SECURITY_ATTRIBUTES_CHANGED, subject=Subject.USER)
_SIGN_IN = AtnaEvent(USER_AUTHENTICATION, "E", Shape.AUTHENTICATION, LOGIN)
_SIGN_OUT = AtnaEvent(USER_AUTHENTICATION, "E", Shape.AUTHENTICATION, LOGOUT)
_PURGE = AtnaEvent(STUDY_DELETED, "D", Shape.DELETED)

#: audit event → ATNA message; keys are :class:`AuditEvent` values (plain strings, so an event another
#: module adds can be mapped before it exists)
EVENTS: dict[str, AtnaEvent] = {
    AuditEvent.SERVICE: AtnaEvent(APPLICATION_ACTIVITY, "E", Shape.APPLICATION, type_by_detail=(
        ("action", "start", APPLICATION_START), ("action", "stop", APPLICATION_STOP))),
    AuditEvent.RECEIVED: AtnaEvent(INSTANCES_TRANSFERRED, "C", Shape.RECEIVED, aggregate=True),
    AuditEvent.DISPATCHED: AtnaEvent(INSTANCES_TRANSFERRED, "R", Shape.SENT, aggregate=True),
    AuditEvent.DISPATCH_FAILED: AtnaEvent(INSTANCES_TRANSFERRED, "R", Shape.SENT, outcome=MINOR_FAILURE,
                                          outcome_by_detail=(("permanent", True, SERIOUS_FAILURE),)),
    AuditEvent.INFERRED: AtnaEvent(INSTANCES_ACCESSED, "C", Shape.ACCESSED),
    AuditEvent.QUERIED: AtnaEvent(QUERY, "E", Shape.QUERY, outcome_by_detail=(("answered", False, MINOR_FAILURE),)),
    AuditEvent.REVIEWED: AtnaEvent(INSTANCES_ACCESSED, "U", Shape.ACCESSED),
    AuditEvent.PURGED: _PURGE,
    AuditEvent.CONNECTIONS_REFUSED: AtnaEvent(_ALERT, "E", Shape.ALERT, NODE_AUTHENTICATION,
                                              outcome=MINOR_FAILURE, subject=Subject.NODE),
    AuditEvent.QUARANTINED: AtnaEvent(_ALERT, "E", Shape.ALERT, RESTRICTED_FUNCTION, outcome=MINOR_FAILURE,
                                      subject=Subject.NODE),
    AuditEvent.QUARANTINE_BUDGET_SPENT: AtnaEvent(_ALERT, "E", Shape.ALERT, RESTRICTED_FUNCTION,
                                                  outcome=SERIOUS_FAILURE, subject=Subject.NODE),
    AuditEvent.MODEL_ADDED: _MODEL_CHANGE,
    AuditEvent.MODEL_PROMOTED: _MODEL_CHANGE,
    AuditEvent.MODEL_ENABLED: _MODEL_CHANGE,
    AuditEvent.MODEL_DISABLED: _MODEL_CHANGE,
    AuditEvent.MODEL_REFUSED: AtnaEvent(_ALERT, "E", Shape.ALERT, SOFTWARE_CONFIGURATION, outcome=MINOR_FAILURE,
                                        subject=Subject.MODEL),
    AuditEvent.FL_ENROLLED: AtnaEvent(_ALERT, "U", Shape.ALERT, SECURITY_CONFIGURATION),
    AuditEvent.SIGNED_IN: _SIGN_IN,
    AuditEvent.SIGN_IN_FAILED: AtnaEvent(USER_AUTHENTICATION, "E", Shape.AUTHENTICATION, LOGIN,
                                         outcome=MINOR_FAILURE),
    AuditEvent.SIGN_IN_LOCKED: AtnaEvent(USER_AUTHENTICATION, "E", Shape.AUTHENTICATION, LOGIN,
                                         outcome=SERIOUS_FAILURE),
    AuditEvent.SIGNED_OUT: _SIGN_OUT,
    AuditEvent.USER_CHANGED: _USER_CHANGE,
    AuditEvent.TOKEN_ISSUED: _USER_CHANGE,
    AuditEvent.TOKEN_REVOKED: _USER_CHANGE,
    AuditEvent.AUDIT_CHAINED: AtnaEvent(_ALERT, "E", Shape.AUDIT_ALERT, AUDIT_RECORDING_STARTED,
                                        outcome_by_detail=(("action", "head_rebuilt", SERIOUS_FAILURE),)),
    AuditEvent.ATNA_DROPPED: AtnaEvent(_ALERT, "E", Shape.AUDIT_ALERT, AUDIT_RECORDING_STOPPED,
                                       outcome=SERIOUS_FAILURE),
    AuditEvent.AUDIT_VERIFIED: AtnaEvent(AUDIT_LOG_USED, "R", Shape.AUDIT_LOG,
                                         outcome_by_detail=(("ok", False, SERIOUS_FAILURE),)),
    AuditEvent.AUDIT_EXPORTED: AtnaEvent(AUDIT_LOG_USED, "R", Shape.AUDIT_LOG),
}

#: for events without a line in :data:`EVENTS`: a name starting with one of these maps like that
PREFIXES: tuple[tuple[str, AtnaEvent], ...] = (
    ("logout", _SIGN_OUT), ("log_out", _SIGN_OUT), ("sign_out", _SIGN_OUT), ("signout", _SIGN_OUT),
    ("signed_out", _SIGN_OUT),
    ("login", _SIGN_IN), ("log_in", _SIGN_IN), ("sign_in", _SIGN_IN), ("signin", _SIGN_IN),
    ("signed_in", _SIGN_IN),
    ("purge", _PURGE), ("delete", _PURGE),
)
#: an event name with one of these (``sign_in_failed``) is at least a minor failure
FAILURE_WORDS = ("fail", "refus", "denied", "locked", "invalid", "reject")


def atna_event(event: str) -> AtnaEvent | None:
    """The mapping for audit event ``event``, or ``None``: not sent."""
    found = EVENTS.get(event)
    if found is not None:
        return found
    for prefix, mapped in PREFIXES:
        if event.startswith(prefix):
            return mapped
    return None


def outcome(spec: AtnaEvent, event: str, detail: dict[str, Any]) -> int:
    """EventOutcomeIndicator of one row: the spec's rule, at least a minor failure for a failure's name."""
    found = spec.outcome_of(detail)
    if found == SUCCESS and event not in EVENTS and any(word in event for word in FAILURE_WORDS):
        return MINOR_FAILURE
    return found
