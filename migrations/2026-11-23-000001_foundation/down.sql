DROP TABLE api_keys;
DROP INDEX instance_keys_one_current;
DROP TABLE instance_keys;
DROP INDEX instance_single_row;
DROP TABLE instance;
