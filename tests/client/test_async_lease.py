"""The asyncio client's `async with client.lease(...)` against a real server, cancellation included."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from authpool_client import AsyncAuthPoolClient, AsyncLease, AuthPoolClient, Decision

from tests.client.observe import lease_history, live_leases
from tests.client.server_thread import TTL, ServerThread

WAIT = 5.0


@pytest.fixture
def observer(live: ServerThread) -> Iterator[AuthPoolClient]:
    """A blocking client to read the server's state with, off the test's event loop."""
    with AuthPoolClient(live.target, insecure=True, timeout=5) as client:
        yield client


async def look(observer: AuthPoolClient, lease_id: str) -> tuple[set[str], list[str]]:
    """(live lease ids, this lease's event history), read in a thread so the loop keeps running."""
    live = await asyncio.to_thread(live_leases, observer)
    return set(live), await asyncio.to_thread(lease_history, observer, lease_id)


async def test_a_lease_is_released_on_normal_exit(aclient: AsyncAuthPoolClient, observer: AuthPoolClient) -> None:
    async with aclient.lease("worker-7") as lease:
        assert lease.decision is Decision.NEW
        assert lease.credential_ref == f"/creds/.claude-{lease.subscription_id}"
        assert (await look(observer, lease.lease_id))[0] == {lease.lease_id}
    assert lease.released is True
    assert await look(observer, lease.lease_id) == (set(), ["LEASE_GRANTED", "LEASE_RELEASED"])


async def test_an_exception_in_the_body_releases_the_lease_and_propagates(
    aclient: AsyncAuthPoolClient, observer: AuthPoolClient
) -> None:
    with pytest.raises(KeyError):
        async with aclient.lease("worker-7") as lease:
            raise KeyError("model")
    assert lease.released is True
    assert await look(observer, lease.lease_id) == (set(), ["LEASE_GRANTED", "LEASE_RELEASED"])


async def test_a_cancelled_holder_releases_its_lease(aclient: AsyncAuthPoolClient, observer: AuthPoolClient) -> None:
    entered = asyncio.Event()
    held: list[AsyncLease] = []

    async def work() -> None:
        async with aclient.lease("worker-7") as lease:
            held.append(lease)
            entered.set()
            await asyncio.sleep(3600)  # a long provider call, cancelled by a shutdown or a timeout

    task = asyncio.create_task(work())
    await asyncio.wait_for(entered.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (lease,) = held
    assert lease.released is True
    assert await look(observer, lease.lease_id) == (set(), ["LEASE_GRANTED", "LEASE_RELEASED"])


async def test_a_holder_cut_by_a_timeout_releases_its_lease(
    aclient: AsyncAuthPoolClient, observer: AuthPoolClient
) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5), aclient.lease("worker-7") as lease:
            await asyncio.sleep(3600)
    assert lease.released is True
    assert await look(observer, lease.lease_id) == (set(), ["LEASE_GRANTED", "LEASE_RELEASED"])


async def test_the_lease_is_renewed_by_a_task_across_several_ttls(
    aclient: AsyncAuthPoolClient, observer: AuthPoolClient
) -> None:
    unrenewed = (await aclient.allocate("worker-unrenewed")).lease
    async with aclient.lease("worker-7") as lease:
        first_expiry = lease.expires_at
        await asyncio.sleep(3.5 * TTL)
        assert not lease.lost
        assert lease.renewals >= 5
        assert (lease.expires_at - first_expiry).total_seconds() > 2.5 * TTL
        assert (await look(observer, lease.lease_id))[0] == {lease.lease_id}
    assert (await look(observer, unrenewed.lease_id))[1] == ["LEASE_GRANTED", "LEASE_EXPIRED"]


async def test_a_rebalance_moves_the_lease_and_an_async_callback_is_told(
    aclient: AsyncAuthPoolClient, observer: AuthPoolClient
) -> None:
    moved = asyncio.Event()
    seen: list[str] = []

    async def on_move(lease: AsyncLease) -> None:
        seen.append(lease.credential_ref)
        moved.set()

    async with aclient.lease("worker-7", on_move=on_move) as lease:
        old_subscription, old_token = lease.subscription_id, lease.fencing_token
        # Spend on this lease's subscription so the others are cheaper by more than the pool's 5-unit gap.
        await lease.report_usage(10_000_000, model="claude-opus-4")
        result = await aclient.rebalance()
        assert [(m.lease_id, m.from_subscription_id) for m in result.moves] == [(lease.lease_id, old_subscription)]
        await asyncio.wait_for(moved.wait(), WAIT)
        assert lease.moved
        assert lease.subscription_id == result.moves[0].to_subscription_id
        assert lease.fencing_token == result.moves[0].fencing_token > old_token
        assert seen == [f"/creds/.claude-{lease.subscription_id}"]
    assert lease.released is True
