"""The live side of the event log: fan-out to watchers, replay then follow.

Events are published here only after the batch that holds them is durable,
and always in sequence order. A watcher registers before it replays, so an
event committed while it replays from the store reaches its queue and none
falls between replay and live (design invariant 5). Each watcher has a
bounded queue: publishing never waits, and a watcher that falls too far
behind is ended with `WatcherLagged`, telling it where to resume.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from authpool_server.domain import Event
from authpool_server.errors import EventsCompacted, SequenceAhead, WatcherLagged
from authpool_server.store.base import Store

__all__ = ["EventHub"]

_REPLAY_PAGE = 500


class _Watcher:
    __slots__ = ("lagged", "queue")

    def __init__(self, capacity: int) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=capacity)
        self.lagged = False

    def offer(self, event: Event) -> None:
        if self.lagged:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagged = True
            # Wake the reader so that it notices at once rather than after
            # draining a queue it can no longer trust to be complete.
            self.queue.get_nowait()
            self.queue.put_nowait(event)


class EventHub:
    """Fans committed events out to watchers; `watch` replays then follows."""

    def __init__(self, store: Store, *, watcher_capacity: int = 10_000) -> None:
        self._store = store
        self._watchers: set[_Watcher] = set()
        self._capacity = watcher_capacity
        self.last_sequence = 0

    def watcher_backlogs(self) -> list[int]:
        """Events queued for each live watcher (how far behind each one is)."""
        return [watcher.queue.qsize() for watcher in self._watchers]

    def publish(self, events: Iterable[Event]) -> None:
        """Hand durable events, in sequence order, to every watcher. Never blocks."""
        for event in events:
            self.last_sequence = event.sequence
            for watcher in self._watchers:
                watcher.offer(event)

    async def watch(self, after_sequence: int) -> AsyncIterator[Event]:
        """Every event after `after_sequence`, exactly once and in order, then live ones.

        Raises:
            EventsCompacted: events after `after_sequence` are no longer retained.
            WatcherLagged: the watcher fell behind by more than its queue holds.
        """
        if after_sequence > self.last_sequence:
            # Waiting would silently skip every event up to the stale cursor.
            raise SequenceAhead(after_sequence, self.last_sequence)
        watcher = _Watcher(self._capacity)
        self._watchers.add(watcher)
        replay_until = self.last_sequence
        try:
            cursor = after_sequence
            if cursor < replay_until:
                first = await self._store.first_sequence() or replay_until + 1
                # 0 asks for the oldest retained event, so only a positive
                # cursor can point into what was compacted away.
                if 0 < cursor < first - 1:
                    raise EventsCompacted(cursor, first)
                cursor = max(cursor, first - 1)
            while cursor < replay_until:
                page = await self._store.events_after(cursor, _REPLAY_PAGE)
                if not page:
                    break
                for event in page:
                    if event.sequence > replay_until:
                        break
                    yield event
                    cursor = event.sequence
            while True:
                if watcher.lagged:
                    raise WatcherLagged(cursor)
                event = await watcher.queue.get()
                if watcher.lagged:
                    raise WatcherLagged(cursor)
                if event.sequence > cursor:
                    yield event
                    cursor = event.sequence
        finally:
            self._watchers.discard(watcher)
