"""Scoring a model on rows an actor holds for the whole run, every round.

A hospital scores each local model on its validation patients and the
coordinator scores each global model on the held-out test patients, once per
round. ``federation.training.predict_proba`` builds a fresh model on every
call (about 0.7 ms with its seeded initialisation, more than the forward
pass over a hospital's validation rows); ``Scorer`` builds it once, keeps the
rows as a tensor, and per call only loads the weights and runs the same
forward pass, so the probabilities are those of ``predict_proba``.
"""

from __future__ import annotations

import numpy as np
import torch

from federation.metrics import binary_metrics
from federation.models import as_tensor, build_model, set_weights
from federation.training import log_loss

# Rows per forward pass, as in federation.training.predict_proba.
CHUNK_ROWS = 65_536


class Scorer:
    """Scores flat weight vectors of one model on fixed rows ``(X, y)``.

    model_name, hidden: as ``federation.models.build_model``.
    X: features ``[n, d]`` (converted to float32 once); y: 0/1 labels ``[n]``.
    """

    def __init__(self, model_name: str, X: np.ndarray, y: np.ndarray,
                 hidden: int = 64) -> None:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"X must be a 2-D matrix [n, d], got shape {X.shape}")
        self.y = np.asarray(y)
        self._X = as_tensor(X)
        self._model = build_model(model_name, X.shape[1], hidden)
        self._model.eval()

    def proba(self, weights: np.ndarray) -> np.ndarray:
        """Probability of the positive class per row (float64), as predict_proba.

        Raises ValueError when ``weights`` has the wrong size.
        """
        set_weights(self._model, weights)
        out = np.empty(self._X.shape[0], dtype=np.float64)
        with torch.no_grad():
            for start in range(0, self._X.shape[0], CHUNK_ROWS):
                logits = self._model(self._X[start : start + CHUNK_ROWS])
                out[start : start + CHUNK_ROWS] = torch.sigmoid(logits.double()).numpy()
        return out

    def metrics(self, weights: np.ndarray, loss: bool = False) -> dict:
        """``binary_metrics`` of ``weights`` on the rows, plus BCE ``loss`` if asked.

        Raises ValueError where ``binary_metrics`` does (non-finite outputs
        of a diverged model).
        """
        p = self.proba(weights)
        result = binary_metrics(self.y, p)
        if loss:
            result["loss"] = log_loss(self.y, p)
        return result
