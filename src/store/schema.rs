//! Table definitions for diesel, written by hand to match `migrations/`.
//!
//! Only column types that SQLite and PostgreSQL share are used: `Text`,
//! `BigInt` (times as epoch milliseconds), `Bool`, `Binary`, `Integer` and
//! their `Nullable` forms.

diesel::table! {
    /// This instance's identity; at most one row.
    instance (id) {
        /// The instance's UUID.
        id -> Text,
        name -> Text,
        public_url -> Text,
        /// A JSON array of strings.
        capabilities_json -> Text,
        /// A JSON object of string values.
        metadata_json -> Text,
        created_at_ms -> BigInt,
        updated_at_ms -> BigInt,
    }
}

diesel::table! {
    /// The instance's signing keys, current and retired.
    instance_keys (key_id) {
        key_id -> Text,
        /// SPKI DER.
        public_key -> Binary,
        /// Nonce followed by ciphertext; opaque to the store.
        sealed_private_key -> Binary,
        created_at_ms -> BigInt,
        /// NULL for the current key.
        valid_until_ms -> Nullable<BigInt>,
        is_current -> Bool,
        retired_at_ms -> Nullable<BigInt>,
        /// The key's self-signed certificate (DER); NULL until first made.
        certificate_der -> Nullable<Binary>,
    }
}

diesel::table! {
    /// Client API keys, stored as hashes.
    api_keys (id) {
        id -> Text,
        name -> Text,
        key_hash -> Binary,
        /// The first characters of the key, shown in lists.
        prefix -> Text,
        /// Comma separated.
        scopes -> Text,
        created_at_ms -> BigInt,
        last_used_at_ms -> Nullable<BigInt>,
        revoked_at_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    /// Federation connections with peers, one per peer and workspace.
    federation_connections (id) {
        id -> Text,
        workspace -> Text,
        remote_instance_id -> Text,
        remote_name -> Text,
        remote_url -> Text,
        /// SPKI DER of the peer's current key.
        remote_public_key -> Binary,
        remote_fingerprint -> Text,
        /// JSON object of four string arrays (remote, granted, granted_to_us, requested).
        capabilities_json -> Text,
        direction -> Text,
        state -> Text,
        state_reason -> Text,
        suspended_by -> Nullable<Text>,
        reachable -> Bool,
        last_contact_at_ms -> Nullable<BigInt>,
        created_at_ms -> BigInt,
        updated_at_ms -> BigInt,
        /// Where an inbound request came from (the rate limiter's client
        /// group, e.g. `ip:203.0.113.7`); NULL for outbound connections.
        request_source -> Nullable<Text>,
    }
}

diesel::table! {
    /// Every state change of a federation connection.
    federation_connection_events (id) {
        id -> Text,
        connection_id -> Text,
        from_state -> Nullable<Text>,
        to_state -> Text,
        actor -> Text,
        reason -> Text,
        at_ms -> BigInt,
    }
}

diesel::table! {
    /// Keys a peer rotated away from, still valid for its connection.
    federation_peer_keys (connection_id, key_id) {
        connection_id -> Text,
        key_id -> Text,
        public_key -> Binary,
        valid_until_ms -> BigInt,
    }
}

diesel::table! {
    /// Message ids accepted from each sender (replay protection, idempotent retries).
    federation_seen_messages (sender_instance_id, message_id) {
        sender_instance_id -> Text,
        message_id -> Text,
        payload_digest -> Binary,
        reply_payload -> Nullable<Binary>,
        reply_signature -> Nullable<Binary>,
        reply_key_id -> Nullable<Text>,
        seen_at_ms -> BigInt,
    }
}

diesel::table! {
    /// Notices to peers not yet delivered.
    federation_outbox (id) {
        id -> Text,
        connection_id -> Text,
        kind -> Text,
        reason -> Text,
        granted_capabilities_json -> Text,
        signing_key_id -> Nullable<Text>,
        attempts -> Integer,
        next_attempt_at_ms -> BigInt,
        last_error -> Text,
        created_at_ms -> BigInt,
        sequence -> BigInt,
    }
}

diesel::table! {
    /// The audit log of signed commands, received and sent.
    federation_command_log (id) {
        id -> Text,
        /// `inbound` or `outbound`.
        direction -> Text,
        message_id -> Text,
        sender_instance_id -> Text,
        recipient_instance_id -> Text,
        workspace -> Text,
        command_type -> Text,
        /// `ok`, a gRPC code name, or empty while awaiting the reply.
        outcome -> Text,
        detail -> Text,
        issued_at_ms -> BigInt,
        recorded_at_ms -> BigInt,
        /// Outbound: digest of the operator's request.
        request_digest -> Nullable<Binary>,
        /// Outbound: the signed command, re-sent by a retry.
        envelope_payload -> Nullable<Binary>,
        envelope_signature -> Nullable<Binary>,
        envelope_key_id -> Nullable<Text>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    instance,
    instance_keys,
    api_keys,
    federation_connections,
    federation_connection_events,
    federation_peer_keys,
    federation_seen_messages,
    federation_outbox,
    federation_command_log,
);

diesel::table! {
    /// Agents: what was asked; never changes after the spawn.
    agents (id) {
        id -> Text,
        agent_type -> Text,
        prompt -> Text,
        task_id -> Text,
        /// A JSON object of string values.
        labels_json -> Text,
        /// `LOCAL` or `PEER`.
        origin_kind -> Text,
        origin_instance_id -> Text,
        origin_workspace -> Text,
        /// The daemon (data dir) that supervises the process.
        runner_id -> Text,
        timeout_secs -> BigInt,
        created_at_ms -> BigInt,
    }
}

diesel::table! {
    /// Where each agent's process is; one row per agent.
    agent_status (agent_id) {
        agent_id -> Text,
        /// `SPAWNING`, `RUNNING`, `COMPLETED`, `FAILED`, `KILLED` or `TIMED_OUT`.
        state -> Text,
        state_reason -> Text,
        pid -> Nullable<BigInt>,
        exit_code -> Nullable<Integer>,
        signal -> Nullable<Integer>,
        /// A JSON array of strings.
        output_tail_json -> Text,
        output_bytes -> BigInt,
        output_truncated -> Bool,
        started_at_ms -> Nullable<BigInt>,
        ended_at_ms -> Nullable<BigInt>,
        updated_at_ms -> BigInt,
    }
}

diesel::table! {
    /// Agent labels, one row each, for filtering.
    agent_labels (agent_id, label_key) {
        agent_id -> Text,
        label_key -> Text,
        label_value -> Text,
    }
}

diesel::table! {
    /// Every state an agent entered.
    agent_events (agent_id, to_state) {
        agent_id -> Text,
        to_state -> Text,
        from_state -> Text,
        reason -> Text,
        at_ms -> BigInt,
    }
}

diesel::joinable!(agent_status -> agents (agent_id));
diesel::joinable!(agent_labels -> agents (agent_id));
diesel::joinable!(agent_events -> agents (agent_id));
diesel::allow_tables_to_appear_in_same_query!(agents, agent_status, agent_labels, agent_events);

diesel::table! {
    /// Coordinator jobs; `version` counts history entries and guards every
    /// change (a conditional UPDATE on the version read).
    jobs (id) {
        id -> Text,
        job_type -> Text,
        workspace -> Text,
        payload_json -> Text,
        priority -> Integer,
        /// A JSON object of string values (also in `job_labels`).
        labels_json -> Text,
        /// PENDING, RUNNING, COMPLETED, FAILED or CANCELLED.
        state -> Text,
        progress -> Integer,
        progress_message -> Text,
        result_json -> Text,
        error -> Text,
        created_by -> Text,
        agent_id -> Text,
        peer_instance_id -> Text,
        idempotency_key -> Nullable<Text>,
        version -> BigInt,
        created_at_ms -> BigInt,
        updated_at_ms -> BigInt,
        started_at_ms -> Nullable<BigInt>,
        ended_at_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    /// One row per job label, for filtering.
    job_labels (job_id, name) {
        job_id -> Text,
        name -> Text,
        value -> Text,
    }
}

diesel::table! {
    /// Every accepted change of a job.
    job_history (job_id, sequence) {
        job_id -> Text,
        sequence -> BigInt,
        /// NULL for the creation entry.
        from_state -> Nullable<Text>,
        to_state -> Text,
        progress -> Integer,
        message -> Text,
        actor -> Text,
        at_ms -> BigInt,
    }
}

diesel::table! {
    /// Webhook deliveries already processed.
    webhook_deliveries (source, delivery_id) {
        source -> Text,
        delivery_id -> Text,
        /// NULL when the event was ignored by configuration.
        job_id -> Nullable<Text>,
        received_at_ms -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(jobs, job_labels, job_history, webhook_deliveries);

diesel::table! {
    /// Leases on background work shared by replicas.
    replica_leases (name) {
        name -> Text,
        /// The process that holds it.
        holder -> Text,
        /// Grows with every change of holder.
        token -> BigInt,
        expires_at_ms -> BigInt,
    }
}

diesel::table! {
    /// The replicas of the instance, one per runner id.
    replicas (runner_id) {
        runner_id -> Text,
        /// How another replica reaches it (an https URL).
        address -> Text,
        /// Grows with every start and every takeover.
        epoch -> BigInt,
        /// `serving`, `stopped` or `lost`.
        state -> Text,
        version -> Text,
        started_at_ms -> BigInt,
        heartbeat_at_ms -> BigInt,
        expires_at_ms -> BigInt,
    }
}
