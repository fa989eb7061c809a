"""The permissioned ledger: Raft consensus, durable log, signed entries, rules and blocks. Pure: no Ray."""
