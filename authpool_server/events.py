"""The live side of the event log: fan-out to watchers, replay then follow.

Events are published here only after the batch that holds them is durable,
and always in sequence order. A watcher registers before it replays, so an
event committed while it replays from the store reaches its queue and none
falls between replay and live (design invariant 5).

Each watcher has a filter and a bounded queue. Publishing never waits: it
checks each watcher's filter and appends the events it wants to its queue,
nothing more. A watcher whose queue overflows (it fell `watcher_capacity`
matching events behind, typically because its client stopped reading and its
stream is stuck on HTTP/2 flow control) is unregistered at once, its queue is
dropped, and its owner's `on_lag` is called so that it can end the stream
(the gRPC service cancels the handler blocked in its write and ends the call
with `WatcherLagged`, telling the client where to resume).

While no matching event flows for `progress_seconds`, a watcher yields a
`Progress` with the sequence it has considered (events it skipped as not
matching included): resuming after it skips nothing that matches.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from authpool_server.domain import Event, EventType
from authpool_server.errors import EventsCompacted, SequenceAhead, ShuttingDown, WatcherLagged
from authpool_server.store.base import Store

__all__ = ["EventFilter", "EventHub", "Progress"]

log = logging.getLogger(__name__)

_REPLAY_PAGE = 500


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a watcher wants: all kinds given must match (AND), any value of a kind (OR).

    An empty kind matches everything. An event is about a subscription when
    it names it, or, for a moved lease, when it moved away from it; events
    about the whole pool (a rebalance cycle, the pool exhausted, a webhook
    failure) name no subscription or client, so a subscription or client
    filter leaves them out.
    """

    types: frozenset[EventType] = frozenset()
    subscription_ids: frozenset[str] = frozenset()
    client_ids: frozenset[str] = frozenset()

    @property
    def is_everything(self) -> bool:
        return not (self.types or self.subscription_ids or self.client_ids)

    def matches(self, event: Event) -> bool:
        if self.types and event.type not in self.types:
            return False
        if self.client_ids and event.client_id not in self.client_ids:
            return False
        if self.subscription_ids and event.subscription_id not in self.subscription_ids:
            return event.type is EventType.LEASE_MOVED and any(
                key == "from_subscription_id" and value in self.subscription_ids for key, value in event.attributes
            )
        return True


@dataclass(frozen=True, slots=True)
class Progress:
    """Every event up to and including `sequence` was considered: sent if it matched."""

    sequence: int


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Watcher:
    __slots__ = ("capacity", "events", "filter", "lagged", "on_lag", "waiter")

    def __init__(self, capacity: int, wanted: EventFilter | None, on_lag: Callable[[], None] | None) -> None:
        self.capacity = capacity
        self.events: deque[Event] = deque()
        self.filter = wanted
        self.on_lag = on_lag
        self.lagged = False
        self.waiter: asyncio.Future[None] | None = None

    def offer(self, event: Event) -> bool:
        """Queue `event` and wake the reader; False if the queue is full."""
        if len(self.events) >= self.capacity:
            return False
        self.events.append(event)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True


class EventHub:
    """Fans committed events out to watchers; `watch` replays then follows."""

    def __init__(self, store: Store, *, watcher_capacity: int = 10_000) -> None:
        self._store = store
        self._watchers: set[_Watcher] = set()
        self._capacity = watcher_capacity
        self._closed = False
        self.last_sequence = 0

    def close(self) -> None:
        """End every watch (server shutdown): each raises `ShuttingDown` naming where to resume."""
        self._closed = True
        for watcher in self._watchers:
            if watcher.waiter is not None:
                _wake(watcher.waiter)

    def watcher_backlogs(self) -> list[int]:
        """Events queued for each live watcher (how far behind each one is)."""
        return [len(watcher.events) for watcher in self._watchers]

    def publish(self, events: Iterable[Event]) -> None:
        """Hand durable events, in sequence order, to every watcher that wants them. Never blocks."""
        overflowed: list[_Watcher] = []
        watchers = self._watchers
        for event in events:
            self.last_sequence = event.sequence
            for watcher in watchers:
                wanted = watcher.filter
                if (wanted is None or wanted.matches(event)) and not watcher.lagged and not watcher.offer(event):
                    watcher.lagged = True
                    overflowed.append(watcher)
        for watcher in overflowed:
            self._cut(watcher)

    def _cut(self, watcher: _Watcher) -> None:
        """End a watcher that fell too far behind; its events are dropped, its owner told."""
        self._watchers.discard(watcher)
        watcher.events.clear()
        if watcher.waiter is not None:
            _wake(watcher.waiter)
        if watcher.on_lag is not None:
            try:
                watcher.on_lag()
            except Exception:  # one watcher's owner must never break publishing to the others
                log.exception("ending a lagging watcher failed")

    async def watch(
        self,
        after_sequence: int,
        *,
        only: EventFilter | None = None,
        progress_seconds: float | None = None,
        on_lag: Callable[[], None] | None = None,
    ) -> AsyncIterator[Event | Progress]:
        """Every event after `after_sequence` that `only` matches, exactly once and in order, then live ones.

        While none matches for `progress_seconds` (None: never), yields a
        `Progress` instead. When the watcher falls more than its capacity of
        matching events behind, it is unregistered and `on_lag` is called
        from the publisher (it must not block); without one, the next step
        raises `WatcherLagged`.

        Raises:
            SequenceAhead: `after_sequence` is past the newest event.
            EventsCompacted: events after `after_sequence` are no longer retained.
            WatcherLagged: the watcher fell behind by more than its queue holds.
            ShuttingDown: the server is stopping; resume on another (or after the restart).
        """
        if self._closed:
            raise ShuttingDown(after_sequence)
        if after_sequence > self.last_sequence:
            # Waiting would silently skip every event up to the stale cursor.
            raise SequenceAhead(after_sequence, self.last_sequence)
        wanted = None if only is None or only.is_everything else only
        watcher = _Watcher(self._capacity, wanted, on_lag)
        self._watchers.add(watcher)
        replay_until = self.last_sequence
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()  # when the last item was handed out
        cursor = after_sequence  # every event up to here has been considered
        try:
            if cursor < replay_until:
                first = await self._store.first_sequence() or replay_until + 1
                # 0 asks for the oldest retained event, so only a positive
                # cursor can point into what was compacted away.
                if 0 < cursor < first - 1:
                    raise EventsCompacted(cursor, first)
                cursor = max(cursor, first - 1)
            while cursor < replay_until:
                page = await self._store.events_after(cursor, _REPLAY_PAGE)
                if not page:  # compacted while we replayed, up to the live events
                    raise EventsCompacted(cursor, await self._store.first_sequence() or replay_until + 1)
                for event in page:
                    if event.sequence > replay_until:
                        break
                    if event.sequence != cursor + 1:  # compacted while we replayed: never a silent gap
                        raise EventsCompacted(cursor, event.sequence)
                    cursor = event.sequence
                    if wanted is None or wanted.matches(event):
                        yield event
                        quiet_since = loop.time()
                if progress_seconds is not None and loop.time() - quiet_since >= progress_seconds:
                    yield Progress(cursor)
                    quiet_since = loop.time()
            queue = watcher.events
            while True:
                if watcher.lagged:
                    raise WatcherLagged(cursor)
                if self._closed:
                    raise ShuttingDown(cursor)
                if queue:
                    event = queue.popleft()
                    if event.sequence > cursor:  # else: already replayed
                        cursor = event.sequence
                        yield event
                        quiet_since = loop.time()
                    continue
                # Nothing queued: every event published so far has been considered.
                cursor = max(cursor, self.last_sequence)
                if progress_seconds is None:
                    await self._wait(watcher, None)
                    continue
                remaining = quiet_since + progress_seconds - loop.time()
                if remaining > 0:
                    await self._wait(watcher, remaining)
                else:
                    yield Progress(cursor)
                    quiet_since = loop.time()
        finally:
            self._watchers.discard(watcher)
            watcher.events.clear()

    @staticmethod
    async def _wait(watcher: _Watcher, seconds: float | None) -> None:
        """Until an event is queued for `watcher` (or it is cut), or `seconds` pass."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        watcher.waiter = waiter
        timer = loop.call_later(seconds, _wake, waiter) if seconds is not None else None
        try:
            await waiter
        finally:
            watcher.waiter = None
            if timer is not None:
                timer.cancel()
