"""The appliance database as Portico made it before migrations (commit 4a2fe6b): frozen, for upgrade tests.

Each module created its own tables at start with ``CREATE … IF NOT EXISTS``; there was no version.
"""

from __future__ import annotations

UNVERSIONED_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    calling_ae TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
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
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    run_version INTEGER
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid);
CREATE TABLE IF NOT EXISTS runs (
    study_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    reason TEXT NOT NULL,
    instance_count INTEGER NOT NULL,
    last_received REAL NOT NULL,
    routed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (study_uid, version)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    run_version INTEGER NOT NULL,
    rule TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT,
    series_uid TEXT NOT NULL,
    content_key TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    error TEXT,
    provider TEXT,
    package_hash TEXT,
    timings TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
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
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created REAL NOT NULL,
    sent_at REAL,
    UNIQUE (destination, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox(job_id);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
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
    audit_id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    written_at REAL,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS atna_outbox_state ON atna_outbox(state, audit_id);
CREATE TABLE IF NOT EXISTS quarantine (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    reason TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    peer TEXT NOT NULL,
    path TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS reviews (
    job_id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    held INTEGER NOT NULL,
    created REAL NOT NULL,
    decided_at REAL,
    reviewer TEXT,
    reason TEXT NOT NULL DEFAULT '',
    via TEXT
);
CREATE INDEX IF NOT EXISTS reviews_state ON reviews(state);

CREATE TABLE IF NOT EXISTS model_versions (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('candidate', 'active')),
    enabled INTEGER NOT NULL DEFAULT 1,
    package_hash TEXT NOT NULL,
    folder TEXT NOT NULL,
    added REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS model_versions_one_active ON model_versions(name) WHERE role = 'active';

CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    password_changed REAL NOT NULL,
    last_sign_in REAL,
    last_sign_in_from TEXT
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    expires REAL NOT NULL,
    revoked REAL,
    last_used REAL
);
CREATE INDEX IF NOT EXISTS api_tokens_user ON api_tokens(username);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    last_seen REAL NOT NULL,
    address TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(username);
CREATE TABLE IF NOT EXISTS sign_in_failures (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    failures INTEGER NOT NULL,
    last_failure REAL NOT NULL,
    locked_until REAL NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, key)
);
"""
