"""Secure aggregation: pairwise masking with Shamir recovery, and CKKS homomorphic sums."""
