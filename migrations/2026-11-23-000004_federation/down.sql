DROP TABLE federation_outbox;
DROP TABLE federation_seen_messages;
DROP TABLE federation_peer_keys;
DROP TABLE federation_connection_events;
DROP TABLE federation_connections;
