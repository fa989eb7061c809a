"""The permissioned ledger: Raft, durable log, signed entries, rules, blocks. No Ray."""
