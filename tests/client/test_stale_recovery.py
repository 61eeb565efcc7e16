"""A Renew that moved the lease but lost its answer: the resend is stale, and the lease recovers.

The server commits a move, tells the holder the new token in the Renew's
answer, and dies before the answer arrives; the caller's retry presents the
old token, which the server now refuses as stale. Here the lost answer is
played by a Renew the test sends itself with the lease's token, right after
a drain moved the lease: the lease's own next renewal is then that retry.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from authpool_client import AsyncAuthPoolClient, AuthPoolClient

from tests.client.observe import live_leases
from tests.client.server_thread import ServerThread, client_spec

TTL = 3.0  # the first renewal comes a second in: time enough to set the scene first


def test_a_stale_renewal_after_a_lost_answer_recovers_the_current_token(
    start_server: Callable[..., ServerThread],
) -> None:
    server = start_server(spec=client_spec(ttl=TTL))
    moved = threading.Event()
    with (
        AuthPoolClient(server.target, insecure=True, timeout=5) as client,
        client.lease("worker-7", on_move=lambda _: moved.set()) as lease,
    ):
        old_token = lease.fencing_token
        assert client.drain_subscription(lease.subscription_id) == 1
        answer = client.renew(lease.lease_id, old_token)  # the answer the holder never got
        assert answer.moved
        assert moved.wait(TTL), "the lease did not recover from the stale renewal"
        assert not lease.lost
        assert lease.fencing_token == answer.lease.fencing_token
        assert lease.subscription_id == answer.lease.subscription_id
        assert set(live_leases(client)) == {lease.lease_id}  # the same lease, not a second one
    assert lease.released is True


async def test_the_asyncio_lease_recovers_the_same_way(start_server: Callable[..., ServerThread]) -> None:
    server = start_server(spec=client_spec(ttl=TTL))
    moved = asyncio.Event()
    async with AsyncAuthPoolClient(server.target, insecure=True, timeout=5) as client:
        async with client.lease("worker-7", on_move=lambda _: moved.set()) as lease:
            old_token = lease.fencing_token
            assert await client.drain_subscription(lease.subscription_id) == 1
            answer = await client.renew(lease.lease_id, old_token)
            assert answer.moved
            await asyncio.wait_for(moved.wait(), TTL)
            assert not lease.lost
            assert lease.fencing_token == answer.lease.fencing_token
        assert lease.released is True
