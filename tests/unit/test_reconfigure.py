"""`Pool.reconfigure` (what a config reload applies): only what changed changes, and nothing is forgotten."""

from __future__ import annotations

import dataclasses

from authpool_server.domain import MICROS_PER_UNIT, ExtraWindow, PoolSpec, SubscriptionStatus
from tests.conftest import FakeClock, make_spec
from tests.unit.test_pool import OpenPool, open_pool, report, store, view  # noqa: F401 - fixtures

HOUR = 3600.0


def with_subscriptions(spec: PoolSpec, count: int) -> PoolSpec:
    return dataclasses.replace(spec, subscriptions=make_spec(count).subscriptions)


async def test_a_drained_subscription_that_leaves_the_config_and_comes_back_is_still_drained(
    open_pool: OpenPool,  # noqa: F811
) -> None:
    spec = make_spec(3)
    pool = await open_pool(spec)
    await pool.drain("sub3")  # say its credential leaked: out of rotation until an operator resumes it
    assert (await pool.reconfigure(with_subscriptions(spec, 2))).removed == ("sub3",)
    assert (await pool.reconfigure(spec)).added == ("sub3",)
    assert view(pool, "sub3").status is SubscriptionStatus.DRAINING
    leases = [(await pool.allocate(f"c{i}")).lease for i in range(4)]
    assert "sub3" not in {lease.subscription_id for lease in leases}


async def test_a_new_extra_window_budget_keeps_the_weekly_spend_the_provider_reported(
    open_pool: OpenPool,  # noqa: F811
    clock: FakeClock,
) -> None:
    session = ExtraWindow("session", 5 * HOUR, 50 * MICROS_PER_UNIT)
    base = make_spec(1, budget_units=100)
    spec = dataclasses.replace(
        base, subscriptions=(dataclasses.replace(base.subscriptions[0], extra_windows=(session,)),)
    )
    pool = await open_pool(spec)
    lease = (await pool.allocate("c1")).lease
    # Our own count is 2 units; the provider says 61 % of the week is used.
    await pool.report_usage(dataclasses.replace(report(lease, 2), provider_remaining_ppm=390_000))
    spent = view(pool, "sub1").window_usage_micros
    assert spent == 61 * MICROS_PER_UNIT
    roomier = dataclasses.replace(session, budget_micros=80 * MICROS_PER_UNIT)
    reloaded = dataclasses.replace(
        spec, subscriptions=(dataclasses.replace(spec.subscriptions[0], extra_windows=(roomier,)),)
    )
    assert (await pool.reconfigure(reloaded)).changed == ("sub1",)
    assert view(pool, "sub1").window_usage_micros == spent  # a budget changed, not a window
    # A new length does move the extra window: it is recounted from the usage log.
    clock.advance(HOUR)
    longer = dataclasses.replace(roomier, length_seconds=8 * HOUR)
    await pool.reconfigure(
        dataclasses.replace(spec, subscriptions=(dataclasses.replace(spec.subscriptions[0], extra_windows=(longer,)),))
    )
    assert view(pool, "sub1").window_usage_micros == spent
    start, end = pool._ledgers["sub1"].extra_windows[0]
    assert end - start == 8 * HOUR
