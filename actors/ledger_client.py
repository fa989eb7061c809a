"""LedgerClient: the driver-side way to submit to a replicated ledger.

The client is a plain Python object holding the replicas' actor handles. It
finds the leader (asks every replica's `status`, follows leader hints),
submits there, and on `NotLeader`, a dead or restarting actor, or a call
timeout it looks for the leader again and retries with the same idempotency
key, so a submission that did land is never applied twice (the replicas
return the original result). `submit` blocks; `submit_async` is the same for
asyncio code (many concurrent submitters on one thread).

Safe to share between threads: the only shared state is the cached leader
index, and a stale value only costs one extra retry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from actors.ledger_replica import NotLeader, default_key

log = logging.getLogger(__name__)

# Errors after which the leader is looked up again and the call retried.
_RETRY = (RayActorError, ActorUnavailableError, GetTimeoutError, TimeoutError,
          asyncio.TimeoutError)
_POLL_S = 0.02


class NoLeader(TimeoutError):
    """No replica named a reachable leader within the time allowed."""


class LedgerClient:
    """LedgerClient: submit to and read from the replicas in `replicas`.

    replicas: actor handles, in replica index order.
    timeout_s: default seconds a `submit` keeps retrying before TimeoutError.
    call_timeout_s: seconds one actor call may take before it is retried
        (should exceed the replicas' `submit_timeout_s` only slightly).
    """

    def __init__(
        self, replicas: list[Any], timeout_s: float = 15.0,
        call_timeout_s: float = 6.0,
    ) -> None:
        if not replicas:
            raise ValueError("LedgerClient needs at least one replica handle")
        self.replicas = list(replicas)
        self.timeout_s = timeout_s
        self.call_timeout_s = call_timeout_s
        self.leader: int | None = None
        self.retries = 0

    # -- leader discovery ------------------------------------------------------

    @staticmethod
    def _pick(statuses: list[dict | None]) -> int | None:
        """The leader with the highest term, else the hint most replicas give."""
        leaders = [s for s in statuses if s and s["role"] == "leader"]
        if leaders:
            return max(leaders, key=lambda s: s["term"])["replica"]
        hints = [s["leader"] for s in statuses if s and s["leader"] is not None]
        return max(set(hints), key=hints.count) if hints else None

    def statuses(self, timeout_s: float = 1.0) -> list[dict | None]:
        """Every replica's `status()`; None for one that did not answer in time."""
        refs = [r.status.remote() for r in self.replicas]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out: list[dict | None] = []
        for ref in refs:
            if ref not in ready:
                out.append(None)
                continue
            try:
                out.append(ray.get(ref))
            except _RETRY:
                out.append(None)
        return out

    def wait_for_leader(self, timeout_s: float = 10.0) -> int:
        """Block until a replica reports itself leader; returns its index."""
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = self.statuses(timeout_s=min(1.0, timeout_s))
            leaders = [s for s in statuses if s and s["role"] == "leader"]
            if leaders:
                self.leader = max(leaders, key=lambda s: s["term"])["replica"]
                return self.leader
            if time.monotonic() >= deadline:
                raise NoLeader(
                    f"no leader among {len(self.replicas)} replicas after "
                    f"{timeout_s} s; statuses: {statuses}"
                )
            time.sleep(_POLL_S)

    async def _statuses_async(self) -> list[dict | None]:
        refs = [r.status.remote() for r in self.replicas]
        out: list[dict | None] = []
        for ref in refs:
            try:
                out.append(await asyncio.wait_for(ref, 1.0))
            except _RETRY:
                out.append(None)
        return out

    # -- submitting ------------------------------------------------------------

    def _after_failure(self, exc: BaseException, tried: int) -> float:
        """Update the cached leader after a failed call; seconds to wait."""
        self.retries += 1
        if isinstance(exc, NotLeader):
            hint = exc.leader_hint
            if hint is not None and hint != tried:
                self.leader = hint
                return 0.0
        self.leader = None
        log.debug("submit to replica %d failed (%s); finding the leader",
                  tried, type(exc).__name__)
        return _POLL_S

    def submit(
        self, entries: list[bytes], key: str | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        """Submit signed entries as one submission; returns the replica's result.

        `key` defaults to the hash of the entries, so resubmitting the same
        bytes is applied once. Raises TimeoutError after `timeout_s` seconds
        (default `self.timeout_s`) of failed attempts.
        """
        key = default_key(entries) if key is None else key
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while True:
            target = self.leader
            if target is None:
                target = self._pick(self.statuses(timeout_s=0.5))
                self.leader = target
            if target is not None:
                ref = self.replicas[target].submit.remote(entries, key)
                try:
                    return ray.get(ref, timeout=self.call_timeout_s)
                except (NotLeader, *_RETRY) as exc:
                    pause = self._after_failure(exc, target)
            else:
                pause = _POLL_S
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"submission {key[:16]} not acknowledged within "
                    f"{timeout_s or self.timeout_s} s ({self.retries} retries so "
                    "far); the ledger may have lost its majority"
                )
            if pause:
                time.sleep(pause)

    async def submit_async(
        self, entries: list[bytes], key: str | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        """`submit` for asyncio code; same retries, same result."""
        key = default_key(entries) if key is None else key
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s or self.timeout_s)
        while True:
            target = self.leader
            if target is None:
                target = self._pick(await self._statuses_async())
                self.leader = target
            if target is not None:
                ref = self.replicas[target].submit.remote(entries, key)
                try:
                    return await asyncio.wait_for(ref, self.call_timeout_s)
                except (NotLeader, *_RETRY) as exc:
                    pause = self._after_failure(exc, target)
            else:
                pause = _POLL_S
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"submission {key[:16]} not acknowledged within "
                    f"{timeout_s or self.timeout_s} s; the ledger may have lost "
                    "its majority"
                )
            if pause:
                await asyncio.sleep(pause)

    # -- reading ---------------------------------------------------------------

    def head(self, replica: int | None = None, timeout_s: float = 5.0) -> dict:
        """The chain head of `replica` (default: the leader)."""
        if replica is None:
            replica = self.leader if self.leader is not None else self.wait_for_leader()
        return ray.get(self.replicas[replica].head.remote(), timeout=timeout_s)

    def heads(self, timeout_s: float = 5.0) -> list[dict | None]:
        """Every replica's chain head; None for one that did not answer."""
        refs = [r.head.remote() for r in self.replicas]
        out: list[dict | None] = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except _RETRY:
                out.append(None)
        return out
