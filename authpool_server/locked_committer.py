"""Group commit for replicas sharing a store: decisions are taken under the store's pool lock.

With one server per store (`committer.Committer`) the pool decides at once
and only the write waits. With several replicas, a decision is only sound on
a state that includes everything the other replicas committed, so here the
pool hands over the decision itself. Each cycle takes the decisions queued
so far and, in one store transaction (`SharedStore.exchange`): locks the
pool, applies what the others committed since this replica's last look
(publishing their events to this replica's watchers first), runs the queued
decisions in order on that state, and writes what they changed. Once it has
committed, this replica's events are published and each caller gets its
decision's result, or the exception it raised.

If the transaction fails, nothing of it was written: every caller in the
cycle gets `StoreUnavailable` and the pool reloads its state, since memory
holds decisions the store does not. If the change records this replica needs
were pruned (it fell far behind), the pool reloads and the same decisions
are taken again on the fresh state; none of them had run.

Between cycles, a notification that another replica committed (from
`SharedStore.follow`) makes the committer catch up without the lock, so
watchers and `Status` on every replica follow the whole deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from authpool_server.errors import StoreUnavailable
from authpool_server.store.base import WriteBatch
from authpool_server.store.replication import CatchUp, ReplicaBehind, SharedStore

__all__ = ["LockedCommitter", "Replica"]

log = logging.getLogger(__name__)


class Replica(Protocol):
    """What the committer needs of the pool."""

    version: int  # the newest write this replica's memory includes
    sequence: int  # the newest event it has applied (its own included)

    def catch_up(self, seen: CatchUp) -> None:
        """Apply, and publish, what other replicas committed."""
        ...

    def committed(self, batch: WriteBatch, version: int) -> None:
        """This replica's own batch is durable as `version`: publish its events."""
        ...

    def reload(self) -> Awaitable[None]:
        """Rebuild memory from the store (after a failed write, or too far behind)."""
        ...


@dataclass(slots=True)
class _Decision:
    decide: Callable[[WriteBatch], Any]
    future: asyncio.Future[Any]
    outcome: tuple[bool, Any] | None = field(default=None)  # (ok, result or exception), once run


class LockedCommitter:
    def __init__(self, store: SharedStore, replica: Replica) -> None:
        self._store = store
        self._replica = replica
        self._pending: list[_Decision] = []
        self._wakeup = asyncio.Event()
        self._known_version = 0  # the newest version some replica is known to have committed
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authpool-locked-committer")

    @property
    def queue_depth(self) -> int:
        """Decisions waiting for the next cycle."""
        return len(self._pending)

    def submit(self, decide: Callable[[WriteBatch], Any]) -> asyncio.Future[Any]:
        """Queue a decision; the future resolves with its result once what it changed is durable."""
        if self._closing:
            raise StoreUnavailable("the server is shutting down")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Decision(decide, future))
        self._wakeup.set()
        return future

    def changed(self, version: int) -> None:
        """Some replica committed `version` (a notification, or a poll of the pool row)."""
        if version > self._known_version:
            self._known_version = version
            self._wakeup.set()

    def catch_up_soon(self) -> None:
        """Look for other replicas' writes now, notified or not (a watcher asks for a newer sequence)."""
        self.changed(self._replica.version + 1)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                if self._pending:
                    group, self._pending = self._pending, []
                    try:
                        await self._cycle(group)
                    finally:
                        # A cycle answers every caller; should a bug cut it short, none may wait forever.
                        for decision in group:
                            if not decision.future.done():
                                decision.future.set_exception(StoreUnavailable("the write was interrupted"))
                elif self._closing:
                    return
                elif self._known_version > self._replica.version:
                    await self._follow()
            except Exception:
                # This task must outlive any bug, or every later call would wait forever.
                log.exception("the commit loop failed; reloading the pool's state")
                await self._replica.reload()
            # What was read is all there is: a notified version beyond it (a store that went
            # back, another schema's notification) must not make this loop spin.
            self._known_version = min(self._known_version, self._replica.version)
            if self._pending or self._closing:
                self._wakeup.set()

    async def _cycle(self, group: list[_Decision]) -> None:
        batch = WriteBatch()
        touched = False  # whether memory changed in this attempt (then a failed write means a reload)

        def decide(seen: CatchUp) -> WriteBatch:
            nonlocal touched
            touched = True
            self._replica.catch_up(seen)
            for decision in group:
                if decision.future.cancelled():
                    continue  # its caller left before anything was decided for it
                try:
                    decision.outcome = (True, decision.decide(batch))
                except Exception as error:
                    decision.outcome = (False, error)
            return batch

        while True:
            try:
                version = await self._store.exchange(self._replica.version, self._replica.sequence, decide)
            except ReplicaBehind as behind:
                log.warning("reloading the pool's state: %s", behind)
                await self._replica.reload()
                continue  # the same decisions, on the fresh state: none of them ran
            except Exception:
                error = StoreUnavailable("the store could not commit the change")
                for decision in group:
                    if not decision.future.done():
                        decision.future.set_exception(error)
                if touched:
                    log.exception("store write failed; failed %d waiting calls, reloading", len(group))
                    await self._replica.reload()
                else:  # failed before the lock (no connection): memory is as it was
                    log.warning("store write failed before deciding; failed %d waiting calls", len(group))
                return
            break
        self._replica.committed(batch, version)
        for decision in group:
            if decision.future.done() or decision.outcome is None:
                continue
            ok, value = decision.outcome
            if ok:
                decision.future.set_result(value)
            else:
                decision.future.set_exception(value)

    async def _follow(self) -> None:
        """Catch up on other replicas' writes between cycles (no lock needed: nothing is decided)."""
        try:
            seen = await self._store.catch_up(self._replica.version, self._replica.sequence)
        except ReplicaBehind as behind:
            log.warning("reloading the pool's state: %s", behind)
            await self._replica.reload()
        except Exception as error:
            # The next notification or poll tries again; calls still catch up under the lock.
            log.warning("could not catch up with other replicas: %s", error)
        else:
            self._replica.catch_up(seen)

    async def close(self) -> None:
        """Commit the decisions already queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
