"""Risk models and their flat weight vectors.

Two PyTorch models map a float32 feature matrix ``[n, d]`` to one logit per
patient ``[n]``: ``"logreg"`` (logistic regression, one ``Linear`` layer) and
``"mlp"`` (``Linear``-``ReLU``-``Linear``). Weights travel between hospitals
and the coordinator as one flat ``numpy.float32`` vector in the order of
``model.parameters()``; ``get_weights`` and ``set_weights`` convert, and
``weights_hash`` names a vector for the audit ledger.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch
from torch import nn

MODEL_NAMES = ("logreg", "mlp")


class _Logits(nn.Module):
    """Wraps a network whose output is ``[n, 1]`` so that it returns ``[n]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """Returns a CPU tensor sharing memory with ``array``, read-only or not.

    Arrays that arrive through Ray's object store are read-only; torch warns
    about those because writing would be undefined. Callers only read the
    tensor, so the warning is silenced here instead of copying the array.
    """
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not")
        return torch.from_numpy(array)


def build_model(
    name: str, n_features: int, hidden: int = 64, seed: int = 0
) -> nn.Module:
    """Builds a model that returns logits ``[n]`` for inputs ``[n, n_features]``.

    name: ``"logreg"`` (one Linear layer to a logit) or ``"mlp"`` (Linear to
        ``hidden`` units, ReLU, Linear to a logit).
    seed: seeds the initial weights only (a local generator; the global torch
        random state is left alone), so every hospital and the coordinator
        build the same initial model from the same seed.
    """
    if n_features < 1:
        raise ValueError(f"n_features must be at least 1, got {n_features}")

    # fork_rng keeps the caller's global random stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "logreg":
            net: nn.Module = nn.Linear(n_features, 1)
        elif name == "mlp":
            if hidden < 1:
                raise ValueError(f"hidden must be at least 1 for 'mlp', got {hidden}")
            net = nn.Sequential(
                nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )
        else:
            raise ValueError(
                f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}"
            )
    return _Logits(net)


def num_weights(model: nn.Module) -> int:
    """Returns the number of scalar parameters, the length of the flat vector."""
    return sum(p.numel() for p in model.parameters())


def get_weights(model: nn.Module) -> np.ndarray:
    """Returns a flat float32 copy of all parameters, in ``parameters()`` order."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat.to("cpu", torch.float32).numpy().copy()


def set_weights(model: nn.Module, flat: np.ndarray) -> None:
    """Copies a flat vector into the model's parameters, in place.

    Raises ValueError when ``flat`` is not one-dimensional or its length is not
    the model's parameter count.
    """
    flat = np.asarray(flat)
    expected = num_weights(model)
    if flat.ndim != 1 or flat.size != expected:
        raise ValueError(
            f"weight vector has shape {flat.shape}, the model needs ({expected},); "
            "check that the model name, hidden size and feature count match"
        )

    source = as_tensor(np.ascontiguousarray(flat, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(source[offset : offset + n].view_as(p))
            offset += n


def weights_hash(flat: np.ndarray) -> str:
    """Returns the hex SHA-256 of the vector as float32 little-endian bytes."""
    data = np.ascontiguousarray(flat, dtype="<f4").tobytes()
    return hashlib.sha256(data).hexdigest()
