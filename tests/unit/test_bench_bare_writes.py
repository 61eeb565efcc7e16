"""`bench.bare_writes`: the streams that stand for gRPC's own share of `watchers_ratio`."""

from __future__ import annotations

import time

import grpc
from authpool_client.api import authpool_pb2 as pb

from bench.bare_writes import FOLLOW, serve_bare_writes


async def test_each_stream_gets_a_watcher_sized_batch_at_the_period_it_asked_for() -> None:
    server, port = await serve_bare_writes()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(FOLLOW, response_deserializer=pb.WatchEventsResponse.FromString)(b"20")
            started = time.monotonic()
            messages = []
            async for message in call:
                messages.append(message)
                if len(messages) == 6:
                    break
            elapsed = time.monotonic() - started
            call.cancel()
    finally:
        await server.stop(0)
    assert all(len(message.batch.events) == 4 for message in messages)
    assert [event.sequence for event in messages[0].batch.events] == [1, 2, 3, 4]
    # Five periods of 20 ms at least between the first and the sixth; not a busy loop.
    assert elapsed >= 0.09
