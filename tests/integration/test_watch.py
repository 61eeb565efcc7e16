"""WatchEvents as an operator relies on it, over real channels to a real server.

Filters (AND across kinds, OR within one), progress messages on a quiet
stream, resuming at every point of the replay/live boundary, compaction,
a stuck watcher cut while allocation goes on, and no task or queue left
behind by a stream however it ends. Streams that ask for batches
(`max_batch_events`, `batch_window`) are held to the same guarantees. The basics (replay then live, resume,
the compacted-cursor error) are in test_rpc_happy.py and test_rpc_bad_input.py.

The pool is tests/conftest.py's `make_spec()` unless a test parametrises
`spec`; the clock is a FakeClock and background work is off, so only
`server.pool.reap()` expires and prunes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2

from authpool_server.server import Server
from tests.conftest import NO_AUTH, FakeClock, eventually, make_spec
from tests.integration.rich_errors import error_details

Stub = authpool_pb2_grpc.AuthPoolStub
DOMAIN = "authpool.v1"
UNIT = 1_000_000
# What grpc.aio names the task that runs one WatchEvents call on the server.
HANDLER_TASK = "HandleExceptions[/authpool.v1.AuthPool/WatchEvents]"
ONE_SECOND = Duration(seconds=1)
# A stream that asks for batches: a size that replay pages and bursts overflow, no window.
BATCHED = {"max_batch_events": 7}

_ids = itertools.count(1)


# -- helpers ----------------------------------------------------------------------------


async def last_sequence(stub: Stub) -> int:
    return (await stub.Status(pb.StatusRequest())).totals.last_sequence


async def allocate(stub: Stub, client_id: str) -> pb.Lease:
    return (await stub.Allocate(pb.AllocateRequest(client_id=client_id))).lease


async def report(stub: Stub, lease: pb.Lease, *, model: str = "claude-sonnet-4") -> None:
    await stub.ReportUsage(
        pb.ReportUsageRequest(
            request_id=f"req-{next(_ids)}",
            lease_id=lease.lease_id,
            fencing_token=lease.fencing_token,
            cost_micros=1,
            model=model,
        )
    )


def watch(stub: Stub, after: int = 0, **filters: object) -> grpc.aio.UnaryStreamCall:
    return stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after, **filters))  # type: ignore[arg-type]


def events_of(message: pb.WatchEventsResponse) -> list[pb.Event]:
    """The events one message carries: its `event`, or every event of its `batch`."""
    kind = message.WhichOneof("message")
    if kind == "batch":
        assert message.batch.events, "an empty batch"
        return list(message.batch.events)
    return [message.event] if kind == "event" else []


async def read_until(
    call: grpc.aio.UnaryStreamCall, last: int, *, seconds: float = 10, kinds: list[str] | None = None
) -> tuple[list[pb.Event], list[pb.Progress]]:
    """Messages until the event `last`, or a progress message that reached it; `kinds` collects each one's kind."""
    events: list[pb.Event] = []
    progress: list[pb.Progress] = []
    deadline = time.monotonic() + seconds
    while True:
        message = await asyncio.wait_for(call.read(), timeout=max(0.1, deadline - time.monotonic()))
        assert message is not grpc.aio.EOF, "the stream ended"
        if kinds is not None:
            kinds.append(message.WhichOneof("message"))
        if message.HasField("progress"):
            progress.append(message.progress)
            if message.progress.sequence >= last:
                return events, progress
        else:
            events.extend(events_of(message))
            if events[-1].sequence >= last:
                return events, progress


async def read_to_the_end(
    call: grpc.aio.UnaryStreamCall, *, seconds: float = 10
) -> tuple[list[pb.Event], grpc.aio.AioRpcError]:
    """Every event until the stream ends, and the error it ends with (a watch never ends by itself)."""
    events: list[pb.Event] = []

    async def read() -> grpc.aio.AioRpcError:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                events.extend(events_of(message))
        except grpc.aio.AioRpcError as error:
            return error
        raise AssertionError("the stream ended without an error")

    return events, await asyncio.wait_for(read(), timeout=seconds)


def sequences(events: Iterable[pb.Event]) -> list[int]:
    return [event.sequence for event in events]


def about(event: pb.Event, request: pb.WatchEventsRequest) -> bool:
    """The filter semantics, restated independently of the server's code."""
    subscriptions = set(request.subscription_ids)
    return (
        (not request.types or event.type in request.types)
        and (not request.client_ids or event.client_id in request.client_ids)
        and (
            not subscriptions
            or event.subscription_id in subscriptions
            or (
                event.type == pb.EVENT_TYPE_LEASE_MOVED
                and event.attributes.get("from_subscription_id") in subscriptions
            )
        )
    )


def handler_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == HANDLER_TASK and not task.done()]


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = error_details(error)[error_details_pb2.ErrorInfo]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.domain == DOMAIN
    return info


# -- filters ----------------------------------------------------------------------------

FILTERS = {
    "one type": pb.WatchEventsRequest(types=[pb.EVENT_TYPE_LEASE_GRANTED]),
    "types, any of": pb.WatchEventsRequest(types=[pb.EVENT_TYPE_USAGE_RECORDED, pb.EVENT_TYPE_LEASE_RELEASED]),
    "one subscription, moves away from it included": pb.WatchEventsRequest(subscription_ids=["sub2"]),
    "subscriptions, any of": pb.WatchEventsRequest(subscription_ids=["sub1", "sub3"]),
    "both ends of a move, which comes once": pb.WatchEventsRequest(subscription_ids=["sub2", "sub3"]),
    "clients, any of": pb.WatchEventsRequest(client_ids=["w1", "w2"]),
    "type and client": pb.WatchEventsRequest(types=[pb.EVENT_TYPE_USAGE_RECORDED], client_ids=["w2"]),
    "all three kinds": pb.WatchEventsRequest(
        types=[pb.EVENT_TYPE_LEASE_MOVED, pb.EVENT_TYPE_USAGE_RECORDED],
        subscription_ids=["sub2"],
        client_ids=["w2", "w3"],
    ),
    "nothing matches": pb.WatchEventsRequest(client_ids=["nobody"]),
}


@pytest.mark.parametrize("spec", [make_spec(ttl=3600)], ids=["long-ttl"])
async def test_filters_select_exactly_the_matching_events_in_replay_and_live(stub: Stub, clock: FakeClock) -> None:
    leases = {f"w{i}": await allocate(stub, f"w{i}") for i in range(1, 5)}  # sub1, sub2, sub3, sub1
    for lease in leases.values():
        await report(stub, lease)
    clock.advance(301)  # every client idle: draining moves them at once

    watchers = {
        name: stub.WatchEvents(
            pb.WatchEventsRequest(
                after_sequence=0,
                types=request.types,
                subscription_ids=request.subscription_ids,
                client_ids=request.client_ids,
                progress_interval=ONE_SECOND,
            )
        )
        for name, request in FILTERS.items()
    }
    try:
        # Live, after the streams opened: a move away from sub2, a rotation, usage, a release.
        await stub.DrainSubscription(pb.DrainSubscriptionRequest(subscription_id="sub2"))
        state = await stub.Status(pb.StatusRequest(include_clients=True))
        current = {lease.client_id: lease for lease in state.clients}
        for client in ("w1", "w2", "w3"):
            await report(stub, current[client])
        await stub.Release(
            pb.ReleaseRequest(lease_id=current["w4"].lease_id, fencing_token=current["w4"].fencing_token)
        )
        last = await last_sequence(stub)
        everything, _ = await read_until(watch(stub), last)
        got = await asyncio.gather(*(read_until(call, last) for call in watchers.values()))
    finally:
        for call in watchers.values():
            call.cancel()

    assert sequences(everything) == list(range(1, last + 1))
    kinds = {event.type for event in everything}
    assert {pb.EVENT_TYPE_LEASE_MOVED, pb.EVENT_TYPE_ROTATION, pb.EVENT_TYPE_LEASE_RELEASED} <= kinds
    moved = [event for event in everything if event.type == pb.EVENT_TYPE_LEASE_MOVED]
    assert [(e.client_id, e.attributes["from_subscription_id"], e.subscription_id) for e in moved] == [
        ("w2", "sub2", "sub3")
    ]
    for (name, request), (events, progress) in zip(FILTERS.items(), got, strict=True):
        expected = [event for event in everything if about(event, request)]
        assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in expected], name
        if not expected or expected[-1].sequence < last:  # told it has seen the whole log
            assert progress[-1].sequence == last, name
    assert got[list(FILTERS).index("nothing matches")][0] == []
    assert len(got[list(FILTERS).index("one subscription, moves away from it included")][0]) >= 4


# -- progress ---------------------------------------------------------------------------


async def test_progress_on_a_quiet_filtered_stream_carries_the_sequence_reached_and_resuming_from_it_skips_nothing(
    stub: Stub,
) -> None:
    watched = pb.WatchEventsRequest(client_ids=["watched"], progress_interval=ONE_SECOND)
    await allocate(stub, "someone")
    start = await last_sequence(stub)
    call = stub.WatchEvents(
        pb.WatchEventsRequest(after_sequence=start, client_ids=watched.client_ids, progress_interval=ONE_SECOND)
    )
    try:
        for client in ("other-1", "other-2"):  # events the filter leaves out
            await allocate(stub, client)
        reached = await last_sequence(stub)
        opened = time.monotonic()
        message = await asyncio.wait_for(call.read(), timeout=5)
        waited = time.monotonic() - opened
    finally:
        call.cancel()

    assert message.WhichOneof("message") == "progress"
    assert message.progress.sequence == reached == start + 2  # the events it skipped count as considered
    assert 0.5 < waited < 3
    assert abs(message.progress.time.ToNanoseconds() / 1e9 - time.time()) < 5

    # After the progress: one matching event among others. Resuming from the progress gets it, first.
    await allocate(stub, "other-3")
    granted = await allocate(stub, "watched")
    await allocate(stub, "other-4")
    resumed = stub.WatchEvents(
        pb.WatchEventsRequest(
            after_sequence=message.progress.sequence, client_ids=watched.client_ids, progress_interval=ONE_SECOND
        )
    )
    try:
        first = await asyncio.wait_for(resumed.read(), timeout=5)
        second = await asyncio.wait_for(resumed.read(), timeout=5)
    finally:
        resumed.cancel()
    assert (first.event.client_id, first.event.lease_id) == ("watched", granted.lease_id)
    assert first.event.sequence == reached + 2
    assert second.WhichOneof("message") == "progress"
    assert second.progress.sequence == reached + 3


@pytest.mark.parametrize(
    "spec", [dataclasses.replace(make_spec(), watch_progress_seconds=1.0)], ids=["progress-every-1s"]
)
async def test_without_an_interval_progress_follows_the_configured_one(stub: Stub) -> None:
    await allocate(stub, "w1")
    call = watch(stub, after=1)  # nothing after it: an idle, unfiltered stream
    try:
        message = await asyncio.wait_for(call.read(), timeout=5)
    finally:
        call.cancel()
    assert message.WhichOneof("message") == "progress"
    assert message.progress.sequence == 1


# -- batches ----------------------------------------------------------------------------


async def test_a_batch_window_gathers_a_burst_into_one_message_and_never_holds_an_event_much_longer(
    stub: Stub,
) -> None:
    start = await last_sequence(stub)
    window = 0.3
    call = watch(stub, after=start, max_batch_events=100, batch_window=Duration(nanos=int(window * 1e9)))
    await asyncio.wait_for(call.initial_metadata(), timeout=5)
    try:
        began = time.monotonic()
        first = await allocate(stub, "w1")
        await allocate(stub, "w2")  # well within the window of w1's grant
        message = await asyncio.wait_for(call.read(), timeout=5)
        waited = time.monotonic() - began
        # A lone event is written once its window has passed.
        await allocate(stub, "w3")
        alone = await asyncio.wait_for(call.read(), timeout=5)
    finally:
        call.cancel()

    assert message.WhichOneof("message") == "batch"
    assert [e.client_id for e in message.batch.events] == ["w1", "w2"]
    assert message.batch.events[0].lease_id == first.lease_id
    assert window * 0.8 < waited < window + 1.5
    assert [e.client_id for e in events_of(alone)] == ["w3"]


async def test_without_a_window_a_batched_stream_sends_each_event_as_soon_as_it_is_committed(stub: Stub) -> None:
    start = await last_sequence(stub)
    call = watch(stub, after=start, max_batch_events=1000)
    await asyncio.wait_for(call.initial_metadata(), timeout=5)
    try:
        await allocate(stub, "w1")
        message = await asyncio.wait_for(call.read(), timeout=0.5)  # no window: nothing waits for company
    finally:
        call.cancel()
    assert message.WhichOneof("message") == "batch"
    assert [e.client_id for e in message.batch.events] == ["w1"]


# -- resume at every point of the replay/live boundary ---------------------------------


async def test_resume_from_every_sequence_while_events_flow_sees_each_later_event_once_in_order(stub: Stub) -> None:
    """Watchers open from every cursor while events keep committing, so their replays end at every point.

    Each one must see every later event exactly once and in order, with no gap
    between what it replayed from the store and what it then got live; a
    filtered twin of each sees exactly the matching subset.
    """
    clients = [f"w{i}" for i in range(6)]
    leases = [await allocate(stub, client) for client in clients]
    for i in range(30):
        await report(stub, leases[i % len(leases)])
    opened_at = await last_sequence(stub)  # 36 events before the first watcher opens
    more = 60

    async def produce() -> None:
        for i in range(more):
            await report(stub, leases[i % len(leases)])
            if i % 3 == 0:
                await asyncio.sleep(0)

    producer = asyncio.create_task(produce())
    calls: list[tuple[int, pb.WatchEventsRequest, grpc.aio.UnaryStreamCall]] = []
    try:
        for after in range(opened_at + 1):
            for request in (
                pb.WatchEventsRequest(after_sequence=after, progress_interval=ONE_SECOND),
                pb.WatchEventsRequest(after_sequence=after, client_ids=clients[::2], progress_interval=ONE_SECOND),
                pb.WatchEventsRequest(after_sequence=after, progress_interval=ONE_SECOND, **BATCHED),
                pb.WatchEventsRequest(
                    after_sequence=after,
                    client_ids=clients[::2],
                    progress_interval=ONE_SECOND,
                    batch_window=Duration(nanos=20_000_000),
                    **BATCHED,
                ),
            ):
                calls.append((after, request, stub.WatchEvents(request)))
            await asyncio.sleep(0)  # let the commits interleave with the openings
        await producer
        last = await last_sequence(stub)
        assert last == opened_at + more
        everything, _ = await read_until(watch(stub), last)
        kinds: list[list[str]] = [[] for _ in calls]
        results = await asyncio.gather(
            *(read_until(call, last, kinds=kinds[i]) for i, (_, _, call) in enumerate(calls))
        )
    finally:
        producer.cancel()
        for _, _, call in calls:
            call.cancel()

    assert sequences(everything) == list(range(1, last + 1))
    batches = 0
    for (after, request, _), (events, _), sent in zip(calls, results, kinds, strict=True):
        expected = [event for event in everything if event.sequence > after and about(event, request)]
        name = f"after_sequence={after} {list(request.client_ids)} max_batch_events={request.max_batch_events}"
        assert sequences(events) == sequences(expected), name
        assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in expected]
        # One event per message unless asked; every event in a batch once asked.
        assert "batch" not in sent if request.max_batch_events <= 1 else "event" not in sent, name
        batches += sent.count("batch")
    batched_events = sum(
        len(events) for (_, r, _), (events, _) in zip(calls, results, strict=True) if r.max_batch_events > 1
    )
    assert batches < batched_events  # several events shared a message


async def test_a_cursor_past_the_newest_event_is_out_of_range(stub: Stub) -> None:
    await allocate(stub, "w1")
    call = watch(stub, after=2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(caught.value)
    assert (info.reason, info.metadata["last_sequence"]) == ("SEQUENCE_AHEAD", "1")


# -- compaction -------------------------------------------------------------------------


@pytest.mark.parametrize("batching", [{}, BATCHED], ids=["one-by-one", "batched"])
@pytest.mark.parametrize("spec", [make_spec(max_clients=1000)], ids=["roomy"])
async def test_compaction_during_a_replay_ends_it_out_of_range_never_with_a_gap(
    server: Server, stub: Stub, clock: FakeClock, batching: dict[str, int]
) -> None:
    lease = await allocate(stub, "w1")
    await asyncio.gather(*(report(stub, lease) for _ in range(599)))  # sequences 1..600, soon too old
    clock.advance(8 * 86_400)
    late = await allocate(stub, "w2")  # sequence 601 (w1's expiry may come with it: 602)
    assert await last_sequence(stub) in (601, 602)

    # Small flow-control windows hold the server's writes within the first page until this
    # client reads on, so the compaction lands mid-replay however the machine schedules things.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=SMALL_WINDOWS) as slow_channel:
        call = watch(authpool_pb2_grpc.AuthPoolStub(slow_channel), after=0, **batching)
        try:
            first = await asyncio.wait_for(call.read(), timeout=5)  # the replay has read its first page
            await server.pool.reap()  # prunes events older than 7 days: 1..600
            rest, error = await read_to_the_end(call)
        finally:
            call.cancel()

    # What it got is gapless from the start; then it is told where the log now starts.
    events = [*events_of(first), *rest]
    assert sequences(events) == list(range(1, len(events) + 1))
    assert len(events) < 600
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(error)
    assert (info.reason, info.metadata["oldest_sequence"]) == ("EVENTS_COMPACTED", "601")

    # A filtered watcher resuming from a compacted cursor is refused the same way.
    filtered = watch(stub, after=len(events), client_ids=["w2"], **batching)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(filtered.read(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert error_info(refused.value).metadata["oldest_sequence"] == "601"
    resumed = watch(stub, after=600, client_ids=["w2"], **batching)
    try:
        message = await asyncio.wait_for(resumed.read(), timeout=5)
    finally:
        resumed.cancel()
    assert events_of(message)[0].lease_id == late.lease_id


# -- bad requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"types": [pb.EVENT_TYPE_UNSPECIFIED]}, ["types[0]"]),
        ({"types": [pb.EVENT_TYPE_LEASE_GRANTED, 99]}, ["types[1]"]),
        ({"types": [pb.EVENT_TYPE_LEASE_GRANTED] * 101}, ["types"]),
        ({"subscription_ids": ["sub1", ""]}, ["subscription_ids[1]"]),
        ({"subscription_ids": ["no spaces"]}, ["subscription_ids[0]"]),
        ({"client_ids": [f"w{i}" for i in range(101)]}, ["client_ids"]),
        ({"client_ids": ["x" * 129]}, ["client_ids[0]"]),
        ({"progress_interval": Duration(nanos=999_999_999)}, ["progress_interval"]),
        ({"progress_interval": Duration(seconds=3601)}, ["progress_interval"]),
        ({"progress_interval": Duration(seconds=-5)}, ["progress_interval"]),
        ({"progress_interval": Duration(seconds=2, nanos=-1)}, ["progress_interval"]),
        ({"max_batch_events": 1001}, ["max_batch_events"]),
        ({"max_batch_events": 10, "batch_window": Duration(seconds=1, nanos=1)}, ["batch_window"]),
        ({"max_batch_events": 10, "batch_window": Duration(nanos=-1)}, ["batch_window"]),
        ({"batch_window": Duration(nanos=1_000_000)}, ["batch_window"]),
        (
            {"types": [0], "subscription_ids": [""], "client_ids": ["a b"], "progress_interval": Duration()},
            ["types[0]", "subscription_ids[0]", "client_ids[0]", "progress_interval"],
        ),
    ],
    ids=[
        "unspecified-type",
        "unknown-type",
        "too-many-types",
        "empty-subscription-id",
        "bad-subscription-id",
        "too-many-client-ids",
        "too-long-client-id",
        "interval-under-1s",
        "interval-over-1h",
        "negative-interval",
        "malformed-duration",
        "batch-over-1000",
        "window-over-1s",
        "negative-window",
        "window-without-batches",
        "everything-at-once",
    ],
)
async def test_a_bad_watch_request_is_invalid_argument_naming_each_field(
    server: Server, stub: Stub, request_fields: dict[str, object], fields: list[str]
) -> None:
    call = stub.WatchEvents(pb.WatchEventsRequest(**request_fields))  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), timeout=5)

    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "INVALID_ARGUMENT"
    bad = error_details(error)[error_details_pb2.BadRequest]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [violation.field for violation in bad.field_violations] == fields
    assert all(violation.description for violation in bad.field_violations)
    assert server.pool.events.watcher_backlogs() == []  # nothing was registered


async def test_the_bounds_of_a_watch_request_are_accepted(stub: Stub) -> None:
    every_type = [value for value in pb.EventType.values() if value]
    for interval in (Duration(seconds=1), Duration(seconds=3600)):
        call = stub.WatchEvents(
            pb.WatchEventsRequest(
                types=(every_type * 100)[:100],  # 100 entries, the most allowed
                subscription_ids=[f"sub{i}" for i in range(100)],  # unknown ids are fine: they may come later
                client_ids=["x" * 128],
                progress_interval=interval,
                max_batch_events=1000,
                batch_window=Duration(seconds=1),
            )
        )
        try:
            await asyncio.wait_for(call.initial_metadata(), timeout=5)
            await asyncio.sleep(0.05)
            assert not call.done()
        finally:
            call.cancel()


# -- a stuck watcher --------------------------------------------------------------------

BUFFER = 100  # the smallest watcher buffer the config accepts (events.watcherBuffer)
# A client whose stream window is small and fixed (no BDP probing grows it), so that
# flow control stops the server's writes after a few kilobytes instead of megabytes.
SMALL_WINDOWS = [("grpc.http2.lookahead_bytes", 8192), ("grpc.http2.bdp_probe", 0)]


@pytest.mark.parametrize("batching", [{}, BATCHED], ids=["one-by-one", "batched"])
@pytest.mark.parametrize(
    "spec", [dataclasses.replace(make_spec(max_clients=1000), watcher_buffer=BUFFER)], ids=["buffer-100"]
)
async def test_a_stuck_watcher_is_cut_while_allocation_and_other_watchers_go_on(
    server: Server, stub: Stub, batching: dict[str, int]
) -> None:
    """A client that never reads: its server-side write blocks on HTTP/2 flow control.

    Its events queue up in the hub until the buffer overflows; then it is cut
    at once (unregistered, its queue dropped, its handler cancelled out of the
    blocked write), while Allocate calls and a healthy watcher carry on. When
    the client reads again it gets the messages that were already on their way,
    then ABORTED (WATCHER_LAGGED) naming the last of them, and resuming from
    there misses nothing.
    """
    hub = server.pool.events
    lease = await allocate(stub, "c" * 128)
    big = "m" * 128  # every event about 400 bytes on the wire
    start = await last_sequence(stub)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=SMALL_WINDOWS) as slow_channel:
        stuck = authpool_pb2_grpc.AuthPoolStub(slow_channel).WatchEvents(
            pb.WatchEventsRequest(after_sequence=start, **batching)
        )
        await asyncio.wait_for(stuck.initial_metadata(), timeout=5)
        healthy = watch(stub, after=start, **batching)
        await asyncio.wait_for(healthy.initial_metadata(), timeout=5)
        await eventually(lambda: len(hub.watcher_backlogs()) == 2)

        latencies: list[float] = []
        stop = asyncio.Event()

        async def allocate_throughout() -> None:
            for n in itertools.count():
                if stop.is_set():
                    return
                began = time.monotonic()
                await allocate(stub, f"a{n}")
                latencies.append(time.monotonic() - began)

        allocator = asyncio.create_task(allocate_throughout())
        produced = 0
        try:
            while len(hub.watcher_backlogs()) == 2:
                assert produced < 20 * BUFFER, "the stuck watcher was never cut"
                await asyncio.gather(*(report(stub, lease, model=big) for _ in range(20)))
                produced += 20
            assert len(hub.watcher_backlogs()) == 1  # the healthy one is still there
            await asyncio.gather(*(report(stub, lease, model=big) for _ in range(20)))  # and life goes on
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            await allocator
        last = await last_sequence(stub)
        healthy_events, _ = await read_until(healthy, last)
        healthy.cancel()

        assert produced <= 4 * BUFFER  # cut soon after the buffer overflowed
        assert len(latencies) > 10
        assert max(latencies) < 1.0, f"an Allocate took {max(latencies):.2f}s while a watcher was stuck"
        assert sequences(healthy_events) == list(range(start + 1, last + 1))

        # The stuck client reads at last: the messages already sent, then the reason it was cut.
        received, error = await read_to_the_end(stuck)
        assert error.code() == grpc.StatusCode.ABORTED
        info = error_info(error)
        assert info.reason == "WATCHER_LAGGED"
        assert sequences(received) == list(range(start + 1, start + 1 + len(received)))
        assert 0 < len(received) < produced
        assert info.metadata["resume_after_sequence"] == str(received[-1].sequence)
        await eventually(lambda: not handler_tasks())  # the cut stream's task has finished

    resumed = watch(stub, after=received[-1].sequence, **batching)
    try:
        rest, _ = await read_until(resumed, last)
    finally:
        resumed.cancel()
    assert sequences(rest) == list(range(received[-1].sequence + 1, last + 1))


# -- nothing left behind ----------------------------------------------------------------


async def test_a_stream_ended_by_its_client_leaves_no_task_or_queue(server: Server, stub: Stub) -> None:
    hub = server.pool.events
    await allocate(stub, "w1")
    calls = [
        watch(stub, after=0),
        watch(stub, after=1, client_ids=["w2"]),
        watch(stub, after=1, progress_interval=ONE_SECOND),
    ]
    for call in calls:
        await asyncio.wait_for(call.initial_metadata(), timeout=5)
    await eventually(lambda: len(hub.watcher_backlogs()) == 3 and len(handler_tasks()) == 3)
    await allocate(stub, "w2")
    assert (await asyncio.wait_for(calls[1].read(), timeout=5)).event.client_id == "w2"

    for call in calls:
        call.cancel()

    await eventually(lambda: hub.watcher_backlogs() == [] and handler_tasks() == [])


async def test_stopping_the_server_ends_every_stream_and_leaves_no_task_or_queue(tmp_path: Path) -> None:
    # The full grace: open streams must not hold a shutdown for it.
    server = Server(
        make_spec(), data_dir=tmp_path, security=NO_AUTH, listen="127.0.0.1:0", background=False, grace_seconds=10
    )
    await server.start()
    stopped = False
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            await allocate(stub, "w1")
            calls = [watch(stub, after=0), watch(stub, after=1, types=[pb.EVENT_TYPE_LEASE_EXPIRED])]
            for call in calls:
                await asyncio.wait_for(call.initial_metadata(), timeout=5)
            await eventually(lambda: len(server.pool.events.watcher_backlogs()) == 2 and len(handler_tasks()) == 2)
            started = time.monotonic()
            await server.stop()
            stopped = True
            assert time.monotonic() - started < 5
            for call in calls:
                _, error = await read_to_the_end(call)
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                info = error_details(error)[error_details_pb2.ErrorInfo]
                assert info.reason == "SHUTTING_DOWN"
                assert int(info.metadata["resume_after_sequence"]) >= 1
    finally:
        if not stopped:
            await server.stop()
    assert server.pool.events.watcher_backlogs() == []
    await eventually(lambda: handler_tasks() == [])


@pytest.mark.parametrize(
    "spec", [dataclasses.replace(make_spec(max_clients=1000), watcher_buffer=BUFFER)], ids=["buffer-100"]
)
async def test_a_cut_watcher_whose_client_leaves_without_reading_leaves_nothing_behind(
    server: Server, stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    hub = server.pool.events
    lease = await allocate(stub, "w1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=SMALL_WINDOWS) as slow_channel:
        stuck = authpool_pb2_grpc.AuthPoolStub(slow_channel).WatchEvents(pb.WatchEventsRequest(after_sequence=1))
        await asyncio.wait_for(stuck.initial_metadata(), timeout=5)
        await eventually(lambda: len(hub.watcher_backlogs()) == 1)
        while hub.watcher_backlogs():
            await asyncio.gather(*(report(stub, lease, model="m" * 128) for _ in range(20)))
        assert len(handler_tasks()) == 1  # its status waits behind the messages the client has not read

        stuck.cancel()

        await eventually(lambda: not handler_tasks())
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
