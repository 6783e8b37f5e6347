-- Federation connections between this instance and peers, their history, the
-- keys peers rotated to, the message ids already seen (replay protection) and
-- the notices still to deliver. Same SQL for SQLite and PostgreSQL: TEXT,
-- BIGINT epoch-ms times, BOOLEAN, BYTEA, INTEGER; text UUID keys.

-- One row per connection with one peer in one workspace, as this instance
-- sees it. direction is
-- 'inbound' or 'outbound'; state is 'pending', 'active', 'suspended',
-- 'disconnected' or 'rejected'; suspended_by is 'local' or 'peer' while
-- SUSPENDED. remote_public_key is the peer's current key (SPKI DER).
-- capabilities_json is one JSON object of four string arrays: `remote` (what
-- the peer advertises), `granted` (what we grant it), `granted_to_us` (what
-- it grants us) and `requested` (what the request asked for); one column
-- keeps the table within diesel's 16-column default.
CREATE TABLE federation_connections (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    remote_instance_id TEXT NOT NULL,
    remote_name TEXT NOT NULL,
    remote_url TEXT NOT NULL,
    remote_public_key BYTEA NOT NULL,
    remote_fingerprint TEXT NOT NULL,
    capabilities_json TEXT NOT NULL,
    direction TEXT NOT NULL,
    state TEXT NOT NULL,
    state_reason TEXT NOT NULL,
    suspended_by TEXT NULL,
    reachable BOOLEAN NOT NULL,
    last_contact_at_ms BIGINT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- At most one open (not DISCONNECTED, not REJECTED) connection per peer and
-- workspace, whatever two concurrent requests do.
CREATE UNIQUE INDEX federation_connections_one_open
    ON federation_connections (workspace, remote_instance_id)
    WHERE state IN ('pending', 'active', 'suspended');

CREATE INDEX federation_connections_by_created
    ON federation_connections (created_at_ms, id);

-- Every state change of a connection. from_state is NULL for the creation;
-- actor is 'local', 'peer' or 'system'.
CREATE TABLE federation_connection_events (
    id TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES federation_connections (id),
    from_state TEXT NULL,
    to_state TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    at_ms BIGINT NOT NULL
);

CREATE INDEX federation_connection_events_by_connection
    ON federation_connection_events (connection_id, at_ms);

-- Keys a peer rotated away from that still verify for this connection until
-- valid_until_ms (the end of the peer's grace period).
CREATE TABLE federation_peer_keys (
    connection_id TEXT NOT NULL REFERENCES federation_connections (id),
    key_id TEXT NOT NULL,
    public_key BYTEA NOT NULL,
    valid_until_ms BIGINT NOT NULL,
    PRIMARY KEY (connection_id, key_id)
);

-- Message ids already accepted from each sender, with a digest of the signed
-- payload (an identical retry gets the stored reply; other bytes under the
-- same id are refused). Pruned once older than twice the clock window, when
-- the clock check alone refuses them.
CREATE TABLE federation_seen_messages (
    sender_instance_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload_digest BYTEA NOT NULL,
    reply_payload BYTEA NULL,
    reply_signature BYTEA NULL,
    reply_key_id TEXT NULL,
    seen_at_ms BIGINT NOT NULL,
    PRIMARY KEY (sender_instance_id, message_id)
);

CREATE INDEX federation_seen_messages_by_time ON federation_seen_messages (seen_at_ms);

-- Notices to peers not yet delivered. kind is the NoticeKind name in lower
-- case ('accepted', 'suspended', ..., 'key_rotated'); signing_key_id names the
-- key a 'key_rotated' notice must be signed with (the one the peer trusts).
-- Delivered rows are deleted.
CREATE TABLE federation_outbox (
    id TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES federation_connections (id),
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    granted_capabilities_json TEXT NOT NULL,
    signing_key_id TEXT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at_ms BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    sequence BIGINT NOT NULL
);

CREATE INDEX federation_outbox_due ON federation_outbox (next_attempt_at_ms);
CREATE INDEX federation_outbox_by_connection ON federation_outbox (connection_id, sequence);
