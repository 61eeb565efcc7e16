"""Group commit: many decisions, one durable write.

The pool submits each decision's `WriteBatch` and awaits its future. While
the store is busy committing one group, new batches queue up; they are then
merged and written together, so one fsync covers all of them. Groups are
written strictly in submission order. After a group is durable its events
are published and its futures resolved, in that order; if a write fails,
every waiting caller gets `StoreUnavailable` and the pool is told, so it can
reload its state from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from authpool_server.domain import Event
from authpool_server.errors import StoreUnavailable
from authpool_server.store.base import Store, WriteBatch

__all__ = ["Committer"]

log = logging.getLogger(__name__)


class Committer:
    def __init__(
        self,
        store: Store,
        *,
        on_durable: Callable[[list[Event]], None],
        on_failure: Callable[[], Awaitable[None]],
    ) -> None:
        self._store = store
        self._on_durable = on_durable
        self._on_failure = on_failure
        self._pending: list[tuple[WriteBatch, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.groups_written = 0
        self.batches_written = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authpool-committer")

    def submit(self, batch: WriteBatch) -> asyncio.Future[None]:
        """Queue `batch`; the future resolves once it is durable."""
        if self._closing:
            raise StoreUnavailable("the server is shutting down")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((batch, future))
        self._wakeup.set()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            group, self._pending = self._pending, []
            merged = WriteBatch()
            for batch, _ in group:
                merged.extend(batch)
            try:
                await self._store.write(merged)
            except Exception:
                log.exception("store write failed; failing %d waiting calls and reloading", len(group))
                failed = group + self._pending
                self._pending = []
                for _, future in failed:
                    if not future.done():
                        future.set_exception(StoreUnavailable("the store could not commit the change"))
                await self._on_failure()
            else:
                self.groups_written += 1
                self.batches_written += len(group)
                self._on_durable(merged.events)
                for _, future in group:
                    if not future.done():
                        future.set_result(None)
            if self._pending or self._closing:
                self._wakeup.set()

    async def close(self) -> None:
        """Write everything already submitted, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
