ALTER TABLE instance_keys DROP COLUMN certificate_der;
