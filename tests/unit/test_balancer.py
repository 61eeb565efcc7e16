"""Pure tests of the allocation policy: plain values in, plain decisions out, `now` as a parameter."""

from __future__ import annotations

import ast
import datetime as dt
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authpool_server import balancer
from authpool_server.balancer import (
    WEEK_SECONDS,
    Placement,
    PlannedMove,
    Refusal,
    SubscriptionLoad,
    decide_allocation,
    decide_renewal,
    health_score,
    plan_rebalance,
    subscription_status,
    window_bounds,
)
from authpool_server.domain import (
    MICROS_PER_UNIT,
    DecisionKind,
    FallbackSpec,
    Lease,
    PoolSpec,
    RebalancePolicy,
    SubscriptionSpec,
    SubscriptionStatus,
)

U = MICROS_PER_UNIT
THRESHOLD = 850_000  # 85 %
MONDAY = 1_763_942_400.0  # 2025-11-24 00:00:00 UTC, a Monday
NOW = MONDAY + 2 * 86_400 + 3_600  # Wednesday 01:00 UTC, mid-window


# -- builders ------------------------------------------------------------------


def policy(threshold_ppm: int = THRESHOLD) -> PoolSpec:
    """A pool spec that only sets what status and health read."""
    return PoolSpec(subscriptions=(), threshold_ppm=threshold_ppm)


def sub(sid: str, *, type_: str = "claude-pro", budget: int = 100 * U, max_clients: int = 2) -> SubscriptionSpec:
    return SubscriptionSpec(
        id=sid,
        email=f"team+{sid}@company.com",
        type=type_,
        credential_ref=f"/creds/{sid}",
        weekly_budget_micros=budget,
        max_clients=max_clients,
    )


def load(
    sid: str,
    *,
    live: int = 0,
    usage: int = 0,
    type_: str = "claude-pro",
    budget: int = 100 * U,
    max_clients: int = 2,
) -> SubscriptionLoad:
    # All spend counts as recent; with no window end set, forecasts equal today's spend.
    return SubscriptionLoad(
        sub(sid, type_=type_, budget=budget, max_clients=max_clients), live, usage, recent_spend_micros=usage
    )


def pool_of(
    *loads: SubscriptionLoad,
    fallback: bool = True,
    ttl: float = 30.0,
    gap: int = 5 * U,
    max_moves: int = 3,
    idle: float = 60.0,
) -> PoolSpec:
    return PoolSpec(
        subscriptions=tuple(item.spec for item in loads),
        threshold_ppm=THRESHOLD,
        fallback_when_exhausted=fallback,
        fallback=FallbackSpec(id="payg", type="pay-as-you-go", credential_ref="env:PAYG_KEY"),
        rebalancing=RebalancePolicy(cost_gap_micros=gap, max_moves_per_cycle=max_moves, idle_seconds=idle),
        lease_ttl_seconds=ttl,
    )


def lease(
    lease_id: str,
    sid: str,
    *,
    client: str = "",
    fallback: bool = False,
    last_used_at: float = NOW - 600,
    wanted_type: str = "",
    token: int = 1,
) -> Lease:
    return Lease(
        lease_id=lease_id,
        client_id=client or f"client-{lease_id}",
        session_id="",
        subscription_id=sid,
        fallback=fallback,
        granted_at=last_used_at,
        expires_at=NOW + 30,
        fencing_token=token,
        acked_token=token,
        last_used_at=last_used_at,
        wanted_type=wanted_type,
    )


def placed(decision: Placement | Refusal) -> Placement:
    assert isinstance(decision, Placement), decision
    return decision


# -- purity --------------------------------------------------------------------


def _imported_modules(tree: ast.AST) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            modules.add(base)
            # `from authpool_server import store` imports the store module itself.
            modules.update(f"{base}.{alias.name}" for alias in node.names)
    return modules


_FORBIDDEN = ("grpc", "asyncio", "sqlite3", "time", "authpool_server.store", "authpool_server.pool")


def _forbidden_imports(source: str) -> list[str]:
    modules = _imported_modules(ast.parse(source))
    return sorted(
        module
        for module in modules
        if any(module == bad or module.startswith(bad + ".") for bad in _FORBIDDEN) or ".store" in module
    )


def test_balancer_imports_no_io_no_clock_and_no_store() -> None:
    source = Path(balancer.__file__).read_text(encoding="utf-8")
    assert _forbidden_imports(source) == [], "balancer.py must stay pure: no grpc, asyncio, sqlite3, time or store"
    # The parser really saw the imports (guards against a vacuous pass).
    assert "authpool_server.domain" in _imported_modules(ast.parse(source))


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "from time import monotonic",
        "import asyncio.tasks",
        "from grpc import aio",
        "import sqlite3 as db",
        "from authpool_server.store.base import Store",
        "from authpool_server import store",
        "from .store import memory",
        "def f():\n    import time",
    ],
)
def test_the_purity_check_catches_forbidden_imports(source: str) -> None:
    assert _forbidden_imports(source) != []


# -- window_bounds -------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        pytest.param(MONDAY, (MONDAY, MONDAY + WEEK_SECONDS), id="exactly-on-monday-midnight"),
        pytest.param(MONDAY - 0.001, (MONDAY - WEEK_SECONDS, MONDAY), id="a-millisecond-before"),
        pytest.param(MONDAY - 1e-6, (MONDAY - WEEK_SECONDS, MONDAY), id="a-microsecond-before"),
        pytest.param(MONDAY + 0.001, (MONDAY, MONDAY + WEEK_SECONDS), id="a-millisecond-after"),
        pytest.param(NOW, (MONDAY, MONDAY + WEEK_SECONDS), id="mid-week"),
        pytest.param(MONDAY + WEEK_SECONDS - 1, (MONDAY, MONDAY + WEEK_SECONDS), id="sunday-23-59-59"),
        pytest.param(MONDAY + WEEK_SECONDS, (MONDAY + WEEK_SECONDS, MONDAY + 2 * WEEK_SECONDS), id="next-monday"),
        pytest.param(4 * 86_400.0, (4 * 86_400.0, 11 * 86_400.0), id="first-monday-after-the-epoch"),
        pytest.param(0.0, (-3 * 86_400.0, 4 * 86_400.0), id="the-epoch-was-a-thursday"),
    ],
)
def test_window_bounds(now: float, expected: tuple[float, float]) -> None:
    assert window_bounds(now) == expected


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False))
def test_window_always_starts_on_a_monday_midnight_utc_and_holds_now(now: float) -> None:
    start, end = window_bounds(now)
    assert start <= now < end
    assert end - start == WEEK_SECONDS
    moment = dt.datetime.fromtimestamp(start, dt.UTC)
    assert (moment.weekday(), moment.hour, moment.minute, moment.second, moment.microsecond) == (0, 0, 0, 0, 0)


# -- subscription_status -------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (0, SubscriptionStatus.ACTIVE),
        (85 * U - 1, SubscriptionStatus.ACTIVE),
        (85 * U, SubscriptionStatus.LIMITED),  # exactly threshold x budget
        (100 * U - 1, SubscriptionStatus.LIMITED),
        (100 * U, SubscriptionStatus.EXHAUSTED),  # exactly the budget
        (150 * U, SubscriptionStatus.EXHAUSTED),
    ],
)
def test_subscription_status(usage: int, expected: SubscriptionStatus) -> None:
    assert subscription_status(load("s", usage=usage), policy(THRESHOLD), NOW) is expected


def test_status_depends_on_spend_not_on_clients() -> None:
    assert subscription_status(load("s", live=2, max_clients=2), policy(THRESHOLD), NOW) is SubscriptionStatus.ACTIVE


def test_status_threshold_is_per_pool() -> None:
    half_spent = load("s", usage=50 * U)
    assert subscription_status(half_spent, policy(500_000), NOW) is SubscriptionStatus.LIMITED
    assert subscription_status(half_spent, policy(500_001), NOW) is SubscriptionStatus.ACTIVE


# -- health_score --------------------------------------------------------------


@pytest.mark.parametrize(
    ("live", "usage", "expected"),
    [
        # No spend history, so projected spend is today's: health = 55 b + 30 c + 15.
        pytest.param(0, 0, 100, id="fresh-and-idle"),
        pytest.param(1, 85 * U // 2, 58, id="half-of-limit-spent-and-half-full"),
        pytest.param(1, 0, 85, id="half-full-nothing-spent"),
        pytest.param(2, 0, 70, id="full-nothing-spent"),
        pytest.param(0, 17 * U, 89, id="a-fifth-of-limit-spent"),
        pytest.param(0, 85 * U, 45, id="limited-and-idle-scores-at-most-45"),
        pytest.param(1, 90 * U, 30, id="limited-half-full"),
        pytest.param(2, 99 * U, 15, id="limited-and-full"),
        pytest.param(0, 100 * U, 0, id="exhausted"),
        pytest.param(0, 250 * U, 0, id="overspent"),
    ],
)
def test_health_score_examples(live: int, usage: int, expected: int) -> None:
    assert health_score(load("s", live=live, usage=usage), policy(THRESHOLD), NOW) == expected


def test_exhausted_scores_zero_even_when_idle() -> None:
    # Idle capacity must not make a spent subscription look healthy.
    assert health_score(load("s", live=0, usage=100 * U), policy(THRESHOLD), NOW) == 0


loads_strategy = st.builds(
    lambda max_clients, live, budget, usage: load(
        "s", max_clients=max_clients, live=min(live, max_clients + 2), budget=budget, usage=usage
    ),
    st.integers(1, 20),
    st.integers(0, 22),
    st.integers(U, 1_000 * U),  # budgets of at least one unit, as any real subscription has
    st.integers(0, 1_200 * U),
)


@settings(max_examples=300, deadline=None)
@given(loads_strategy, st.integers(1, 1_000_000))
def test_health_is_always_between_0_and_100_and_agrees_with_status(
    subject: SubscriptionLoad, threshold_ppm: int
) -> None:
    score = health_score(subject, policy(threshold_ppm), NOW)
    assert 0 <= score <= 100
    status = subscription_status(subject, policy(threshold_ppm), NOW)
    if status is SubscriptionStatus.EXHAUSTED:
        assert score == 0
    elif status is SubscriptionStatus.LIMITED:
        assert score <= 45


@settings(max_examples=200, deadline=None)
@given(loads_strategy, st.integers(0, 50 * U), st.integers(0, 3))
def test_health_never_rises_with_more_spend_or_more_clients(subject: SubscriptionLoad, extra: int, more: int) -> None:
    busier = replace(
        subject, window_usage_micros=subject.window_usage_micros + extra, live_clients=subject.live_clients + more
    )
    assert health_score(busier, policy(THRESHOLD), NOW) <= health_score(subject, policy(THRESHOLD), NOW)


# -- decide_allocation: new clients --------------------------------------------


def test_new_client_goes_to_the_healthiest_subscription_with_room() -> None:
    loads = [load("sub1", live=1), load("sub2", live=0), load("sub3", live=0, usage=10 * U)]
    decision = placed(decide_allocation(loads, pool_of(*loads), None, "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.NEW, "sub2")


def test_ties_are_broken_by_subscription_id_whatever_the_order() -> None:
    loads = [load("sub-b"), load("sub-c"), load("sub-a")]
    for ordering in (loads, loads[::-1], sorted(loads, key=lambda x: x.spec.id)):
        decision = placed(decide_allocation(ordering, pool_of(*ordering), None, "", NOW))
        assert decision.subscription_id == "sub-a"


def test_equal_health_prefers_more_budget_headroom_in_money() -> None:
    # Equal health (80 each); sub-b has twice the money left before it is limited, so it wins over the id.
    small = load("sub-a", budget=100 * U, usage=0, live=1)
    big = load("sub-b", budget=200 * U, usage=0, live=1)
    assert health_score(small, policy(THRESHOLD), NOW) == health_score(big, policy(THRESHOLD), NOW)
    decision = placed(decide_allocation([small, big], pool_of(small, big), None, "", NOW))
    assert decision.subscription_id == "sub-b"


def test_limited_subscriptions_take_no_new_clients() -> None:
    limited = load("sub1", usage=85 * U)  # idle, health 40
    worn = load("sub2", usage=80 * U, live=1)  # active but less healthy (24)
    assert health_score(limited, policy(THRESHOLD), NOW) > health_score(worn, policy(THRESHOLD), NOW)
    decision = placed(decide_allocation([limited, worn], pool_of(limited, worn), None, "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.NEW, "sub2")


def test_full_subscriptions_take_no_new_clients() -> None:
    full = load("sub1", live=2, max_clients=2)  # health 60
    spent = load("sub2", usage=60 * U)  # health 58
    assert health_score(full, policy(THRESHOLD), NOW) > health_score(spent, policy(THRESHOLD), NOW)
    decision = placed(decide_allocation([full, spent], pool_of(full, spent), None, "", NOW))
    assert decision.subscription_id == "sub2"


def test_exhausted_subscriptions_take_no_new_clients() -> None:
    loads = [load("sub1", usage=100 * U), load("sub2", usage=84 * U, live=1)]
    assert placed(decide_allocation(loads, pool_of(*loads), None, "", NOW)).subscription_id == "sub2"


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [("api-key", "sub2"), ("claude-pro", "sub1"), ("", "sub1")],
)
def test_wanted_type_filters_the_candidates(wanted: str, expected: str) -> None:
    loads = [load("sub1", type_="claude-pro"), load("sub2", type_="api-key", live=1, usage=50 * U)]
    assert placed(decide_allocation(loads, pool_of(*loads), None, wanted, NOW)).subscription_id == expected


def test_no_subscription_of_the_wanted_type_falls_back_and_says_so() -> None:
    loads = [load("sub1")]
    decision = placed(decide_allocation(loads, pool_of(*loads), None, "workspace", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.FALLBACK, "payg")
    assert "'workspace'" in decision.reason


@pytest.mark.parametrize(
    "loads",
    [
        pytest.param([load("sub1", live=2), load("sub2", live=2)], id="all-full"),
        pytest.param([load("sub1", usage=85 * U), load("sub2", usage=100 * U)], id="limited-and-exhausted"),
        pytest.param([load("sub1", usage=90 * U), load("sub2", live=2)], id="limited-and-full"),
        pytest.param([], id="no-subscriptions"),
    ],
)
def test_nothing_has_room_uses_the_fallback_when_enabled(loads: list[SubscriptionLoad]) -> None:
    decision = placed(decide_allocation(loads, pool_of(*loads, fallback=True), None, "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.FALLBACK, "payg")


@pytest.mark.parametrize(
    ("now", "ttl", "expected_retry"),
    [
        pytest.param(NOW, 30.0, 30.0, id="mid-week-retry-after-a-lease-ttl"),
        pytest.param(MONDAY + WEEK_SECONDS - 10, 30.0, 10.0, id="retry-when-the-window-rolls-if-sooner"),
        pytest.param(MONDAY + WEEK_SECONDS - 0.25, 30.0, 1.0, id="never-less-than-a-second"),
    ],
)
def test_nothing_has_room_is_refused_with_a_positive_retry_when_fallback_is_off(
    now: float, ttl: float, expected_retry: float
) -> None:
    loads = [load("sub1", live=2), load("sub2", usage=100 * U)]
    decision = decide_allocation(loads, pool_of(*loads, fallback=False, ttl=ttl), None, "", now)
    assert isinstance(decision, Refusal)
    assert decision.retry_after_seconds == pytest.approx(expected_retry)
    assert decision.retry_after_seconds > 0
    assert "fallbackWhenExhausted" in decision.reason


# -- decide_allocation: a client that holds a lease ------------------------------


@pytest.mark.parametrize(
    "own",
    [
        pytest.param(load("sub1", live=1), id="active"),
        pytest.param(load("sub1", live=1, usage=90 * U), id="limited"),
        pytest.param(load("sub1", live=2, max_clients=2), id="full-counting-itself"),
    ],
)
def test_a_live_lease_is_sticky_while_its_subscription_can_serve(own: SubscriptionLoad) -> None:
    fresh = load("sub2")  # healthier, but the client stays put
    loads = [own, fresh]
    decision = placed(decide_allocation(loads, pool_of(*loads), lease("L1", "sub1"), "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.STICKY, "sub1")


def test_a_fallback_lease_stays_while_the_pool_has_no_room() -> None:
    loads = [load("sub1", live=2, max_clients=2), load("sub2", usage=90 * U)]
    current = lease("L1", "payg", fallback=True)
    decision = placed(decide_allocation(loads, pool_of(*loads), current, "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.STICKY, "payg")


def test_a_fallback_lease_comes_back_to_the_pool_once_it_has_room() -> None:
    loads = [load("sub1")]
    current = lease("L1", "payg", fallback=True)
    decision = placed(decide_allocation(loads, pool_of(*loads), current, "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.FAILOVER, "sub1")


def test_lease_on_an_exhausted_subscription_fails_over_to_another() -> None:
    loads = [load("sub1", live=1, usage=100 * U), load("sub2", usage=50 * U), load("sub3", live=2)]
    decision = placed(decide_allocation(loads, pool_of(*loads), lease("L1", "sub1"), "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.FAILOVER, "sub2")
    assert "sub1" in decision.reason


def test_lease_on_a_subscription_removed_from_the_spec_fails_over() -> None:
    loads = [load("sub2"), load("sub3", live=1)]
    decision = placed(decide_allocation(loads, pool_of(*loads), lease("L1", "gone"), "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.FAILOVER, "sub2")
    assert "no longer in the pool" in decision.reason


def test_failover_honours_the_leases_wanted_type_not_the_requests() -> None:
    loads = [load("sub1", usage=100 * U, type_="api-key", live=1), load("sub2"), load("sub3", type_="api-key", live=1)]
    current = lease("L1", "sub1", wanted_type="api-key")
    assert placed(decide_allocation(loads, pool_of(*loads), current, "", NOW)).subscription_id == "sub3"


def test_failover_with_no_room_uses_the_fallback() -> None:
    loads = [load("sub1", live=1, usage=100 * U), load("sub2", live=2)]
    decision = placed(decide_allocation(loads, pool_of(*loads), lease("L1", "sub1"), "", NOW))
    assert (decision.kind, decision.subscription_id) == (DecisionKind.FALLBACK, "payg")


def test_failover_with_no_room_and_no_fallback_is_refused() -> None:
    loads = [load("sub1", live=1, usage=100 * U), load("sub2", live=2)]
    decision = decide_allocation(loads, pool_of(*loads, fallback=False), lease("L1", "sub1"), "", NOW)
    assert isinstance(decision, Refusal)
    assert decision.retry_after_seconds > 0


def test_renewal_decides_like_an_allocation_of_the_held_lease() -> None:
    loads = [load("sub1", live=1, usage=100 * U), load("sub2", type_="api-key"), load("sub3", live=1)]
    for current in (lease("L1", "sub1"), lease("L1", "sub1", wanted_type="api-key"), lease("L2", "sub3")):
        spec = pool_of(*loads)
        assert decide_renewal(loads, spec, current, NOW) == decide_allocation(
            loads, spec, current, current.wanted_type, NOW
        )


# -- plan_rebalance --------------------------------------------------------------


def test_no_moves_when_the_gap_is_within_the_threshold() -> None:
    loads = [load("sub1", live=1, usage=5 * U), load("sub2")]
    plan = plan_rebalance(loads, [lease("L1", "sub1")], pool_of(*loads), NOW)
    assert plan.moves == ()
    assert "within the threshold" in plan.reason


def test_a_gap_one_micro_over_the_threshold_moves_an_idle_client() -> None:
    loads = [load("sub1", live=1, usage=5 * U + 1), load("sub2")]
    plan = plan_rebalance(loads, [lease("L1", "sub1", client="c1")], pool_of(*loads), NOW)
    assert plan.moves == (PlannedMove("L1", "c1", "sub1", "sub2"),)


def test_only_idle_leases_move() -> None:
    loads = [load("sub1", live=3, max_clients=3, usage=20 * U), load("sub2", max_clients=3)]
    leases = [
        lease("just-idle", "sub1", last_used_at=NOW - 60),  # idle for exactly idle_seconds
        lease("busy", "sub1", last_used_at=NOW - 59.5),
        lease("busy-now", "sub1", last_used_at=NOW),
    ]
    plan = plan_rebalance(loads, leases, pool_of(*loads), NOW)
    assert [move.lease_id for move in plan.moves] == ["just-idle"]


def test_fallback_leases_never_move() -> None:
    loads = [load("sub1", live=0, usage=20 * U), load("sub2")]
    plan = plan_rebalance(loads, [lease("F1", "sub1", fallback=True)], pool_of(*loads), NOW)
    assert plan.moves == ()


@pytest.mark.parametrize("max_moves", [0, 1, 3])
def test_at_most_max_moves_per_cycle_and_no_lease_twice(max_moves: int) -> None:
    loads = [
        load("sub1", live=6, max_clients=6, usage=40 * U),
        load("sub2", max_clients=6),
        load("sub3", max_clients=6),
    ]
    leases = [lease(f"L{i}", "sub1", last_used_at=NOW - 100 - i) for i in range(6)]
    plan = plan_rebalance(loads, leases, pool_of(*loads, max_moves=max_moves), NOW)
    assert len(plan.moves) == max_moves
    assert len({move.lease_id for move in plan.moves}) == len(plan.moves)


def test_longest_idle_client_moves_first() -> None:
    loads = [load("sub1", live=3, max_clients=3, usage=20 * U), load("sub2", max_clients=3)]
    leases = [
        lease("recent", "sub1", last_used_at=NOW - 100),
        lease("oldest", "sub1", last_used_at=NOW - 900),
        lease("middle", "sub1", last_used_at=NOW - 500),
    ]
    plan = plan_rebalance(loads, leases, pool_of(*loads, max_moves=2), NOW)
    assert [move.lease_id for move in plan.moves] == ["oldest", "middle"]


def test_moves_go_from_the_most_spent_to_the_least_spent() -> None:
    loads = [
        load("sub1", live=1, usage=20 * U),
        load("sub2", live=1, usage=30 * U),
        load("sub3", live=0, usage=10 * U),
        load("sub4", live=0, usage=0),
    ]
    leases = [lease("on-sub1", "sub1"), lease("on-sub2", "sub2")]
    plan = plan_rebalance(loads, leases, pool_of(*loads, max_moves=1), NOW)
    assert plan.moves == (PlannedMove("on-sub2", "client-on-sub2", "sub2", "sub4"),)


def test_never_moves_to_a_full_subscription() -> None:
    loads = [load("sub1", live=2, usage=30 * U), load("sub2", live=1, max_clients=1), load("sub3", live=1, usage=U)]
    leases = [lease("L1", "sub1"), lease("L2", "sub1")]
    plan = plan_rebalance(loads, leases, pool_of(*loads), NOW)
    # sub2 is the cheapest but full; sub3 had one free slot, so exactly one move goes there.
    assert [(move.lease_id, move.to_subscription_id) for move in plan.moves] == [("L1", "sub3")]


def test_moves_fill_the_cheapest_then_the_next() -> None:
    loads = [
        load("sub1", live=3, max_clients=3, usage=30 * U),
        load("sub2", live=1, max_clients=2),
        load("sub3", live=0, max_clients=2, usage=U),
    ]
    leases = [lease(f"L{i}", "sub1", last_used_at=NOW - 1000 + i) for i in range(3)]
    plan = plan_rebalance(loads, leases, pool_of(*loads), NOW)
    assert [move.to_subscription_id for move in plan.moves] == ["sub2", "sub3", "sub3"]


def test_never_moves_to_a_limited_or_exhausted_subscription() -> None:
    loads = [
        load("sub1", live=1, usage=40 * U),
        load("small-limited", budget=10 * U, usage=9 * U),  # least spent in money, but limited
        load("small-exhausted", budget=5 * U, usage=5 * U),
        load("sub3", usage=20 * U),
    ]
    plan = plan_rebalance(loads, [lease("L1", "sub1")], pool_of(*loads), NOW)
    assert [move.to_subscription_id for move in plan.moves] == ["sub3"]


def test_stops_once_source_and_target_are_within_the_gap() -> None:
    loads = [
        load("sub1", live=2, max_clients=3, usage=20 * U),
        load("sub2", live=0, max_clients=3, usage=16 * U),
        load("sub3", live=0, max_clients=1, usage=0),
    ]
    leases = [lease("L1", "sub1", last_used_at=NOW - 900), lease("L2", "sub1", last_used_at=NOW - 800)]
    plan = plan_rebalance(loads, leases, pool_of(*loads), NOW)
    # After sub3 is full the next cheapest is sub2, only 4 units cheaper: not worth a move.
    assert [(move.lease_id, move.to_subscription_id) for move in plan.moves] == [("L1", "sub3")]


def test_fewer_than_two_active_subscriptions_plan_nothing() -> None:
    loads = [load("sub1", live=1, usage=90 * U), load("sub2", usage=0)]
    plan = plan_rebalance(loads, [lease("L1", "sub1")], pool_of(*loads), NOW)
    assert plan.moves == ()


def test_typed_lease_is_not_moved_to_a_subscription_of_another_type() -> None:
    loads = [load("sub1", live=1, usage=20 * U), load("sub2", type_="api-key")]
    plan = plan_rebalance(loads, [lease("L1", "sub1", wanted_type="claude-pro")], pool_of(*loads), NOW)
    assert plan.moves == ()


def test_typed_lease_moves_to_the_cheapest_subscription_of_its_type() -> None:
    # The cheapest subscription has another type: the lease must try the next
    # cheapest of its own type rather than drop out of the cycle.
    loads = [
        load("sub1", live=1, usage=20 * U),
        load("sub2", type_="api-key", usage=0),
        load("sub3", usage=10 * U),
    ]
    plan = plan_rebalance(loads, [lease("L1", "sub1", client="c1", wanted_type="claude-pro")], pool_of(*loads), NOW)
    assert plan.moves == (PlannedMove("L1", "c1", "sub1", "sub3"),)


def test_an_idle_lease_on_a_subscription_removed_from_the_spec_does_not_break_the_plan() -> None:
    # After a restart with a config that dropped a subscription its leases are
    # still live; the planner must leave them to failover, not raise KeyError.
    loads = [load("sub1", live=1, usage=20 * U), load("sub2")]
    leases = [lease("L1", "sub1", client="c1"), lease("orphan", "removed-sub", client="c2")]
    plan = plan_rebalance(loads, leases, pool_of(*loads), NOW)
    assert PlannedMove("L1", "c1", "sub1", "sub2") in plan.moves


# -- invariant 6: same inputs, same decision -------------------------------------


scenario = st.fixed_dictionaries(
    {
        "subs": st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 120), st.sampled_from(["claude-pro", "api-key"])),
            min_size=1,
            max_size=4,
        ),
        "idle": st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1_000)), max_size=6),
        "current": st.none() | st.integers(0, 4),
        "wanted": st.sampled_from(["", "claude-pro", "api-key"]),
        "fallback": st.booleans(),
        "seed": st.integers(0, 2**32),
    }
)


@settings(max_examples=200, deadline=None)
@given(scenario)
def test_decisions_depend_on_the_inputs_only_not_their_order(case: dict) -> None:
    loads = [
        load(f"sub{i}", live=live, max_clients=3, usage=units * U, type_=type_)
        for i, (live, units, type_) in enumerate(case["subs"])
    ]
    spec = pool_of(*loads, fallback=case["fallback"])
    ids = [item.spec.id for item in loads]
    leases = [
        lease(f"L{n}", ids[i % len(ids)], last_used_at=NOW - idle_for) for n, (i, idle_for) in enumerate(case["idle"])
    ]
    current = None if case["current"] is None else lease("C", f"sub{case['current']}")

    first = decide_allocation(loads, spec, current, case["wanted"], NOW)
    plan = plan_rebalance(loads, leases, spec, NOW)

    shuffler = random.Random(case["seed"])
    shuffled_loads, shuffled_leases = loads[:], leases[:]
    shuffler.shuffle(shuffled_loads)
    shuffler.shuffle(shuffled_leases)
    assert decide_allocation(loads, spec, current, case["wanted"], NOW) == first
    assert decide_allocation(shuffled_loads, spec, current, case["wanted"], NOW) == first
    assert plan_rebalance(shuffled_loads, shuffled_leases, spec, NOW) == plan
    assert plan_rebalance(loads, iter(leases), spec, NOW) == plan

    # Whatever was decided respects the limits.
    if isinstance(first, Placement) and first.kind in (DecisionKind.NEW, DecisionKind.FAILOVER):
        chosen = next(item for item in loads if item.spec.id == first.subscription_id)
        assert chosen.live_clients < chosen.spec.max_clients
        assert subscription_status(chosen, policy(THRESHOLD), NOW) is SubscriptionStatus.ACTIVE
    by_id = {item.spec.id: item for item in loads}
    for move in plan.moves:
        assert subscription_status(by_id[move.to_subscription_id], policy(THRESHOLD), NOW) is SubscriptionStatus.ACTIVE
    targets = [move.to_subscription_id for move in plan.moves]
    for sid in set(targets):
        assert by_id[sid].live_clients + targets.count(sid) <= by_id[sid].spec.max_clients


def test_rebalancing_skips_when_nothing_was_spent_lately() -> None:
    loads = [replace(load("sub1", live=1, usage=20 * U), recent_spend_micros=0), load("sub2")]
    plan = plan_rebalance(loads, [lease("L1", "sub1", client="c1")], pool_of(*loads), NOW)
    assert plan.moves == ()
    assert "load is low" in plan.reason


# -- cooldowns and forecasts, with the clock as a parameter ---------------------


def test_a_cooldown_limits_until_it_runs_out() -> None:
    spec = policy()
    cooling = replace(load("s"), rate_limited_at=NOW)
    assert subscription_status(cooling, spec, NOW + spec.cooldown_seconds - 1) is SubscriptionStatus.LIMITED
    assert subscription_status(cooling, spec, NOW + spec.cooldown_seconds) is SubscriptionStatus.ACTIVE
    assert health_score(cooling, spec, NOW + 1) == health_score(load("s"), spec, NOW) // 2


def test_a_forecast_extrapolates_the_recent_rate_to_the_window_end() -> None:
    start = window_bounds(NOW)[0]
    spent = replace(
        load("s", usage=12 * U), recent_spend_micros=6 * U, window_start=start, window_end=start + WEEK_SECONDS
    )
    result = balancer.forecast(spent, policy(), NOW)  # 6 units in the 6 h horizon: 1 unit an hour
    assert result.spend_rate_micros_per_hour == U
    hours_left = (start + WEEK_SECONDS - NOW) / 3600
    assert result.projected_window_spend_micros == round(12 * U + hours_left * U)
    assert result.seconds_to_threshold == pytest.approx((85 - 12) * 3600)
    idle = replace(spent, recent_spend_micros=0)
    assert balancer.forecast(idle, policy(), NOW).seconds_to_threshold is None


def test_new_clients_go_where_projected_headroom_is_largest() -> None:
    start = window_bounds(NOW)[0]
    window = {"window_start": start, "window_end": start + WEEK_SECONDS}
    # Same spend so far, but sub1 spends fast: by the end of the week it will have far less left.
    fast = replace(load("sub1", usage=10 * U), recent_spend_micros=5 * U, **window)
    slow = replace(load("sub2", usage=10 * U), recent_spend_micros=0, **window)
    decision = placed(decide_allocation([fast, slow], pool_of(fast, slow), None, "", NOW))
    assert decision.subscription_id == "sub2"
