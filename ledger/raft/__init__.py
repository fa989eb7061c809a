"""Raft consensus as a pure state machine, and its deterministic simulator."""
