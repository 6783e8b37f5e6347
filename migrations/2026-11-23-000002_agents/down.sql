DROP TABLE agent_events;
DROP TABLE agent_labels;
DROP TABLE agent_status;
DROP TABLE agents;
