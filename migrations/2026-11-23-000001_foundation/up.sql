-- One SQL text for both SQLite and PostgreSQL: only TEXT, BIGINT (epoch
-- milliseconds for times), BOOLEAN, BYTEA and INTEGER columns, text UUID keys,
-- and no STRICT tables (SQLite keeps blobs in a BYTEA column as they are).

-- The identity of this instance. There is exactly one row once the instance
-- has been initialised.
CREATE TABLE instance (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    public_url TEXT NOT NULL,
    capabilities_json TEXT NOT NULL,
    metadata_json TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- A unique index on a constant admits a single row, so two daemons that
-- initialise the same database at once cannot both create an instance.
CREATE UNIQUE INDEX instance_single_row ON instance ((1));

-- Every signing key the instance has had. The current key has
-- valid_until_ms NULL; a retired key stays here, so peers can still verify
-- what it signed, until valid_until_ms has passed and it is pruned.
-- sealed_private_key is nonce || ciphertext and opaque to the store.
CREATE TABLE instance_keys (
    key_id TEXT PRIMARY KEY,
    public_key BYTEA NOT NULL,
    sealed_private_key BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    valid_until_ms BIGINT NULL,
    is_current BOOLEAN NOT NULL,
    retired_at_ms BIGINT NULL
);

-- At most one key is current, whatever two concurrent rotations do.
CREATE UNIQUE INDEX instance_keys_one_current ON instance_keys (is_current) WHERE is_current;

-- API keys for clients. Only a hash of the key is kept; prefix is the first
-- characters of the key, shown in lists so a user can tell keys apart.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    last_used_at_ms BIGINT NULL,
    revoked_at_ms BIGINT NULL
);
