-- The replicas of one instance, one row per runner id (a data dir): how the
-- others reach it, and its lease, renewed by a heartbeat. epoch grows with
-- every start of the runner and with every settlement of its agents by
-- another replica, so a replica that was taken over writes nothing over it
-- (its heartbeat names an old epoch). state: serving, stopped (it let go at
-- a clean stop) or lost (another replica settled it). One SQL text for
-- SQLite and PostgreSQL.
CREATE TABLE replicas (
    runner_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    state TEXT NOT NULL,
    version TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    heartbeat_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
