-- The agent runtime. One SQL text for SQLite and PostgreSQL (see the
-- foundation migration).
--
-- An agent is one run of a configured agent type as an OS process. What was
-- asked (agents) never changes after the spawn; where the process is
-- (agent_status) changes with every transition. runner_id names the daemon
-- (its data dir) that supervises the process, so a restarted daemon settles
-- only its own unfinished agents, never those of a replica sharing the
-- database. labels_json and output_tail_json are JSON (an object of strings,
-- an array of lines). pid, exit_code and signal stay NULL until known. Times
-- are epoch milliseconds.
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    agent_type TEXT NOT NULL,
    prompt TEXT NOT NULL,
    task_id TEXT NOT NULL,
    labels_json TEXT NOT NULL,
    origin_kind TEXT NOT NULL,
    origin_instance_id TEXT NOT NULL,
    origin_workspace TEXT NOT NULL,
    runner_id TEXT NOT NULL,
    timeout_secs BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

-- ListAgents pages newest first.
CREATE INDEX agents_newest_first ON agents (created_at_ms, id);
CREATE INDEX agents_runner ON agents (runner_id);

CREATE TABLE agent_status (
    agent_id TEXT PRIMARY KEY REFERENCES agents (id) ON DELETE CASCADE,
    state TEXT NOT NULL,
    state_reason TEXT NOT NULL,
    pid BIGINT NULL,
    exit_code INTEGER NULL,
    signal INTEGER NULL,
    output_tail_json TEXT NOT NULL,
    output_bytes BIGINT NOT NULL,
    output_truncated BOOLEAN NOT NULL,
    started_at_ms BIGINT NULL,
    ended_at_ms BIGINT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE INDEX agent_status_state ON agent_status (state);

-- One row per label, so a label filter is an indexed lookup on both backends.
CREATE TABLE agent_labels (
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    label_key TEXT NOT NULL,
    label_value TEXT NOT NULL,
    PRIMARY KEY (agent_id, label_key)
);
CREATE INDEX agent_labels_lookup ON agent_labels (label_key, label_value);

-- Every state an agent entered, with when and why. An agent enters each state
-- at most once (the lifecycle has no cycles), hence the key.
CREATE TABLE agent_events (
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    to_state TEXT NOT NULL,
    from_state TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, to_state)
);
