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

A watcher takes its events in batches of up to `max_events`: whatever its
queue holds when its owner asks for more (a stream that was busy writing
finds several), or, with a `window`, what arrives within that long of the
first. Publishing looks only at the watchers that may want an event: those
following its subscription (or, for a moved lease, the one it left) and those
with no subscription filter, so a hundred watchers of one subscription each
cost an event five offers, not a hundred filter checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
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


def _windows_passed(opened: list[tuple[_Watcher, int]]) -> None:
    """The window of each of these batches has passed: wake the readers still waiting for theirs."""
    for watcher, batch in opened:
        # A batch that filled up early has been taken, and its reader waits for another.
        if watcher.batches == batch and watcher.waiter is not None:
            _wake(watcher.waiter)


# What `_Watcher.offer` did with an event.
_QUEUED, _FULL, _OPENED = range(3)


def _alarm(watcher: _Watcher) -> None:
    watcher.alarm = None
    if watcher.waiter is not None:
        _wake(watcher.waiter)


class _Watcher:
    __slots__ = (
        "alarm",
        "batches",
        "capacity",
        "events",
        "filter",
        "first_at",
        "flush",
        "lagged",
        "on_lag",
        "waiter",
        "wake_at",
        "window",
    )

    def __init__(
        self,
        capacity: int,
        wanted: EventFilter | None,
        on_lag: Callable[[], None] | None,
        *,
        max_events: int = 1,
        window: float = 0.0,
    ) -> None:
        self.capacity = capacity
        self.events: deque[Event] = deque()
        self.filter = wanted
        self.on_lag = on_lag
        self.lagged = False
        self.waiter: asyncio.Future[None] | None = None
        # With a window, the reader is woken by a full batch, or when the window of the
        # first event queued (at `first_at`, monotonic) has passed (the `flush` timer).
        self.window = window if max_events > 1 else 0.0
        self.wake_at = max_events if self.window else 1
        self.first_at = 0.0
        self.batches = 0  # opened or taken so far: which batch a window timer was set for
        self.flush: asyncio.TimerHandle | None = None
        # The progress deadline's timer: armed once and re-armed only when it fires early.
        self.alarm: asyncio.TimerHandle | None = None

    def offer(self, event: Event, now: float) -> int:
        """Queue `event` (published at `now`, monotonic) and wake the reader if it has enough.

        Returns _QUEUED, _FULL (nothing queued: the watcher is too far behind),
        or _OPENED: `event` opened a batch that the waiting reader must be woken
        for once the window has passed (the publisher arranges it).
        """
        events = self.events
        if len(events) >= self.capacity:
            return _FULL
        events.append(event)
        if len(events) == 1 and self.window:
            self.first_at = now
            self.batches += 1
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if len(events) >= self.wake_at:
                waiter.set_result(None)
            elif len(events) == 1:
                return _OPENED
        return _QUEUED

    def disarm(self) -> None:
        for timer in (self.flush, self.alarm):
            if timer is not None:
                timer.cancel()
        self.flush = self.alarm = None


class EventHub:
    """Fans committed events out to watchers; `watch` replays then follows."""

    def __init__(self, store: Store, *, watcher_capacity: int = 10_000) -> None:
        self._store = store
        self._watchers: set[_Watcher] = set()
        # Where publishing looks: watchers with no subscription filter, and the others by subscription.
        self._unindexed: set[_Watcher] = set()
        self._by_subscription: dict[str, set[_Watcher]] = {}
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

    def _register(self, watcher: _Watcher) -> None:
        self._watchers.add(watcher)
        wanted = watcher.filter
        if wanted is None or not wanted.subscription_ids:
            self._unindexed.add(watcher)
            return
        for subscription_id in wanted.subscription_ids:
            self._by_subscription.setdefault(subscription_id, set()).add(watcher)

    def _unregister(self, watcher: _Watcher) -> None:
        """Forget `watcher`; harmless if it is already gone."""
        self._watchers.discard(watcher)
        self._unindexed.discard(watcher)
        wanted = watcher.filter
        if wanted is None:
            return
        for subscription_id in wanted.subscription_ids:
            following = self._by_subscription.get(subscription_id)
            if following is not None:
                following.discard(watcher)
                if not following:
                    del self._by_subscription[subscription_id]

    def _candidates(self, event: Event) -> Iterable[_Watcher]:
        """The watchers that may want `event`: each once, the others cannot match it."""
        by_subscription = self._by_subscription
        if not by_subscription:
            return self._unindexed
        following = by_subscription.get(event.subscription_id)
        if event.type is EventType.LEASE_MOVED:
            for key, value in event.attributes:
                left = by_subscription.get(value) if key == "from_subscription_id" else None
                if left:
                    following = left if following is None else following | left  # one offer each
        if not following:
            return self._unindexed
        if not self._unindexed:
            return following
        return (*self._unindexed, *following)

    def publish(self, events: Iterable[Event]) -> None:
        """Hand durable events, in sequence order, to every watcher that wants them. Never blocks."""
        overflowed: list[_Watcher] = []
        opened: list[tuple[_Watcher, int]] = []
        now = time.monotonic()
        for event in events:
            self.last_sequence = event.sequence
            for watcher in self._candidates(event):
                wanted = watcher.filter
                if (wanted is None or wanted.matches(event)) and not watcher.lagged:
                    outcome = watcher.offer(event, now)
                    if outcome == _OPENED:
                        opened.append((watcher, watcher.batches))
                    elif outcome == _FULL:
                        watcher.lagged = True
                        overflowed.append(watcher)
        if opened:
            self._wake_after_windows(opened)
        for watcher in overflowed:
            self._cut(watcher)

    @staticmethod
    def _wake_after_windows(opened: list[tuple[_Watcher, int]]) -> None:
        """One timer for every watcher whose batch opened at this publish and has the same window.

        An event goes to every watcher of its subscription, so their batches
        open together and their windows end together: a timer each cost a
        handle and a heap entry per message (the heap compares its handles in
        Python) for wake-ups that happen at the same moment.
        """
        by_window: dict[float, list[tuple[_Watcher, int]]] = {}
        for entry in opened:
            by_window.setdefault(entry[0].window, []).append(entry)
        loop = asyncio.get_running_loop()
        for window, batches in by_window.items():
            loop.call_later(window, _windows_passed, batches)

    def _cut(self, watcher: _Watcher) -> None:
        """End a watcher that fell too far behind; its events are dropped, its owner told."""
        self._unregister(watcher)
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
        """`watch_batches` one event at a time."""
        stream = self.watch_batches(after_sequence, only=only, progress_seconds=progress_seconds, on_lag=on_lag)
        try:
            async for item in stream:
                if isinstance(item, Progress):
                    yield item
                else:
                    for event in item:
                        yield event
        finally:
            await stream.aclose()

    async def watch_batches(
        self,
        after_sequence: int,
        *,
        only: EventFilter | None = None,
        progress_seconds: float | None = None,
        on_lag: Callable[[], None] | None = None,
        max_events: int = 1,
        window: float = 0.0,
    ) -> AsyncIterator[Sequence[Event] | Progress]:
        """Every event after `after_sequence` that `only` matches, exactly once and in order, then live ones.

        Events come in batches of 1 to `max_events`, consecutive among the
        matching ones: what the replay page or the live queue holds at the
        moment the caller asks for more. With a `window` (seconds), a live
        batch that is not full waits up to that long for more events first.

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
        max_events = max(1, max_events)
        wanted = None if only is None or only.is_everything else only
        watcher = _Watcher(self._capacity, wanted, on_lag, max_events=max_events, window=window)
        window = watcher.window
        self._register(watcher)
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
                batch: list[Event] = []
                gap_at = 0
                for event in page:
                    if event.sequence > replay_until:
                        break
                    if event.sequence != cursor + 1:  # compacted while we replayed: never a silent gap
                        gap_at = event.sequence
                        break
                    cursor = event.sequence
                    if wanted is None or wanted.matches(event):
                        batch.append(event)
                        if len(batch) >= max_events:
                            yield batch
                            batch = []
                            quiet_since = loop.time()
                if batch:  # what this page matched is handed out before anything else happens
                    yield batch
                    quiet_since = loop.time()
                if gap_at:
                    raise EventsCompacted(cursor, gap_at)
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
                    if window and len(queue) < max_events:
                        # Let the batch fill until its first event's window has passed; a full
                        # batch, a cut or shutdown ends the wait sooner.
                        remaining = watcher.first_at + window - time.monotonic()
                        if remaining > 0:
                            await self._wait(watcher, None, flush_in=remaining)
                            continue
                    batch = []
                    while queue and len(batch) < max_events:
                        event = queue.popleft()
                        if event.sequence > cursor:  # else: already replayed
                            cursor = event.sequence
                            batch.append(event)
                    watcher.batches += 1  # taken: a window timer set for it wakes no one
                    if batch:
                        yield batch
                        quiet_since = loop.time()
                    continue
                # Nothing queued: every event published so far has been considered.
                cursor = max(cursor, self.last_sequence)
                if progress_seconds is None:
                    await self._wait(watcher, None)
                elif loop.time() < quiet_since + progress_seconds:
                    await self._wait(watcher, quiet_since + progress_seconds)
                else:
                    yield Progress(cursor)
                    quiet_since = loop.time()
        finally:
            self._unregister(watcher)
            watcher.disarm()
            watcher.events.clear()

    @staticmethod
    async def _wait(watcher: _Watcher, progress_at: float | None, *, flush_in: float | None = None) -> None:
        """Until `watcher` has enough queued (or is cut), its batch's window ends, or (about) `progress_at`.

        The progress alarm is kept across waits: a wait after another event
        leaves the one armed for an earlier deadline, and when that fires
        early the caller finds time remaining and waits again, arming it anew.
        So a busy stream costs one timer per progress interval, not one per event.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        watcher.waiter = waiter
        if progress_at is not None and watcher.alarm is None:
            watcher.alarm = loop.call_at(progress_at, _alarm, watcher)
        if flush_in is not None:
            watcher.flush = loop.call_later(flush_in, _wake, waiter)
        try:
            await waiter
        finally:
            watcher.waiter = None
            if watcher.flush is not None:
                watcher.flush.cancel()
                watcher.flush = None
