"""Ray actors: hospital groups, the coordinator and the ledger replicas."""
