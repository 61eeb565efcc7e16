"""The allocation policy, as pure functions.

Every decision the pool takes is made here: where a client goes, whether a
lease can stay where it is, what a subscription's status, forecast and health
are, and what a rebalance moves. The functions take plain values (loads,
leases, the pool's spec and `now`) and return plain values. They do no I/O
and never read the clock, so the same inputs always give the same decision
(design invariant 6), and tests and the simulator can drive them directly.

Status machine
--------------
``DISABLED`` (after ``auth_failure_limit`` auth failures in a row, until an
operator resumes it) and ``DRAINING`` (an operator rotating its credential)
come first; otherwise ``EXHAUSTED`` at 100% of the weekly budget, ``LIMITED``
at the threshold or for ``cooldown_seconds`` after a rate-limited report, and
``ACTIVE`` below. Only ACTIVE subscriptions take new clients; EXHAUSTED and
DISABLED ones lose theirs at once, DRAINING ones as each client goes idle.

Forecast
--------
The spend rate is the spend of the last ``forecast_horizon_seconds`` (or of
the window so far, if shorter) per second; the projected end-of-window spend
is today's spend plus that rate until the window ends.

Health score
------------
From 0 to 100::

    budget      = 1 - min(1, spend / limit)              limit = threshold x weekly budget
    projected   = 1 - min(1, projected_spend / limit)
    capacity    = 1 - min(1, live_clients / max_clients)
    reliability = 1 - recent error rate                  rate-limit, auth and server errors
    health      = round(100 x (0.35 budget + 0.20 projected + 0.30 capacity + 0.15 reliability))

halved while cooling down, and 0 when exhausted or disabled. A fresh, idle
subscription scores 100; half its spendable budget used, on course to the
limit, half full and error-free scores 48, just under the guide's alert line
of 50; a pool whose subscriptions are a quarter used scores about 75, above
its target of 70.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from authpool_server.domain import (
    PPM,
    BudgetReset,
    DecisionKind,
    ExtraWindow,
    Lease,
    PoolSpec,
    SubscriptionSpec,
    SubscriptionStatus,
)

WEEK_SECONDS = 7 * 86_400
# 1970-01-01 was a Thursday; the first Monday 00:00 UTC was four days later.
_FIRST_MONDAY = 4 * 86_400
_MONDAY_UTC = BudgetReset()
_BUDGET_WEIGHT = 0.35
_PROJECTED_WEIGHT = 0.20
_CAPACITY_WEIGHT = 0.30
_RELIABILITY_WEIGHT = 0.15

__all__ = [
    "WEEK_SECONDS",
    "Forecast",
    "Placement",
    "PlannedMove",
    "RebalancePlan",
    "Refusal",
    "SubscriptionLoad",
    "cooling_down",
    "decide_allocation",
    "decide_renewal",
    "extra_window_bounds",
    "forecast",
    "health_score",
    "plan_rebalance",
    "subscription_status",
    "window_bounds",
]


@dataclass(frozen=True, slots=True)
class SubscriptionLoad:
    """A subscription's spec with what it carries and how it has been doing."""

    spec: SubscriptionSpec
    live_clients: int
    window_usage_micros: int
    window_start: float = 0.0
    window_end: float = 0.0
    # Spend within the forecast horizon (or the window so far, if shorter).
    recent_spend_micros: int = 0
    # Requests and failed ones (rate-limited, auth, server errors) in the error window.
    recent_requests: int = 0
    recent_errors: int = 0
    # When the provider last refused it for its rate limits; 0 if never.
    rate_limited_at: float = 0.0
    disabled: bool = False
    draining: bool = False
    # Spend in each of the spec's extra windows, in the same order, and when
    # each ends.
    extra_usage_micros: tuple[int, ...] = ()
    extra_window_ends: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Forecast:
    spend_rate_micros_per_hour: int
    projected_window_spend_micros: int
    # Seconds until the spend reaches the threshold at this rate; None if it never does.
    seconds_to_threshold: float | None


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


def window_bounds(now: float, reset: BudgetReset = _MONDAY_UTC) -> tuple[float, float]:
    """The weekly budget window holding `now`, as [start, end) in POSIX seconds.

    The default is Monday 00:00 UTC to the next; see `BudgetReset` for the
    others. Pure: the time zone rules come from the zone's data, not the clock.
    """
    if reset.anchor is not None:
        start = now - ((now - reset.anchor) % WEEK_SECONDS)
        return start, start + WEEK_SECONDS
    if reset == _MONDAY_UTC:
        start = now - ((now - _FIRST_MONDAY) % WEEK_SECONDS)  # the common case, without datetime
        return start, start + WEEK_SECONDS
    zone = _zone(reset.timezone)
    local = datetime.fromtimestamp(now, zone)
    start_local = (local - timedelta(days=(local.weekday() - reset.weekday) % 7)).replace(
        hour=reset.hour, minute=reset.minute, second=0, microsecond=0
    )
    if start_local > local:
        start_local -= timedelta(days=7)
    # Aware datetime arithmetic is wall-clock arithmetic: next week, same local time.
    return start_local.timestamp(), (start_local + timedelta(days=7)).timestamp()


def extra_window_bounds(now: float, window: ExtraWindow) -> tuple[float, float]:
    """The extra window holding `now`."""
    start = now - ((now - window.anchor) % window.length_seconds)
    return start, start + window.length_seconds


def _extra_status(load: SubscriptionLoad, threshold_ppm: int) -> SubscriptionStatus:
    """The tightest of the extra windows: a spent one serves nobody until it resets."""
    status = SubscriptionStatus.ACTIVE
    for window, spent in zip(load.spec.extra_windows, load.extra_usage_micros, strict=True):
        if spent >= window.budget_micros:
            return SubscriptionStatus.EXHAUSTED
        if spent >= window.budget_micros * threshold_ppm // PPM:
            status = SubscriptionStatus.LIMITED
    return status


@functools.cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def limit_micros(spec: SubscriptionSpec, threshold_ppm: int) -> int:
    """Spend at which a subscription stops taking new clients."""
    return spec.weekly_budget_micros * threshold_ppm // PPM


def cooling_down(load: SubscriptionLoad, pool: PoolSpec, now: float) -> bool:
    return load.rate_limited_at > 0 and now < load.rate_limited_at + pool.cooldown_seconds


def subscription_status(load: SubscriptionLoad, pool: PoolSpec, now: float) -> SubscriptionStatus:
    """Where the subscription stands; see "Status machine" in the module docstring."""
    if load.disabled:
        return SubscriptionStatus.DISABLED
    if load.draining:
        return SubscriptionStatus.DRAINING
    usage = load.window_usage_micros
    extra = _extra_status(load, pool.threshold_ppm) if load.extra_usage_micros else SubscriptionStatus.ACTIVE
    if usage >= load.spec.weekly_budget_micros or extra is SubscriptionStatus.EXHAUSTED:
        return SubscriptionStatus.EXHAUSTED
    if (
        usage >= limit_micros(load.spec, pool.threshold_ppm)
        or extra is SubscriptionStatus.LIMITED
        or cooling_down(load, pool, now)
    ):
        return SubscriptionStatus.LIMITED
    return SubscriptionStatus.ACTIVE


def _spend_rate(load: SubscriptionLoad, horizon_seconds: float, now: float) -> float:
    """Micro-units per second over the horizon (or the window so far, if shorter)."""
    observed = min(horizon_seconds, now - load.window_start)
    # Under a minute of window is too little to extrapolate from.
    return load.recent_spend_micros / observed if observed >= 60 else 0.0


def forecast(load: SubscriptionLoad, pool: PoolSpec, now: float) -> Forecast:
    """Spend rate and where it leads by the window's end; see "Forecast" above."""
    rate = _spend_rate(load, pool.forecast_horizon_seconds, now)
    projected = load.window_usage_micros + round(rate * max(0.0, load.window_end - now))
    to_limit = limit_micros(load.spec, pool.threshold_ppm) - load.window_usage_micros
    if to_limit <= 0:
        seconds_to_threshold: float | None = 0.0
    else:
        seconds_to_threshold = to_limit / rate if rate > 0 else None
    return Forecast(round(rate * 3600), projected, seconds_to_threshold)


def health_score(load: SubscriptionLoad, pool: PoolSpec, now: float) -> int:
    """Health from 0 to 100; the formula is in the module docstring."""
    if subscription_status(load, pool, now) in (SubscriptionStatus.EXHAUSTED, SubscriptionStatus.DISABLED):
        return 0
    limit = max(1, limit_micros(load.spec, pool.threshold_ppm))
    projected = forecast(load, pool, now).projected_window_spend_micros
    error_rate = load.recent_errors / load.recent_requests if load.recent_requests else 0.0
    score = 100 * (
        _BUDGET_WEIGHT * (1.0 - min(1.0, load.window_usage_micros / limit))
        + _PROJECTED_WEIGHT * (1.0 - min(1.0, projected / limit))
        + _CAPACITY_WEIGHT * (1.0 - min(1.0, load.live_clients / load.spec.max_clients))
        + _RELIABILITY_WEIGHT * (1.0 - error_rate)
    )
    if cooling_down(load, pool, now):
        score /= 2
    return round(score)


def _best_subscription(
    loads: Collection[SubscriptionLoad], pool: PoolSpec, wanted_type: str, now: float, exclude: str = ""
) -> SubscriptionLoad | None:
    """The active subscription with room that a new client should go to, if any.

    The one with the most projected headroom (what it may still spend before
    its limit, less what its current rate will spend by the window's end), so
    subscriptions reach the end of the window evenly; then the fewest clients;
    the id breaks the last tie, so the choice is deterministic. One pass: this
    runs on every new Allocate.
    """
    threshold, horizon, cooldown = pool.threshold_ppm, pool.forecast_horizon_seconds, pool.cooldown_seconds
    best: SubscriptionLoad | None = None
    # The key is (projected - limit, live clients, id), smallest first; its tail is
    # only built on a tie. Everything is inlined: this loop runs over every
    # subscription on every new Allocate (a thousand of them at scale).
    best_headroom = 0.0
    for load in loads:
        spec = load.spec
        clients = load.live_clients
        if clients >= spec.max_clients or spec.id == exclude:
            continue
        if wanted_type and spec.type != wanted_type:
            continue
        # subscription_status(...) is ACTIVE, spelled out.
        if load.disabled or load.draining or (load.rate_limited_at > 0 and now < load.rate_limited_at + cooldown):
            continue
        if load.extra_usage_micros and _extra_status(load, threshold) is not SubscriptionStatus.ACTIVE:
            continue
        usage = load.window_usage_micros
        limit = spec.weekly_budget_micros * threshold // PPM
        if usage >= limit:
            continue
        remaining = load.window_end - now
        recent = load.recent_spend_micros
        if remaining > 0 and recent:  # else the projection is today's spend (_spend_rate 0)
            observed = now - load.window_start  # _spend_rate(load, horizon, now), inlined
            if observed > horizon:
                observed = horizon
            headroom = usage + (recent / observed if observed >= 60 else 0.0) * remaining - limit
        else:
            headroom = usage - limit
        if best is not None and (
            headroom > best_headroom
            or (headroom == best_headroom and (clients, spec.id) >= (best.live_clients, best.spec.id))
        ):
            continue
        best, best_headroom = load, headroom
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
    best = _best_subscription(loads, pool, wanted_type, now, exclude=moving_from)
    if best is not None:
        kind = DecisionKind.FAILOVER if moving_from else DecisionKind.NEW
        return Placement(kind, best.spec.id, f"{why}; placed on {best.spec.id}, the most projected headroom")
    if pool.fallback_when_exhausted:
        return Placement(
            DecisionKind.FALLBACK,
            pool.fallback.id,
            f"{why}; every subscription{_of_type(wanted_type)} is limited, exhausted, full or out of "
            "service, so the pay-as-you-go fallback serves",
        )
    _, window_end = window_bounds(now)
    return Refusal(
        f"every subscription{_of_type(wanted_type)} is limited, exhausted, full or out of service "
        "and fallbackWhenExhausted is off",
        retry_after_seconds=max(1.0, min(window_end - now, pool.lease_ttl_seconds)),
    )


def _of_type(wanted_type: str) -> str:
    return f" of type {wanted_type!r}" if wanted_type else ""


def _can_keep(lease: Lease, loads: Collection[SubscriptionLoad], pool: PoolSpec, now: float) -> str:
    """Why the lease's subscription can no longer serve it, or "" when it can.

    Checks only what forces a move (spent, disabled, draining while idle, or
    gone), not the full status: this runs on every sticky Allocate and Renew.
    """
    for load in loads:
        if load.spec.id != lease.subscription_id:
            continue
        if load.disabled:
            return f"subscription {lease.subscription_id} is disabled after repeated auth failures"
        if load.window_usage_micros >= load.spec.weekly_budget_micros or (
            load.extra_usage_micros and _extra_status(load, pool.threshold_ppm) is SubscriptionStatus.EXHAUSTED
        ):
            return f"subscription {lease.subscription_id} has spent its budget"
        if load.draining and _idle(lease, pool, now):
            return f"subscription {lease.subscription_id} is draining for credential rotation"
        return ""
    return f"subscription {lease.subscription_id} is no longer in the pool"


@functools.lru_cache(maxsize=4096)
def _sticky(subscription_id: str) -> Placement:
    # Placements are immutable: one per subscription serves every sticky answer.
    return Placement(DecisionKind.STICKY, subscription_id, "the client's live lease")


def _idle(lease: Lease, pool: PoolSpec, now: float) -> bool:
    return now - lease.last_used_at >= pool.rebalancing.idle_seconds


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
        best = _best_subscription(loads, pool, current.wanted_type, now)
        if best is None:
            return Placement(DecisionKind.STICKY, current.subscription_id, "the pool is still spent or full")
        return Placement(
            DecisionKind.FAILOVER, best.spec.id, f"the pool has room again; back from the fallback to {best.spec.id}"
        )
    why = _can_keep(current, loads, pool, now)
    if not why:
        return _sticky(current.subscription_id)
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
    if all(load.recent_spend_micros == 0 for load in loads):
        # With nothing spent lately, moving idle clients changes no forecast.
        return RebalancePlan((), "load is low: nothing was spent within the forecast horizon")
    active = [load for load in loads if subscription_status(load, pool, now) is SubscriptionStatus.ACTIVE]
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
            and _idle(lease, pool, now)
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
