"""Shamir sharing and the SecAgg+ neighbourhood graph."""

from __future__ import annotations

import random

import pytest

from federation.secagg import shamir
from federation.secagg.neighbours import default_degree, neighbourhoods


def test_any_threshold_shares_rebuild_the_secret():
    source = random.Random(1)
    secret = source.getrandbits(256)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5], source.randbytes)

    for subset in ([1, 2, 3], [5, 3, 1], [2, 4, 5], [1, 2, 3, 4, 5]):
        assert shamir.reconstruct({x: shares[x] for x in subset}) == secret


def test_fewer_than_threshold_shares_do_not_rebuild():
    source = random.Random(2)
    secret = source.getrandbits(256)
    shares = shamir.split(secret, 3, [1, 2, 3, 4], source.randbytes)

    assert shamir.reconstruct({1: shares[1], 2: shares[2]}) != secret


def test_share_points_must_be_distinct_and_nonzero():
    with pytest.raises(ValueError, match="distinct and non-zero"):
        shamir.split(5, 2, [0, 1], random.Random(0).randbytes)
    with pytest.raises(ValueError, match="threshold 4"):
        shamir.split(5, 4, [1, 2, 3], random.Random(0).randbytes)


def test_encoding_round_trips():
    value = shamir.PRIME - 1
    assert shamir.decode(shamir.encode(value)) == value


@pytest.mark.parametrize("n, expected", [(3, 2), (5, 4), (10, 8), (50, 12), (100, 14)])
def test_default_degree_is_logarithmic_and_below_n(n, expected):
    assert default_degree(n) == expected


@pytest.mark.parametrize("n", [10, 37, 100])
def test_graph_is_regular_symmetric_and_per_round(n):
    degree = default_degree(n)
    graph = neighbourhoods(n, degree, seed=7, round_number=1)

    assert all(len(neighbours) == degree for neighbours in graph)
    assert all(i not in graph[i] for i in range(n))
    assert all(i in graph[j] for i in range(n) for j in graph[i])
    assert graph == neighbourhoods(n, degree, seed=7, round_number=1)
    if degree < n - 1:
        assert graph != neighbourhoods(n, degree, seed=7, round_number=2)
