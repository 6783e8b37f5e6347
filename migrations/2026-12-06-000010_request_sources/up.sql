-- Where an inbound connection request came from: the client address group
-- as the rate limiter groups clients (`ip:203.0.113.7`, `ip:2001:db8::/64`),
-- so that one source's PENDING requests are counted against its own quota
-- (federation.max_pending_inbound_per_source). NULL for outbound
-- connections and for requests stored before this column existed. One SQL
-- text for SQLite and PostgreSQL.
ALTER TABLE federation_connections ADD COLUMN request_source TEXT NULL;

-- The quota counts the PENDING inbound requests of one source.
CREATE INDEX federation_connections_pending_by_source
    ON federation_connections (request_source)
    WHERE state = 'pending';
