"""Federated learning core without Ray.

Models, local training, aggregation, privacy (DP-SGD and distributed DP),
secure aggregation (``federation.secagg``) and metrics.
"""
