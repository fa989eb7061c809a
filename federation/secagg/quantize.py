"""Fixed-point quantisation of update values with a declared range.

A value x in [-clip_range, clip_range] becomes the integer round(x * 2^frac_bits).
Values outside the range are never clipped silently: mode ``"error"`` raises
``OutOfRange`` naming the first offending index and value; mode ``"clip"``
clips them and returns how many there were, for the coordinator to log.
Non-finite values always raise. The rounding error is at most 2^-(frac_bits+1)
per value, so a sum of integer-weighted values is off by at most
sum(weights) * 2^-(frac_bits+1) per coordinate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from federation.secagg.errors import OutOfRange

CLIP_MODES = ("error", "clip")


@dataclass(frozen=True)
class Quantiser:
    """Maps float values to signed fixed-point integers and back.

    clip_range: declared bound c; inputs must lie in [-c, c].
    frac_bits: fractional bits f; the quantisation step is 2^-f.
    clip_mode: ``"error"`` (raise on out-of-range input) or ``"clip"`` (clip
        and count).
    """

    clip_range: float
    frac_bits: int
    clip_mode: str = "error"

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise ValueError(
                f"clip_range must be finite and positive, got {self.clip_range}"
            )
        if not 0 <= self.frac_bits <= 40:
            raise ValueError(f"frac_bits must lie in [0, 40], got {self.frac_bits}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(
                f"clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}"
            )

    @property
    def max_level(self) -> int:
        """Largest absolute quantised integer: round(clip_range * 2^frac_bits)."""
        return int(round(self.clip_range * 2**self.frac_bits))

    def quantise(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """Returns (int64 levels, number of values clipped) for a 1-d array."""
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"expected a flat vector, got shape {x.shape}")

        finite = np.isfinite(x)
        if not finite.all():
            index = int(np.flatnonzero(~finite)[0])
            raise OutOfRange(
                f"value {x[index]} at index {index} is not finite; "
                "fix the local update before masking",
                index, float(x[index]), int((~finite).sum()),
            )

        outside = np.abs(x) > self.clip_range
        count = int(outside.sum())
        if count and self.clip_mode == "error":
            index = int(np.flatnonzero(outside)[0])
            raise OutOfRange(
                f"{count} values outside the declared range ±{self.clip_range}, "
                f"first at index {index}: {float(x[index])}; clip the update (for "
                "example by norm), raise clip_range, or use clip_mode='clip'",
                index, float(x[index]), count,
            )
        if count:
            x = np.clip(x, -self.clip_range, self.clip_range)

        levels = np.rint(x * 2.0**self.frac_bits).astype(np.int64)
        return levels, count

    def dequantise(self, levels: np.ndarray) -> np.ndarray:
        """Returns float64 values for signed integer levels."""
        return np.asarray(levels, dtype=np.float64) / 2.0**self.frac_bits
