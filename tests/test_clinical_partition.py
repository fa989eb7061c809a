"""Hospital partitions: disjoint, covering, deterministic, with measurable skew."""

from __future__ import annotations

import numpy as np
import pytest

from clinical.partition import describe, label_skew, partition


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    rng = np.random.default_rng(42)
    return (rng.random(20_000) < 0.11).astype(np.float32)


def _assert_cover(parts, n_rows):
    joined = np.concatenate(parts)
    assert len(joined) == n_rows
    assert np.array_equal(np.sort(joined), np.arange(n_rows))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "natural"])
def test_parts_are_disjoint_and_cover_all_rows(labels, scheme):
    groups = np.arange(len(labels)) % 7

    parts = partition(labels, 10, scheme, groups=groups, seed=1)

    assert len(parts) == 10
    _assert_cover(parts, len(labels))
    assert sum(d["size"] for d in describe(parts, labels)) == len(labels)


def test_iid_sizes_are_even_and_rates_close(labels):
    parts = partition(labels, 8, "iid", seed=0)

    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert label_skew(parts, labels) < 0.02


def test_same_seed_same_partition(labels):
    a = partition(labels, 10, "dirichlet", alpha=0.3, seed=5)
    b = partition(labels, 10, "dirichlet", alpha=0.3, seed=5)
    c = partition(labels, 10, "dirichlet", alpha=0.3, seed=6)

    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skew_is_measurable_and_falls_with_alpha(labels):
    def mean_skew(alpha):
        return np.mean([label_skew(partition(labels, 10, "dirichlet", alpha=alpha,
                                             seed=s), labels) for s in range(5)])

    skews = [mean_skew(a) for a in (0.1, 1.0, 10.0, 1000.0)]
    iid = label_skew(partition(labels, 10, "iid", seed=0), labels)

    assert skews[0] > 0.2
    assert skews == sorted(skews, reverse=True)
    assert skews[-1] < 0.05 and iid < skews[1]


def test_dirichlet_respects_minimum_size(labels):
    parts = partition(labels, 10, "dirichlet", alpha=0.1, seed=0, min_size=300)

    assert min(len(p) for p in parts) >= 300
    with pytest.raises(ValueError, match="min_size"):
        partition(labels, 10, "dirichlet", min_size=5_000)


def test_natural_split_follows_groups():
    rng = np.random.default_rng(0)
    # One dominant group, one mid-sized, a few small ones (like admission source).
    groups = rng.choice([7, 1, 17, 4, 6, 2], size=50_000,
                        p=[0.56, 0.29, 0.07, 0.04, 0.025, 0.015])
    y = (rng.random(50_000) < 0.1).astype(float)

    parts = partition(y, 10, "natural", groups=groups, seed=0)

    _assert_cover(parts, len(y))
    shares = []
    owners = []
    for p in parts:
        values, counts = np.unique(groups[p], return_counts=True)
        shares.append(counts.max() / counts.sum())
        owners.append(values[np.argmax(counts)])
    # Every hospital is dominated by one group; the big group spans several.
    assert min(shares) > 0.6
    assert owners.count(7) >= 4 and owners.count(1) >= 2
    # Small groups are merged whole into one hospital each.
    for small in (4, 6, 2):
        holders = [h for h, p in enumerate(parts) if np.any(groups[p] == small)]
        assert len(holders) == 1


def test_bad_arguments_are_named(labels):
    with pytest.raises(ValueError, match="'random'"):
        partition(labels, 3, "random")
    with pytest.raises(ValueError, match="alpha"):
        partition(labels, 3, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="one group value per row"):
        partition(labels, 3, "natural")
    with pytest.raises(ValueError, match="at least 1"):
        partition(labels, 0, "iid")


def test_describe_reports_size_and_rate():
    y = np.array([1, 0, 0, 1, 1, 1], dtype=float)
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]

    assert describe(parts, y) == [{"size": 3, "label_rate": pytest.approx(1 / 3)},
                                  {"size": 3, "label_rate": 1.0}]
    assert label_skew(parts, y) == pytest.approx(1 / 3)
