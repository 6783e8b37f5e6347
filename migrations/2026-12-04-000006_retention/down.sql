DROP INDEX agent_status_ended;
DROP INDEX webhook_deliveries_by_job;
DROP INDEX webhook_deliveries_by_received;
DROP INDEX jobs_ended;
