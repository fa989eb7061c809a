"""Local training at one hospital: FedAvg clients and FedProx clients.

A hospital receives the global weights, trains on its own patients for a few
epochs of shuffled mini-batches with binary cross-entropy on logits, and
returns the *delta* (local minus global weights) with its sample count; raw
rows never leave the hospital.

- FedAvg client update: McMahan et al. 2017, "Communication-Efficient Learning
  of Deep Networks from Decentralized Data" (AISTATS).
- FedProx: Li et al. 2020, "Federated Optimization in Heterogeneous Networks"
  (MLSys). The local objective gains ``mu/2 * ||w - w_global||^2``, which pulls
  each hospital's model toward the global one when hospitals differ; with
  ``mu = 0`` it is plain FedAvg.

The trainer is built for speed on small tabular models: the features and
labels become torch tensors once, in the constructor; mini-batches are drawn
by a seeded ``torch.Generator`` permutation per epoch (no DataLoader), and the
model is built once and reused every round. The SGD and Adam steps are
written out here rather than taken from ``torch.optim``, whose first use
imports the torch compiler stack (2-3 s per process, paid again by every
hospital process); the arithmetic is that of ``torch.optim.SGD`` (no
momentum) and ``torch.optim.Adam`` (default betas and eps). The number of
torch threads is the caller's choice; this module never changes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from federation.metrics import binary_metrics
from federation.models import (
    as_tensor,
    build_model,
    get_weights,
    num_weights,
    set_weights,
)

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass
class FitResult:
    """What a hospital sends back after local training.

    delta: float32, local weights minus the global weights received.
    num_samples: training examples used (the FedAvg weight).
    metrics: at least ``loss`` (mean training BCE over the last epoch) and
        ``steps`` (optimizer steps taken); private trainers add epsilon etc.
    """

    delta: np.ndarray
    num_samples: int
    metrics: dict = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """Returns the torch device for ``"cpu"`` or ``"cuda"``; fails clearly."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but CUDA is not available here; "
            "use device='cpu'"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


def _as_features(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validates and converts one hospital's rows to contiguous float32."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32).reshape(-1)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D matrix [n, d], got shape {X.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"X has {X.shape[0]} rows but y has {y.shape[0]} labels; they must match"
        )
    if X.shape[0] == 0:
        raise ValueError("no training rows: a hospital needs at least one patient")
    if not np.all(np.isfinite(X)):
        raise ValueError("X holds NaN or infinite values; impute them before training")
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(
            f"labels must be 0 or 1, found {np.unique(y[bad])[:5].tolist()}"
        )
    return X, y


def check_training_settings(
    batch_size: int, lr: float, optimizer: str, proximal_mu: float
) -> None:
    """Raises ValueError naming the first local-training setting out of range."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")


class LocalTrainer:
    """Trains one hospital's copy of the global model on its own rows.

    model_name: ``"logreg"`` or ``"mlp"`` (see ``federation.models``).
    X, y: this hospital's training features ``[n, d]`` and 0/1 labels ``[n]``.
    batch_size: rows per mini-batch (default 256); the last batch of an epoch
        may be smaller. A batch size of at least ``n`` gives full-batch steps.
    lr: local learning rate (default 0.1).
    optimizer: ``"sgd"`` (plain, no momentum; default) or ``"adam"``. Adam's
        moment estimates start afresh at every ``fit``, since the model it
        starts from is a new global model each round.
    proximal_mu: FedProx coefficient ``mu`` (default 0.0 = FedAvg).
    hidden: hidden units of ``"mlp"`` (default 64).
    seed: seeds the initial model and the mini-batch shuffling; the shuffling
        stream continues across rounds, so a seed reproduces the whole run.
    device: ``"cpu"`` (default) or ``"cuda"``.
    """

    def __init__(
        self,
        model_name: str,
        X: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int = 256,
        lr: float = 0.1,
        optimizer: str = "sgd",
        proximal_mu: float = 0.0,
        hidden: int = 64,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        check_training_settings(batch_size, lr, optimizer, proximal_mu)
        X, y = _as_features(X, y)

        self.model_name = model_name
        self.hidden = hidden
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.optimizer_name = optimizer
        self.proximal_mu = float(proximal_mu)
        self.device = resolve_device(device)
        self.num_samples = int(X.shape[0])
        self.n_features = int(X.shape[1])

        # Tensors are made once: every round reuses them without copying.
        self.X = as_tensor(X).to(self.device)
        self.y = as_tensor(y).to(self.device)
        self.model = build_model(model_name, self.n_features, hidden, seed).to(
            self.device
        )
        self.dim = num_weights(self.model)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._params = list(self.model.parameters())

    def _make_optimizer(self) -> "_SGD | _Adam":
        if self.optimizer_name == "adam":
            return _Adam(self._params, self.lr)
        return _SGD(self._params, self.lr)

    def _global_views(self, global_weights: np.ndarray) -> list[torch.Tensor]:
        """Splits the global vector into tensors shaped like each parameter."""
        flat = as_tensor(np.ascontiguousarray(global_weights, np.float32))
        flat = flat.to(self.device)
        views, offset = [], 0
        for p in self._params:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def fit(self, global_weights: np.ndarray, epochs: int = 1) -> FitResult:
        """Trains from ``global_weights`` for ``epochs`` passes over the rows.

        Returns the delta (local minus global), the sample count and
        ``{"loss", "steps", "epochs"}`` where loss is the mean BCE over the
        last epoch (without the proximal term).
        """
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        global_weights = np.asarray(global_weights, dtype=np.float32)
        set_weights(self.model, global_weights)

        optimizer = self._make_optimizer()
        anchors = self._global_views(global_weights) if self.proximal_mu > 0 else None
        n, bs = self.num_samples, self.batch_size
        steps = 0
        self.model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.generator).to(self.device)
            loss_sum = torch.zeros((), device=self.device)
            for start in range(0, n, bs):
                idx = order[start : start + bs]
                xb, yb = self.X.index_select(0, idx), self.y.index_select(0, idx)
                for p in self._params:
                    p.grad = None
                loss = self.loss_fn(self.model(xb), yb)
                loss.backward()

                # The gradient of mu/2 ||w - w_g||^2 is mu (w - w_g): added
                # straight to the gradient, no extra graph to build.
                if anchors is not None:
                    with torch.no_grad():
                        for p, a in zip(self._params, anchors):
                            p.grad.add_(p.detach() - a, alpha=self.proximal_mu)
                optimizer.step()

                loss_sum += loss.detach() * idx.numel()
                steps += 1
            # One device sync per epoch, not per step.
            epoch_loss = float(loss_sum) / n

        delta = get_weights(self.model) - global_weights
        return FitResult(
            delta=delta.astype(np.float32, copy=False),
            num_samples=n,
            metrics={"loss": epoch_loss, "steps": steps, "epochs": epochs},
        )

    def evaluate(self, weights: np.ndarray, X: np.ndarray, y: np.ndarray) -> dict:
        """Scores ``weights`` on ``(X, y)``: ``binary_metrics`` plus mean BCE ``loss``.

        Leaves the trainer's own model untouched.
        """
        p = predict_proba(self.model_name, weights, X, hidden=self.hidden)
        result = binary_metrics(y, p)
        result["loss"] = log_loss(y, p)
        return result


class _SGD:
    """Plain SGD step, ``w -= lr * grad`` (``torch.optim.SGD`` without momentum)."""

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        self.params, self.lr = params, lr

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            p.add_(p.grad, alpha=-self.lr)


class _Adam:
    """Adam step with bias correction, as ``torch.optim.Adam`` with defaults.

    Kingma and Ba 2015, "Adam: A Method for Stochastic Optimization" (ICLR).
    """

    def __init__(self, params: list[torch.Tensor], lr: float) -> None:
        self.params, self.lr = params, lr
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = ADAM_BETAS
        self.t += 1
        correction1 = 1 - b1**self.t
        correction2 = 1 - b2**self.t
        for p, m, v in zip(self.params, self.m, self.v):
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / correction2**0.5).add_(ADAM_EPS)
            p.addcdiv_(m, denom, value=-self.lr / correction1)


def log_loss(y_true: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy (nats) of probabilities ``p`` for labels 0/1."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), 1e-12, 1 - 1e-12)
    return float(-np.mean(y_true * np.log(p) + (1 - y_true) * np.log(1 - p)))


def predict_proba(
    model_name: str, weights: np.ndarray, X: np.ndarray, hidden: int = 64
) -> np.ndarray:
    """Returns the predicted probability of the positive class per row, float64.

    Runs on CPU in batches of 65,536 rows so memory stays bounded.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D matrix [n, d], got shape {X.shape}")
    model = build_model(model_name, X.shape[1], hidden)
    set_weights(model, weights)
    model.eval()

    out = np.empty(X.shape[0], dtype=np.float64)
    chunk = 65_536
    with torch.no_grad():
        for start in range(0, X.shape[0], chunk):
            logits = model(as_tensor(X[start : start + chunk]))
            out[start : start + chunk] = torch.sigmoid(logits.double()).numpy()
    return out
