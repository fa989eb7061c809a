"""Majority quorums over a fixed set of voters (Raft's only quorum kind here)."""

from __future__ import annotations

from collections.abc import Iterable


def quorum_size(voters: int) -> int:
    """quorum_size is the smallest majority of `voters` nodes."""
    return voters // 2 + 1


def committed_index(match_indexes: Iterable[int]) -> int:
    """committed_index is the highest index that a majority has persisted.

    `match_indexes` holds one value per voter, the leader's own included.
    """
    ordered = sorted(match_indexes, reverse=True)
    return ordered[quorum_size(len(ordered)) - 1]


def vote_result(votes: dict[int, bool], voters: int) -> bool | None:
    """vote_result is True once a majority granted, False once a majority
    rejected, and None while the election is still open."""
    need = quorum_size(voters)
    granted = sum(1 for v in votes.values() if v)
    if granted >= need:
        return True
    if len(votes) - granted >= need:
        return False
    return None
