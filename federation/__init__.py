"""Federated learning core without Ray: models, local training, aggregation, privacy, secure aggregation, metrics."""
