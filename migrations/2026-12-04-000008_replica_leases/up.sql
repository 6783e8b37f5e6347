-- Leases on background work shared by the replicas of one instance (notice
-- delivery per connection, pings): one holder at a time, until
-- expires_at_ms unless renewed. token grows with every change of holder (a
-- fencing token). One SQL text for SQLite and PostgreSQL.
CREATE TABLE replica_leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
