"""The pool over the in-memory store with a hand-moved clock: what a caller sees, and what is kept."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from authpool_server.balancer import window_bounds
from authpool_server.domain import (
    MICROS_PER_UNIT,
    DecisionKind,
    Event,
    EventType,
    Lease,
    Outcome,
    PoolSpec,
    SubscriptionStatus,
)
from authpool_server.errors import (
    InvalidArgument,
    LeaseNotFound,
    PoolExhausted,
    StaleFencingToken,
    StoreUnavailable,
)
from authpool_server.pool import Pool, SubscriptionView, UsageReport
from authpool_server.store.base import Snapshot, WriteBatch
from authpool_server.store.memory import MemoryStore
from authpool_server.store.usage import UsagePlanner, everything
from tests.conftest import FakeClock, make_spec

U = MICROS_PER_UNIT


# -- helpers -------------------------------------------------------------------


def ids(prefix: str = "lease") -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter)}"


_requests = itertools.count(1)


def report(lease: Lease, units: float = 1, *, request_id: str = "", token: int | None = None) -> UsageReport:
    return UsageReport(
        request_id=request_id or f"req-{next(_requests)}",
        lease_id=lease.lease_id,
        fencing_token=lease.fencing_token if token is None else token,
        cost_micros=int(units * U),
        input_tokens=100,
        output_tokens=50,
        model="claude-sonnet",
        outcome=Outcome.OK,
    )


def sequences(store: MemoryStore) -> list[int]:
    return [event.sequence for event in store.events]


def assert_gapless(store: MemoryStore) -> None:
    assert sequences(store) == list(range(1, len(store.events) + 1))
    assert store.last_sequence == len(store.events)


def events_of(store: MemoryStore, type_: EventType) -> list[Event]:
    return [event for event in store.events if event.type is type_]


def status_changes(store: MemoryStore) -> list[tuple[str, str, str]]:
    return [
        (event.subscription_id, dict(event.attributes)["from"], dict(event.attributes)["to"])
        for event in events_of(store, EventType.SUBSCRIPTION_STATUS_CHANGED)
    ]


def view(pool: Pool, subscription_id: str) -> SubscriptionView:
    return next(v for v in pool.status().subscriptions if v.spec.id == subscription_id)


def assert_memory_matches_store(pool: Pool, store: MemoryStore) -> None:
    """What the pool answers from memory is exactly what a restart would load."""
    status = pool.status(include_clients=True)
    assert {lease.lease_id: lease for lease in status.leases} == store.leases
    for sub_view in status.subscriptions:
        on_it = [lease for lease in store.leases.values() if not lease.fallback]
        assert sub_view.live_clients == sum(1 for lease in on_it if lease.subscription_id == sub_view.spec.id)
        assert sub_view.window_usage_micros == sum(
            record.cost_micros
            for record in store.usage.values()
            if not record.fallback and record.subscription_id == sub_view.spec.id and record.at >= sub_view.window_start
        )
    assert status.fallback_usage_micros == sum(r.cost_micros for r in store.usage.values() if r.fallback)
    assert status.last_sequence == store.last_sequence


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


OpenPool = Callable[..., Awaitable[Pool]]


@pytest.fixture
async def open_pool(store: MemoryStore, clock: FakeClock) -> AsyncIterator[OpenPool]:
    """Start pools on the test's store and clock (a second one is a restart); all are closed at the end."""
    opened: list[Pool] = []

    async def open_(spec: PoolSpec, *, prefix: str = "lease") -> Pool:
        pool = Pool(spec, store, clock=clock, new_id=ids(prefix))
        await pool.start(background=False)
        opened.append(pool)
        return pool

    yield open_
    for pool in opened:
        await pool.close()  # closing twice is harmless


@pytest.fixture
async def pool(spec: PoolSpec, open_pool: OpenPool) -> Pool:
    return await open_pool(spec)


# -- allocate / sticky -----------------------------------------------------------


async def test_allocate_grants_a_lease_on_the_healthiest_subscription(
    pool: Pool, store: MemoryStore, clock: FakeClock
) -> None:
    allocation = await pool.allocate("client-a", session_id="s1", labels=[("team", "red")])
    lease = allocation.lease
    assert allocation.kind is DecisionKind.NEW
    assert (lease.lease_id, lease.client_id, lease.session_id) == ("lease-1", "client-a", "s1")
    assert lease.subscription_id == "sub1"  # all equal: the id breaks the tie
    assert not lease.fallback
    assert lease.expires_at == clock.now + pool.spec.lease_ttl_seconds
    assert lease.fencing_token == lease.acked_token == 1
    assert lease.labels == (("team", "red"),)
    assert store.leases == {"lease-1": lease}
    granted = events_of(store, EventType.LEASE_GRANTED)
    assert [(e.lease_id, e.client_id, e.subscription_id, e.fencing_token) for e in granted] == [
        ("lease-1", "client-a", "sub1", 1)
    ]
    assert view(pool, "sub1").live_clients == 1
    assert_gapless(store)


async def test_new_clients_spread_over_the_pool(pool: Pool) -> None:
    placed = [(await pool.allocate(f"c{i}")).lease.subscription_id for i in range(6)]
    assert placed == ["sub1", "sub2", "sub3", "sub1", "sub2", "sub3"]
    assert [v.live_clients for v in pool.status().subscriptions] == [2, 2, 2]


async def test_asking_again_returns_the_same_lease(pool: Pool, store: MemoryStore, clock: FakeClock) -> None:
    first = await pool.allocate("client-a")
    clock.advance(5)
    again = await pool.allocate("client-a", session_id="other-session", wanted_type="claude-pro")
    assert again.kind is DecisionKind.STICKY
    assert again.lease == first.lease
    assert len(store.leases) == 1
    assert len(events_of(store, EventType.LEASE_GRANTED)) == 1
    assert view(pool, "sub1").live_clients == 1


async def test_concurrent_allocations_of_one_client_share_one_lease(pool: Pool, store: MemoryStore) -> None:
    results = await asyncio.gather(*(pool.allocate("client-a") for _ in range(5)))
    assert {result.lease.lease_id for result in results} == {"lease-1"}
    assert [result.kind for result in results].count(DecisionKind.NEW) == 1
    assert len(store.leases) == 1


async def test_concurrent_allocations_never_overfill_a_subscription(pool: Pool, store: MemoryStore) -> None:
    results = await asyncio.gather(*(pool.allocate(f"c{i}") for i in range(10)))
    per_sub = {v.spec.id: v.live_clients for v in pool.status().subscriptions}
    assert per_sub == {"sub1": 2, "sub2": 2, "sub3": 2}
    assert sum(result.kind is DecisionKind.FALLBACK for result in results) == 4
    assert len(store.leases) == 10
    assert_memory_matches_store(pool, store)


async def test_full_pool_uses_the_fallback(open_pool: OpenPool) -> None:
    pool = await open_pool(make_spec(1, max_clients=1))
    await pool.allocate("c1")
    allocation = await pool.allocate("c2")
    assert allocation.kind is DecisionKind.FALLBACK
    assert allocation.lease.fallback
    assert allocation.lease.subscription_id == pool.spec.fallback.id
    assert view(pool, "sub1").live_clients == 1
    assert pool.status().fallback_clients == 1


async def test_full_pool_without_fallback_refuses_and_changes_nothing(store: MemoryStore, open_pool: OpenPool) -> None:
    pool = await open_pool(make_spec(1, max_clients=1, fallback=False))
    await pool.allocate("c1")
    writes, events = store.writes, list(store.events)
    with pytest.raises(PoolExhausted) as refused:
        await pool.allocate("c2")
    assert refused.value.retry_after_seconds > 0
    assert (store.writes, store.events) == (writes, events)
    assert "c2" not in {lease.client_id for lease in store.leases.values()}


# -- renew -----------------------------------------------------------------------


async def test_renew_extends_the_lease(pool: Pool, store: MemoryStore, clock: FakeClock) -> None:
    lease = (await pool.allocate("client-a")).lease
    clock.advance(20)
    renewal = await pool.renew(lease.lease_id, lease.fencing_token)
    assert not renewal.moved
    assert renewal.lease.expires_at == clock.now + pool.spec.lease_ttl_seconds
    assert renewal.lease.fencing_token == lease.fencing_token
    assert store.leases[lease.lease_id].expires_at == renewal.lease.expires_at
    clock.advance(20)  # past the first expiry, inside the renewed one
    assert await pool.reap() == 0
    assert lease.lease_id in store.leases


async def test_renew_of_an_unknown_lease_is_not_found(pool: Pool) -> None:
    with pytest.raises(LeaseNotFound):
        await pool.renew("no-such-lease", 1)


async def test_a_token_the_lease_never_had_is_invalid_and_changes_nothing(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("client-a")).lease
    before = (dict(store.leases), list(store.events))
    for call in (pool.renew, pool.release):
        with pytest.raises(InvalidArgument) as invalid:
            await call(lease.lease_id, lease.fencing_token + 1)
        assert [field for field, _ in invalid.value.violations] == ["fencing_token"]
    assert (store.leases, store.events) == before


async def test_renew_moves_a_lease_off_an_exhausted_subscription(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 100))
    renewal = await pool.renew(lease.lease_id, lease.fencing_token)
    assert renewal.moved
    assert renewal.lease.lease_id == lease.lease_id
    assert renewal.lease.subscription_id == "sub2"
    assert renewal.lease.fencing_token > lease.fencing_token
    assert renewal.lease.acked_token == renewal.lease.fencing_token
    assert (view(pool, "sub1").live_clients, view(pool, "sub2").live_clients) == (0, 1)
    (moved,) = events_of(store, EventType.LEASE_MOVED)
    assert (moved.subscription_id, dict(moved.attributes)["from_subscription_id"]) == ("sub2", "sub1")
    with pytest.raises(StaleFencingToken):
        await pool.renew(lease.lease_id, lease.fencing_token)


async def test_allocate_fails_over_a_lease_off_an_exhausted_subscription(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 100))
    again = await pool.allocate("client-a")
    assert again.kind is DecisionKind.FAILOVER
    assert again.lease.lease_id == lease.lease_id
    assert again.lease.subscription_id != "sub1"
    assert again.lease.fencing_token > lease.fencing_token
    assert again.lease.acked_token == again.lease.fencing_token
    assert len(store.leases) == 1
    assert_memory_matches_store(pool, store)


# -- fencing ------------------------------------------------------------------------


async def test_fencing_token_grows_with_every_grant_and_move(
    store: MemoryStore, clock: FakeClock, open_pool: OpenPool
) -> None:
    pool = await open_pool(make_spec(2, ttl=600))
    a = (await pool.allocate("a")).lease
    b = (await pool.allocate("b")).lease
    assert (a.fencing_token, b.fencing_token) == (1, 2)
    await pool.report_usage(report(a, 10))  # sub1 is now 10 units ahead of sub2
    clock.advance(61)  # a is idle
    outcome = await pool.rebalance(dry_run=False)
    ((move, token),) = outcome.moves
    assert (move.lease_id, move.from_subscription_id, move.to_subscription_id) == (a.lease_id, "sub1", "sub2")
    assert token == 3
    c = (await pool.allocate("c")).lease
    assert c.fencing_token == 4
    assert store.fencing_token == 4


async def test_renew_after_a_move_reports_it_and_then_the_old_token_is_stale(
    store: MemoryStore, clock: FakeClock, open_pool: OpenPool
) -> None:
    pool = await open_pool(make_spec(2, ttl=600))
    a = (await pool.allocate("a")).lease
    await pool.allocate("b")
    await pool.report_usage(report(a, 10))
    clock.advance(61)
    await pool.rebalance(dry_run=False)
    moved = store.leases[a.lease_id]
    assert (moved.acked_token, moved.fencing_token) == (a.fencing_token, 3)  # the holder was not told yet

    # Until the holder is told, its old token is still accepted ...
    renewal = await pool.renew(a.lease_id, a.fencing_token)
    assert renewal.moved
    assert renewal.lease.subscription_id == "sub2"
    assert renewal.lease.acked_token == renewal.lease.fencing_token == 3
    # ... and once it has been, the old token is stale for renew and release.
    with pytest.raises(StaleFencingToken) as stale:
        await pool.renew(a.lease_id, a.fencing_token)
    assert stale.value.metadata["current_fencing_token"] == "3"
    with pytest.raises(StaleFencingToken):
        await pool.release(a.lease_id, a.fencing_token)
    again = await pool.renew(a.lease_id, 3)
    assert not again.moved
    # Late usage under the old token is still charged where it was spent.
    ack = await pool.report_usage(report(a, 2, token=a.fencing_token))
    assert ack.subscription_id == "sub1"
    assert (view(pool, "sub1").window_usage_micros, view(pool, "sub2").window_usage_micros) == (12 * U, 0)


async def test_a_rebalance_dry_run_changes_nothing(store: MemoryStore, clock: FakeClock, open_pool: OpenPool) -> None:
    pool = await open_pool(make_spec(2, ttl=600))
    a = (await pool.allocate("a")).lease
    await pool.allocate("b")
    await pool.report_usage(report(a, 10))
    clock.advance(61)
    writes = store.writes
    outcome = await pool.rebalance(dry_run=True)
    assert outcome.dry_run
    assert [(move.lease_id, token) for move, token in outcome.moves] == [(a.lease_id, 0)]
    assert store.writes == writes
    assert store.leases[a.lease_id].subscription_id == "sub1"
    real = await pool.rebalance(dry_run=False)
    assert [move for move, _ in real.moves] == [move for move, _ in outcome.moves]
    assert [e.type for e in store.events[-2:]] == [EventType.LEASE_MOVED, EventType.REBALANCE_COMPLETED]
    assert_gapless(store)


# -- release ---------------------------------------------------------------------------


async def test_release_frees_the_slot_and_is_idempotent(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("client-a")).lease
    assert await pool.release(lease.lease_id, lease.fencing_token) is True
    assert store.leases == {}
    assert lease.lease_id in store.ended
    assert view(pool, "sub1").live_clients == 0
    (released,) = events_of(store, EventType.LEASE_RELEASED)
    assert (released.lease_id, released.client_id) == (lease.lease_id, "client-a")

    events = len(store.events)
    assert await pool.release(lease.lease_id, lease.fencing_token) is False
    assert len(store.events) == events
    with pytest.raises(LeaseNotFound):
        await pool.renew(lease.lease_id, lease.fencing_token)
    # The client can come back and gets a fresh lease.
    again = await pool.allocate("client-a")
    assert again.kind is DecisionKind.NEW
    assert again.lease.lease_id != lease.lease_id


async def test_release_of_an_unknown_lease_is_false(pool: Pool) -> None:
    assert await pool.release("never-granted", 1) is False


# -- usage ---------------------------------------------------------------------------------


async def test_report_usage_counts_against_the_subscription(pool: Pool, store: MemoryStore, clock: FakeClock) -> None:
    lease = (await pool.allocate("client-a")).lease
    clock.advance(3)
    ack = await pool.report_usage(report(lease, 2.5, request_id="r-1"))
    assert (ack.duplicate, ack.subscription_id) == (False, "sub1")
    assert view(pool, "sub1").window_usage_micros == 2_500_000
    record = store.usage["r-1"]
    assert (record.lease_id, record.client_id, record.subscription_id, record.cost_micros) == (
        lease.lease_id,
        "client-a",
        "sub1",
        2_500_000,
    )
    (recorded,) = events_of(store, EventType.USAGE_RECORDED)
    assert dict(recorded.attributes)["cost_micros"] == "2500000"
    assert store.leases[lease.lease_id].last_used_at == clock.now
    assert_gapless(store)


async def test_report_usage_is_idempotent_by_request_id(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("client-a")).lease
    first = await pool.report_usage(report(lease, 3, request_id="r-1"))
    retry = await pool.report_usage(report(lease, 3, request_id="r-1"))
    assert (first.duplicate, first.subscription_id) == (False, "sub1")
    assert (retry.duplicate, retry.subscription_id) == (True, "sub1")  # the same answer as the first time
    assert view(pool, "sub1").window_usage_micros == 3 * U
    assert len(store.usage) == 1
    assert len(events_of(store, EventType.USAGE_RECORDED)) == 1


async def test_concurrent_retries_of_one_report_count_once(pool: Pool) -> None:
    lease = (await pool.allocate("client-a")).lease
    acks = await asyncio.gather(*(pool.report_usage(report(lease, 3, request_id="r-1")) for _ in range(4)))
    assert [ack.duplicate for ack in acks].count(False) == 1
    assert view(pool, "sub1").window_usage_micros == 3 * U


async def test_fallback_usage_is_counted_apart(open_pool: OpenPool) -> None:
    pool = await open_pool(make_spec(1, max_clients=1))
    await pool.allocate("c1")
    fallback = (await pool.allocate("c2")).lease
    ack = await pool.report_usage(report(fallback, 7))
    assert ack.subscription_id == pool.spec.fallback.id
    assert pool.status().fallback_usage_micros == 7 * U
    assert view(pool, "sub1").window_usage_micros == 0


async def test_usage_after_release_is_accepted_within_the_retention(pool: Pool, clock: FakeClock) -> None:
    lease = (await pool.allocate("client-a")).lease
    await pool.release(lease.lease_id, lease.fencing_token)
    clock.advance(pool.spec.ended_lease_retention_seconds - 60)
    await pool.reap()  # pruning runs, but the ended lease is still within its retention
    ack = await pool.report_usage(report(lease, 4))
    assert (ack.duplicate, ack.subscription_id) == (False, "sub1")
    assert view(pool, "sub1").window_usage_micros == 4 * U

    clock.advance(pool.spec.ended_lease_retention_seconds)
    await pool.reap()  # now the ended lease is forgotten
    with pytest.raises(LeaseNotFound):
        await pool.report_usage(report(lease, 4))
    assert view(pool, "sub1").window_usage_micros == 4 * U


async def test_usage_for_an_unknown_lease_or_a_foreign_token_is_rejected_and_changes_nothing(
    pool: Pool, store: MemoryStore
) -> None:
    lease = (await pool.allocate("client-a")).lease
    events = len(store.events)
    with pytest.raises(LeaseNotFound):
        await pool.report_usage(replace(report(lease, 1), lease_id="no-such-lease"))
    with pytest.raises(InvalidArgument) as invalid:
        await pool.report_usage(report(lease, 1, token=lease.fencing_token + 5))
    assert [field for field, _ in invalid.value.violations] == ["fencing_token"]
    assert len(store.events) == events
    assert store.usage == {}
    assert view(pool, "sub1").window_usage_micros == 0


# -- expiry ------------------------------------------------------------------------------------


async def test_reap_expires_a_lease_after_its_ttl(pool: Pool, store: MemoryStore, clock: FakeClock) -> None:
    lease = (await pool.allocate("client-a")).lease
    clock.advance(pool.spec.lease_ttl_seconds - 1)
    assert await pool.reap() == 0
    clock.advance(1)  # exactly at expires_at
    assert await pool.reap() == 1
    assert store.leases == {}
    assert view(pool, "sub1").live_clients == 0
    (expired,) = events_of(store, EventType.LEASE_EXPIRED)
    assert (expired.lease_id, expired.client_id, expired.subscription_id) == (lease.lease_id, "client-a", "sub1")
    with pytest.raises(LeaseNotFound):
        await pool.renew(lease.lease_id, lease.fencing_token)
    assert await pool.release(lease.lease_id, lease.fencing_token) is False
    again = await pool.allocate("client-a")
    assert again.kind is DecisionKind.NEW
    assert again.lease.lease_id != lease.lease_id
    assert_gapless(store)


async def test_an_expired_lease_frees_its_slot_for_the_next_client(clock: FakeClock, open_pool: OpenPool) -> None:
    pool = await open_pool(make_spec(1, max_clients=1, fallback=False))
    await pool.allocate("c1")
    with pytest.raises(PoolExhausted):
        await pool.allocate("c2")
    clock.advance(pool.spec.lease_ttl_seconds)
    await pool.reap()
    assert (await pool.allocate("c2")).lease.subscription_id == "sub1"


async def test_an_expired_but_unreaped_lease_is_not_renewed_or_reused(
    pool: Pool, store: MemoryStore, clock: FakeClock
) -> None:
    lease = (await pool.allocate("client-a")).lease
    clock.advance(pool.spec.lease_ttl_seconds + 5)
    again = await pool.allocate("client-a")  # no reaper ran
    assert again.kind is DecisionKind.NEW
    assert again.lease.lease_id != lease.lease_id
    assert [e.type for e in store.events[-2:]] == [EventType.LEASE_EXPIRED, EventType.LEASE_GRANTED]
    assert view(pool, "sub1").live_clients == 1
    assert_gapless(store)


# -- status and the budget window -----------------------------------------------------------


async def test_status_changes_are_events_when_usage_crosses_threshold_and_budget(
    pool: Pool, store: MemoryStore
) -> None:
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 84))
    assert view(pool, "sub1").status is SubscriptionStatus.ACTIVE
    assert status_changes(store) == []

    await pool.report_usage(report(lease, 1))  # 85 of 100: exactly the 85 % threshold
    assert view(pool, "sub1").status is SubscriptionStatus.LIMITED
    assert status_changes(store) == [("sub1", "active", "limited")]
    assert (await pool.allocate("client-b")).lease.subscription_id != "sub1"

    await pool.report_usage(report(lease, 14))
    assert len(status_changes(store)) == 1  # still limited: no new event
    await pool.report_usage(report(lease, 1))  # 100 of 100
    assert view(pool, "sub1").status is SubscriptionStatus.EXHAUSTED
    assert view(pool, "sub1").health == 0
    assert status_changes(store) == [("sub1", "active", "limited"), ("sub1", "limited", "exhausted")]
    assert_gapless(store)


async def test_one_big_report_goes_straight_to_exhausted(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 250))
    assert status_changes(store) == [("sub1", "active", "exhausted")]


async def test_the_window_roll_resets_usage_and_revives_exhausted_subscriptions(
    pool: Pool, store: MemoryStore, clock: FakeClock
) -> None:
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 100))
    await pool.release(lease.lease_id, lease.fencing_token)
    _, window_end = window_bounds(clock.now)

    clock.now = window_end - 1  # Sunday 23:59:59: still last week
    assert (await pool.allocate("client-b")).lease.subscription_id == "sub2"
    assert view(pool, "sub1").status is SubscriptionStatus.EXHAUSTED

    clock.now = window_end  # Monday 00:00 UTC
    assert (await pool.allocate("client-c")).lease.subscription_id == "sub1"
    assert view(pool, "sub1").status is SubscriptionStatus.ACTIVE
    assert view(pool, "sub1").window_usage_micros == 0
    assert {v.window_start for v in pool.status().subscriptions} == {window_end}
    assert status_changes(store) == [("sub1", "active", "exhausted"), ("sub1", "exhausted", "active")]
    assert_gapless(store)


async def test_the_window_roll_on_a_stale_renew_keeps_the_event_log_gapless(
    store: MemoryStore, clock: FakeClock, open_pool: OpenPool
) -> None:
    # The roll's status events are decided before the token check fails; they
    # must be committed all the same, or a sequence number is skipped for good
    # and "exhausted -> active" is never written although memory says active.
    pool = await open_pool(make_spec(2, ttl=14 * 86_400))
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 100))
    await pool.renew(lease.lease_id, lease.fencing_token)  # fails over to sub2; the old token is now stale
    clock.now = window_bounds(clock.now)[1] + 1
    with pytest.raises(StaleFencingToken):
        await pool.renew(lease.lease_id, lease.fencing_token)
    await pool.allocate("client-b")
    assert_gapless(store)
    assert status_changes(store)[-1] == ("sub1", "exhausted", "active")


async def test_the_window_roll_on_a_stale_release_keeps_the_event_log_gapless(
    store: MemoryStore, clock: FakeClock, open_pool: OpenPool
) -> None:
    # As above, through release().
    pool = await open_pool(make_spec(2, ttl=14 * 86_400))
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 100))
    await pool.renew(lease.lease_id, lease.fencing_token)
    clock.now = window_bounds(clock.now)[1] + 1
    with pytest.raises(StaleFencingToken):
        await pool.release(lease.lease_id, lease.fencing_token)
    await pool.allocate("client-b")
    assert_gapless(store)
    assert status_changes(store)[-1] == ("sub1", "exhausted", "active")


async def test_status_reads_the_new_window_once_monday_has_passed(pool: Pool, clock: FakeClock) -> None:
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 100))
    await pool.release(lease.lease_id, lease.fencing_token)
    clock.now = window_bounds(clock.now)[1] + 60  # nothing has happened since Monday 00:00
    sub1 = view(pool, "sub1")
    assert (sub1.status, sub1.window_usage_micros, sub1.health) == (SubscriptionStatus.ACTIVE, 0, 100)
    assert {v.window_start for v in pool.status().subscriptions} == {window_bounds(clock.now)[0]}


async def test_a_window_roll_in_a_failed_write_is_still_recorded(
    pool: Pool, store: MemoryStore, clock: FakeClock
) -> None:
    # BUG (pool._reload -> _rebuild): the write that failed held the roll's
    # "exhausted -> active" event; the reload recomputes statuses for the new
    # window from scratch, so the transition is never recorded, and sub1's next
    # change is logged "from active" after a log that last said "exhausted".
    lease = (await pool.allocate("client-a")).lease
    await pool.report_usage(report(lease, 100))
    clock.now = window_bounds(clock.now)[1] + 1
    store.fail_next_write = RuntimeError("disk full")
    with pytest.raises(StoreUnavailable):
        await pool.allocate("client-b")
    await pool.allocate("client-b")
    assert view(pool, "sub1").status is SubscriptionStatus.ACTIVE
    assert status_changes(store) == [("sub1", "active", "exhausted"), ("sub1", "exhausted", "active")]


async def test_a_window_roll_while_the_server_was_down_is_recorded_after_the_restart(
    store: MemoryStore, clock: FakeClock, spec: PoolSpec, open_pool: OpenPool
) -> None:
    # BUG (pool.start -> _rebuild): statuses are rebuilt for the window of the
    # restart time, so a Monday that passed while the server was down turns an
    # exhausted subscription active with no SUBSCRIPTION_STATUS_CHANGED event.
    first = await open_pool(spec)
    lease = (await first.allocate("client-a")).lease
    await first.report_usage(report(lease, 100))
    await first.close()

    clock.now = window_bounds(clock.now)[1] + 3_600  # down over the weekend
    second = await open_pool(spec, prefix="after")
    await second.reap()
    assert view(second, "sub1").status is SubscriptionStatus.ACTIVE
    assert status_changes(store) == [("sub1", "active", "exhausted"), ("sub1", "exhausted", "active")]
    assert_gapless(store)


async def test_usage_retention_shorter_than_the_window_does_not_forget_this_weeks_spend(
    store: MemoryStore, clock: FakeClock, open_pool: OpenPool
) -> None:
    # BUG (pool._prune): usageRetentionDays may be set below 7 (the config only
    # asks for > 0). Pruning then deletes this window's usage from the store
    # while memory still counts it; a restart or a reload after a failed write
    # forgets the spend and a limited subscription takes new clients again.
    spec = replace(make_spec(2, ttl=3_600), usage_retention_seconds=86_400.0)
    first = await open_pool(spec)
    lease = (await first.allocate("client-a")).lease
    await first.report_usage(report(lease, 90))  # sub1 is limited
    clock.advance(2 * 86_400)  # still the same week
    await first.reap()  # prunes usage older than a day
    assert view(first, "sub1").window_usage_micros == 90 * U
    assert_memory_matches_store(first, store)
    await first.close()

    second = await open_pool(spec, prefix="after")
    assert view(second, "sub1").window_usage_micros == 90 * U
    assert view(second, "sub1").status is SubscriptionStatus.LIMITED


# -- restart -------------------------------------------------------------------------------


async def test_a_restart_restores_leases_usage_fencing_and_event_sequence(
    store: MemoryStore, clock: FakeClock, spec: PoolSpec, open_pool: OpenPool
) -> None:
    first = await open_pool(spec, prefix="before")
    a = (await first.allocate("a")).lease
    b = (await first.allocate("b")).lease
    await first.report_usage(report(a, 90, request_id="r-a"))  # sub1 limited
    await first.report_usage(report(b, 3, request_id="r-b"))
    await first.release(b.lease_id, b.fencing_token)
    before = first.status(include_clients=True)
    await first.close()

    clock.advance(5)
    second = await open_pool(spec, prefix="after")
    after = second.status(include_clients=True)
    assert after.leases == before.leases

    def restored(view: SubscriptionView) -> tuple[object, ...]:
        # The projection runs to the window's end, which is 5 s closer now; all else must match.
        return (
            *(getattr(view, f) for f in ("spec", "status", "health", "live_clients", "window_usage_micros")),
            view.error_rate,
            view.forecast.spend_rate_micros_per_hour,
        )

    assert [restored(v) for v in after.subscriptions] == [restored(v) for v in before.subscriptions]
    assert after.last_sequence == before.last_sequence
    assert_memory_matches_store(second, store)

    again = await second.allocate("a")
    assert (again.kind, again.lease) == (DecisionKind.STICKY, a)
    assert (await second.report_usage(report(a, 90, request_id="r-a"))).duplicate
    assert (await second.report_usage(report(b, 1))).subscription_id == "sub2"  # the ended lease is remembered
    c = (await second.allocate("c")).lease
    assert c.fencing_token == b.fencing_token + 1
    assert status_changes(store) == [("sub1", "active", "limited")]  # the restart invents no transitions
    assert_gapless(store)


async def test_a_restart_with_a_subscription_removed_fails_its_lease_over(open_pool: OpenPool) -> None:
    first = await open_pool(make_spec(3))
    leases = [(await first.allocate(f"c{i}")).lease for i in range(3)]
    await first.close()
    orphan = next(lease for lease in leases if lease.subscription_id == "sub3")

    second = await open_pool(make_spec(2), prefix="after")
    renewal = await second.renew(orphan.lease_id, orphan.fencing_token)
    assert renewal.moved
    assert renewal.lease.subscription_id == "sub1"  # sub1 and sub2 tie; the id decides
    assert [(v.spec.id, v.live_clients) for v in second.status().subscriptions] == [("sub1", 2), ("sub2", 1)]


async def test_rebalance_survives_a_lease_on_a_subscription_removed_by_a_restart(
    clock: FakeClock, open_pool: OpenPool
) -> None:
    # The idle lease still on sub3 must not make the planner look up usage the
    # new spec no longer has (KeyError would fail every background cycle).
    first = await open_pool(make_spec(3, ttl=3_600))
    leases = [(await first.allocate(f"c{i}")).lease for i in range(3)]
    assert [lease.subscription_id for lease in leases] == ["sub1", "sub2", "sub3"]
    await first.report_usage(report(leases[0], 20))
    await first.close()

    clock.advance(120)  # everyone is idle
    second = await open_pool(make_spec(2, ttl=3_600), prefix="after")
    outcome = await second.rebalance(dry_run=False)
    # sub2 has one free slot, so exactly one idle client moves there.
    assert [move.to_subscription_id for move, _ in outcome.moves] == ["sub2"]


# -- a failed store write ---------------------------------------------------------------------


async def test_a_failed_grant_raises_store_unavailable_and_the_pool_reloads(pool: Pool, store: MemoryStore) -> None:
    await pool.allocate("a")
    store.fail_next_write = RuntimeError("disk full")
    with pytest.raises(StoreUnavailable):
        await pool.allocate("b")
    assert pool.ready
    assert_memory_matches_store(pool, store)
    assert "b" not in {lease.client_id for lease in pool.status(include_clients=True).leases}

    retry = await pool.allocate("b")
    assert retry.kind is DecisionKind.NEW
    assert store.leases[retry.lease.lease_id] == retry.lease
    assert retry.lease.fencing_token > store.leases["lease-1"].fencing_token
    assert_memory_matches_store(pool, store)
    assert_gapless(store)


async def test_every_call_waiting_on_a_failed_write_gets_store_unavailable(pool: Pool, store: MemoryStore) -> None:
    store.fail_next_write = RuntimeError("disk full")
    results = await asyncio.gather(pool.allocate("a"), pool.allocate("a"), pool.allocate("b"), return_exceptions=True)
    assert [type(result) for result in results] == [StoreUnavailable] * 3
    assert store.leases == {}
    assert_memory_matches_store(pool, store)
    assert (await pool.allocate("a")).kind is DecisionKind.NEW
    assert_gapless(store)


async def test_a_failed_usage_write_is_not_counted_and_its_retry_counts_once(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("a")).lease
    store.fail_next_write = RuntimeError("disk full")
    with pytest.raises(StoreUnavailable):
        await pool.report_usage(report(lease, 5, request_id="r-1"))
    assert view(pool, "sub1").window_usage_micros == 0
    assert_memory_matches_store(pool, store)

    ack = await pool.report_usage(report(lease, 5, request_id="r-1"))
    assert not ack.duplicate  # the failed attempt was never acknowledged
    assert (await pool.report_usage(report(lease, 5, request_id="r-1"))).duplicate
    assert view(pool, "sub1").window_usage_micros == 5 * U
    assert_memory_matches_store(pool, store)
    assert_gapless(store)


async def test_a_failed_release_leaves_the_lease_live(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("a")).lease
    store.fail_next_write = RuntimeError("disk full")
    with pytest.raises(StoreUnavailable):
        await pool.release(lease.lease_id, lease.fencing_token)
    assert view(pool, "sub1").live_clients == 1
    assert_memory_matches_store(pool, store)
    assert await pool.release(lease.lease_id, lease.fencing_token) is True
    assert_gapless(store)


async def test_a_failed_status_change_is_emitted_again_by_the_retry(pool: Pool, store: MemoryStore) -> None:
    lease = (await pool.allocate("a")).lease
    store.fail_next_write = RuntimeError("disk full")
    with pytest.raises(StoreUnavailable):
        await pool.report_usage(report(lease, 100, request_id="r-1"))
    assert view(pool, "sub1").status is SubscriptionStatus.ACTIVE
    await pool.report_usage(report(lease, 100, request_id="r-1"))
    assert status_changes(store) == [("sub1", "active", "exhausted")]
    assert_gapless(store)


# -- nothing is answered before it is durable ---------------------------------------------------


class GatedStore(MemoryStore):
    """A MemoryStore whose writes and reloads wait until the test opens their gate."""

    def __init__(self) -> None:
        super().__init__()
        self.write_gate = asyncio.Event()
        self.load_gate = asyncio.Event()
        self.write_gate.set()
        self.load_gate.set()

    async def write(self, batch: WriteBatch) -> None:
        await self.write_gate.wait()
        await super().write(batch)

    async def load(self, plan: UsagePlanner = everything) -> Snapshot:
        await self.load_gate.wait()
        return await super().load(plan)


async def settle() -> None:
    """Let every callback that is ready run."""
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture
async def gated(spec: PoolSpec, clock: FakeClock) -> AsyncIterator[tuple[Pool, GatedStore]]:
    store = GatedStore()
    pool = Pool(spec, store, clock=clock, new_id=ids())
    await pool.start(background=False)
    try:
        yield pool, store
    finally:
        store.write_gate.set()
        store.load_gate.set()
        await pool.close()


async def test_a_sticky_answer_waits_until_the_grant_is_durable(gated: tuple[Pool, GatedStore]) -> None:
    pool, store = gated
    store.write_gate.clear()
    grant = asyncio.create_task(pool.allocate("client-a"))
    sticky = asyncio.create_task(pool.allocate("client-a"))
    await settle()
    assert not sticky.done()  # the lease exists in memory, but is not durable yet
    store.write_gate.set()
    assert (await sticky).lease == (await grant).lease
    assert (await sticky).lease.lease_id in store.leases


async def test_a_duplicate_report_waits_until_the_first_is_durable(gated: tuple[Pool, GatedStore]) -> None:
    pool, store = gated
    lease = (await pool.allocate("client-a")).lease
    store.write_gate.clear()
    first = asyncio.create_task(pool.report_usage(report(lease, 2, request_id="r-1")))
    retry = asyncio.create_task(pool.report_usage(report(lease, 2, request_id="r-1")))
    await settle()
    assert not retry.done()
    store.write_gate.set()
    assert [(await first).duplicate, (await retry).duplicate] == [False, True]
    assert "r-1" in store.usage


async def test_a_second_release_waits_until_the_first_is_durable(gated: tuple[Pool, GatedStore]) -> None:
    pool, store = gated
    lease = (await pool.allocate("client-a")).lease
    store.write_gate.clear()
    first = asyncio.create_task(pool.release(lease.lease_id, lease.fencing_token))
    second = asyncio.create_task(pool.release(lease.lease_id, lease.fencing_token))
    await settle()
    assert not second.done()  # "not live" must not be said before the release is durable
    store.write_gate.set()
    assert [await first, await second] == [True, False]
    assert lease.lease_id in store.ended


async def test_calls_are_refused_until_the_reload_after_a_failed_write_completes(
    gated: tuple[Pool, GatedStore],
) -> None:
    pool, store = gated
    await pool.allocate("client-a")
    store.load_gate.clear()
    store.fail_next_write = RuntimeError("disk full")
    with pytest.raises(StoreUnavailable):
        await pool.allocate("client-b")
    assert not pool.ready  # memory may be ahead of the store until the reload is done
    refused = asyncio.create_task(pool.allocate("client-c"))
    await settle()
    assert refused.done()
    with pytest.raises(StoreUnavailable):
        await refused

    store.load_gate.set()
    await settle()
    assert pool.ready
    assert (await pool.allocate("client-c")).kind is DecisionKind.NEW
    assert_memory_matches_store(pool, store)
    assert_gapless(store)


class _CommitsThenFails(MemoryStore):
    """The next write commits, then reports failure: a connection lost while COMMIT was in flight."""

    fail_after_commit = False

    async def write(self, batch: WriteBatch) -> None:
        await super().write(batch)
        if self.fail_after_commit:
            self.fail_after_commit = False
            raise ConnectionError("connection lost during COMMIT")


async def test_watchers_see_the_events_of_a_write_that_failed_but_committed(clock: FakeClock) -> None:
    store = _CommitsThenFails()
    pool = Pool(make_spec(), store, clock=clock, new_id=ids("lease"))
    await pool.start(background=False)
    try:
        await pool.allocate("c1")
        seen: list[int] = []

        async def follow() -> None:
            async for event in pool.events.watch(store.last_sequence):
                seen.append(event.sequence)  # type: ignore[union-attr]

        watcher = asyncio.create_task(follow())
        await asyncio.sleep(0)
        store.fail_after_commit = True
        with pytest.raises(StoreUnavailable):
            await pool.allocate("c2")
        async with asyncio.timeout(5):
            while not pool.ready:  # noqa: ASYNC110 - the reload runs in the committer's task
                await asyncio.sleep(0.01)
            while len(seen) < len(store.events) - 1:  # noqa: ASYNC110 - the watcher task fills `seen`
                await asyncio.sleep(0.01)
        assert seen == [e.sequence for e in store.events[1:]]  # nothing skipped, nothing twice
        assert "c2" in {lease.client_id for lease in pool.status(include_clients=True).leases}  # it did commit
        watcher.cancel()
    finally:
        await pool.close()
