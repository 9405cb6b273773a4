"""Typed, append-only audit events. Written explicitly at each action, never derived from logs."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class AuditEvent(StrEnum):
    RECEIVED = "received"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    #: a STOW-RS sender's quarantine budget is spent: its bad parts are refused and not kept (once per episode)
    QUARANTINE_BUDGET_SPENT = "quarantine_budget_spent"
    STUDY_COMPLETE = "study_complete"
    ROUTED = "routed"
    NO_MATCH = "no_match"
    JOB_STATE = "job_state"
    INFERRED = "inferred"
    #: results held until a reviewer decides (``review`` settings)
    HELD_FOR_REVIEW = "held_for_review"
    #: a reviewer approved or rejected a job's results
    REVIEWED = "reviewed"
    DISPATCHED = "dispatched"
    DISPATCH_FAILED = "dispatch_failed"
    MODEL_LOADED = "model_loaded"
    SERVICE = "service"
    #: a C-FIND to the sending PACS for a study's instance count (first answer, a changed one, or a failure)
    QUERIED = "queried"
    #: connections the DICOM listener's edge refused, counted per (reason, address) and window
    CONNECTIONS_REFUSED = "connections_refused"
    FL_ENROLLED = "fl_enrolled"
    FL_CLIENT = "fl_client"
    FL_JOB_WAITING = "fl_job_waiting"
    FL_JOB_APPROVED = "fl_job_approved"
    FL_JOB_REJECTED = "fl_job_rejected"
    FL_ROUND = "fl_round"
    FL_JOB_FINISHED = "fl_job_finished"
    FL_EXPORTED = "fl_exported"
    MODEL_ADDED = "model_added"
    MODEL_PROMOTED = "model_promoted"
    MODEL_ENABLED = "model_enabled"
    MODEL_DISABLED = "model_disabled"
    MODEL_REFUSED = "model_refused"
    # the audit trail itself (appliance.audit_chain, appliance.atna_outbox, portico audit)
    #: rows written before the hash chain existed were chained at upgrade, or a lost chain head was rebuilt
    AUDIT_CHAINED = "audit_chained"
    #: ``portico audit verify`` walked the chain (detail: ok, and the first problem found)
    AUDIT_VERIFIED = "audit_verified"
    #: ``portico audit export`` wrote rows out for an auditor
    AUDIT_EXPORTED = "audit_exported"
    #: the ATNA queue passed ``audit.syslog.queue_max``: its oldest unsent messages were dropped (counted)
    ATNA_DROPPED = "atna_dropped"
    # accounts (appliance.users): actor = the user name; detail has address and route, never a secret
    #: a password sign-in succeeded (a session began)
    SIGNED_IN = "signed_in"
    SIGNED_OUT = "signed_out"
    #: a wrong password, unknown or disabled user, or a wrong, expired or revoked bearer token
    SIGN_IN_FAILED = "sign_in_failed"
    #: a user name or an address was locked out after repeated failures (with what was refused meanwhile)
    SIGN_IN_LOCKED = "sign_in_locked"
    #: an account added, disabled, enabled, unlocked, or its password or roles changed
    USER_CHANGED = "user_changed"
    TOKEN_ISSUED = "token_issued"
    TOKEN_REVOKED = "token_revoked"
    #: retention (appliance.retention) removed a study's files and index rows, or quarantined files
    PURGED = "purged"
    #: FL: the site's privacy budget (fl.privacy epsilon) for a project is spent; the site stops contributing
    FL_PRIVACY_BUDGET_SPENT = "fl_privacy_budget_spent"
    #: FL: a startup kit was enrolled without an out-of-band root CA fingerprint (explicit admin flag)
    FL_FINGERPRINT_WAIVED = "fl_fingerprint_waived"
    #: an operator put a failed job back in the queue (detail: the error it had, and how it was asked)
    JOB_RETRIED = "job_retried"
    #: an operator queued a study's results again for a destination (detail: items per destination)
    RESULTS_RESENT = "results_resent"
    #: an operator paused a destination: nothing is sent to it until resumed (detail: reason, items waiting)
    DESTINATION_PAUSED = "destination_paused"
    #: an operator resumed a paused destination (detail: who paused it, when and why)
    DESTINATION_RESUMED = "destination_resumed"


@dataclass(frozen=True)
class AuditRecord:
    """One audit row. ``detail`` holds no patient identifiers: UIDs, ids, states and reasons only."""

    event: AuditEvent
    study_uid: str | None = None
    job_id: int | None = None
    actor: str = "system"
    detail: dict[str, Any] = field(default_factory=dict)
