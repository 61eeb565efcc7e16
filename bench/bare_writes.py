"""The transport's own share of `watchers_ratio`: streams that only write, served beside the server under test.

`allocate_watched` loses some Allocate throughput to its 100 watchers, and
some of that is gRPC itself: a grpc.aio write, its completion and the event
loop's wake-up for every message, on the same loop as the Allocates. This
service measures that part alone. `bench.server --bare-writes` starts it on
a second port in the server's own process and event loop; each stream of
`Follow` writes one fixed, already encoded message (a batch of four events,
the size of what the watchers get) every period the caller asks for, from a
random phase, and does nothing else: no hub, no filter, no encoding, no
window. `allocate_watched_bare` (`bench.watchers --follow bare`) holds 100 of
them open while the Allocate load runs, and `watchers_bare_ratio` over its
twin is the ceiling that `watchers_ratio` could reach on this machine at
that message rate if AuthPool's own work per message cost nothing.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
from authpool_client.api import authpool_pb2 as pb

__all__ = ["FOLLOW", "serve_bare_writes"]

FOLLOW = "/bench.BareWrites/Follow"
_EVENTS_PER_MESSAGE = 4


def _message() -> bytes:
    now = time.time()
    batch = pb.WatchEventsResponse()
    for sequence in range(1, _EVENTS_PER_MESSAGE + 1):
        event = batch.batch.events.add(
            sequence=sequence,
            type=pb.EVENT_TYPE_LEASE_GRANTED,
            subscription_id="bench-sub1",
            client_id=f"bench-client-{sequence}",
            lease_id=f"bench-lease-{sequence:012d}",
            fencing_token=sequence,
        )
        event.time.FromNanoseconds(int(now * 1e9))
    return batch.SerializeToString()


async def _follow(request: bytes, context: grpc.aio.ServicerContext) -> None:
    """Write the message every `request` (the period in milliseconds, as ASCII digits), until cancelled."""
    period = int(request or b"100") / 1000
    message = _message()
    await context.send_initial_metadata(())
    # Streams opened together would otherwise all write together, ever after; the watchers' batches
    # open whenever their subscription's next event comes.
    await asyncio.sleep(random.uniform(0, period))
    while True:
        await context.write(message)
        await asyncio.sleep(period)


def _raw(payload: bytes) -> bytes:
    return payload


async def serve_bare_writes(listen: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """The started service and its port; runs on the calling event loop."""
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(_follow, request_deserializer=_raw, response_serializer=_raw)
    service, method = FOLLOW.strip("/").split("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    port = server.add_insecure_port(listen)
    await server.start()
    return server, port
