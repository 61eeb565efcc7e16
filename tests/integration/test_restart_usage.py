"""After a restart the pool reports what it reported before, on every store, from a summary of the old usage.

Memory keeps only the recent usage records; a restart loads those whole and
the rest summarised (`store/usage.py`). Two days of usage of every kind
(provider reports and reset times, rate limits, auth failures, fallback,
an extra window) must come back as the same Status, and a report retried
with the request id of a record memory no longer holds must still count
once, on SQLite, in memory and on PostgreSQL.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from authpool_server.domain import MICROS_PER_UNIT, BudgetReset, ExtraWindow, Lease, Outcome, PoolSpec
from authpool_server.pool import Pool, UsageReport
from authpool_server.store.base import Store
from authpool_server.store.memory import MemoryStore
from authpool_server.store.postgres import PostgresStore
from authpool_server.store.sqlite import SQLiteStore
from tests.conftest import FakeClock, make_spec

U = MICROS_PER_UNIT
HOUR = 3600.0


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """A new store over the same durable state each call (a restart)."""
    if request.param == "sqlite":
        return lambda: SQLiteStore(tmp_path / "authpool.sqlite3")
    if request.param == "memory":
        memory = MemoryStore()
        return lambda: memory
    dsn = request.getfixturevalue("postgres_dsn")
    schema = request.getfixturevalue("pg_schema")
    return lambda: PostgresStore(dsn, schema=schema, connect_timeout=3)


@pytest.fixture
async def open_pool(make_store: Callable[[], Store], clock: FakeClock) -> AsyncIterator[Callable[..., object]]:
    opened: list[Pool] = []
    counter = itertools.count(1)

    async def open_(spec: PoolSpec) -> Pool:
        pool = Pool(spec, make_store(), clock=clock, new_id=lambda: f"lease-{next(counter)}")
        await pool.start(background=False)
        opened.append(pool)
        return pool

    yield open_
    for pool in opened:
        if pool.ready:  # not closed by the test (a SQLite store closes once)
            await pool.close()


def spec() -> PoolSpec:
    base = make_spec(3, budget_units=1_000, max_clients=2, ttl=30 * 86_400)
    five_hours = ExtraWindow("five-hour", 5 * HOUR, 40 * U, anchor=1_763_990_000.0)
    first = replace(base.subscriptions[0], extra_windows=(five_hours,))
    return replace(base, subscriptions=(first, *base.subscriptions[1:]))


def report(lease: Lease, n: int, cost_units: float, **changes: object) -> UsageReport:
    base = UsageReport(f"req-{n}", lease.lease_id, lease.fencing_token, int(cost_units * U), 100, 20, "m", Outcome.OK)
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_a_restart_reports_what_was_reported_before_and_counts_no_retry_twice(
    open_pool: Callable[..., object], clock: FakeClock
) -> None:
    first: Pool = await open_pool(spec())  # type: ignore[misc]
    leases = [(await first.allocate(f"client-{i}")).lease for i in range(7)]  # the seventh is on the fallback
    assert leases[6].fallback
    for n in range(300):  # two days and more, one report every ten minutes
        lease = leases[n % 7]
        changes: dict[str, object] = {}
        if n % 11 == 0:
            changes["provider_remaining_ppm"] = 900_000 - n * 1_000
        if n % 13 == 0:
            changes["outcome"] = Outcome.RATE_LIMITED
        if n == 250 and lease.subscription_id == "sub1":
            changes["provider_reset_at"] = clock.now + 3 * 86_400  # the provider says when its week ends
        if n > 280 and lease.subscription_id == "sub3":
            changes["outcome"] = Outcome.AUTH_FAILED
        await first.report_usage(report(lease, n, 0.5 + n % 5, **changes))
        clock.advance(600)
    before = first.status(include_clients=True)
    memory = first.memory()
    await first.close()

    second: Pool = await open_pool(spec())  # type: ignore[misc]
    after = second.status(include_clients=True)
    assert after.subscriptions == before.subscriptions
    assert (after.fallback_usage_micros, after.leases, after.last_sequence) == (
        before.fallback_usage_micros,
        before.leases,
        before.last_sequence,
    )
    # Memory held, and holds again, only the recent records (back to the forecast horizon, and before the
    # restart a margin): the rest came back summarised.
    assert 0 < second.memory()["usage_records"] <= memory["usage_records"] < 300

    # A retry of a record memory let go of, and of a recent one: neither counts again.
    for n in (3, 299):
        ack = await second.report_usage(report(leases[n % 7], n, 99))
        assert ack.duplicate
    assert second.status().subscriptions == after.subscriptions
    assert not (await second.report_usage(report(leases[0], 300, 1))).duplicate


async def test_a_reload_that_moves_a_window_recounts_it_from_the_store(
    open_pool: Callable[..., object], clock: FakeClock
) -> None:
    first: Pool = await open_pool(spec())  # type: ignore[misc]
    lease = (await first.allocate("client")).lease
    assert lease.subscription_id == "sub1"
    spent: list[tuple[float, int]] = []
    for n in range(200):  # a day and more on sub1, most of it older than memory keeps
        await first.report_usage(report(lease, n, 1 + n % 3))
        spent.append((clock.now, (1 + n % 3) * U))
        clock.advance(600)
    await first.close()

    second: Pool = await open_pool(spec())  # type: ignore[misc]
    anchor = clock.now - 20 * HOUR  # sub1's week now starts 20 hours ago
    moved = spec()
    moved = replace(moved, subscriptions=(replace(moved.subscriptions[0], reset=BudgetReset(anchor=anchor)),))
    await second.reconfigure(replace(moved, subscriptions=(*moved.subscriptions, *spec().subscriptions[1:])))
    (view,) = [v for v in second.status().subscriptions if v.spec.id == "sub1"]
    assert view.window_start == anchor
    assert view.window_usage_micros == sum(cost for at, cost in spent if at >= anchor)
