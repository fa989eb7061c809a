"""The ledger rules: the replicated state machine every replica runs identically.

``LedgerState.apply(entry_bytes, index)`` decides whether one committed entry
is accepted and, if not, why. It reads nothing but the entry and the state
(no clock, no randomness, no I/O), so every replica that applies the same
entries in the same order reaches the same state and the same outcomes.

Checks, in order (the first failure is the reason):

1. well-formed canonical entry of a known type (``ledger.entries.parse``);
2. the signer is a current member and the Ed25519 signature verifies;
3. the nonce is new for that signer (replay);
4. the signer's role may send this type: hospitals send ``model_update`` and
   ``privacy_spend`` for themselves, the coordinator sends ``round_open`` and
   ``global_model``, servers send ``prediction_audit``, admins send
   ``member_change``; auditors only read;
5. the type's own rules (open round, current base model, one update per
   hospital per round, updates named by a global model are accepted ones of
   that round, ...).

Privacy spends are cumulative (epsilon so far at delta), so a spend lower
than the hospital's previous one is rejected.

Known shortcoming: used nonces are kept forever, so the state grows with the
number of entries (about 60 bytes each in a snapshot).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ledger import entries as E
from ledger.identity import (
    ADMIN, COORDINATOR, HOSPITAL, SERVER, Member, verify,
)

log = logging.getLogger(__name__)

PERMISSIONS = {
    E.MODEL_UPDATE: HOSPITAL,
    E.PRIVACY_SPEND: HOSPITAL,
    E.ROUND_OPEN: COORDINATOR,
    E.GLOBAL_MODEL: COORDINATOR,
    E.PREDICTION_AUDIT: SERVER,
    E.MEMBER_CHANGE: ADMIN,
}


@dataclass(frozen=True)
class Outcome:
    """The verdict on one entry. ``entry`` is the parsed entry (None if malformed)."""

    accepted: bool
    reason: str | None = None
    entry: E.SignedEntry | None = field(default=None, compare=False, repr=False)


class Rejected(Exception):
    """Internal: an entry breaks a rule; the message is the recorded reason."""


class LedgerState:
    """What the committed entries have established so far.

    Attributes (read-only for callers):
        members: member id -> ``Member``.
        round: the latest opened round, or None before the first.
        round_open: whether ``round`` still accepts updates.
        base_model_hash: the model that updates of the open round must build on.
        latest_model: hash of the latest accepted global model, or None.
        applied_index: the ``index`` of the last entry applied (0 before any).
    """

    def __init__(self, members: list[Member]) -> None:
        self.members: dict[str, Member] = {m.id: m for m in members}
        self.nonces: dict[str, set[str]] = {}
        self.round: int | None = None
        self.round_open = False
        self.base_model_hash: str | None = None
        self.latest_model: str | None = None
        self.global_models: dict[str, int] = {}
        # update hash -> [hospital, round, index]
        self.updates: dict[str, list] = {}
        self.rejected_updates: set[str] = set()
        self.updated: set[tuple[str, int]] = set()
        # hospital -> {"round", "epsilon", "delta", "accountant"} of the last spend
        self.privacy: dict[str, dict] = {}
        self.spent_rounds: set[tuple[str, int]] = set()
        self.audited_predictions = 0
        self.applied_index = 0
        self.accepted = 0
        self.rejected = 0

    # -- applying -----------------------------------------------------------

    def apply(self, entry_bytes: bytes, index: int) -> Outcome:
        """Apply the committed entry numbered ``index``; bad input never raises."""
        entry: E.SignedEntry | None = None
        try:
            entry = E.parse(entry_bytes)
            self._authenticate(entry)
            self._dispatch(entry, index)
        except (E.MalformedEntry, Rejected) as exc:
            reason = str(exc)
            if isinstance(exc, E.MalformedEntry):
                reason = f"malformed: {reason}"
            if entry is not None and entry.type == E.MODEL_UPDATE:
                self.rejected_updates.add(entry.body["update_hash"])
            self.applied_index = index
            self.rejected += 1
            log.debug(
                "entry %d rejected (%s from %s): %s", index,
                entry.type if entry else "?", entry.signer if entry else "?", reason,
            )
            return Outcome(False, reason, entry)
        self.applied_index = index
        self.accepted += 1
        return Outcome(True, None, entry)

    def _authenticate(self, entry: E.SignedEntry) -> None:
        member = self.members.get(entry.signer)
        if member is None:
            raise Rejected(f"unknown signer {entry.signer!r}")
        if not verify(member.public_key, entry.signature, entry.signed_bytes()):
            raise Rejected(f"bad signature from {entry.signer!r}")
        used = self.nonces.setdefault(entry.signer, set())
        if entry.nonce in used:
            raise Rejected(
                f"replay: nonce {entry.nonce} already used by {entry.signer}"
            )
        used.add(entry.nonce)
        allowed = PERMISSIONS[entry.type]
        if member.role != allowed:
            raise Rejected(
                f"role violation: {entry.signer} has role {member.role}; "
                f"{entry.type} needs role {allowed}"
            )

    def _dispatch(self, entry: E.SignedEntry, index: int) -> None:
        handler = {
            E.MODEL_UPDATE: self._model_update,
            E.GLOBAL_MODEL: self._global_model,
            E.PRIVACY_SPEND: self._privacy_spend,
            E.PREDICTION_AUDIT: self._prediction_audit,
            E.MEMBER_CHANGE: self._member_change,
            E.ROUND_OPEN: self._round_open,
        }[entry.type]
        handler(entry, entry.body, index)

    def _round_open(self, entry: E.SignedEntry, body: dict, index: int) -> None:
        r = body["round"]
        if self.round is not None and r <= self.round:
            raise Rejected(f"round {r} is not after the latest round {self.round}")
        base = body["base_model_hash"]
        if self.latest_model is not None and base != self.latest_model:
            raise Rejected(
                f"stale: round {r} base {body['base_model_hash'][:12]} is not the "
                f"latest global model {self.latest_model[:12]}"
            )
        self.round, self.round_open = r, True
        self.base_model_hash = body["base_model_hash"]

    def _model_update(self, entry: E.SignedEntry, body: dict, index: int) -> None:
        hospital, r = body["hospital"], body["round"]
        if hospital != entry.signer:
            raise Rejected(
                f"role violation: {entry.signer} sent an update for {hospital}"
            )
        if self.round is None or r > self.round:
            raise Rejected(f"round {r} is not open (latest round {self.round})")
        if r < self.round or not self.round_open:
            raise Rejected(f"stale: round {r} is closed (latest round {self.round})")
        if body["base_model_hash"] != self.base_model_hash:
            raise Rejected(
                f"stale: built on {body['base_model_hash'][:12]}, round {r} uses "
                f"{self.base_model_hash[:12]}"
            )
        if (hospital, r) in self.updated:
            raise Rejected(f"replay: {hospital} already sent an update for round {r}")
        if body["update_hash"] in self.updates:
            raise Rejected(
                f"replay: update {body['update_hash'][:12]} already on the ledger"
            )
        self.updated.add((hospital, r))
        self.updates[body["update_hash"]] = [hospital, r, index]

    def _global_model(self, entry: E.SignedEntry, body: dict, index: int) -> None:
        r = body["round"]
        if self.round is None or r != self.round or not self.round_open:
            raise Rejected(
                f"round {r} is not open (latest round {self.round}, "
                f"{'open' if self.round_open else 'closed'})"
            )
        named = body["update_hashes"]
        if not named:
            raise Rejected(f"global model for round {r} names no updates")
        rejected = [h[:12] for h in named if h in self.rejected_updates
                    and h not in self.updates]
        unknown = [h[:12] for h in named if h not in self.updates
                   and h not in self.rejected_updates]
        if rejected:
            raise Rejected(f"global model names rejected updates: {rejected}")
        if unknown:
            raise Rejected(f"global model names updates not on the ledger: {unknown}")
        other = [h[:12] for h in named if self.updates[h][1] != r]
        if other:
            raise Rejected(
                f"global model for round {r} names updates of other rounds: {other}"
            )
        self.round_open = False
        self.latest_model = body["model_hash"]
        self.global_models[body["model_hash"]] = r

    def _privacy_spend(self, entry: E.SignedEntry, body: dict, index: int) -> None:
        hospital, r = body["hospital"], body["round"]
        if hospital != entry.signer:
            raise Rejected(
                f"role violation: {entry.signer} reported privacy spent by {hospital}"
            )
        if self.round is None or r > self.round:
            raise Rejected(f"round {r} has not been opened (latest round {self.round})")
        if (hospital, r) in self.spent_rounds:
            raise Rejected(f"replay: {hospital} already reported privacy for round {r}")
        previous = self.privacy.get(hospital)
        if previous is not None and body["epsilon"] < previous["epsilon"]:
            raise Rejected(
                f"epsilon {body['epsilon']} is below {hospital}'s previous "
                f"{previous['epsilon']}; spends are cumulative"
            )
        self.spent_rounds.add((hospital, r))
        self.privacy[hospital] = {
            "round": r, "epsilon": body["epsilon"], "delta": body["delta"],
            "accountant": body["accountant"],
        }

    def _prediction_audit(self, entry: E.SignedEntry, body: dict, index: int) -> None:
        if body["model_hash"] not in self.global_models:
            raise Rejected(
                f"model {body['model_hash'][:12]} is not a global model on the ledger"
            )
        self.audited_predictions += body["count"]

    def _member_change(self, entry: E.SignedEntry, body: dict, index: int) -> None:
        member = Member.from_dict(body["member"])
        if body["action"] == "add":
            if member.id in self.members:
                raise Rejected(f"member {member.id!r} already exists")
            self.members[member.id] = member
            return
        if member.id not in self.members:
            raise Rejected(f"member {member.id!r} does not exist")
        admins = [m for m in self.members.values() if m.role == ADMIN]
        if self.members[member.id].role == ADMIN and len(admins) == 1:
            raise Rejected(f"removing {member.id!r} would leave no admin")
        del self.members[member.id]

    # -- queries ------------------------------------------------------------

    def epsilon_spent(self, hospital: str) -> float:
        """Cumulative epsilon ``hospital`` reported (0.0 if none)."""
        return float(self.privacy.get(hospital, {}).get("epsilon", 0.0))

    # -- snapshots ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": [self.members[k].to_dict() for k in sorted(self.members)],
            "nonces": {k: sorted(v) for k, v in sorted(self.nonces.items())},
            "round": self.round,
            "round_open": self.round_open,
            "base_model_hash": self.base_model_hash,
            "latest_model": self.latest_model,
            "global_models": dict(sorted(self.global_models.items())),
            "updates": dict(sorted(self.updates.items())),
            "rejected_updates": sorted(self.rejected_updates),
            "updated": sorted([h, r] for h, r in self.updated),
            "privacy": dict(sorted(self.privacy.items())),
            "spent_rounds": sorted([h, r] for h, r in self.spent_rounds),
            "audited_predictions": self.audited_predictions,
            "applied_index": self.applied_index,
            "accepted": self.accepted,
            "rejected": self.rejected,
        }

    def snapshot(self) -> bytes:
        """Canonical bytes of the whole state; equal states give equal bytes."""
        return E.canonical(self.to_dict())

    def state_hash(self) -> str:
        return hashlib.sha256(self.snapshot()).hexdigest()

    @classmethod
    def restore(cls, data: bytes) -> "LedgerState":
        """Rebuild a state from ``snapshot()`` bytes."""
        try:
            raw = json.loads(data)
            state = cls([Member.from_dict(m) for m in raw["members"]])
            state.nonces = {k: set(v) for k, v in raw["nonces"].items()}
            state.round = raw["round"]
            state.round_open = raw["round_open"]
            state.base_model_hash = raw["base_model_hash"]
            state.latest_model = raw["latest_model"]
            state.global_models = dict(raw["global_models"])
            state.updates = {k: list(v) for k, v in raw["updates"].items()}
            state.rejected_updates = set(raw["rejected_updates"])
            state.updated = {(h, r) for h, r in raw["updated"]}
            state.privacy = dict(raw["privacy"])
            state.spent_rounds = {(h, r) for h, r in raw["spent_rounds"]}
            state.audited_predictions = raw["audited_predictions"]
            state.applied_index = raw["applied_index"]
            state.accepted = raw["accepted"]
            state.rejected = raw["rejected"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"unreadable ledger state snapshot: {exc}") from exc
        return state
