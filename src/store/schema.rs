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

diesel::allow_tables_to_appear_in_same_query!(instance, instance_keys, api_keys);
