"""Hospital updates and their screening, without torch.

An ``Update`` is what one hospital contributes to one round. ``check_update``
says why an update is unacceptable (no samples, non-finite values, the wrong
shape or dtype, another round); ``RoundFailed`` is raised when none of a
round's updates is acceptable. Kept apart from ``federation.aggregation`` so
that hospital agents, which screen updates before masking, need not import
torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Update:
    """One hospital's contribution to one round.

    delta: float32 ``[dim]``, the hospital's local weights minus the global
        weights it received.
    num_samples: training examples behind the delta (the FedAvg weight).
    """

    hospital: str
    round: int
    delta: np.ndarray
    num_samples: int
    metrics: dict = field(default_factory=dict)


class RoundFailed(RuntimeError):
    """No update of a round was acceptable; the global model is unchanged.

    reasons: ``[{"hospital", "reason"}]``, one per update received (empty when
    none arrived).
    """

    def __init__(self, round: int | None, reasons: list[dict]) -> None:
        self.round = round
        self.reasons = reasons
        detail = "; ".join(f"{r['hospital']}: {r['reason']}" for r in reasons)
        super().__init__(
            f"round {round}: no acceptable update out of {len(reasons)} "
            f"({detail or 'none received'}); the global model is unchanged"
        )


def check_update(
    update: Update, dim: int, expected_round: int | None = None
) -> str | None:
    """Returns None when ``update`` is acceptable, else why it is rejected.

    dim: the length of the global weight vector.
    expected_round: the round being aggregated; ``None`` skips that check.
    """
    n = update.num_samples
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        return f"num_samples must be an integer, got {type(n).__name__} {n!r}"
    if n <= 0:
        return f"num_samples must be positive, got {n}"
    if expected_round is not None and update.round != expected_round:
        return f"update is for round {update.round}, expected round {expected_round}"

    delta = update.delta
    if not isinstance(delta, np.ndarray):
        return f"delta must be a numpy array, got {type(delta).__name__}"
    if delta.dtype != np.float32:
        return f"delta dtype must be float32, got {delta.dtype}"
    if delta.ndim != 1 or delta.size != dim:
        return f"delta shape {delta.shape} does not match the model, expected ({dim},)"
    finite = np.isfinite(delta)
    if not finite.all():
        nans = int(np.isnan(delta).sum())
        infs = int(delta.size - finite.sum()) - nans
        return f"delta holds {nans} NaN and {infs} infinite value(s)"
    return None


def screen_updates(
    updates: list[Update], dim: int, expected_round: int | None = None
) -> tuple[list[Update], list[dict]]:
    """Splits updates into the acceptable ones and ``[{"hospital", "reason"}]``.

    Logs one warning per rejected update.
    """
    accepted, rejected = [], []
    for u in updates:
        reason = check_update(u, dim, expected_round)
        if reason is None:
            accepted.append(u)
        else:
            log.warning("round %s: rejected update from %s: %s", u.round, u.hospital,
                        reason)
            rejected.append({"hospital": u.hospital, "reason": reason})
    return accepted, rejected
