"""Parameters of one masked aggregation, checked for overflow up front.

The masked sum is computed modulo 2^modulus_bits over signed fixed-point
integers: each hospital contributes weight * round(x * 2^frac_bits) for every
value x of its update, plus its weight in one extra coordinate. The
configuration refuses a modulus too small to hold the largest possible sum of
n hospitals, so a sum never wraps around unnoticed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from federation.secagg.neighbours import default_degree
from federation.secagg.quantize import Quantiser

logger = logging.getLogger(__name__)

MAX_MODULUS_BITS = 62
"""Largest modulus exponent: two residues below 2^62 add without int64 overflow."""


@dataclass(frozen=True)
class MaskingConfig:
    """Protocol parameters shared by every hospital and the coordinator.

    n: hospitals in the round, with ids 0..n-1.
    threshold: shares (among a hospital's ``degree`` neighbours) needed to
        rebuild its secrets; None picks degree // 2 + 1, the least value for
        which two disjoint sets of neighbours cannot both rebuild.
    clip_range: declared bound c on every update value (default 4.0).
    frac_bits: fractional bits of the fixed-point code (default 16: a step of
        1.5e-5).
    modulus_bits: k, sums are taken mod 2^k (default 48, at most 62; a
        smaller k lets the coordinator reduce its int64 sums less often).
    max_weight: largest accepted integer weight (num_samples), default 100000;
        larger weights raise rather than warn.
    clip_mode: ``"error"`` or ``"clip"`` (see ``Quantiser``).
    degree: neighbours per hospital; None gives 2*ceil(log2 n), below n.
    graph_seed: public seed of the neighbourhood graph.
    min_survivors: fewest masked inputs the coordinator may sum; None gives
        ``threshold``. Fewer aborts the round rather than reveal a near-single
        update.
    """

    n: int
    threshold: int | None = None
    clip_range: float = 4.0
    frac_bits: int = 16
    modulus_bits: int = 48
    max_weight: int = 100_000
    clip_mode: str = "error"
    degree: int | None = None
    graph_seed: int = 0
    min_survivors: int | None = None
    quantiser: Quantiser = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(
                f"a masked round needs at least 2 hospitals, got n={self.n}"
            )
        degree = default_degree(self.n) if self.degree is None else self.degree
        if not 1 <= degree <= self.n - 1:
            raise ValueError(f"degree must lie in [1, {self.n - 1}], got {degree}")
        threshold = degree // 2 + 1 if self.threshold is None else self.threshold
        if not 1 <= threshold <= degree:
            raise ValueError(
                f"threshold must lie in [1, degree={degree}], got {threshold}"
            )
        if threshold <= degree // 2:
            logger.warning(
                "threshold %d is at most half the degree %d: a dishonest coordinator "
                "could rebuild both secrets of one hospital from disjoint neighbours",
                threshold, degree,
            )
        min_survivors = threshold if self.min_survivors is None else self.min_survivors
        object.__setattr__(self, "degree", degree)
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "min_survivors", min_survivors)
        quantiser = Quantiser(self.clip_range, self.frac_bits, self.clip_mode)
        object.__setattr__(self, "quantiser", quantiser)
        self._check_modulus()

    def _check_modulus(self) -> None:
        """Raises unless 2^modulus_bits holds every possible signed sum."""
        if not 2 <= self.modulus_bits <= MAX_MODULUS_BITS:
            raise ValueError(
                f"modulus_bits must lie in [2, {MAX_MODULUS_BITS}], "
                f"got {self.modulus_bits}"
            )
        if not isinstance(self.max_weight, int) or self.max_weight < 1:
            raise ValueError(
                f"max_weight must be a positive integer, got {self.max_weight!r}"
            )

        level = self.quantiser.max_level
        bound = self.n * level * self.max_weight
        weight_bound = self.n * self.max_weight
        limit = 2 ** (self.modulus_bits - 1) - 1
        if max(bound, weight_bound) > limit:
            raise ValueError(
                f"modulus 2^{self.modulus_bits} overflows: {self.n} hospitals x "
                f"quantised range ±{level} (clip_range {self.clip_range} x "
                f"2^{self.frac_bits}) x max weight {self.max_weight} = ±{bound}, "
                f"above the signed limit {limit}; raise modulus_bits (at most "
                f"{MAX_MODULUS_BITS}) or lower frac_bits, clip_range or max_weight"
            )

    @property
    def modulus_mask(self) -> int:
        """2^modulus_bits - 1: AND with it reduces modulo 2^modulus_bits."""
        return (1 << self.modulus_bits) - 1

    def error_bound(self, total_weight: int) -> float:
        """Largest quantisation error per coordinate of the weighted sum."""
        return total_weight * 2.0 ** -(self.frac_bits + 1)
