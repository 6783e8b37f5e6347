DROP TABLE webhook_deliveries;
DROP TABLE job_history;
DROP TABLE job_labels;
DROP TABLE jobs;
