"""Replaying a trace through a placement policy, with a simulated clock.

The replay calls the real policy: `decide_allocation` when a client arrives,
`decide_renewal` before each of its requests (so a client whose subscription
is exhausted fails over before the request is charged, as a Renew would move
it), and `plan_rebalance` every ``rebalancing.intervalSeconds`` of simulated
time. It applies each decision the way `pool.Pool` does (sticky leases,
failover, fallback and back, moves with a new fencing token) to state of its
own, with no asyncio, store or gRPC, so one replay of a week takes seconds.

State kept, as `SubscriptionLedger` keeps it for the server: per subscription
the live clients, the spend in its budget window and in each extra window,
the spend within the forecast horizon, the requests and errors within the
error window, when it was last rate-limited and its run of auth failures.
(What a provider reports about its own account, with a usage report, is not
in traces, so the ledger's provider figures and learned reset times do not
arise.) `_initial_load` and the lines marked "ledger" in `_Replay` are the
whole state-to-`SubscriptionLoad` conversion; when the policy reads a new
field, keep it there. `test_simulator.py` checks, decision by decision, that
the loads handed to the balancer equal what the server's ledger would hand it.

Speed: the replay owns one `SubscriptionLoad` per subscription and one `Lease`
per client and updates their fields in place (through the slots' own setters)
instead of building a new frozen value on every change. Building a 13-field
frozen dataclass costs about as much as the decision itself here, and every
request changes one load and lets older spend fall out of another's window;
the balancer is pure and keeps no reference to its inputs beyond a call, so
no decision can see a value change under it.

Baselines (round-robin, least-clients, random) differ from ours only in
*which* subscription a client is placed on. Every decision still comes from the
balancer, so whether a client stays, fails over, falls back or comes back
follows the same rules and limits; when the balancer places a client on a
subscription (a new client, a failover, a return from the fallback), the
baseline swaps in its own pick among the subscriptions the policy would allow
(active, with room, of the wanted type). Baselines do not rebalance.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from authpool_server.balancer import (
    Placement,
    Refusal,
    SubscriptionLoad,
    decide_allocation,
    decide_renewal,
    extra_window_bounds,
    plan_rebalance,
    subscription_status,
    window_bounds,
)
from authpool_server.domain import (
    PPM,
    DecisionKind,
    Lease,
    Outcome,
    PoolSpec,
    SubscriptionSpec,
    SubscriptionStatus,
)
from authpool_server.simulator.trace import ARRIVE, REQUEST, Trace

__all__ = [
    "BASELINES",
    "OURS",
    "POLICIES",
    "RunResult",
    "Series",
    "capacity_micros",
    "lower_bound_micros",
    "simulate",
]

OURS = "ours"
BASELINES = ("round-robin", "least-clients", "random")
POLICIES = (OURS, *BASELINES)
DEFAULT_SAMPLE_SECONDS = 900.0

_set = object.__setattr__  # see "Speed" in the module docstring


def _setter(cls: type, name: str) -> Callable[[object, object], None]:
    """A fast setter for one field of a frozen dataclass (its slot's own, when it has slots)."""
    slot = cls.__dict__.get(name)
    if slot is not None and hasattr(slot, "__set__") and not isinstance(slot, property):
        return slot.__set__  # type: ignore[no-any-return]
    return lambda obj, value: _set(obj, name, value)


_SET_USAGE = _setter(SubscriptionLoad, "window_usage_micros")
_SET_SPEND = _setter(SubscriptionLoad, "recent_spend_micros")
_SET_REQUESTS = _setter(SubscriptionLoad, "recent_requests")
_SET_ERRORS = _setter(SubscriptionLoad, "recent_errors")
_SET_LAST_USED = _setter(Lease, "last_used_at")
_ERRORS = frozenset({Outcome.RATE_LIMITED, Outcome.AUTH_FAILED, Outcome.SERVER_ERROR})
_STICKY = DecisionKind.STICKY
_FALLBACK = DecisionKind.FALLBACK
_ACTIVE = SubscriptionStatus.ACTIVE
_HASH_MULTIPLIER = 2_654_435_761  # Knuth's: spreads consecutive event numbers over 32 bits


def capacity_micros(pool: PoolSpec) -> int:
    """What the pool may spend in a window before every subscription is limited: Σ threshold x budget."""
    return sum(spec.weekly_budget_micros * pool.threshold_ppm // PPM for spec in pool.subscriptions)


def lower_bound_micros(demand_micros: int, capacity: int) -> int:
    """The fluid lower bound on fallback spend: max(0, demand - Σ threshold x budget)."""
    return max(0, demand_micros - capacity)


@dataclass(frozen=True, slots=True)
class Series:
    """Samples over simulated time, for the plot: each subscription's window spend and the fallback's."""

    subscription_ids: tuple[str, ...]
    t: list[float] = field(default_factory=list)  # seconds since the trace's start
    usage: list[tuple[int, ...]] = field(default_factory=list)
    fallback: list[int] = field(default_factory=list)  # cumulative


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one policy did with one trace. Money in micro-units."""

    trace: str
    policy: str
    requests: int
    demand_micros: int
    capacity_micros: int
    budget_micros: int  # Σ weekly budget, over the windows the trace touches
    lower_bound_micros: int
    pool_spend_micros: int
    fallback_micros: int
    # Spend charged to a subscription by requests that began when it had already spent its budget.
    overrun_micros: int
    # How far the last request before exhaustion carried each subscription past its budget, summed.
    overshoot_micros: int
    # Most minus least spent subscription at the end of the window (the worst window, if several).
    cost_gap_micros: int
    cost_gap_threshold_micros: int
    # Subscriptions that ended a window at or past their threshold (LIMITED or EXHAUSTED by spend).
    limited_at_end: int
    subscriptions: int
    clients_moved: int  # by rebalancing
    failovers: int  # moved off a subscription that could no longer serve them
    returns: int  # back from the fallback to the pool
    served: int  # requests served by a subscription or the fallback
    on_fallback: int  # requests served by the fallback
    rate_limited: int
    arrivals: int
    decisions: int  # calls of decide_allocation, decide_renewal and plan_rebalance
    seconds: float  # wall-clock time of the replay loop
    cpu_seconds: float  # CPU time of the replay loop: steadier than wall-clock on a busy machine
    final_usage: tuple[tuple[str, int], ...]
    series: Series

    @property
    def success_rate(self) -> float:
        return self.served / self.requests if self.requests else 1.0

    @property
    def fallback_ratio(self) -> float | None:
        """Fallback spend over the lower bound; None when the bound is 0."""
        return self.fallback_micros / self.lower_bound_micros if self.lower_bound_micros else None

    @property
    def decisions_per_second(self) -> float:
        return self.decisions / self.seconds if self.seconds > 0 else math.nan

    def figures(self) -> dict[str, object]:
        """Every figure as plain JSON values (the series is left out)."""
        return {
            "trace": self.trace,
            "policy": self.policy,
            "requests": self.requests,
            "demand_micros": self.demand_micros,
            "capacity_micros": self.capacity_micros,
            "budget_micros": self.budget_micros,
            "lower_bound_micros": self.lower_bound_micros,
            "pool_spend_micros": self.pool_spend_micros,
            "fallback_micros": self.fallback_micros,
            "fallback_over_lower_bound": self.fallback_ratio,
            "overrun_micros": self.overrun_micros,
            "overshoot_micros": self.overshoot_micros,
            "cost_gap_micros": self.cost_gap_micros,
            "cost_gap_threshold_micros": self.cost_gap_threshold_micros,
            "limited_at_end": self.limited_at_end,
            "clients_moved": self.clients_moved,
            "failovers": self.failovers,
            "returns": self.returns,
            "served": self.served,
            "on_fallback": self.on_fallback,
            "success_rate": self.success_rate,
            "rate_limited": self.rate_limited,
            "arrivals": self.arrivals,
            "decisions": self.decisions,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "decisions_per_second": self.decisions_per_second,
            "final_usage_micros": dict(self.final_usage),
        }


# -- placement for the baselines ---------------------------------------------------------

Chooser = Callable[[list[int], Sequence[SubscriptionLoad]], int]


def _round_robin() -> Chooser:
    cursor = 0

    def choose(eligible: list[int], loads: Sequence[SubscriptionLoad]) -> int:
        nonlocal cursor
        n = len(loads)
        pick = min(eligible, key=lambda i: (i - cursor) % n)  # the next one at or after the cursor
        cursor = (pick + 1) % n
        return pick

    return choose


def _least_clients() -> Chooser:
    def choose(eligible: list[int], loads: Sequence[SubscriptionLoad]) -> int:
        return min(eligible, key=lambda i: (loads[i].live_clients, i))

    return choose


def _random(seed: int) -> Chooser:
    rng = random.Random(seed)  # noqa: S311 - placement, not security; a fixed seed repeats the run

    def choose(eligible: list[int], loads: Sequence[SubscriptionLoad]) -> int:
        return rng.choice(eligible)

    return choose


def _chooser(policy: str, seed: int) -> Chooser | None:
    if policy == OURS:
        return None
    if policy == "round-robin":
        return _round_robin()
    if policy == "least-clients":
        return _least_clients()
    if policy == "random":
        return _random(seed)
    raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")


# -- the replay -------------------------------------------------------------------------------


def _initial_load(
    spec: SubscriptionSpec, window: tuple[float, float], extra_ends: tuple[float, ...]
) -> SubscriptionLoad:
    """A subscription with nothing on it yet; the replay then keeps its fields current."""
    return SubscriptionLoad(
        spec=spec,
        live_clients=0,
        window_usage_micros=0,
        window_start=window[0],
        window_end=window[1],
        recent_spend_micros=0,
        recent_requests=0,
        recent_errors=0,
        rate_limited_at=0.0,
        disabled=False,
        draining=False,
        extra_usage_micros=(0,) * len(extra_ends),
        extra_window_ends=extra_ends,
    )


def simulate(
    trace: Trace, policy: str = OURS, *, seed: int = 1, sample_seconds: float = DEFAULT_SAMPLE_SECONDS
) -> RunResult:
    """Replay `trace` under `policy` (one of `POLICIES`) and measure what happened."""
    return _Replay(trace, policy, seed, sample_seconds).run()


class _Replay:
    """One replay's state. The hot loop is `run`; rarer steps are methods."""

    def __init__(self, trace: Trace, policy: str, seed: int, sample_seconds: float) -> None:
        self.trace = trace
        self.policy = policy
        self.choose = _chooser(policy, seed)
        pool = self.pool = trace.pool
        # Each subscription's extra windows (shorter limits): where each stands and what was spent in it.
        self.extra_windows = [
            [extra_window_bounds(trace.start, window) for window in spec.extra_windows] for spec in pool.subscriptions
        ]
        self.extra_usage = [[0] * len(spec.extra_windows) for spec in pool.subscriptions]
        self.loads = [
            _initial_load(spec, window_bounds(trace.start, spec.reset), tuple(end for _, end in extra))
            for spec, extra in zip(pool.subscriptions, self.extra_windows, strict=True)
        ]
        self.index = {spec.id: i for i, spec in enumerate(pool.subscriptions)}
        self.budgets = [spec.weekly_budget_micros for spec in pool.subscriptions]
        self.leases: list[Lease | None] = [None] * len(trace.clients)
        self.wanted = [""] * len(trace.clients)  # the subscription type each client asked for
        self.live: dict[str, int] = {}  # lease id -> client
        self.live_leases: dict[int, Lease] = {}  # client -> its lease
        self.token = 0
        # A present client renews its lease in the background, so it never expires while the
        # client is there: every lease expires a TTL after the trace ends.
        self.expires_at = trace.start + trace.duration + pool.lease_ttl_seconds
        self.grants = 0
        self.auth_streak = [0] * len(self.loads)
        # Every request charged to a subscription, (time, subscription, cost, failed), in time
        # order; `spent_from` and `counted_from` are the first entries still within the
        # forecast horizon and the error window, so forgetting is moving a cursor.
        self.log: list[tuple[float, int, int, bool]] = []
        self.spent_from = self.counted_from = 0
        self.decisions = 0
        self.overrun = 0
        self.fallback_spend = 0
        self.on_fallback = 0
        self.served = 0
        self.rate_limited = 0
        self.failovers = 0
        self.returns = 0
        self.moved = 0
        self.arrivals = 0
        self.sample_seconds = sample_seconds
        self.series = Series(tuple(spec.id for spec in pool.subscriptions))
        # Each subscription's finished windows: (start, spend), for spend and overshoot.
        self.closed: list[list[tuple[float, int]]] = [[] for _ in self.loads]
        # Incidents by subscription: (start, end, 32-bit share, outcome) in POSIX seconds.
        self.incidents: list[list[tuple[float, float, int, Outcome]]] = [[] for _ in self.loads]
        for incident in trace.incidents:
            self.incidents[self.index[incident.subscription_id]].append(
                (
                    trace.start + incident.start,
                    trace.start + incident.end,
                    round(incident.share * 2**32),
                    incident.outcome,
                )
            )

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> RunResult:
        trace, pool, loads, leases = self.trace, self.pool, self.loads, self.leases
        start = trace.start
        budgets, index, incidents, auth_streak = self.budgets, self.index, self.incidents, self.auth_streak
        # Subscriptions with extra windows or incidents take the slower path when charged.
        special = [bool(e or i) for e, i in zip(self.extra_windows, incidents, strict=True)]
        log = self.log
        append = log.append
        logged, spent_from, counted_from = len(log), self.spent_from, self.counted_from
        horizon = pool.forecast_horizon_seconds
        error_window = pool.error_window_seconds
        errors = _ERRORS
        ok = Outcome.OK
        rebalancing = self.choose is None and pool.rebalancing.enabled
        interval = pool.rebalancing.interval_seconds
        next_rebalance = start + interval if rebalancing else math.inf
        next_sample = start
        next_roll = self._next_roll()
        timers = min(next_rebalance, next_sample, next_roll)
        decisions = served = on_fallback = overrun = fallback_spend = rate_limited = 0
        set_usage, set_spend, set_requests, set_errors = _SET_USAGE, _SET_SPEND, _SET_REQUESTS, _SET_ERRORS
        set_last_used = _SET_LAST_USED

        began, began_cpu = time.perf_counter(), time.process_time()
        for number, (t, kind, client, cost, outcome, detail) in enumerate(trace.events):
            now = start + t
            if now >= timers:
                # Timers fire at their own times, before the event: sample, roll windows, rebalance.
                self.fallback_spend = fallback_spend
                self.spent_from, self.counted_from = spent_from, counted_from
                while now >= timers:
                    if timers == next_sample:
                        self._sample(next_sample)
                        next_sample += self.sample_seconds
                    elif timers == next_roll:
                        self._roll(next_roll)
                        next_roll = self._next_roll()
                    else:
                        self._rebalance(next_rebalance)
                        next_rebalance += interval
                    timers = min(next_rebalance, next_sample, next_roll)
                logged, spent_from, counted_from = len(log), self.spent_from, self.counted_from

            # ledger: forget what fell out of the forecast horizon and the error window (as `_forget`)
            cut = now - horizon
            while spent_from < logged and log[spent_from][0] < cut:
                entry = log[spent_from]
                load = loads[entry[1]]
                set_spend(load, load.recent_spend_micros - entry[2])
                spent_from += 1
            cut = now - error_window
            while counted_from < logged and log[counted_from][0] < cut:
                entry = log[counted_from]
                load = loads[entry[1]]
                set_requests(load, load.recent_requests - 1)
                if entry[3]:
                    set_errors(load, load.recent_errors - 1)
                counted_from += 1

            if kind == REQUEST:
                lease = leases[client]
                decisions += 1
                if lease is None:  # refused before: ask again, as a client retrying Allocate would
                    lease = self._arrive(client, self.wanted[client], now)
                    if lease is None:
                        continue
                else:
                    decision = decide_renewal(loads, pool, lease, now)
                    if decision.__class__ is Refusal:
                        continue
                    if decision.kind is not _STICKY:  # type: ignore[union-attr]
                        self._move(lease, decision, now)  # type: ignore[arg-type]
                served += 1
                set_last_used(lease, now)
                if lease.fallback:
                    fallback_spend += cost
                    on_fallback += 1
                    continue
                i = index[lease.subscription_id]
                load = loads[i]
                usage = load.window_usage_micros
                if usage >= budgets[i]:
                    overrun += cost
                if special[i]:
                    if outcome is ok:
                        for begins, ends, share, instead in incidents[i]:
                            if begins <= now < ends and (number * _HASH_MULTIPLIER) & 0xFFFFFFFF < share:
                                outcome = instead
                                break
                    if self.extra_windows[i]:
                        self._charge_extra(i, now, cost)
                # ledger: record the request
                set_usage(load, usage + cost)
                set_spend(load, load.recent_spend_micros + cost)
                set_requests(load, load.recent_requests + 1)
                logged += 1
                if outcome is ok:
                    append((now, i, cost, False))
                    if auth_streak[i]:
                        self._auth_streak(i, 0, now)
                    continue
                failed = outcome in errors
                append((now, i, cost, failed))
                if failed:
                    set_errors(load, load.recent_errors + 1)
                if outcome is Outcome.RATE_LIMITED:
                    rate_limited += 1
                    if now > load.rate_limited_at:
                        _set(load, "rate_limited_at", now)
                elif outcome is Outcome.AUTH_FAILED:
                    self._auth_streak(i, auth_streak[i] + 1, now)
            elif kind == ARRIVE:
                decisions += 1
                self.arrivals += 1
                self.wanted[client] = detail
                self._arrive(client, detail, now)
            else:
                self._depart(client)
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu

        self.decisions += decisions  # plus those the methods counted
        self.fallback_spend = fallback_spend
        self.on_fallback, self.served, self.overrun, self.rate_limited = on_fallback, served, overrun, rate_limited
        self._sample(start + trace.duration)
        return self._result(seconds, cpu_seconds)

    # -- decisions and their effects ----------------------------------------------------------------

    def _arrive(self, client: int, wanted_type: str, now: float) -> Lease | None:
        """A client asks for a lease (Allocate); None if refused."""
        decision = decide_allocation(self.loads, self.pool, None, wanted_type, now)
        if isinstance(decision, Refusal):
            return None
        target, fallback = self._target(decision, wanted_type, "", now)
        self.token += 1
        self.grants += 1
        lease = Lease(
            lease_id=f"lease-{self.grants}",
            client_id=self.trace.clients[client],
            session_id="",
            subscription_id=target,
            fallback=fallback,
            granted_at=now,
            expires_at=self.expires_at,
            fencing_token=self.token,
            acked_token=self.token,
            last_used_at=now,
            wanted_type=wanted_type,
        )
        if not fallback:
            self._add_clients(target, 1)
        self.leases[client] = lease
        self.live[lease.lease_id] = client
        self.live_leases[client] = lease
        return lease

    def _depart(self, client: int) -> None:
        """The client releases its lease (Release)."""
        lease = self.leases[client]
        if lease is None:
            return
        if not lease.fallback:
            self._add_clients(lease.subscription_id, -1)
        self.leases[client] = None
        del self.live[lease.lease_id]
        del self.live_leases[client]

    def _target(self, decision: Placement, wanted_type: str, leaving: str, now: float) -> tuple[str, bool]:
        """Where the decision puts the client: (subscription id, on the fallback?)."""
        if decision.kind is _FALLBACK:
            return decision.subscription_id, True
        if self.choose is None:
            return decision.subscription_id, False
        # A baseline: its own pick among the subscriptions the policy would place a client on.
        pool, loads = self.pool, self.loads
        eligible = [
            i
            for i, load in enumerate(loads)
            if load.spec.id != leaving
            and load.live_clients < load.spec.max_clients
            and (not wanted_type or load.spec.type == wanted_type)
            and subscription_status(load, pool, now) is _ACTIVE
        ]
        if not eligible:  # the policy saw room the baseline's rule does not; follow the policy
            return decision.subscription_id, False
        return loads[self.choose(eligible, loads)].spec.id, False

    def _move(self, lease: Lease, decision: Placement, now: float) -> None:
        """Apply a renewal's FAILOVER or FALLBACK decision, as `Pool._place` does."""
        leaving = "" if lease.fallback else lease.subscription_id
        if lease.fallback:
            self.returns += 1
        else:
            self.failovers += 1
        target, fallback = self._target(decision, lease.wanted_type, leaving, now)
        self._relocate(lease, target, fallback)

    def _relocate(self, lease: Lease, target: str, fallback: bool) -> None:
        """Move a lease with a new fencing token, as `Pool._place` does."""
        if not lease.fallback:
            self._add_clients(lease.subscription_id, -1)
        if not fallback:
            self._add_clients(target, 1)
        self.token += 1
        _set(lease, "history", (*lease.history, (lease.fencing_token, lease.subscription_id)))
        _set(lease, "subscription_id", target)
        _set(lease, "fallback", fallback)
        _set(lease, "fencing_token", self.token)
        _set(lease, "acked_token", self.token)

    def _add_clients(self, subscription_id: str, count: int) -> None:
        i = self.index.get(subscription_id)
        if i is not None:
            load = self.loads[i]
            _set(load, "live_clients", load.live_clients + count)  # ledger

    def _auth_streak(self, i: int, streak: int, now: float) -> None:
        """An auth failure or success changed subscription i's run of auth failures (ledger)."""
        self.auth_streak[i] = streak
        disabled = streak >= self.pool.auth_failure_limit
        if disabled != self.loads[i].disabled:
            _set(self.loads[i], "disabled", disabled)
            if disabled:
                self._move_off(i, now)

    def _move_off(self, i: int, now: float) -> None:
        """Move the leases of a subscription that went out of service, as the server's reaper does."""
        sid = self.loads[i].spec.id
        for lease in list(self.live_leases.values()):
            if lease.fallback or lease.subscription_id != sid:
                continue
            self.decisions += 1
            decision = decide_renewal(self.loads, self.pool, lease, now)
            if isinstance(decision, Placement) and decision.kind is not _STICKY:
                self._move(lease, decision, now)

    def _rebalance(self, now: float) -> None:
        self._forget(now)
        self.decisions += 1
        plan = plan_rebalance(self.loads, self.live_leases.values(), self.pool, now)
        for move in plan.moves:
            lease = self.live_leases[self.live[move.lease_id]]
            self._relocate(lease, move.to_subscription_id, False)
            self.moved += 1

    def _forget(self, now: float) -> None:
        """The ledger's forgetting, for a decision taken between events (the same as in `run`)."""
        loads, log = self.loads, self.log
        cut = now - self.pool.forecast_horizon_seconds  # spend before a window's start went at its roll
        while self.spent_from < len(log) and log[self.spent_from][0] < cut:
            _, i, spent, _ = log[self.spent_from]
            _SET_SPEND(loads[i], loads[i].recent_spend_micros - spent)
            self.spent_from += 1
        cut = now - self.pool.error_window_seconds
        while self.counted_from < len(log) and log[self.counted_from][0] < cut:
            _, i, _, failed = log[self.counted_from]
            _SET_REQUESTS(loads[i], loads[i].recent_requests - 1)
            if failed:
                _SET_ERRORS(loads[i], loads[i].recent_errors - 1)
            self.counted_from += 1
        done = min(self.spent_from, self.counted_from)
        if done > 65_536:  # drop what both cursors are past, now and then
            del log[:done]
            self.spent_from -= done
            self.counted_from -= done

    # -- time ----------------------------------------------------------------------------------------

    def _charge_extra(self, i: int, now: float, cost: int) -> None:
        """Count a request in subscription i's extra windows (ledger)."""
        usage = self.extra_usage[i]
        for index, (start, _) in enumerate(self.extra_windows[i]):
            if now >= start:
                usage[index] += cost
        _set(self.loads[i], "extra_usage_micros", tuple(usage))

    def _next_roll(self) -> float:
        weekly = min(load.window_end for load in self.loads)
        return min([weekly, *(end for extra in self.extra_windows for _, end in extra)])

    def _roll(self, now: float) -> None:
        """Enter the next window of each subscription whose window ended (`Pool._advance`)."""
        for i, load in enumerate(self.loads):
            if now >= load.window_end:
                self.closed[i].append((load.window_start, load.window_usage_micros))
                start, end = window_bounds(now, load.spec.reset)
                _set(load, "window_start", start)
                _set(load, "window_end", end)
                _SET_USAGE(load, 0)
                # The forecast counts spend since the window's start only: forget the rest now.
                _SET_SPEND(load, 0)
                log = self.log
                for k in range(self.spent_from, len(log)):
                    if log[k][1] == i:
                        log[k] = (log[k][0], i, 0, log[k][3])
            extra = self.extra_windows[i]
            if any(now >= end for _, end in extra):
                for index, (_, end) in enumerate(extra):
                    if now >= end:
                        extra[index] = extra_window_bounds(now, load.spec.extra_windows[index])
                        self.extra_usage[i][index] = 0
                _set(load, "extra_usage_micros", tuple(self.extra_usage[i]))
                _set(load, "extra_window_ends", tuple(end for _, end in extra))

    def _sample(self, now: float) -> None:
        series = self.series
        series.t.append(now - self.trace.start)
        series.usage.append(tuple(load.window_usage_micros for load in self.loads))
        series.fallback.append(self.fallback_spend)

    # -- figures -------------------------------------------------------------------------------------

    def _result(self, seconds: float, cpu_seconds: float) -> RunResult:
        pool, trace, loads = self.pool, self.trace, self.loads
        windows = [
            [*closed, (load.window_start, load.window_usage_micros)]
            for closed, load in zip(self.closed, loads, strict=True)
        ]
        # What the pool may spend before every subscription is limited, over the windows the trace touches.
        capacity = sum(
            len(spent) * spec.weekly_budget_micros * pool.threshold_ppm // PPM
            for spent, spec in zip(windows, pool.subscriptions, strict=True)
        )
        budget = sum(
            len(spent) * spec.weekly_budget_micros for spent, spec in zip(windows, pool.subscriptions, strict=True)
        )
        final = [load.window_usage_micros for load in loads]
        limits = [spec.weekly_budget_micros * pool.threshold_ppm // PPM for spec in pool.subscriptions]
        demand = trace.demand_micros
        return RunResult(
            trace=trace.name,
            policy=self.policy,
            requests=trace.requests,
            demand_micros=demand,
            capacity_micros=capacity,
            budget_micros=budget,
            lower_bound_micros=lower_bound_micros(demand, capacity),
            pool_spend_micros=sum(spent for window in windows for _, spent in window),
            fallback_micros=self.fallback_spend,
            overrun_micros=self.overrun,
            overshoot_micros=sum(
                max(0, spent - limit)
                for window, limit in zip(windows, self.budgets, strict=True)
                for _, spent in window
            ),
            cost_gap_micros=max(final) - min(final),
            cost_gap_threshold_micros=pool.rebalancing.cost_gap_micros,
            limited_at_end=sum(1 for spent, limit in zip(final, limits, strict=True) if spent >= limit),
            subscriptions=len(loads),
            clients_moved=self.moved,
            failovers=self.failovers,
            returns=self.returns,
            served=self.served,
            on_fallback=self.on_fallback,
            rate_limited=self.rate_limited,
            arrivals=self.arrivals,
            decisions=self.decisions,
            seconds=seconds,
            cpu_seconds=cpu_seconds,
            final_usage=tuple((load.spec.id, load.window_usage_micros) for load in loads),
            series=self.series,
        )
