"""LedgerClient: the driver-side way to submit to a replicated ledger.

The client is a plain Python object holding the replicas' actor handles. It
finds the leader (asks every replica's `status`, follows leader hints),
submits there, and on `NotLeader`, a dead or restarting actor, a call
timeout, or another replica taking over while a call is outstanding (checked
after `suspect_after_s`, since Ray reports a killed actor only after about a
second) it looks for the leader again and retries with the same idempotency
key, so a submission that did land is never applied twice (the replicas
return the original result). `submit` blocks; `submit_async` is for asyncio
code, where concurrent submissions share actor calls (`submit_many`).

`submit` may be called from several threads at once: the shared state is
the cached leader index (a stale value costs one retry) and counters.
`submit_async` coalesces per event loop; each loop gets its own coalescer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from actors.ledger_replica import MAX_KEY_CHARS, NotLeader, default_key

log = logging.getLogger(__name__)

# Errors after which the leader is looked up again and the call retried.
_RETRY = (RayActorError, ActorUnavailableError, GetTimeoutError, TimeoutError,
          asyncio.TimeoutError)
_POLL_S = 0.02


class NoLeader(TimeoutError):
    """No replica named a reachable leader within the time allowed."""


class _LeaderMoved(Exception):
    """Internal: while a call was outstanding another replica became leader."""


class _Fallback(Exception):
    """Internal: a coalesced call failed; submit this pair on its own."""


class LedgerClient:
    """LedgerClient: submit to and read from the replicas in `replicas`.

    replicas: actor handles, in replica index order.
    timeout_s: default seconds a `submit` keeps retrying before TimeoutError.
    call_timeout_s: seconds one actor call may take before it is retried
        (a little above the replicas' `submit_timeout_s`).
    suspect_after_s: seconds a call may be outstanding before the client
        checks whether the leader is still the leader (a killed actor's
        error takes Ray about a second to report; a new leader is usually
        elected sooner).
    max_in_flight: concurrent `submit_many` calls `submit_async` keeps open;
        submissions waiting meanwhile are sent together in the next one.
    max_coalesce: most entries one coalesced call carries.
    """

    def __init__(
        self, replicas: list[Any], timeout_s: float = 15.0,
        call_timeout_s: float = 6.0, suspect_after_s: float = 0.2,
        max_in_flight: int = 2, max_coalesce: int = 1000,
    ) -> None:
        if not replicas:
            raise ValueError("LedgerClient needs at least one replica handle")
        self.replicas = list(replicas)
        self.timeout_s = timeout_s
        self.call_timeout_s = call_timeout_s
        self.suspect_after_s = suspect_after_s
        self.max_in_flight = max_in_flight
        self.max_coalesce = max_coalesce
        self.leader: int | None = None
        self.retries = 0
        self._status_cache: tuple[float, list] = (0.0, [])
        self._coalescers: dict[int, _Coalescer] = {}

    # -- leader discovery ------------------------------------------------------

    @staticmethod
    def _pick(statuses: list[dict | None]) -> int | None:
        """The leader with the highest term, else the hint most replicas give."""
        leaders = [s for s in statuses if s and s["role"] == "leader"]
        if leaders:
            return max(leaders, key=lambda s: s["term"])["replica"]
        hints = [s["leader"] for s in statuses if s and s["leader"] is not None]
        return max(set(hints), key=hints.count) if hints else None

    @staticmethod
    def _elsewhere(target: int, statuses: list[dict | None]) -> int | None:
        """Another replica's index if it now leads instead of `target`."""
        leaders = [s for s in statuses if s and s["role"] == "leader"]
        if not leaders:
            return None
        best = max(leaders, key=lambda s: s["term"])
        mine = statuses[target]
        still = mine is not None and mine["role"] == "leader"
        if best["replica"] == target or (still and mine["term"] >= best["term"]):
            return None
        return best["replica"]

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

    async def _statuses_async(self, timeout_s: float = 0.3) -> list[dict | None]:
        # Many coroutines may ask at once during a failover: share answers.
        now = time.monotonic()
        at, cached = self._status_cache
        if cached and now - at < 0.05:
            return cached
        futures = [asyncio.wrap_future(r.status.remote().future())
                   for r in self.replicas]
        for future in futures:
            future.add_done_callback(_retrieve)
        await asyncio.wait(futures, timeout=timeout_s)
        out = [f.result() if f.done() and not f.exception() else None
               for f in futures]
        self._status_cache = (time.monotonic(), out)
        return out

    # -- submitting ------------------------------------------------------------

    def _after_failure(self, exc: BaseException, tried: int | None) -> float:
        """Update the cached leader after a failed call; seconds to wait."""
        self.retries += 1
        if isinstance(exc, _LeaderMoved):
            return 0.0
        if isinstance(exc, NotLeader):
            hint = exc.leader_hint
            if hint is not None and hint != tried:
                self.leader = hint
                return 0.0
        self.leader = None
        log.debug("submit to replica %s failed (%s); finding the leader",
                  tried, type(exc).__name__)
        return _POLL_S

    def _await(self, ref, target: int):
        """ray.get of `ref`, giving up early when another replica took over."""
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            wait = self.suspect_after_s - elapsed if elapsed < self.suspect_after_s \
                else 0.1
            ready, _ = ray.wait([ref], timeout=max(0.001, wait))
            if ready:
                return ray.get(ref)
            elapsed = time.monotonic() - start
            if elapsed >= self.call_timeout_s:
                raise GetTimeoutError(f"no answer from replica {target} in "
                                      f"{self.call_timeout_s} s")
            if elapsed >= self.suspect_after_s:
                moved = self._elsewhere(target, self.statuses(timeout_s=0.2))
                if moved is not None:
                    self.leader = moved
                    raise _LeaderMoved()

    async def _await_async(self, ref, target: int):
        """`_await` for asyncio code."""
        future = asyncio.wrap_future(ref.future())
        future.add_done_callback(_retrieve)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            elapsed = loop.time() - start
            wait = self.suspect_after_s - elapsed if elapsed < self.suspect_after_s \
                else 0.1
            done, _ = await asyncio.wait({future}, timeout=max(0.001, wait))
            if done:
                return future.result()
            elapsed = loop.time() - start
            if elapsed >= self.call_timeout_s:
                raise GetTimeoutError(f"no answer from replica {target} in "
                                      f"{self.call_timeout_s} s")
            if elapsed >= self.suspect_after_s:
                moved = self._elsewhere(target, await self._statuses_async())
                if moved is not None:
                    self.leader = moved
                    raise _LeaderMoved()

    def submit(
        self, entries: list[bytes], key: str | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        """Submit signed entries as one submission; returns the replica's result.

        `key` defaults to the hash of the entries, so resubmitting the same
        bytes is applied once. Raises TimeoutError after `timeout_s` seconds
        (default `self.timeout_s`) of failed attempts.
        """
        key = _checked(entries, key)
        limit = timeout_s or self.timeout_s
        deadline = time.monotonic() + limit
        while True:
            target = self.leader
            if target is None:
                target = self._pick(self.statuses(timeout_s=0.3))
                self.leader = target
            if target is not None:
                ref = self.replicas[target].submit.remote(entries, key)
                try:
                    return self._await(ref, target)
                except (NotLeader, _LeaderMoved, *_RETRY) as exc:
                    pause = self._after_failure(exc, target)
            else:
                pause = _POLL_S
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"submission {key[:16]} not acknowledged within {limit} s "
                    f"({self.retries} retries so far); the ledger may have lost "
                    "its majority"
                )
            if pause:
                time.sleep(pause)

    async def submit_async(
        self, entries: list[bytes], key: str | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        """`submit` for asyncio code; concurrent calls share actor calls.

        Submissions that wait while `max_in_flight` calls are outstanding go
        to the leader together in one `submit_many` call (they keep their own
        keys and results); if that call fails, each is retried on its own.
        """
        key = _checked(entries, key)
        loop = asyncio.get_running_loop()
        coalescer = self._coalescers.get(id(loop))
        if coalescer is None or coalescer.loop is not loop:
            coalescer = self._coalescers[id(loop)] = _Coalescer(self, loop)
        future = loop.create_future()
        coalescer.add(entries, key, future)
        try:
            return await future
        except _Fallback:
            return await self._submit_one_async(entries, key, timeout_s)

    async def _submit_one_async(
        self, entries: list[bytes], key: str, timeout_s: float | None,
    ) -> dict:
        loop = asyncio.get_running_loop()
        limit = timeout_s or self.timeout_s
        deadline = loop.time() + limit
        while True:
            target = self.leader
            if target is None:
                target = self._pick(await self._statuses_async())
                self.leader = target
            if target is not None:
                ref = self.replicas[target].submit.remote(entries, key)
                try:
                    return await self._await_async(ref, target)
                except (NotLeader, _LeaderMoved, *_RETRY) as exc:
                    pause = self._after_failure(exc, target)
            else:
                pause = _POLL_S
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"submission {key[:16]} not acknowledged within {limit} s; "
                    "the ledger may have lost its majority"
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


def _retrieve(future: asyncio.Future) -> None:
    """Mark an abandoned future's exception as seen (no warning at exit)."""
    if not future.cancelled():
        future.exception()


def _checked(entries: list[bytes], key: str | None) -> str:
    """The submission's key, after the checks a replica would make."""
    if not entries:
        raise ValueError("a submission needs at least one entry, got an empty list")
    if key is None:
        return default_key(entries)
    if not 0 < len(key) <= MAX_KEY_CHARS:
        raise ValueError(f"idempotency key must be 1..{MAX_KEY_CHARS} characters, "
                         f"got {len(key)}")
    return key


class _Coalescer:
    """Per event loop: sends waiting submissions together, `max_in_flight` at a time."""

    def __init__(self, client: LedgerClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.outbox: list[tuple[list[bytes], str, asyncio.Future]] = []
        self.in_flight = 0

    def add(self, entries: list[bytes], key: str, future: asyncio.Future) -> None:
        self.outbox.append((entries, key, future))
        self._kick()

    def _kick(self) -> None:
        while self.outbox and self.in_flight < self.client.max_in_flight:
            batch, count = [], 0
            while self.outbox and (
                not batch or count + len(self.outbox[0][0]) <= self.client.max_coalesce
            ):
                item = self.outbox.pop(0)
                batch.append(item)
                count += len(item[0])
            self.in_flight += 1
            self.loop.create_task(self._send(batch))

    async def _send(self, batch: list) -> None:
        client = self.client
        target = client.leader
        try:
            if target is None:
                target = client._pick(await client._statuses_async())
                client.leader = target
            if target is None:
                raise _LeaderMoved()
            ref = client.replicas[target].submit_many.remote(
                [(entries, key) for entries, key, _ in batch]
            )
            results = await client._await_async(ref, target)
            for (_, _, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        except (NotLeader, _LeaderMoved, *_RETRY) as exc:
            client._after_failure(exc, target)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(_Fallback())
        except Exception as exc:  # the caller's own error (bad entries, ...)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self.in_flight -= 1
            self._kick()
