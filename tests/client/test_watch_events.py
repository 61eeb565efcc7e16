"""`watch_events` in both clients: batched on the wire by default, one event per message to the caller."""

from __future__ import annotations

import pytest
from authpool_client import AsyncAuthPoolClient, AuthPoolClient, InvalidArgument
from authpool_client.api import authpool_pb2 as pb


def read(client: AuthPoolClient, last: int, **options: object) -> list[pb.WatchEventsResponse]:
    messages = []
    for message in client.watch_events(0, timeout=10, **options):  # type: ignore[arg-type]
        messages.append(message)
        if message.HasField("event") and message.event.sequence >= last:
            return messages
    raise AssertionError("the stream ended")


def test_batched_or_not_the_caller_gets_each_event_in_a_message_of_its_own(client: AuthPoolClient) -> None:
    for n in range(12):
        client.allocate(f"worker-{n}")
    last = client.status().totals.last_sequence

    unbatched = read(client, last, max_batch_events=1)
    default = read(client, last)  # the replay's 12 events reach it in batches
    windowed = read(client, last, max_batch_events=5, batch_window=0.05)

    assert [m.WhichOneof("message") for m in unbatched] == ["event"] * last
    for messages in (default, windowed):
        assert [m.SerializeToString() for m in messages] == [m.SerializeToString() for m in unbatched]


async def test_the_async_client_unbatches_the_same_way(aclient: AsyncAuthPoolClient) -> None:
    for n in range(12):
        await aclient.allocate(f"worker-{n}")
    last = (await aclient.status()).totals.last_sequence

    async def read_async(**options: object) -> list[int]:
        sequences = []
        async for message in aclient.watch_events(0, timeout=10, **options):  # type: ignore[arg-type]
            assert message.WhichOneof("message") == "event"
            sequences.append(message.event.sequence)
            if message.event.sequence >= last:
                return sequences
        raise AssertionError("the stream ended")

    assert await read_async() == await read_async(max_batch_events=1) == list(range(1, last + 1))


@pytest.mark.parametrize("size", [0, 1001])
def test_a_batch_size_out_of_bounds_is_refused_or_means_one_by_one(client: AuthPoolClient, size: int) -> None:
    client.allocate("worker-1")
    if size > 1000:
        with pytest.raises(InvalidArgument) as refused:
            read(client, 1, max_batch_events=size)
        assert [v.field for v in refused.value.field_violations] == ["max_batch_events"]
    else:
        assert [m.WhichOneof("message") for m in read(client, 1, max_batch_events=size)] == ["event"]
