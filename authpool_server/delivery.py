"""The webhook dispatcher: takes due notifications from the pool's outbox and delivers them.

At least once: an attempt is recorded only after the receiver answered (or
failed), so a crash between sending and recording repeats the attempt after
the restart, with the same `webhook-id` for the receiver to drop. Attempts
of one notification never overlap; up to `concurrency` notifications are in
flight at once, so one slow endpoint does not hold the others back. Retries
wait an exponential backoff with full jitter; after `max_attempts` the
notification is dead-lettered (the pool records a WEBHOOK_FAILURE event and
`Status` shows it). With replicas, only the one leading the background work
delivers; a leader that loses the lead mid-attempt may overlap the next one
for a moment, which at-least-once delivery (same `webhook-id`) allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from authpool_server.domain import OutboxEntry
from authpool_server.outbox import Attempt
from authpool_server.pool import Pool
from authpool_server.webhooks.sender import RetryPolicy, WebhookSender

__all__ = ["WebhookDispatcher"]

log = logging.getLogger(__name__)

# Even with nothing due, look again this often (a clock that jumps, an entry restored late).
_IDLE_RECHECK_SECONDS = 5.0
_NOT_READY_RECHECK_SECONDS = 1.0


class WebhookDispatcher:
    def __init__(
        self,
        pool: Pool,
        sender: WebhookSender,
        policy: RetryPolicy,
        *,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._sender = sender
        self._policy = policy
        self._concurrency = concurrency
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authpool-webhooks")

    async def close(self) -> None:
        """Stop: attempts in flight are abandoned unrecorded, so they are made again after a restart."""
        tasks = [t for t in (self._task, *self._in_flight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._sender.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._dispatch_once()
            except Exception:  # the dispatcher must outlive any bug in one pass
                log.exception("webhook dispatch failed; retrying in %.0f s", _NOT_READY_RECHECK_SECONDS)
                await asyncio.sleep(_NOT_READY_RECHECK_SECONDS)

    async def _dispatch_once(self) -> None:
        """Start the attempts that are due, then wait for a wake-up or the next due time."""
        outbox, wakeup = self._pool.outbox, self._pool.outbox_wakeup
        wakeup.clear()
        if not self._pool.ready:
            # The store is away: attempts could not be recorded, so they would only repeat.
            await asyncio.sleep(_NOT_READY_RECHECK_SECONDS)
            return
        if not self._pool.is_leader:
            # Another replica delivers; becoming the leader sets the wake-up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=_IDLE_RECHECK_SECONDS)
            return
        in_flight = set(self._in_flight)
        room = self._concurrency - len(in_flight)
        for entry in outbox.due(self._clock(), room, skip=in_flight) if room > 0 else ():
            task = asyncio.create_task(self._attempt(entry), name=f"webhook-{entry.notification_id}")
            self._in_flight[entry.notification_id] = task
            task.add_done_callback(lambda _, key=entry.notification_id: self._finished(key))
        # Attempts in flight are not waited for here: their end wakes this loop.
        due = outbox.next_due(skip=set(self._in_flight))
        wait = _IDLE_RECHECK_SECONDS if due is None else max(0.0, min(_IDLE_RECHECK_SECONDS, due - self._clock()))
        if len(self._in_flight) >= self._concurrency:
            wait = _IDLE_RECHECK_SECONDS  # full: the next slot frees on a finished attempt
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), timeout=wait)

    def _finished(self, notification_id: str) -> None:
        self._in_flight.pop(notification_id, None)
        self._pool.outbox_wakeup.set()  # a slot is free; its retry time may be due

    async def _attempt(self, entry: OutboxEntry) -> None:
        try:
            result = await self._sender.deliver(entry.notification_id, entry.body)
        except Exception as error:  # a bug in delivery must not stop the dispatcher
            log.exception("webhook attempt crashed")
            result_error, delivered = f"internal error ({type(error).__name__})", False
        else:
            result_error, delivered = result.error, result.delivered
        attempts = entry.attempts + 1
        if delivered:
            attempt = Attempt(entry.notification_id, delivered=True)
        elif self._policy.exhausted(attempts):
            attempt = Attempt(entry.notification_id, delivered=False, error=result_error)
            log.warning(
                "webhook notification given up",
                extra={
                    "context": {"notification_id": entry.notification_id, "attempts": attempts, "error": result_error}
                },
            )
        else:
            delay = self._policy.delay(attempts, self._rng)
            attempt = Attempt(
                entry.notification_id, delivered=False, error=result_error, retry_at=self._clock() + delay
            )
            log.info(
                "webhook attempt failed; retrying",
                extra={
                    "context": {
                        "notification_id": entry.notification_id,
                        "attempt": attempts,
                        "error": result_error,
                        "retry_in_s": round(delay, 3),
                    }
                },
            )
        try:
            await self._pool.record_delivery(attempt)
        except Exception:
            # Not recorded: the attempt is made again (at least once, same webhook-id),
            # after a pause held in this task so the loop does not pick it up at once.
            log.warning(
                "could not record a webhook attempt; it will be repeated",
                extra={"context": {"notification_id": entry.notification_id}},
            )
            await asyncio.sleep(self._policy.delay(attempts, self._rng))
