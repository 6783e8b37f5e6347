DROP TABLE replica_leases;
