"""What the pool keeps stays bounded, and the shortcuts taken for scale decide as the balancer would.

`make bench` soaks a million lifecycles and times a thousand subscriptions;
these are the parts of that which hold without a clock on the wall: state
returns to its baseline once leases expire and records age past their
retention, and the pool's and the ledger's fast paths give the same answers
as the plain ones.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from authpool_server import balancer
from authpool_server.balancer import Placement, SubscriptionLoad
from authpool_server.domain import MICROS_PER_UNIT, PPM, Lease, Outcome, PoolSpec, SubscriptionSpec
from authpool_server.ledger import SubscriptionLedger
from authpool_server.pool import Pool, UsageReport
from authpool_server.store.memory import MemoryStore
from tests.conftest import FakeClock, make_spec

U = MICROS_PER_UNIT
DAY = 86_400.0


def _report(lease: Lease, n: int) -> UsageReport:
    return UsageReport(f"req-{n}", lease.lease_id, lease.fencing_token, U // 100, 100, 50, "claude-sonnet", Outcome.OK)


async def test_memory_returns_to_its_baseline_after_expiry_and_pruning(clock: FakeClock) -> None:
    store = MemoryStore()
    counter = itertools.count(1)
    pool = Pool(
        make_spec(3, budget_units=10_000, max_clients=1_000), store, clock=clock, new_id=lambda: f"l{next(counter)}"
    )
    await pool.start(background=False)
    try:
        baseline = pool.memory()
        for n in range(600):
            lease = (await pool.allocate(f"client-{n % 50}")).lease
            await pool.report_usage(_report(lease, n))
            if n % 5:  # the others are abandoned: the reaper expires them
                await pool.release(lease.lease_id, lease.fencing_token)
            clock.advance(60.0)
            if n % 10 == 0:
                await pool.reap()
        # The store keeps the retention; memory only the records the forecast horizon still reads (plus a margin,
        # let go in steps), one a minute here.
        assert len(store.usage) == 600
        horizon = pool.spec.forecast_horizon_seconds + 3600.0
        assert horizon / 60 <= pool.memory()["usage_records"] <= (horizon + 600.0) / 60 + 1

        # Past the usage retention and out of this budget window: the last leases expire, records go.
        clock.advance(15 * DAY)
        await pool.reap()
        # Past the ended-lease retention and the next prune: those leases go too.
        clock.advance(2 * 3600.0)
        await pool.reap()

        assert pool.memory() == baseline
        assert not store.leases
        assert not store.ended
        assert not store.usage
        assert all(event.at >= clock.now - pool.spec.event_retention_seconds for event in store.events)
    finally:
        await pool.close()


async def test_a_sticky_answer_from_one_load_is_the_answer_from_all(clock: FakeClock) -> None:
    """`Pool._placement` reads only the lease's own subscription when that keeps it; the balancer agrees."""
    spec = make_spec(4, budget_units=100, max_clients=10)
    pool = Pool(spec, MemoryStore(), clock=clock)
    await pool.start(background=False)
    try:
        leases = [(await pool.allocate(f"c{n}")).lease for n in range(12)]
        # Spend one subscription past its budget and drain another: their leases must move.
        spent = leases[0]
        await pool.report_usage(UsageReport("big", spent.lease_id, spent.fencing_token, 101 * U, 1, 1, "m", Outcome.OK))
        await pool.drain(leases[1].subscription_id)
        clock.advance(spec.rebalancing.idle_seconds + 1)
        now = clock.now
        for lease in pool.status(include_clients=True).leases:
            expected = balancer.decide_renewal(pool._loads(now), pool.spec, lease, now)
            assert pool._placement(lease, lease.wanted_type, now) == expected
    finally:
        await pool.close()


def test_the_ledger_forgets_spend_and_errors_as_they_age_out() -> None:
    pool = PoolSpec(subscriptions=(), forecast_horizon_seconds=3600.0, error_window_seconds=900.0)
    spec = SubscriptionSpec("s", "s@x.com", "claude-pro", "/c", 100 * U, 10)
    ledger = SubscriptionLedger(spec, pool, (0.0, 7 * DAY))
    ledger.record(1000.0, 5 * U, Outcome.SERVER_ERROR)
    ledger.record(1500.0, 7 * U, Outcome.OK)
    assert ledger.load(1500.0).recent_spend_micros == 12 * U
    assert (ledger.load(1500.0).recent_errors, ledger.load(1500.0).recent_requests) == (1, 2)
    load = ledger.load(1000.0 + 900.0 + 1)  # the error is out of the error window
    assert (load.recent_errors, load.recent_requests) == (0, 1)
    assert ledger.load(1000.0 + 3600.0 + 1).recent_spend_micros == 7 * U  # out of the horizon
    assert ledger.load(1500.0 + 3600.0 + 1).recent_spend_micros == 0
    ledger.record(9000.0, 3 * U, Outcome.OK)
    assert ledger.load(9000.0).recent_spend_micros == 3 * U
    assert ledger.load(9000.0).recent_requests == 1
    # A new window forgets the old one's spend at once.
    ledger.roll((9500.0, 9500.0 + 7 * DAY), 0)
    assert ledger.load(9500.0).recent_spend_micros == 0


def _reference_best(
    loads: list[SubscriptionLoad], pool: PoolSpec, wanted_type: str, now: float, exclude: str = ""
) -> SubscriptionLoad | None:
    """`balancer._best_subscription` as it was written before it was inlined for scale."""
    threshold, horizon = pool.threshold_ppm, pool.forecast_horizon_seconds
    best, best_key = None, None
    for load in loads:
        spec = load.spec
        if spec.id == exclude or load.live_clients >= spec.max_clients:
            continue
        if wanted_type and spec.type != wanted_type:
            continue
        if load.disabled or load.draining or balancer.cooling_down(load, pool, now):
            continue
        if (
            load.extra_usage_micros
            and balancer._extra_status(load, threshold) is not balancer.SubscriptionStatus.ACTIVE
        ):
            continue
        limit = spec.weekly_budget_micros * threshold // PPM
        if load.window_usage_micros >= limit:
            continue
        remaining = load.window_end - now
        projected = load.window_usage_micros + (
            balancer._spend_rate(load, horizon, now) * remaining if remaining > 0 else 0
        )
        key = (projected - limit, load.live_clients, spec.id)
        if best_key is None or key < best_key:
            best, best_key = load, key
    return best


_NOW = 1_764_000_000.0
_loads = st.lists(
    st.builds(
        lambda i, kind, budget, clients, usage, recent, start, end, limited, disabled, draining: SubscriptionLoad(
            spec=SubscriptionSpec(f"s{i}", "e@x.com", kind, "/c", budget * U, 5),
            live_clients=clients,
            window_usage_micros=usage * U // 10,
            window_start=_NOW - start,
            window_end=_NOW + end,
            recent_spend_micros=recent * U // 10,
            rate_limited_at=_NOW - 100 if limited else 0.0,
            disabled=disabled,
            draining=draining,
        ),
        st.integers(0, 5),
        st.sampled_from(["pro", "max"]),
        st.sampled_from([10, 20]),
        st.integers(0, 5),
        st.sampled_from([0, 0, 50, 85, 170, 199]),
        st.sampled_from([0, 0, 10, 30]),
        st.sampled_from([0.0, 30.0, 60.0, 3600.0, 2 * DAY]),
        st.sampled_from([-10.0, 0.0, 3600.0, 5 * DAY]),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(loads=_loads, wanted=st.sampled_from(["", "pro"]), exclude=st.sampled_from(["", "s0", "s1"]))
def test_the_inlined_placement_loop_chooses_as_before(loads: list[SubscriptionLoad], wanted: str, exclude: str) -> None:
    pool = make_spec(1)
    chosen = balancer._best_subscription(loads, pool, wanted, _NOW, exclude=exclude)
    assert chosen is _reference_best(loads, pool, wanted, _NOW, exclude=exclude)
    if chosen is not None and not exclude:  # a new client's decision excludes nothing
        decision = balancer.decide_allocation(loads, pool, None, wanted, _NOW)
        assert isinstance(decision, Placement)
        assert decision.subscription_id == chosen.spec.id
