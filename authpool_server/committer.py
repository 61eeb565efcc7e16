"""Group commit: many decisions, one durable write.

The pool submits each decision's `WriteBatch` and awaits its future. While
the store is busy committing one group, new batches queue up; they are then
merged and written together, so one fsync covers all of them. Groups are
written strictly in submission order. After a group is durable, `on_durable`
sees it (the pool publishes its events) and then its futures resolve; if a
write fails, every waiting caller gets `StoreUnavailable` and the pool is
told, so it can reload its state from the store.

Every batch gets a ticket, increasing with submission order; `durable` is the
newest ticket known to be on disk, so anyone can wait for an earlier write
(`wait_durable`) without sharing, or being cancelled with, its caller's future.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from authpool_server.errors import StoreUnavailable
from authpool_server.store.base import Store, WriteBatch

__all__ = ["Committer"]

log = logging.getLogger(__name__)


class Committer:
    def __init__(
        self,
        store: Store,
        *,
        on_durable: Callable[[WriteBatch, int], None],
        on_failure: Callable[[], Awaitable[None]],
    ) -> None:
        self._store = store
        self._on_durable = on_durable
        self._on_failure = on_failure
        self._pending: list[tuple[WriteBatch, asyncio.Future[None]]] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.submitted = 0  # ticket of the newest batch submitted
        self.durable = 0  # ticket of the newest batch on disk

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authpool-committer")

    @property
    def queue_depth(self) -> int:
        """Batches waiting for the next group commit."""
        return len(self._pending)

    def submit(self, batch: WriteBatch) -> asyncio.Future[None]:
        """Queue `batch` (its ticket is `submitted` afterwards); the future resolves once it is durable."""
        if self._closing:
            raise StoreUnavailable("the server is shutting down")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.submitted += 1
        self._pending.append((batch, future))
        self._wakeup.set()
        return future

    async def wait_durable(self, ticket: int) -> None:
        """Return once the batch with `ticket` (and every earlier one) is durable."""
        if ticket <= self.durable:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((ticket, future))
        await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            group, self._pending = self._pending, []
            last_ticket = self.submitted - len(self._pending)
            merged = WriteBatch()
            for batch, _ in group:
                merged.extend(batch)
            try:
                await self._store.write(merged)
            except Exception:
                log.exception("store write failed; failing %d waiting calls and reloading", len(group))
                self._fail(group + self._pending)
                self._pending = []
                await self._on_failure()
            else:
                self.durable = last_ticket
                self._on_durable(merged, last_ticket)
                for _, future in group:
                    if not future.done():
                        future.set_result(None)
                self._release_waiters()
            if self._pending or self._closing:
                self._wakeup.set()

    def _release_waiters(self) -> None:
        still_waiting = []
        for ticket, future in self._waiters:
            if ticket > self.durable:
                still_waiting.append((ticket, future))
            elif not future.done():
                future.set_result(None)
        self._waiters = still_waiting

    def _fail(self, group: list[tuple[WriteBatch, asyncio.Future[None]]]) -> None:
        error = StoreUnavailable("the store could not commit the change")
        for _, future in group:
            if not future.done():
                future.set_exception(error)
        # Whatever was not durable never will be: those waiters fail too, and
        # the tickets they waited for are written off.
        self.durable = self.submitted
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(error)
        self._waiters = []

    async def close(self) -> None:
        """Write everything already submitted, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
