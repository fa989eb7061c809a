"""Record-level differential privacy at one hospital: DP-SGD with Opacus.

Each hospital trains with DP-SGD (Abadi et al. 2016, "Deep Learning with
Differential Privacy", CCS): per-row gradients are clipped to an L2 norm of
``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` is added to their sum at every step.
Batches come from Poisson sampling (each row joins a batch independently
with probability ``sample_rate``), which the accountants assume; batch sizes
therefore vary.

One Opacus ``PrivacyEngine`` per hospital lives across all rounds, so the
epsilon it reports composes over every local step of every round. The privacy
unit is one training row (one encounter) of this hospital; a patient with
``k`` encounters is protected only by group privacy, roughly ``k * epsilon``.

Known shortcomings, stated plainly:

- Noise and Poisson sampling come from torch's default (Mersenne Twister)
  generator, not a cryptographic one: Opacus's ``secure_mode`` needs
  ``torchcsprng``, which is not installed here. ``secure_mode=True`` is
  accepted and fails with a clear error until it is. Without it the epsilon is
  the guarantee against an adversary who cannot predict the generator.
- Floating-point noise is open to the attacks of Mironov 2012 ("On
  significance of the least significant bits for differential privacy").
- The hospital's row count (``num_samples``) and, if enabled, the training loss
  are released without noise; neither is covered by the epsilon.

The accountant's state can be taken out (``privacy_state``, JSON-safe) and put
back (``restore_privacy_state``), so a trainer rebuilt after a crash or on a
resumed run continues the spend instead of starting again from epsilon 0.
"""

from __future__ import annotations

import base64
import logging
import math
import warnings
from copy import deepcopy

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from federation.dp_config import (  # noqa: F401  (re-exported)
    ACCOUNTANTS,
    BudgetExhausted,
    DPConfig,
)
from federation.metrics import binary_metrics
from federation.models import build_model, get_weights, num_weights, set_weights
from federation.training import (
    FitResult,
    _as_features,
    check_training_settings,
    log_loss,
    predict_proba,
    resolve_device,
)

log = logging.getLogger(__name__)

# Opacus's PRV accountant sizes its domain with an internal RDP bound, which
# warns about its order range even when RDP is not the accountant in use; the
# reported epsilon is PRV's own, so the warning only confuses operators.
warnings.filterwarnings(
    "ignore", message="Optimal order is the", module="opacus.accountants.analysis.rdp"
)


# Version of the dict ``PrivateTrainer.privacy_state`` returns.
PRIVACY_STATE_VERSION = 1


class PrivacyStateError(ValueError):
    """A saved privacy state cannot be restored into this trainer."""


class _RowsDataset(TensorDataset):
    """Feature and label tensors that hand out a whole batch by one indexing.

    The default per-row fetch and collate cost ~15 ms per 256-row batch; this
    gathers the Poisson-sampled rows with one ``index_select`` each.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        X, y = self.tensors
        idx = torch.as_tensor(indices, dtype=torch.long, device=X.device)
        return X.index_select(0, idx), y.index_select(0, idx)


def _keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    """Collate for ``_RowsDataset``: the batch is already assembled."""
    return batch


def sample_rate_for(num_rows: int, batch_size: int) -> float:
    """Poisson sample rate Opacus uses: 1 / ceil(n / batch), about batch / n.

    It is at most ``batch_size / num_rows``; the sampler and the accountant both
    use this exact value, so the epsilon matches what is sampled.
    """
    return 1.0 / math.ceil(num_rows / batch_size)


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Optimizer steps in one Poisson-sampled epoch, exactly as Opacus runs them.

    Opacus takes ``int(1 / sample_rate)``, which floating point makes one less
    than ``ceil(n / batch)`` for some sizes (93 batches give 92 steps).
    """
    return int(1 / sample_rate_for(num_rows, batch_size))


def calibrate_noise(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """Noise multiplier keeping ``steps`` steps at ``sample_rate`` within epsilon.

    Opacus's binary search against ``dp.accountant``: the epsilon at
    ``dp.delta`` of the schedule is at most ``dp.epsilon`` and within 0.01 of it.
    """
    if dp.epsilon is None:
        raise ValueError("calibrate_noise needs dp.epsilon; it is None")
    return float(
        get_noise_multiplier(
            target_epsilon=dp.epsilon,
            target_delta=dp.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=dp.accountant,
        )
    )


def _extend_history(
    history: list[tuple[float, float, int]], noise: float, rate: float, steps: int
) -> list[tuple[float, float, int]]:
    """History after ``steps`` more steps, merged the way Opacus merges them."""
    out = list(history)
    if out and out[-1][0] == noise and out[-1][1] == rate:
        out[-1] = (noise, rate, out[-1][2] + steps)
    elif steps > 0:
        out.append((noise, rate, steps))
    return out


def epsilon_of_history(
    history: list[tuple[float, float, int]], delta: float, accountant: str
) -> float:
    """Epsilon at ``delta`` of a list of ``(noise, sample_rate, steps)``."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = deepcopy(history)
    return float(acc.get_epsilon(delta=delta))


class PrivateTrainer:
    """Trains one hospital's model with DP-SGD, one privacy engine for all rounds.

    Same ``fit``/``evaluate`` as ``federation.training.LocalTrainer``.

    model_name, X, y, hidden, seed, device: as for ``LocalTrainer``.
    dp: the ``DPConfig``.
    batch_size: expected Poisson batch size (default 256); the sample rate is
        ``1 / ceil(n / batch_size)``.
    lr: local learning rate (default 0.1).
    optimizer: ``"sgd"`` (default) or ``"adam"``; its state restarts each round.
    local_epochs: epochs per round that the calibration plans for and that
        ``fit`` runs when called without ``epochs`` (default 1).
    budget_epsilon: epsilon past which ``fit`` refuses to train; defaults to
        ``dp.epsilon`` (no budget when both are None).
    report_loss: when True, ``metrics["loss"]`` is the mean training loss of
        the round; it is computed from the rows without noise and so is NOT
        covered by epsilon. Default False: ``metrics["loss"]`` is None.
    secure_mode: Opacus's cryptographic noise; needs ``torchcsprng``.
    proximal_mu: FedProx coefficient (default 0.0). Its gradient
        ``mu * (w - w_global)`` does not depend on any row, so it is applied
        after the noisy step and costs no privacy; SGD only.
    name: the hospital's name, used in logs and in ``BudgetExhausted``.

    With ``dp.epsilon`` and no ``dp.noise_multiplier``, the noise multiplier is
    calibrated once, here, for ``planned_rounds * local_epochs * ceil(n /
    batch_size)`` steps at the sample rate above.
    """

    def __init__(
        self,
        model_name: str,
        X: np.ndarray,
        y: np.ndarray,
        dp: DPConfig,
        *,
        batch_size: int = 256,
        lr: float = 0.1,
        optimizer: str = "sgd",
        local_epochs: int = 1,
        hidden: int = 64,
        seed: int = 0,
        device: str = "cpu",
        budget_epsilon: float | None = None,
        report_loss: bool = False,
        secure_mode: bool = False,
        proximal_mu: float = 0.0,
        name: str = "hospital",
    ) -> None:
        check_training_settings(batch_size, lr, optimizer, proximal_mu)
        if local_epochs < 1:
            raise ValueError(f"local_epochs must be at least 1, got {local_epochs}")
        if proximal_mu > 0 and optimizer != "sgd":
            raise ValueError(
                f"proximal_mu={proximal_mu} is supported with optimizer='sgd' "
                f"only, got {optimizer!r}; use SGD or set proximal_mu=0"
            )
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be positive, got {budget_epsilon}")
        X, y = _as_features(X, y)

        self.dp = dp
        self.name = name
        self.model_name = model_name
        self.hidden = hidden
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.local_epochs = int(local_epochs)
        self.proximal_mu = float(proximal_mu)
        self.report_loss = report_loss
        self.device = resolve_device(device)
        self.num_samples = int(X.shape[0])
        self.n_features = int(X.shape[1])
        self.budget_epsilon = (
            budget_epsilon if budget_epsilon is not None else dp.epsilon
        )

        # The schedule is fixed by n and the batch size; calibrate once for it.
        self.sample_rate = sample_rate_for(self.num_samples, self.batch_size)
        self.steps_per_epoch = steps_per_epoch(self.num_samples, self.batch_size)
        if dp.noise_multiplier is not None:
            self.noise_multiplier = float(dp.noise_multiplier)
        else:
            planned = dp.planned_rounds * self.local_epochs * self.steps_per_epoch
            self.noise_multiplier = calibrate_noise(dp, self.sample_rate, planned)

        # Seeded generators make a run reproducible; they are not cryptographic.
        self._sampling_gen = torch.Generator(device="cpu").manual_seed(seed)
        noise_gen = None
        if not secure_mode:
            noise_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        self._noise_gen = noise_gen

        model = build_model(model_name, self.n_features, hidden, seed).to(self.device)
        self.dim = num_weights(model)
        self._inner = model
        opt: torch.optim.Optimizer
        if optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=self.lr)
        dataset = _RowsDataset(
            torch.from_numpy(X).to(self.device), torch.from_numpy(y).to(self.device)
        )
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            generator=self._sampling_gen,
            collate_fn=_keep_batch,
        )

        # One engine and one wrapping for the trainer's life: wrapping again
        # would register the per-sample gradient hooks twice.
        try:
            with warnings.catch_warnings():
                # The "secure RNG off" warning is replaced by the log line below.
                warnings.filterwarnings("ignore", message="Secure RNG turned off")
                self.engine = PrivacyEngine(
                    accountant=dp.accountant, secure_mode=secure_mode
                )
        except ImportError as exc:
            raise ValueError(
                "secure_mode=True needs the torchcsprng package, which is not "
                "installed; install it or use secure_mode=False"
            ) from exc
        self.model, self.optimizer, self.loader = self.engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=float(dp.max_grad_norm),
            poisson_sampling=True,
            noise_generator=noise_gen,
        )
        if (
            self.loader.sample_rate != self.sample_rate
            or len(self.loader) != self.steps_per_epoch
        ):
            raise RuntimeError(
                f"Opacus samples at {self.loader.sample_rate} for {len(self.loader)} "
                f"steps per epoch, the accounting assumed {self.sample_rate} for "
                f"{self.steps_per_epoch}; the epsilon would be wrong"
            )
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.rounds = 0
        self._spent_cache: tuple[list, float] | None = None
        log.info(
            "%s: DP-SGD ready, noise_multiplier=%.4f sample_rate=%.5f "
            "steps/epoch=%d accountant=%s budget=%s at delta=%g secure_rng=%s",
            self.name, self.noise_multiplier, self.sample_rate, self.steps_per_epoch,
            dp.accountant, self.budget_epsilon, dp.delta, secure_mode,
        )

    def spent(self) -> tuple[float, float]:
        """Returns ``(epsilon, delta)`` spent so far by this hospital's engine."""
        history = list(self.engine.accountant.history)
        if not history:
            return 0.0, self.dp.delta

        # The PRV accountant takes ~0.1 s per call; the history only changes
        # when training runs, so the last answer is kept with its history.
        if self._spent_cache is None or self._spent_cache[0] != history:
            eps = float(self.engine.accountant.get_epsilon(delta=self.dp.delta))
            self._spent_cache = (history, eps)
        return self._spent_cache[1], self.dp.delta

    def steps_taken(self) -> int:
        """Noisy optimizer steps accounted so far, over all rounds."""
        return int(sum(s for _, _, s in self.engine.accountant.history))

    def epsilon_after(self, epochs: int) -> float:
        """Epsilon this hospital would have spent after ``epochs`` more epochs.

        Computed on a copy of the accountant's history; nothing is spent.
        """
        history = _extend_history(
            self.engine.accountant.history,
            self.noise_multiplier,
            self.sample_rate,
            epochs * self.steps_per_epoch,
        )
        if self._spent_cache is not None and self._spent_cache[0] == history:
            return self._spent_cache[1]
        eps = epsilon_of_history(history, self.dp.delta, self.dp.accountant)

        # Training runs exactly these steps, so spent() will ask for this value.
        self._spent_cache = (history, eps)
        return eps

    def fit(self, global_weights: np.ndarray, epochs: int | None = None) -> FitResult:
        """Trains from ``global_weights`` for ``epochs`` (default ``local_epochs``).

        Raises ``BudgetExhausted``, before touching the model, when the round
        would take epsilon past the budget. Returns the delta, ``num_samples``
        (rows held, the FedAvg weight) and metrics ``{"loss", "steps",
        "epochs", "epsilon", "delta", "epsilon_round", "noise_multiplier",
        "sample_rate"}``: epsilon is the total spent at delta after this
        round, epsilon_round what this round added.
        """
        epochs = self.local_epochs if epochs is None else int(epochs)
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        global_weights = np.asarray(global_weights, dtype=np.float32)
        if global_weights.ndim != 1 or global_weights.size != self.dim:
            raise ValueError(
                f"global weights have shape {global_weights.shape}, the model "
                f"needs ({self.dim},); check the model name and feature count"
            )

        # Refuse before training: a round that would overspend must not run.
        eps_before, _ = self.spent()
        eps_after = self.epsilon_after(epochs)
        if self.budget_epsilon is not None and eps_after > self.budget_epsilon:
            log.warning(
                "%s: refusing round %d, epsilon would reach %.4f > budget %.4f",
                self.name, self.rounds + 1, eps_after, self.budget_epsilon,
            )
            raise BudgetExhausted(
                f"{self.name}: privacy budget epsilon={self.budget_epsilon:g} at "
                f"delta={self.dp.delta:g} would be exceeded: this round of "
                f"{epochs} epoch(s) would bring epsilon from {eps_before:.4f} to "
                f"{eps_after:.4f}; stop training this hospital or raise its budget"
            )

        # Each round restarts from the global model with a fresh optimizer state.
        set_weights(self._inner, global_weights)
        self.optimizer.original_optimizer.state.clear()
        params = list(self._inner.parameters())
        anchors = [p.detach().clone() for p in params] if self.proximal_mu else None
        self.model.train()
        steps_before = self.steps_taken()
        loss_sum = torch.zeros((), device=self.device)
        rows_seen = 0
        with warnings.catch_warnings():
            # Opacus's hooks fire on inputs that need no gradient; harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(epochs):
                for xb, yb in self.loader:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = self.loss_fn(self.model(xb), yb)
                    loss.backward()

                    # FedProx: the proximal gradient is row-free, so it joins
                    # the noisy SGD step outside Opacus (same update as one
                    # step on the sum of both gradients).
                    pulls = None
                    if anchors is not None:
                        with torch.no_grad():
                            pulls = [p - a for p, a in zip(params, anchors)]
                    self.optimizer.step()
                    if pulls is not None:
                        with torch.no_grad():
                            for p, pull in zip(params, pulls):
                                p.sub_(pull, alpha=self.lr * self.proximal_mu)
                    # An empty Poisson batch still takes a noisy step.
                    if yb.shape[0]:
                        loss_sum += loss.detach() * yb.shape[0]
                        rows_seen += int(yb.shape[0])

        # Results.
        self.rounds += 1
        steps = self.steps_taken() - steps_before
        eps_total, delta = self.spent()
        delta_w = get_weights(self._inner) - global_weights
        loss = float(loss_sum) / max(rows_seen, 1) if self.report_loss else None
        log.info(
            "%s: DP round %d done, %d steps, epsilon %.4f -> %.4f at delta=%g",
            self.name, self.rounds, steps, eps_before, eps_total, delta,
        )
        return FitResult(
            delta=delta_w.astype(np.float32, copy=False),
            num_samples=self.num_samples,
            metrics={
                "loss": loss,
                "steps": steps,
                "epochs": epochs,
                "epsilon": eps_total,
                "delta": delta,
                "epsilon_round": eps_total - eps_before,
                "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate,
            },
        )

    def privacy_state(self) -> dict:
        """The accountant's record, JSON-safe, for ``restore_privacy_state``.

        Keys: ``version``, ``hospital``, ``accountant``, ``delta``,
        ``noise_multiplier`` (the one this trainer adds),
        ``target_epsilon`` and ``planned_rounds`` (what a calibrated noise
        was planned for, so a resume can be checked before it starts),
        ``sample_rate``,
        ``history`` (``[[noise_multiplier, sample_rate, steps], ...]``, what
        the accountant composes), ``steps`` (their sum), ``rounds`` (rounds
        trained), ``epsilon`` (spent at ``delta``, for readers; restoring
        recomputes it from the history) and ``generators`` (base64 states
        of the sampling and noise generators, so a restored trainer draws
        fresh batches and noise rather than replaying those of round 1;
        the noise entry is None under ``secure_mode``).
        """
        epsilon, delta = self.spent()
        noise_state = None
        if self._noise_gen is not None:
            noise_state = _encode_generator(self._noise_gen)
        return {
            "version": PRIVACY_STATE_VERSION,
            "hospital": self.name,
            "accountant": self.dp.accountant,
            "delta": float(delta),
            "noise_multiplier": float(self.noise_multiplier),
            "target_epsilon": self.dp.epsilon,
            "planned_rounds": int(self.dp.planned_rounds),
            "sample_rate": float(self.sample_rate),
            "history": [[float(n), float(r), int(k)]
                        for n, r, k in self.engine.accountant.history],
            "steps": self.steps_taken(),
            "rounds": int(self.rounds),
            "epsilon": float(epsilon),
            "generators": {"sampling": _encode_generator(self._sampling_gen),
                           "noise": noise_state},
        }

    def restore_privacy_state(self, state: dict) -> None:
        """Puts a ``privacy_state`` back into this trainer's accountant.

        Afterwards ``spent()`` equals what it was when the state was taken,
        and ``fit`` refuses at the budget exactly as the original trainer
        would. Raises ``PrivacyStateError`` (a ValueError), changing
        nothing, when the state is malformed, was kept by another
        accountant, at another delta, or with another noise multiplier (the
        noise is calibrated from the data size, batch size, epochs,
        epsilon and planned rounds: resume with the settings of the run
        that wrote it).
        """
        if not isinstance(state, dict):
            raise PrivacyStateError(
                f"{self.name}: privacy state must be a dict, got "
                f"{type(state).__name__}")
        if state.get("version") != PRIVACY_STATE_VERSION:
            raise PrivacyStateError(
                f"{self.name}: privacy state version {state.get('version')!r}, "
                f"this trainer reads {PRIVACY_STATE_VERSION}")
        if state.get("accountant") != self.dp.accountant:
            raise PrivacyStateError(
                f"{self.name}: privacy state was kept by the "
                f"{state.get('accountant')!r} accountant, this run uses "
                f"{self.dp.accountant!r}; resume with accountant = "
                f"{state.get('accountant')!r}")
        saved_delta = state.get("delta")
        if not isinstance(saved_delta, (int, float)) or not math.isclose(
                saved_delta, self.dp.delta, rel_tol=1e-12):
            raise PrivacyStateError(
                f"{self.name}: privacy state is at delta={saved_delta!r}, this "
                f"run at delta={self.dp.delta!r}; resume with that delta")
        saved_noise = state.get("noise_multiplier")
        if not isinstance(saved_noise, (int, float)) or not math.isclose(
                saved_noise, self.noise_multiplier, rel_tol=1e-9):
            raise PrivacyStateError(
                f"{self.name}: privacy state was spent with noise_multiplier="
                f"{saved_noise!r}, this trainer adds {self.noise_multiplier!r}; "
                "the noise is calibrated from epsilon, planned_rounds, batch "
                "size, local epochs and the data: resume with the settings of "
                "the run that wrote the state")
        history = _parse_history(state.get("history"), self.name)
        steps = sum(k for _, _, k in history)
        if state.get("steps") != steps:
            raise PrivacyStateError(
                f"{self.name}: privacy state says {state.get('steps')!r} steps "
                f"but its history holds {steps}; the state was altered")
        rounds = state.get("rounds")
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise PrivacyStateError(
                f"{self.name}: privacy state rounds {rounds!r} is not a count")
        generators = state.get("generators") or {}
        sampling = _decode_generator(generators.get("sampling"), self.name)
        noise = None
        if self._noise_gen is not None:
            noise = _decode_generator(generators.get("noise"), self.name)

        try:
            if sampling is not None:
                self._sampling_gen.set_state(sampling)
            if noise is not None:
                self._noise_gen.set_state(noise.to(self._noise_gen.device))
        except RuntimeError as exc:
            raise PrivacyStateError(
                f"{self.name}: privacy state holds a generator state this "
                f"torch cannot load ({exc})") from exc
        self.engine.accountant.history = history
        self.rounds = rounds
        self._spent_cache = None
        log.info(
            "%s: privacy state restored: %d steps over %d round(s), epsilon "
            "%.4f at delta=%g", self.name, steps, rounds, self.spent()[0],
            self.dp.delta,
        )

    def evaluate(self, weights: np.ndarray, X: np.ndarray, y: np.ndarray) -> dict:
        """Scores ``weights`` on ``(X, y)``: ``binary_metrics`` plus mean BCE ``loss``.

        Spends no privacy budget on the training rows only if ``(X, y)`` are
        not them; scoring on training rows releases un-noised statistics.
        """
        p = predict_proba(self.model_name, weights, X, hidden=self.hidden)
        result = binary_metrics(y, p)
        result["loss"] = log_loss(y, p)
        return result


def _parse_history(raw, name: str) -> list[tuple[float, float, int]]:
    """A saved accountant history, checked entry by entry."""
    if not isinstance(raw, list):
        raise PrivacyStateError(
            f"{name}: privacy state history must be a list, got {raw!r}")
    history = []
    for item in raw:
        ok = (isinstance(item, (list, tuple)) and len(item) == 3
              and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                      for v in item)
              and item[0] > 0 and 0 < item[1] <= 1
              and float(item[2]).is_integer() and item[2] > 0)
        if not ok:
            raise PrivacyStateError(
                f"{name}: privacy state history entry {item!r} is not "
                "[noise_multiplier > 0, sample_rate in (0, 1], steps > 0]")
        history.append((float(item[0]), float(item[1]), int(item[2])))
    return history


def _encode_generator(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode("ascii")


def _decode_generator(text, name: str) -> torch.Tensor | None:
    """A generator state saved by ``_encode_generator``; None when absent."""
    if text is None:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (TypeError, ValueError) as exc:
        raise PrivacyStateError(
            f"{name}: privacy state holds an unreadable generator state") from exc
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)
