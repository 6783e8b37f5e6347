-- The self-signed certificate made for each key, stored beside it so that
-- every replica, and every restart, serves the same bytes until the key
-- rotates (a client may pin the certificate file). NULL for keys made before
-- this column existed: the next start makes and stores one. One SQL text for
-- SQLite and PostgreSQL.
ALTER TABLE instance_keys ADD COLUMN certificate_der BYTEA NULL;
