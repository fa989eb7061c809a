"""Screening hospital updates and combining them into the next global model.

Every update is screened first (``check_update``): an update with no samples,
non-finite values, the wrong shape or dtype, or from another round is
rejected with a stated reason and left out; if none is left the round fails
(``RoundFailed``) and the global model stays as it was.

Server strategies, both applied to deltas (local minus global weights):

- FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep
  Networks from Decentralized Data" (AISTATS). The new global model is the
  global model plus the mean of the deltas weighted by sample count. FedProx
  (Li et al. 2020, MLSys) changes only the hospitals' local objective, so its
  server step is FedAvg's.
- FedAdam: Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR),
  Algorithm 2. The weighted mean delta is a pseudo-gradient fed to an Adam
  step on the server: ``m = b1 m + (1-b1) D``, ``v = b2 v + (1-b2) D^2``,
  ``x = x + lr m / (sqrt(v) + tau)``, with ``m`` starting at 0 and ``v`` at
  ``tau^2`` and no bias correction, as in the paper. ``m`` and ``v`` persist
  across rounds and are saved and restored with ``state_dict`` /
  ``load_state_dict``.

Secure aggregation reveals only the sum of ``num_samples * delta`` and the
total sample count, so each strategy also offers
``apply(global_weights, summed_weighted_delta, total_samples)``. Per-update
screening is impossible there; ``apply`` checks only the sum.

The arithmetic runs in torch float64 on ``device`` (``"cpu"`` or ``"cuda"``),
accumulating updates in a fixed order, and returns numpy float32, so the two
devices give the same weights.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from federation.models import as_tensor
from federation.training import resolve_device
from federation.updates import (  # noqa: F401  (re-exported)
    RoundFailed,
    Update,
    check_update,
    screen_updates,
)

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "fedadam")


def _global_vector(global_weights: np.ndarray) -> np.ndarray:
    g = np.asarray(global_weights)
    if g.ndim != 1 or g.size == 0:
        raise ValueError(
            f"global weights must be a non-empty 1-D vector, got shape {g.shape}"
        )
    if not np.all(np.isfinite(g)):
        raise ValueError("global weights hold NaN or infinite values")
    return g


class _Strategy:
    """Shared screening and weighted averaging; subclasses define ``_step``."""

    name = "strategy"

    def __init__(self, device: str = "cpu") -> None:
        self.device = resolve_device(device)
        self.last_rejected: list[dict] = []

    def aggregate(
        self,
        global_weights: np.ndarray,
        updates: list[Update],
        expected_round: int | None = None,
    ) -> np.ndarray:
        """Returns the next global weights (float32) from the acceptable updates.

        Rejected updates are listed in ``self.last_rejected``; raises
        RoundFailed when none is acceptable, leaving all state unchanged.
        """
        g = _global_vector(global_weights)
        accepted, rejected = screen_updates(updates, g.size, expected_round)
        self.last_rejected = rejected
        if not accepted:
            raise RoundFailed(expected_round, rejected)

        # Accumulate in a fixed order so CPU and CUDA agree bit for bit
        # before the final cast.
        total = sum(int(u.num_samples) for u in accepted)
        summed = torch.zeros(g.size, dtype=torch.float64, device=self.device)
        for u in accepted:
            d = as_tensor(u.delta).to(self.device, torch.float64)
            summed.add_(d, alpha=float(u.num_samples))
        return self._finish(g, summed, total)

    def apply(
        self,
        global_weights: np.ndarray,
        summed_weighted_delta: np.ndarray,
        total_samples: float,
    ) -> np.ndarray:
        """Returns the next global weights from a pre-summed weighted delta.

        summed_weighted_delta: ``sum_k num_samples_k * delta_k`` (what secure
            aggregation reveals); total_samples: ``sum_k num_samples_k``.
        """
        g = _global_vector(global_weights)
        s = np.asarray(summed_weighted_delta)
        if s.ndim != 1 or s.size != g.size:
            raise ValueError(
                f"summed delta shape {s.shape} does not match the model ({g.size},)"
            )
        if not np.all(np.isfinite(s)):
            raise ValueError("summed delta holds NaN or infinite values")
        if not (math.isfinite(total_samples) and total_samples > 0):
            raise ValueError(f"total_samples must be positive, got {total_samples}")
        summed = as_tensor(np.ascontiguousarray(s))
        summed = summed.to(self.device, torch.float64)
        return self._finish(g, summed, float(total_samples))

    def _finish(self, g: np.ndarray, summed: torch.Tensor, total: float) -> np.ndarray:
        mean_delta = summed / total
        x = as_tensor(np.ascontiguousarray(g)).to(self.device, torch.float64)
        return self._step(x, mean_delta).to("cpu", torch.float32).numpy()

    def _step(self, x: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Returns the server state to checkpoint (numpy arrays, plain numbers)."""
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict`` returned."""
        if state.get("name") != self.name:
            raise ValueError(
                f"checkpoint is for strategy {state.get('name')!r}, not {self.name!r}"
            )


class FedAvg(_Strategy):
    """FedAvg server step: global plus the sample-weighted mean delta.

    server_lr: scales the mean delta (default 1.0, the original FedAvg).
    device: ``"cpu"`` (default) or ``"cuda"``. FedAvg keeps no state between
    rounds.
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0, device: str = "cpu") -> None:
        super().__init__(device)
        if not server_lr > 0:
            raise ValueError(f"server_lr must be positive, got {server_lr}")
        self.server_lr = float(server_lr)

    def _step(self, x: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        return x + self.server_lr * mean_delta


class FedAdam(_Strategy):
    """FedAdam server step (Reddi et al. 2021, Algorithm 2).

    lr: server learning rate eta (default 0.01).
    beta1, beta2: decay of the first and second moments (0.9, 0.99).
    tau: adaptivity, added to sqrt(v) and the initial sqrt(v) (default 1e-3).
    device: ``"cpu"`` (default) or ``"cuda"``.
    The moments are created at the first aggregation, sized to the model.
    """

    name = "fedadam"

    def __init__(
        self,
        lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        device: str = "cpu",
    ) -> None:
        super().__init__(device)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        for label, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= b < 1:
                raise ValueError(f"{label} must be in [0, 1), got {b}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.steps = 0

    def _step(self, x: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        if self.m is None:
            self.m = torch.zeros_like(x)
            self.v = torch.full_like(x, self.tau**2)
        elif self.m.numel() != x.numel():
            raise ValueError(
                f"FedAdam state has {self.m.numel()} weights, the model "
                f"{x.numel()}; start a new FedAdam for a different model"
            )

        self.m = self.beta1 * self.m + (1 - self.beta1) * mean_delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * mean_delta * mean_delta
        self.steps += 1
        return x + self.lr * self.m / (torch.sqrt(self.v) + self.tau)

    def state_dict(self) -> dict:
        """Returns ``{"name", "lr", "beta1", "beta2", "tau", "steps", "m", "v"}``.

        ``m`` and ``v`` are float64 numpy copies, or None before the first round.
        """
        def host(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.to("cpu").numpy().copy()

        return {
            "name": self.name, "lr": self.lr, "beta1": self.beta1,
            "beta2": self.beta2, "tau": self.tau, "steps": self.steps,
            "m": host(self.m), "v": host(self.v),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores moments, step count and hyperparameters from ``state_dict``."""
        super().load_state_dict(state)
        m, v = state["m"], state["v"]
        if (m is None) != (v is None):
            raise ValueError("FedAdam checkpoint has only one of m and v")
        if m is not None and np.shape(m) != np.shape(v):
            raise ValueError(
                f"FedAdam checkpoint m {np.shape(m)} and v {np.shape(v)} differ"
            )

        def device(a) -> torch.Tensor | None:
            if a is None:
                return None
            arr = np.array(a, dtype=np.float64)
            return torch.from_numpy(arr).to(self.device)

        self.lr, self.beta1 = float(state["lr"]), float(state["beta1"])
        self.beta2, self.tau = float(state["beta2"]), float(state["tau"])
        self.steps = int(state["steps"])
        self.m, self.v = device(m), device(v)


def build_strategy(
    name: str, *, device: str = "cpu", proximal_mu: float = 0.0, **options
) -> _Strategy:
    """Returns the server strategy for an algorithm name.

    name: ``"fedavg"``, ``"fedprox"`` (server side is FedAvg; the hospitals
        use ``proximal_mu``) or ``"fedadam"``.
    options: passed to the strategy (``server_lr`` or FedAdam's ``lr``,
        ``beta1``, ``beta2``, ``tau``).
    Logs a warning for FedProx with ``proximal_mu = 0``, which is FedAvg.
    """
    if name == "fedprox":
        if proximal_mu == 0:
            log.warning("FedProx asked for with proximal_mu=0: this is plain FedAvg")
        return FedAvg(device=device, **options)
    if name == "fedavg":
        return FedAvg(device=device, **options)
    if name == "fedadam":
        return FedAdam(device=device, **options)
    raise ValueError(
        f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
    )
