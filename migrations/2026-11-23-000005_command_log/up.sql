-- The audit log of signed commands, received and sent. Same SQL for SQLite and
-- PostgreSQL: TEXT, BIGINT epoch-ms times, BYTEA.
--
-- direction is 'inbound' or 'outbound'. outcome is 'ok', the name of the gRPC
-- code the command ended with (e.g. 'PERMISSION_DENIED'), or '' while an
-- outbound command awaits its reply. Outbound rows also keep the signed command
-- (envelope_*) and a digest of the operator's request, so that a retry with the
-- same message id re-sends exactly the same bytes (the peer then answers with
-- its stored result) and a different request under that id is refused.
CREATE TABLE federation_command_log (
    id TEXT PRIMARY KEY,
    direction TEXT NOT NULL,
    message_id TEXT NOT NULL,
    sender_instance_id TEXT NOT NULL,
    recipient_instance_id TEXT NOT NULL,
    workspace TEXT NOT NULL,
    command_type TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    issued_at_ms BIGINT NOT NULL,
    recorded_at_ms BIGINT NOT NULL,
    request_digest BYTEA NULL,
    envelope_payload BYTEA NULL,
    envelope_signature BYTEA NULL,
    envelope_key_id TEXT NULL
);

-- One outbound row per message id: the retry source.
CREATE UNIQUE INDEX federation_command_log_outbound_message
    ON federation_command_log (message_id)
    WHERE direction = 'outbound';

CREATE INDEX federation_command_log_by_recorded
    ON federation_command_log (recorded_at_ms, id);
