"""Migration 1, the baseline: every table as it stood before the schema was versioned.

``CREATE … IF NOT EXISTS`` throughout, so an appliance installed before migrations existed (tables made by
the store, review, model state and accounts modules at every start) takes this migration as a no-op on its
tables; its audit table is then brought up to the hash chain (:func:`appliance.audit_chain.upgrade`). A
fresh database gets exactly the old tables. ``{id}`` is a generated key, ``{key}`` a key the writer gives.
"""

from __future__ import annotations

from appliance import audit_chain
from appliance.db.ddl import run_script
from appliance.db.engine import Tx

NAME = "baseline"

SCRIPT = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    first_received DOUBLE PRECISION NOT NULL,
    last_received DOUBLE PRECISION NOT NULL,
    received_count INTEGER NOT NULL DEFAULT 0,
    expected_count INTEGER,
    run_version INTEGER NOT NULL DEFAULT 0,
    open INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    run_version INTEGER
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid);
CREATE TABLE IF NOT EXISTS runs (
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    instance_count INTEGER NOT NULL,
    last_received DOUBLE PRECISION NOT NULL,
    routed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (study_uid, version)
);
CREATE TABLE IF NOT EXISTS jobs (
    id {id},
    study_uid TEXT NOT NULL,
    run_version INTEGER NOT NULL,
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT,
    series_uid TEXT NOT NULL,
    content_key TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    error TEXT,
    provider TEXT,
    package_hash TEXT,
    timings TEXT,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    UNIQUE (study_uid, run_version, rule)
);
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    detail TEXT
);
-- a job's results and outbox rows, by job (results of a job, review, retention's per-study checks)
CREATE INDEX IF NOT EXISTS results_job ON results(job_id);
CREATE TABLE IF NOT EXISTS outbox (
    id {id},
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT,
    created DOUBLE PRECISION NOT NULL,
    sent_at DOUBLE PRECISION,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox(job_id);
CREATE TABLE IF NOT EXISTS audit (
    id {key},
    ts DOUBLE PRECISION NOT NULL,
    event TEXT NOT NULL,
    study_uid TEXT,
    job_id INTEGER,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT,
    hash TEXT
);
-- the audit chain's head (appliance.audit_chain): one row; atna: whether new rows queue an ATNA message
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_id INTEGER NOT NULL,
    last_hash TEXT NOT NULL,
    atna INTEGER NOT NULL DEFAULT 0
);
-- one row per audit row waiting for (or done with) its ATNA message (appliance.atna_outbox)
CREATE TABLE IF NOT EXISTS atna_outbox (
    audit_id {key},
    state TEXT NOT NULL,
    written_at DOUBLE PRECISION,
    done_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS atna_outbox_state ON atna_outbox(state, audit_id);
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY,
    ts DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer TEXT NOT NULL,
    path TEXT NOT NULL
);
-- review decisions (appliance.review)
CREATE TABLE IF NOT EXISTS reviews (
    job_id {key},
    state TEXT NOT NULL,
    held INTEGER NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    decided_at DOUBLE PRECISION,
    reviewer TEXT,
    reason TEXT NOT NULL DEFAULT '',
    via TEXT
);
CREATE INDEX IF NOT EXISTS reviews_state ON reviews(state);
-- installed model versions and their roles (appliance.model_state)
CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('candidate', 'active')),
    enabled INTEGER NOT NULL DEFAULT 1,
    package_hash TEXT NOT NULL,
    folder TEXT NOT NULL,
    added DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS model_versions_one_active ON model_versions(name) WHERE role = 'active';
-- accounts (appliance.users)
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created DOUBLE PRECISION NOT NULL,
    password_changed DOUBLE PRECISION NOT NULL,
    last_sign_in DOUBLE PRECISION,
    last_sign_in_from TEXT
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    revoked DOUBLE PRECISION,
    last_used DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS api_tokens_user ON api_tokens(username);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    address TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(username);
CREATE TABLE IF NOT EXISTS sign_in_failures (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    failures INTEGER NOT NULL,
    last_failure DOUBLE PRECISION NOT NULL,
    locked_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, key)
);
"""


def apply(tx: Tx) -> None:
    run_script(tx, SCRIPT)
    audit_chain.upgrade(tx)
