"""Cluster set-up and job launch: Ray connection, configuration, the CLI."""
