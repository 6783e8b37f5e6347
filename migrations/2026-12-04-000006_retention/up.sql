-- Indexes for pruning ended work once its retention has passed
-- (storage.*_retention_secs). One SQL text for SQLite and PostgreSQL.

-- Ended jobs, oldest end first; running and pending jobs are not in it.
CREATE INDEX jobs_ended ON jobs (ended_at_ms) WHERE ended_at_ms IS NOT NULL;
-- Webhook deliveries by when they came.
CREATE INDEX webhook_deliveries_by_received ON webhook_deliveries (received_at_ms);
-- Deleting a job deletes its deliveries (ON DELETE CASCADE); without this
-- index every deleted job would scan all deliveries.
CREATE INDEX webhook_deliveries_by_job ON webhook_deliveries (job_id);
-- Ended agents, oldest end first.
CREATE INDEX agent_status_ended ON agent_status (ended_at_ms) WHERE ended_at_ms IS NOT NULL;
