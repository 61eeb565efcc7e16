"""The event hub's live fan-out: its subscription index and its batches, with the in-memory store."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from authpool_server.domain import Event, EventType
from authpool_server.events import EventFilter, EventHub, Progress
from authpool_server.store.memory import MemoryStore

SUBSCRIPTIONS = ("sub1", "sub2", "sub3", "sub4")
CLIENTS = ("w1", "w2", "w3")
KINDS = (EventType.LEASE_GRANTED, EventType.LEASE_MOVED, EventType.USAGE_RECORDED, EventType.REBALANCE_COMPLETED)


def random_event(rng: random.Random, sequence: int) -> Event:
    kind = rng.choice(KINDS)
    if kind is EventType.REBALANCE_COMPLETED:  # pool-wide: names no subscription or client
        return Event(sequence, 0.0, kind)
    attributes: tuple[tuple[str, str], ...] = ()
    if kind is EventType.LEASE_MOVED:
        attributes = (("from_subscription_id", rng.choice(SUBSCRIPTIONS)),)
    return Event(sequence, 0.0, kind, rng.choice(SUBSCRIPTIONS), rng.choice(CLIENTS), attributes=attributes)


def random_filter(rng: random.Random) -> EventFilter:
    def some(values: Sequence[object]) -> frozenset:  # type: ignore[type-arg]
        return frozenset(rng.sample(values, rng.choice((0, 0, 1, 2))))

    return EventFilter(types=some(KINDS), subscription_ids=some(SUBSCRIPTIONS), client_ids=some(CLIENTS))


async def collect(hub: EventHub, only: EventFilter, got: list[Event], max_events: int) -> None:
    """What a watcher hands out, until it is cancelled."""
    async for item in hub.watch_batches(0, only=only, max_events=max_events):
        assert not isinstance(item, Progress)
        assert 1 <= len(item) <= max_events
        got.extend(item)


async def test_each_watcher_gets_exactly_what_its_filter_matches_once_and_in_order() -> None:
    rng = random.Random(5)
    hub = EventHub(MemoryStore())
    filters = [random_filter(rng) for _ in range(60)]
    events = [random_event(rng, n) for n in range(1, 2001)]
    got: list[list[Event]] = [[] for _ in filters]
    readers = [
        asyncio.create_task(collect(hub, wanted, got[i], rng.choice((1, 5, 100)))) for i, wanted in enumerate(filters)
    ]
    await asyncio.sleep(0)
    for start in range(0, len(events), 7):  # commits of a few events, the readers running in between
        hub.publish(events[start : start + 7])
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)

    for wanted, received in zip(filters, got, strict=True):
        assert [e.sequence for e in received] == [e.sequence for e in events if wanted.matches(e)], wanted
    assert hub.watcher_backlogs() == []


async def test_a_full_batch_does_not_wait_out_its_window() -> None:
    hub = EventHub(MemoryStore())
    stream = hub.watch_batches(0, max_events=3, window=30.0)
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    hub.publish([Event(n, 0.0, EventType.LEASE_GRANTED, "sub1") for n in (1, 2)])
    await asyncio.sleep(0.01)
    assert not first.done()  # two of three: it waits for company
    hub.publish([Event(3, 0.0, EventType.LEASE_GRANTED, "sub1")])
    batch = await asyncio.wait_for(first, timeout=1)
    await stream.aclose()
    assert [e.sequence for e in batch] == [1, 2, 3]  # type: ignore[union-attr]


async def test_watchers_whose_batches_open_together_are_each_woken_when_the_window_ends() -> None:
    # Five watchers of one subscription and one of another, each with a window of its own
    # length: every batch is written once its own window has passed, not before, not much later.
    hub = EventHub(MemoryStore())
    windows = (0.2, 0.2, 0.2, 0.2, 0.4)
    streams = [
        hub.watch_batches(0, only=EventFilter(subscription_ids=frozenset({"sub1"})), max_events=100, window=window)
        for window in windows
    ]
    other = hub.watch_batches(0, only=EventFilter(subscription_ids=frozenset({"sub2"})), max_events=100, window=0.2)
    loop = asyncio.get_running_loop()
    pending = [asyncio.ensure_future(stream.__anext__()) for stream in (*streams, other)]
    await asyncio.sleep(0)
    published = loop.time()
    hub.publish([Event(1, 0.0, EventType.LEASE_GRANTED, "sub1"), Event(2, 0.0, EventType.LEASE_GRANTED, "sub1")])
    await asyncio.sleep(0.1)
    hub.publish([Event(3, 0.0, EventType.LEASE_GRANTED, "sub2")])
    woken: list[float] = []
    for waiting in pending[: len(streams)]:
        batch = await asyncio.wait_for(waiting, timeout=2)
        woken.append(loop.time() - published)
        assert [e.sequence for e in batch] == [1, 2]  # type: ignore[union-attr]
    assert [e.sequence for e in await asyncio.wait_for(pending[-1], timeout=2)] == [3]  # type: ignore[union-attr]
    for stream in (*streams, other):
        await stream.aclose()
    for window, waited in zip(windows, woken, strict=True):
        assert window - 0.01 < waited < window + 0.5, (window, waited)
