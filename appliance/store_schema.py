"""The appliance database's tables: studies, instances, runs, jobs, results, outbox, audit, quarantine.

The audit table carries a hash chain (:mod:`appliance.audit_chain`, which adds ``prev_hash`` and ``hash``
to databases older than the chain); ``atna_outbox`` queues its rows for the ATNA collector.

Created idempotently at every start (``CREATE … IF NOT EXISTS``); review and model state add their own.
"""

SCHEMA = """
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
"""
