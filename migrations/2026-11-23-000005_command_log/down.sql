DROP TABLE federation_command_log;
