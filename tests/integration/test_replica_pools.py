"""Two pools in one process sharing a PostgreSQL schema: what each replica learns from the other.

The process tests (test_replicas.py) show the deployment's invariants; these
pin down the cases where a replica must not merely copy the other's rows but
draw its own conclusions from them: alerts it must raise itself, and config
it reloaded itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest

from authpool_server.domain import EventType, Outcome, PoolSpec
from authpool_server.pool import Pool, UsageReport
from authpool_server.store.postgres import PostgresStore
from tests.conftest import make_spec


@pytest.fixture
async def replicas(postgres_dsn: str, pg_schema: str) -> AsyncIterator[Callable[..., object]]:
    started: list[Pool] = []

    async def start(spec: PoolSpec) -> tuple[Pool, Pool]:
        for _ in range(2):
            pool = Pool(spec, PostgresStore(postgres_dsn, schema=pg_schema, connect_timeout=3))
            await pool.start(background=False)
            started.append(pool)
        return started[0], started[1]

    yield start
    for pool in started:
        await pool.close()


async def caught_up(*pools: Pool) -> None:
    """Until every pool has published everything any of them wrote (they follow each other by NOTIFY)."""
    async with asyncio.timeout(5):
        while len({pool.events.last_sequence for pool in pools}) > 1:  # noqa: ASYNC110 - polling replicas
            await asyncio.sleep(0.01)


async def events_of(pool: Pool, kind: EventType) -> list[str]:
    found = []
    async for item in pool.events.watch(0, progress_seconds=None):
        if getattr(item, "type", None) is kind:
            found.append(item.subscription_id)
        if item.sequence == pool.events.last_sequence:
            return found
    return found


async def test_a_pool_refilled_elsewhere_and_run_dry_here_is_announced_again(replicas) -> None:  # type: ignore[no-untyped-def]
    a, b = await replicas(make_spec(1))
    await a.drain("sub1")  # the only subscription: the pool is dry, and A says so
    await a.resume("sub1")
    await caught_up(a, b)
    await b.drain("sub1")  # dry again, and it is B that must say so
    await caught_up(a, b)
    assert len(await events_of(a, EventType.POOL_EXHAUSTED)) == 2


async def test_a_subscription_retired_by_a_reload_stays_out_of_rotation_whatever_the_others_do(replicas) -> None:  # type: ignore[no-untyped-def]
    spec = make_spec(2, max_clients=3)
    a, b = await replicas(spec)
    leases = [(await a.allocate(f"busy-{i}")).lease for i in range(4)]
    on_sub2 = [lease for lease in leases if lease.subscription_id == "sub2"]
    assert on_sub2
    for n, lease in enumerate(on_sub2):  # busy: a drain leaves them until they are idle
        await a.report_usage(UsageReport(f"r{n}", lease.lease_id, lease.fencing_token, 1, 0, 0, "m", Outcome.OK))
    reloaded = dataclasses.replace(spec, subscriptions=spec.subscriptions[:1])
    assert (await a.reconfigure(reloaded)).removed == ("sub2",)  # draining on A while its clients stay
    await b.drain("sub2")  # an operator rotates its credential through B, which still has it in its config
    await b.resume("sub2")
    await caught_up(a, b)
    # More newcomers than sub1 has room for: the rest go to the fallback, never to sub2.
    placed = {(await a.allocate(f"new-{i}")).lease.subscription_id for i in range(4)}
    assert placed == {"sub1", spec.fallback.id}
