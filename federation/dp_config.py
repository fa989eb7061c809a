"""Settings of record-level differential privacy, without torch or Opacus.

``DPConfig`` is checked when built, so a bad setting is refused with the value
named before anything starts; ``BudgetExhausted`` is what a hospital raises
instead of training past its budget. Both live apart from
``federation.privacy`` (which re-exports them) so that reading a run's
configuration does not import Opacus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACCOUNTANTS = ("prv", "rdp")


class BudgetExhausted(RuntimeError):
    """Raised before a round whose training would push epsilon past the budget.

    Nothing was trained: the hospital's model and privacy spend are as before.
    """


@dataclass(frozen=True)
class DPConfig:
    """Settings of record-level DP-SGD at a hospital.

    epsilon: target epsilon over the whole run, at ``delta``. Without
        ``noise_multiplier`` the noise is calibrated once so that
        ``planned_rounds`` rounds spend at most this; with it, the noise is
        fixed and ``epsilon`` only acts as the budget past which training is
        refused.
    delta: the delta of (epsilon, delta)-DP, in (0, 1); pick well below
        1 / rows (default 1e-5).
    noise_multiplier: Gaussian noise standard deviation divided by
        ``max_grad_norm``; None means "calibrate from epsilon".
    max_grad_norm: L2 bound each per-row gradient is clipped to (default 1.0).
    accountant: ``"prv"`` (Gopi et al. 2021, tight; default) or ``"rdp"``
        (Mironov 2017, looser but fast).
    planned_rounds: rounds the calibration plans for (default 20).
    """

    epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float | None = 1.0
    accountant: str = "prv"
    planned_rounds: int = 20

    def __post_init__(self) -> None:
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "differential privacy needs a budget (epsilon, --epsilon) to "
                "calibrate noise for, or fixed noise (noise_multiplier, "
                "--noise-multiplier); neither was given"
            )
        if self.epsilon is not None and not 0 < self.epsilon < math.inf:
            raise ValueError(
                f"epsilon must be positive and finite, got {self.epsilon}; pick "
                "e.g. 1-8, or leave it None and set noise_multiplier"
            )
        if not 0 < self.delta < 1:
            raise ValueError(
                f"delta must lie in (0, 1), got {self.delta}; pick well below "
                "1 / (rows per hospital), e.g. 1e-5"
            )
        if self.max_grad_norm is None or not self.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be positive, got {self.max_grad_norm}: noise "
                "without clipping bounds no sensitivity and gives no privacy; "
                "set a clipping bound such as 1.0"
            )
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(
                f"noise_multiplier must be positive, got {self.noise_multiplier}; "
                "zero noise means infinite epsilon: train without DP instead"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(
                f"unknown accountant {self.accountant!r}; choose 'prv' or 'rdp' "
                "('gdp' is refused: it can underestimate epsilon)"
            )
        if self.planned_rounds < 1:
            raise ValueError(
                f"planned_rounds must be at least 1, got {self.planned_rounds}"
            )
