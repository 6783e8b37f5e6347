-- Jobs of the coordinator, their history, and the webhook deliveries already
-- seen. One SQL text for SQLite and PostgreSQL (see the foundation migration).

-- One row per job. state is PENDING, RUNNING, COMPLETED, FAILED or
-- CANCELLED. version counts the job's history entries: every change is a
-- conditional UPDATE on the version it read, so two racing changes cannot
-- both win, and the new history entry's sequence is the new version.
-- Empty text means "not set" for the optional text fields; idempotency_key
-- is NULL when the job has none, so the unique index ignores it.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    job_type TEXT NOT NULL,
    workspace TEXT NOT NULL,
    payload_json TEXT NOT NULL,
    priority INTEGER NOT NULL,
    labels_json TEXT NOT NULL,
    state TEXT NOT NULL,
    progress INTEGER NOT NULL,
    progress_message TEXT NOT NULL,
    result_json TEXT NOT NULL,
    error TEXT NOT NULL,
    created_by TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    peer_instance_id TEXT NOT NULL,
    idempotency_key TEXT NULL,
    version BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    started_at_ms BIGINT NULL,
    ended_at_ms BIGINT NULL
);

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key);
-- ListJobs pages newest first by (created_at_ms, id).
CREATE INDEX jobs_newest_first ON jobs (created_at_ms, id);
CREATE INDEX jobs_by_state ON jobs (state, created_at_ms);

-- The labels of each job again, one row per label, so ListJobs can filter on
-- labels with plain SQL on both backends.
CREATE TABLE job_labels (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);

CREATE INDEX job_labels_by_pair ON job_labels (name, value);

-- Every accepted change of a job: sequence 1 is the creation, then one more
-- per change. from_state is NULL for the creation entry.
CREATE TABLE job_history (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    sequence BIGINT NOT NULL,
    from_state TEXT NULL,
    to_state TEXT NOT NULL,
    progress INTEGER NOT NULL,
    message TEXT NOT NULL,
    actor TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, sequence)
);

-- Webhook deliveries already processed, so a redelivery creates nothing.
-- job_id is NULL when the source's configuration ignored the event.
CREATE TABLE webhook_deliveries (
    source TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    job_id TEXT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    received_at_ms BIGINT NOT NULL,
    PRIMARY KEY (source, delivery_id)
);
