"""The allocation policy, as pure functions.

Every decision the pool takes is made here: where a client goes, whether a
lease can stay where it is, what a subscription's status and health are, and
what a rebalance moves. The functions take plain values (loads, leases, the
pool's spec and `now`) and return plain values. They do no I/O and never
read the clock, so the same inputs always give the same decision (design
invariant 6), and tests and the simulator can drive them directly.

Health score
------------
A subscription's health runs from 0 to 100::

    budget_headroom   = 1 - min(1, window_usage / (threshold x weekly_budget))
    capacity_headroom = 1 - min(1, live_clients / max_clients)
    health            = round(100 x (0.6 x budget_headroom + 0.4 x capacity_headroom))

and is 0 once the subscription is exhausted. A fresh, idle subscription
scores 100; one that has spent half of what it may spend before it is limited
and is half full scores 50, the guide's alert line; a limited subscription
scores at most 40. The average over the pool therefore stays above the
guide's target of 70 while the pool has real room left.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from authpool_server.domain import (
    PPM,
    DecisionKind,
    Lease,
    PoolSpec,
    SubscriptionSpec,
    SubscriptionStatus,
)

WEEK_SECONDS = 7 * 86_400
# 1970-01-01 was a Thursday; the first Monday 00:00 UTC was four days later.
_FIRST_MONDAY = 4 * 86_400
_BUDGET_WEIGHT = 0.6
_CAPACITY_WEIGHT = 0.4

__all__ = [
    "WEEK_SECONDS",
    "Placement",
    "PlannedMove",
    "RebalancePlan",
    "Refusal",
    "SubscriptionLoad",
    "decide_allocation",
    "decide_renewal",
    "health_score",
    "plan_rebalance",
    "subscription_status",
    "window_bounds",
]


@dataclass(frozen=True, slots=True)
class SubscriptionLoad:
    """A subscription's spec with what it carries right now."""

    spec: SubscriptionSpec
    live_clients: int
    window_usage_micros: int


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a client's lease goes. `subscription_id` is the fallback's id for FALLBACK."""

    kind: DecisionKind
    subscription_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """No subscription can serve the client and fallback is off."""

    reason: str
    retry_after_seconds: float


@dataclass(frozen=True, slots=True)
class PlannedMove:
    lease_id: str
    client_id: str
    from_subscription_id: str
    to_subscription_id: str


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    moves: tuple[PlannedMove, ...]
    reason: str


def window_bounds(now: float) -> tuple[float, float]:
    """The weekly budget window holding `now`: Monday 00:00 UTC to the next."""
    start = now - ((now - _FIRST_MONDAY) % WEEK_SECONDS)
    return start, start + WEEK_SECONDS


def limit_micros(spec: SubscriptionSpec, threshold_ppm: int) -> int:
    """Spend at which a subscription stops taking new clients."""
    return spec.weekly_budget_micros * threshold_ppm // PPM


def subscription_status(load: SubscriptionLoad, threshold_ppm: int) -> SubscriptionStatus:
    usage = load.window_usage_micros
    if usage >= load.spec.weekly_budget_micros:
        return SubscriptionStatus.EXHAUSTED
    if usage >= limit_micros(load.spec, threshold_ppm):
        return SubscriptionStatus.LIMITED
    return SubscriptionStatus.ACTIVE


def health_score(load: SubscriptionLoad, threshold_ppm: int) -> int:
    """Health from 0 to 100; the formula is in the module docstring."""
    return _health(load, limit_micros(load.spec, threshold_ppm))


def _health(load: SubscriptionLoad, limit: int) -> int:
    spec = load.spec
    usage = load.window_usage_micros
    if usage >= spec.weekly_budget_micros:
        return 0
    budget_headroom = 1.0 - min(1.0, usage / max(1, limit))
    capacity_headroom = 1.0 - min(1.0, load.live_clients / spec.max_clients)
    return round(100 * (_BUDGET_WEIGHT * budget_headroom + _CAPACITY_WEIGHT * capacity_headroom))


def _best_subscription(
    loads: Collection[SubscriptionLoad], pool: PoolSpec, wanted_type: str, exclude: str = ""
) -> SubscriptionLoad | None:
    """The active subscription with room that a new client should go to, if any.

    Most health first, then the most budget headroom in money, then the fewest
    clients; the id breaks the last tie, so the choice is deterministic. One
    pass, no allocation: this runs on every new Allocate.
    """
    threshold = pool.threshold_ppm
    best: SubscriptionLoad | None = None
    best_key: tuple[int, int, int, str] | None = None
    for load in loads:
        spec = load.spec
        if spec.id == exclude or load.live_clients >= spec.max_clients:
            continue
        if wanted_type and spec.type != wanted_type:
            continue
        limit = spec.weekly_budget_micros * threshold // PPM
        headroom = limit - load.window_usage_micros
        if headroom <= 0:  # limited or exhausted: no new clients
            continue
        # _health(load, limit), inlined: this loop is the hot path of a new Allocate.
        health = round(
            100
            * (
                _BUDGET_WEIGHT * (headroom / max(1, limit))
                + _CAPACITY_WEIGHT * (1.0 - load.live_clients / spec.max_clients)
            )
        )
        key = (-health, -headroom, load.live_clients, spec.id)
        if best_key is None or key < best_key:
            best, best_key = load, key
    return best


def _elsewhere(
    loads: Collection[SubscriptionLoad],
    pool: PoolSpec,
    wanted_type: str,
    now: float,
    *,
    moving_from: str,
    why: str,
) -> Placement | Refusal:
    """Place a client that needs a (new) subscription: the pool, else the fallback."""
    best = _best_subscription(loads, pool, wanted_type, exclude=moving_from)
    if best is not None:
        kind = DecisionKind.FAILOVER if moving_from else DecisionKind.NEW
        return Placement(kind, best.spec.id, f"{why}; placed on {best.spec.id}, the healthiest with room")
    if pool.fallback_when_exhausted:
        return Placement(
            DecisionKind.FALLBACK,
            pool.fallback.id,
            f"{why}; every subscription{_of_type(wanted_type)} is limited, exhausted or full, "
            "so the pay-as-you-go fallback serves",
        )
    _, window_end = window_bounds(now)
    return Refusal(
        f"every subscription{_of_type(wanted_type)} is limited, exhausted or full and fallbackWhenExhausted is off",
        retry_after_seconds=max(1.0, min(window_end - now, pool.lease_ttl_seconds)),
    )


def _of_type(wanted_type: str) -> str:
    return f" of type {wanted_type!r}" if wanted_type else ""


def _can_keep(lease: Lease, loads: Collection[SubscriptionLoad], pool: PoolSpec) -> str:
    """Why the lease's subscription can no longer serve it, or "" when it can."""
    for load in loads:
        if load.spec.id == lease.subscription_id:
            if subscription_status(load, pool.threshold_ppm) is SubscriptionStatus.EXHAUSTED:
                return f"subscription {lease.subscription_id} has spent its weekly budget"
            return ""
    return f"subscription {lease.subscription_id} is no longer in the pool"


def decide_allocation(
    loads: Collection[SubscriptionLoad],
    pool: PoolSpec,
    current: Lease | None,
    wanted_type: str,
    now: float,
) -> Placement | Refusal:
    """Decide an Allocate for a client holding `current` (its live lease, or None)."""
    if current is None:
        return _elsewhere(loads, pool, wanted_type, now, moving_from="", why="new client")
    if current.fallback:
        # Fallback is pay-as-you-go: come back to the pool as soon as it has room.
        best = _best_subscription(loads, pool, current.wanted_type)
        if best is None:
            return Placement(DecisionKind.STICKY, current.subscription_id, "the pool is still spent or full")
        return Placement(
            DecisionKind.FAILOVER, best.spec.id, f"the pool has room again; back from the fallback to {best.spec.id}"
        )
    why = _can_keep(current, loads, pool)
    if not why:
        return Placement(DecisionKind.STICKY, current.subscription_id, "the client's live lease")
    return _elsewhere(loads, pool, current.wanted_type, now, moving_from=current.subscription_id, why=why)


def decide_renewal(
    loads: Collection[SubscriptionLoad], pool: PoolSpec, lease: Lease, now: float
) -> Placement | Refusal:
    """Decide whether a renewed lease stays (STICKY) or must move."""
    return decide_allocation(loads, pool, lease, lease.wanted_type, now)


def plan_rebalance(
    loads: Collection[SubscriptionLoad],
    leases: Iterable[Lease],
    pool: PoolSpec,
    now: float,
) -> RebalancePlan:
    """Plan the idle clients to move from the most to the least spent subscriptions.

    Runs only when the spend gap between the most and the least spent active
    subscriptions exceeds the configured cost gap. Each move takes the
    longest-idle client off the most spent subscription that has one and puts
    it on the least spent active subscription with room; no client moves twice.
    """
    policy = pool.rebalancing
    threshold = pool.threshold_ppm
    active = [load for load in loads if subscription_status(load, threshold) is SubscriptionStatus.ACTIVE]
    if len(active) < 2:
        return RebalancePlan((), "fewer than two active subscriptions; nothing to balance")
    usage = {load.spec.id: load.window_usage_micros for load in loads}
    gap = max(usage[load.spec.id] for load in active) - min(usage[load.spec.id] for load in active)
    if gap <= policy.cost_gap_micros:
        return RebalancePlan((), f"cost gap {gap} micros is within the threshold {policy.cost_gap_micros}")

    in_pool = {load.spec.id: load for load in loads}
    idle: dict[str, list[Lease]] = {}
    for lease in leases:
        # A lease on a subscription no longer in the pool is failover's business.
        if (
            not lease.fallback
            and lease.subscription_id in in_pool
            and lease.expires_at > now
            and now - lease.last_used_at >= policy.idle_seconds
        ):
            idle.setdefault(lease.subscription_id, []).append(lease)
    for candidates in idle.values():
        candidates.sort(key=lambda lease: (lease.last_used_at, lease.lease_id))  # longest idle first

    live = {load.spec.id: load.live_clients for load in loads}

    def cheapest_target(lease: Lease) -> str | None:
        targets = [
            load.spec.id
            for load in active
            if load.spec.id != lease.subscription_id
            and live[load.spec.id] < load.spec.max_clients
            and (not lease.wanted_type or load.spec.type == lease.wanted_type)
        ]
        return min(targets, key=lambda sid: (usage[sid], sid), default=None)

    def next_move() -> PlannedMove | None:
        for source in sorted(idle, key=lambda sid: (-usage[sid], sid)):
            for lease in idle[source]:
                target = cheapest_target(lease)
                if target is not None and usage[source] - usage[target] > policy.cost_gap_micros:
                    idle[source].remove(lease)
                    return PlannedMove(lease.lease_id, lease.client_id, source, target)
        return None

    moves: list[PlannedMove] = []
    while len(moves) < policy.max_moves_per_cycle and (move := next_move()) is not None:
        moves.append(move)
        live[move.from_subscription_id] -= 1
        live[move.to_subscription_id] += 1
    if not moves:
        return RebalancePlan((), f"cost gap {gap} micros, but no idle client can move to a cheaper subscription")
    return RebalancePlan(tuple(moves), f"cost gap {gap} micros exceeds {policy.cost_gap_micros}")
