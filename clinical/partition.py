"""Hospital partitions: how training rows are dealt out to simulated hospitals.

Diabetes 130 has no hospital identifier, so every split into hospitals is a
simulation choice. Three are offered:

- ``"iid"``: a random permutation cut into ``n`` near-equal parts.
- ``"dirichlet"``: label skew as in Hsu et al. 2019 and Li et al. 2022
  (NIID-Bench). For each class, hospital shares are drawn from
  Dirichlet(alpha); the class's rows are cut by those shares. Draws are
  repeated from the same seeded generator until every hospital has at least
  ``min_size`` rows, so a seed gives one fixed result. Small alpha: strong
  skew and unequal sizes; large alpha: near IID. NIID-Bench's cap (no more
  rows for a hospital above ``len(y) / n``) is deliberately not applied:
  with two classes it leaves the hospitals filled by the majority class with
  no positive cases at all.
- ``"natural"``: by a recorded attribute (``groups``, e.g. admission source).
  The ``n`` hospitals are allotted to attribute groups in proportion to group
  size by the Sainte-Lague highest-averages rule (divisors 1, 3, 5, ...), so
  a large group is split across several hospitals (its rows shuffled and cut
  into near-equal parts). Groups that win no hospital are merged: largest
  first, each whole group joins the hospital holding the fewest rows at that
  moment. Every hospital therefore draws mostly from one group.

`label_skew` measures how far hospitals' label distributions are from the
global one (mean total-variation distance), so skew can be compared.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "natural")
MAX_DIRICHLET_TRIES = 1000


def partition(
    y: np.ndarray,
    n: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    groups: np.ndarray | None = None,
    seed: int = 0,
    min_size: int = 50,
) -> list[np.ndarray]:
    """Splits row indices ``0..len(y)-1`` among ``n`` hospitals.

    y: labels, one per row (integers or 0/1 floats).
    scheme: "iid", "dirichlet" (uses ``alpha`` and ``min_size``) or
        "natural" (uses ``groups``, one attribute value per row).
    Returns ``n`` sorted int64 arrays, pairwise disjoint, covering every row.
    Raises ValueError naming the bad argument.
    """
    y = np.asarray(y)
    if n < 1:
        raise ValueError(f"number of hospitals must be at least 1, got {n}")
    if len(y) < n:
        raise ValueError(f"cannot split {len(y)} rows among {n} hospitals")
    rng = np.random.default_rng([seed, 0xD157])

    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(y)), n)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, n, alpha, min_size, rng)
    elif scheme == "natural":
        if groups is None or len(groups) != len(y):
            got = None if groups is None else len(groups)
            raise ValueError(
                f"natural partition needs one group value per row ({len(y)}), "
                f"got {got}"
            )
        parts = _natural(np.asarray(groups), n, rng)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; use one of {SCHEMES}")

    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(
    y: np.ndarray, n: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be positive, got {alpha}")
    if min_size * n > len(y):
        raise ValueError(
            f"min_size {min_size} x {n} hospitals exceeds the {len(y)} rows; "
            "lower min_size or the number of hospitals"
        )
    classes = np.unique(y)

    for attempt in range(1, MAX_DIRICHLET_TRIES + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        sizes = np.zeros(n)
        for c in classes:
            rows = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares) * len(rows)).astype(int)[:-1]
            for h, chunk in enumerate(np.split(rows, cuts)):
                parts[h].append(chunk)
                sizes[h] += len(chunk)
        if sizes.min() >= min_size:
            if attempt > 1:
                log.debug("dirichlet partition met min_size after %d draws", attempt)
            return [np.concatenate(p) for p in parts]

    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave every one of {n} hospitals "
        f"{min_size} rows in {MAX_DIRICHLET_TRIES} tries; raise alpha or lower "
        "min_size"
    )


def _natural(groups: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    values, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)

    # Sainte-Lague: each seat goes to the highest count / (2 * seats + 1).
    seats = np.zeros(len(values), dtype=int)
    for _ in range(n):
        seats[np.argmax(counts / (2 * seats + 1))] += 1

    parts: list[np.ndarray] = []
    for g in np.flatnonzero(seats):
        rows = rng.permutation(np.flatnonzero(inverse == g))
        parts.extend(np.array_split(rows, seats[g]))

    sizes = np.array([len(p) for p in parts])
    for g in sorted(np.flatnonzero(seats == 0), key=lambda g: (-counts[g], g)):
        h = int(np.argmin(sizes))
        parts[h] = np.concatenate([parts[h], np.flatnonzero(inverse == g)])
        sizes[h] += counts[g]
    return parts


def describe(parts: list[np.ndarray], y: np.ndarray) -> list[dict]:
    """Returns ``{"size", "label_rate"}`` per hospital (rate of label 1)."""
    y = np.asarray(y, dtype=float)
    return [
        {"size": int(len(p)), "label_rate": float(y[p].mean()) if len(p) else 0.0}
        for p in parts
    ]


def label_skew(parts: list[np.ndarray], y: np.ndarray) -> float:
    """Mean total-variation distance of hospital label distributions from the pool.

    0 means every hospital has the global label mix; 1 means each hospital
    holds labels the pool as a whole hardly has. Empty hospitals are skipped.
    """
    y = np.asarray(y)
    classes = np.unique(y)
    pooled = np.array([(y == c).mean() for c in classes])
    distances = [
        0.5 * np.abs(np.array([(y[p] == c).mean() for c in classes]) - pooled).sum()
        for p in parts
        if len(p)
    ]
    return float(np.mean(distances)) if distances else 0.0
