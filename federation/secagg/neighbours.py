"""The SecAgg+ communication graph: who masks with and holds shares of whom.

Bell et al. (2020) replace SecAgg's complete graph with a random k-regular
graph of degree O(log n): each hospital masks with, and shares its secrets
among, only its k neighbours, so a round costs O(n log n) instead of O(n^2).
The graph here is a Harary graph (hospitals on a ring, each joined to the k/2
nearest on either side) over a random relabelling drawn from a public seed
and the round number, so every party derives the same graph and it changes
every round.

Known shortcoming: the seed is a configuration value. Whoever picks it can
try seeds until a target hospital's neighbourhood suits them; a deployment
should derive it from a value no single party controls (for example the
audit ledger's last block hash), which this module does not do.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def default_degree(n: int) -> int:
    """Returns the neighbourhood degree for ``n`` hospitals: 2*ceil(log2 n), < n.

    Falls back to the complete graph (degree n - 1) when that is not larger.
    """
    if n < 2:
        raise ValueError(f"a masked round needs at least 2 hospitals, got {n}")
    degree = 2 * math.ceil(math.log2(n))
    return n - 1 if degree >= n - 1 else degree


def neighbourhoods(
    n: int, degree: int, seed: int, round_number: int
) -> list[frozenset[int]]:
    """Returns the neighbour set of each hospital 0..n-1 for one round.

    degree: n - 1 (complete graph) or an even number below n - 1.
    seed: the public graph seed; it is not secret and need not be.
    """
    if degree == n - 1:
        everyone = frozenset(range(n))
        return [everyone - {i} for i in range(n)]
    if degree % 2 or not 2 <= degree < n - 1:
        raise ValueError(
            f"degree must be n - 1 = {n - 1} or even in [2, {n - 2}], got {degree}"
        )

    # The relabelling is public: a plain generator is fine for it (not for masks).
    digest = hashlib.sha256(f"medfed-graph/{seed}/{round_number}".encode()).digest()
    ring = np.random.default_rng(int.from_bytes(digest, "big")).permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[ring] = np.arange(n)

    half = degree // 2
    result = []
    for i in range(n):
        p = int(position[i])
        result.append(
            frozenset(
                int(ring[(p + step) % n])
                for offset in range(1, half + 1)
                for step in (offset, -offset)
            )
        )
    return result
