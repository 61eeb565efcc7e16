"""Synthetic traces: a week of realistic traffic, the same for the same seed.

The population (what a trace "kind" changes is only the total spend):

* **Developers** (`dev-NNN`) in five time zones work weekday sessions of about
  eight hours from about 09:00 local, a few on weekends; some leave for lunch
  and come back (a new Allocate). Requests come as a Poisson process that
  follows the working day (a late-morning and an afternoon peak, a lunch dip),
  with **bursts**: an agent loop firing dozens of requests in a few minutes.
* **Services** (`svc-*`) stay connected all week, redeploy once a day (leave and
  come back a minute later), and follow the global UTC day, quieter at night
  and at weekends, so they sit idle long enough to be rebalanced.
* **Batch jobs** (`batch-J-K`) fan out a dozen workers within a minute, each
  making a few dozen requests over a quarter of an hour, then leave: bursts of
  arrivals that press on the client limits.

Spend is **heavy-tailed** per client (a log-normal intensity with sigma 1.1,
so the top tenth of clients spend about half) and per request. The model
sets a request's price scale. Costs are then scaled so that the week's demand
is `demand_ratio` times what the pool can spend before every subscription is
limited (Σ threshold x budget): 0.6 for ``below``, 1.0 for ``near``, 1.35
for ``above``. From Wednesday 12:00 UTC one subscription starts
rate-limiting: the header declares an incident under which a share of the
requests it serves come back ``rate_limited``.

Only `random.Random.random()` is used, never its distributions, whose
algorithms may change between Python versions: the same seed gives the same
trace, byte for byte, everywhere.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from authpool_server.domain import (
    MICROS_PER_UNIT,
    Outcome,
    PoolSpec,
    RebalancePolicy,
    SubscriptionSpec,
)
from authpool_server.simulator.engine import capacity_micros
from authpool_server.simulator.trace import ARRIVE, DEPART, REQUEST, Incident, Trace, TraceEvent

__all__ = ["GENERATOR_VERSION", "KINDS", "TRACE_START", "generate", "guide_pool"]

GENERATOR_VERSION = 1
# Demand over Σ threshold x budget, by kind.
KINDS = {"below": 0.6, "near": 1.0, "above": 1.35}
# Developers by kind: the population grows with the demand, so the client limits are pressed too.
_DEVELOPERS = {"below": 40, "near": 55, "above": 70}
TRACE_START = dt.datetime(2025, 11, 17, tzinfo=dt.UTC)  # a Monday, 00:00 UTC: one budget window
_WEEK = 7 * 86_400
_HOUR = 3600.0

_SERVICES = ("svc-review-bot", "svc-support-agent", "svc-docs-indexer", "svc-triage", "svc-codegen", "svc-evals")
_BATCH_JOBS = 5
# (UTC offset in hours, share of developers)
_TIME_ZONES = ((0.0, 0.25), (1.0, 0.25), (-5.0, 0.25), (-8.0, 0.15), (5.5, 0.10))
# (model, price scale, share of clients that mostly use it)
_MODELS = (("claude-sonnet-4-5", 1.0, 0.60), ("claude-opus-4-1", 3.0, 0.15), ("claude-haiku-4-5", 0.3, 0.25))
_SERVER_ERROR_RATE = 0.002
_INCIDENT_SUBSCRIPTION = "sub4"
_INCIDENT_FROM = 2.5 * 86_400  # Wednesday 12:00 UTC
_INCIDENT_SHARE = 0.2
_COST_QUANTUM = 100  # micro-units: costs are whole hundredths of a cent


def guide_pool() -> PoolSpec:
    """Four subscriptions configured as in the guide: 456 a week, 15 clients, threshold 0.85."""
    return PoolSpec(
        subscriptions=tuple(
            SubscriptionSpec(
                id=f"sub{i}",
                email=f"sub{i}@simulated.invalid",  # what a trace reader fills in: traces carry no emails
                type="claude-pro",
                credential_ref=f"simulated:sub{i}",
                weekly_budget_micros=456 * MICROS_PER_UNIT,
                max_clients=15,
            )
            for i in range(1, 5)
        ),
        threshold_ppm=850_000,
        fallback_when_exhausted=True,
        rebalancing=RebalancePolicy(
            enabled=True,
            interval_seconds=300.0,
            cost_gap_micros=5 * MICROS_PER_UNIT,
            max_moves_per_cycle=3,
            idle_seconds=300.0,
        ),
        lease_ttl_seconds=60.0,
    )


class _Rng:
    """Distributions built on `random()` alone (see the module docstring)."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed).random  # noqa: S311 - synthetic traffic, not security

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._random()

    def chance(self, p: float) -> bool:
        return self._random() < p

    def exponential(self, mean: float) -> float:
        return -mean * math.log(1.0 - self._random())

    def normal(self, mu: float, sigma: float) -> float:
        # Box-Muller; one of the pair is thrown away, which keeps the stream simple.
        u1 = 1.0 - self._random()
        u2 = self._random()
        return mu + sigma * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)

    def lognormal(self, mu: float, sigma: float) -> float:
        return math.exp(self.normal(mu, sigma))

    def poisson(self, mean: float) -> int:
        # Knuth's method: fine for the small means used here.
        limit, k, p = math.exp(-mean), 0, self._random()
        while p > limit:
            k += 1
            p *= self._random()
        return k

    def weighted(self, choices: Sequence[tuple[float, float]]) -> float:
        x = self._random() * sum(weight for _, weight in choices)
        for value, weight in choices:
            x -= weight
            if x < 0:
                return value
        return choices[-1][0]

    def index(self, n: int) -> int:
        return min(n - 1, int(self._random() * n))


@dataclass(slots=True)
class _Client:
    name: str
    model: str
    mean_cost: float  # before scaling: intensity x the model's price


@dataclass(slots=True)
class _Draft:
    """Events before costs are scaled: (t, order, kind, client, raw cost, outcome, detail)."""

    events: list[tuple[float, int, int, int, float, Outcome, str]]
    clients: list[_Client]

    def add(self, t: float, kind: int, client: int, cost: float = 0.0, model: str = "") -> None:
        self.events.append((t, len(self.events), kind, client, cost, Outcome.OK, model))


def _client(rng: _Rng, name: str, intensity: float) -> _Client:
    pick = rng.uniform(0, 1)
    for model, price, share in _MODELS:
        pick -= share
        if pick < 0:
            return _Client(name, model, intensity * price)
    model, price, _ = _MODELS[0]
    return _Client(name, model, intensity * price)


def _work_intensity(local_hour: float) -> float:
    """Requests over a working day, 1.0 at the peaks: late morning and mid-afternoon, a lunch dip."""
    hour = local_hour % 24
    if hour < 7 or hour >= 21:
        return 0.15
    if 12.0 <= hour < 13.0:
        return 0.45
    return 0.55 + 0.45 * math.sin(math.pi * (hour - 7.0) / 5.5) ** 2


def _global_intensity(t: float) -> float:
    """Services follow the UTC day: busy 08:00-20:00, quiet at night, half as busy at weekends."""
    hour = (t / _HOUR) % 24
    day = int(t // 86_400)
    base = 0.25 + 0.75 * max(0.0, math.sin(math.pi * (hour - 6.0) / 16.0)) if 6 <= hour < 22 else 0.2
    return base * (0.5 if day >= 5 else 1.0)


def _requests(
    rng: _Rng,
    draft: _Draft,
    client: int,
    begin: float,
    end: float,
    per_hour: float,
    intensity: object,
    tz: float = 0.0,
) -> None:
    """Requests from `client` between `begin` and `end`: thinned Poisson plus bursts."""
    info = draft.clients[client]
    t = begin
    while True:
        t += rng.exponential(_HOUR / per_hour)
        if t >= end:
            break
        level = _work_intensity(t / _HOUR + tz) if intensity == "work" else _global_intensity(t)
        if rng.chance(level):
            draft.add(t, REQUEST, client, info.mean_cost * rng.lognormal(0.0, 0.9), info.model)
    # Bursts: an agent loop, dozens of cheaper requests a few seconds apart.
    for _ in range(rng.poisson(0.5 * (end - begin) / (8 * _HOUR))):
        t = rng.uniform(begin, end)
        for _ in range(int(20 + 60 * rng.uniform(0, 1) ** 2)):
            t += rng.exponential(6.0)
            if t >= end:
                break
            draft.add(t, REQUEST, client, 0.6 * info.mean_cost * rng.lognormal(0.0, 0.7), info.model)


def _session(rng: _Rng, draft: _Draft, client: int, begin: float, end: float, per_hour: float, tz: float) -> None:
    begin, end = max(begin, 1.0), min(end, _WEEK - 60.0)
    if end - begin < 600:
        return
    draft.add(begin, ARRIVE, client)
    _requests(rng, draft, client, begin, end, per_hour, "work", tz)
    draft.add(end, DEPART, client)


def _developers(rng: _Rng, draft: _Draft, count: int) -> None:
    for number in range(count):
        client = len(draft.clients)
        draft.clients.append(_client(rng, f"dev-{number:03d}", rng.lognormal(0.0, 0.9)))
        tz = rng.weighted(_TIME_ZONES)
        per_hour = 26.0 * rng.lognormal(0.0, 0.4)
        for day in range(7):
            weekend = day >= 5
            if not rng.chance(0.12 if weekend else 0.9):
                continue
            if weekend:
                start_local = min(14.0, max(9.0, rng.normal(11.0, 1.5)))
                hours = min(6.0, max(1.0, rng.normal(3.0, 1.0)))
            else:
                start_local = min(12.0, max(6.5, rng.normal(9.0, 1.0)))
                hours = min(11.0, max(2.0, rng.normal(8.0, 1.5)))
            begin = day * 86_400 + (start_local - tz) * _HOUR
            end = begin + hours * _HOUR
            lunch = day * 86_400 + (12.0 + rng.uniform(0, 0.5) - tz) * _HOUR
            if not weekend and begin + _HOUR < lunch < end - _HOUR and rng.chance(0.3):
                _session(rng, draft, client, begin, lunch, per_hour, tz)
                _session(rng, draft, client, lunch + rng.uniform(0.5, 1.0) * _HOUR, end, per_hour, tz)
            else:
                _session(rng, draft, client, begin, end, per_hour, tz)


def _services(rng: _Rng, draft: _Draft) -> None:
    for name in _SERVICES:
        client = len(draft.clients)
        draft.clients.append(_client(rng, name, rng.lognormal(0.0, 0.5)))
        per_hour = 15.0 * rng.lognormal(0.0, 0.3)
        up = rng.uniform(0, 1800)
        for day in range(7):
            redeploy = day * 86_400 + rng.uniform(2 * _HOUR, 22 * _HOUR)
            if redeploy <= up + 600:
                continue
            draft.add(up, ARRIVE, client)
            _requests(rng, draft, client, up, redeploy, per_hour, "global")
            draft.add(redeploy, DEPART, client)
            up = redeploy + rng.uniform(30, 120)
        draft.add(up, ARRIVE, client)
        _requests(rng, draft, client, up, _WEEK - 60.0, per_hour, "global")


def _batch_jobs(rng: _Rng, draft: _Draft) -> None:
    for job in range(_BATCH_JOBS):
        day = rng.index(5)
        at = day * 86_400 + rng.uniform(6 * _HOUR, 22 * _HOUR)
        for worker in range(8 + rng.index(7)):
            client = len(draft.clients)
            draft.clients.append(_client(rng, f"batch-{job}-{worker}", rng.lognormal(-0.5, 0.5)))
            begin = at + rng.uniform(0, 60)
            end = begin + rng.uniform(10, 30) * 60
            draft.add(begin, ARRIVE, client)
            t = begin
            info = draft.clients[client]
            for _ in range(15 + rng.index(26)):
                t += rng.exponential((end - begin) / 40)
                if t >= end:
                    break
                draft.add(t, REQUEST, client, info.mean_cost * rng.lognormal(0.0, 0.6), info.model)
            draft.add(end, DEPART, client)


def generate(kind: str, seed: int = 1) -> Trace:
    """A week of synthetic traffic of `kind` (a key of `KINDS`) from `seed`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    rng = _Rng(seed)
    pool = guide_pool()
    draft = _Draft([], [])
    _developers(rng, draft, _DEVELOPERS[kind])
    _services(rng, draft)
    _batch_jobs(rng, draft)

    # Time order; an arrival before the requests of its second, a departure after.
    draft.events.sort(key=lambda e: (int(e[0]), e[2] != ARRIVE, e[2] == DEPART, e[0], e[1]))
    target = KINDS[kind] * capacity_micros(pool)
    raw_total = sum(e[4] for e in draft.events if e[2] == REQUEST)
    scale = target / raw_total
    events: list[TraceEvent] = []
    numbers: dict[int, int] = {}  # clients numbered as they first appear, as a reader numbers them
    for t, _, event_kind, draft_client, raw_cost, outcome, detail in draft.events:
        client = numbers.setdefault(draft_client, len(numbers))
        cost = 0
        if event_kind == REQUEST:
            cost = max(_COST_QUANTUM, round(raw_cost * scale / _COST_QUANTUM) * _COST_QUANTUM)
            if rng.chance(_SERVER_ERROR_RATE):
                outcome = Outcome.SERVER_ERROR
        events.append(TraceEvent(float(int(t)), event_kind, client, cost, outcome, detail))
    return Trace(
        name=kind,
        pool=pool,
        start=TRACE_START.timestamp(),
        incidents=(Incident(_INCIDENT_SUBSCRIPTION, Outcome.RATE_LIMITED, _INCIDENT_FROM, math.inf, _INCIDENT_SHARE),),
        clients=tuple(draft.clients[draft_client].name for draft_client in numbers),
        events=tuple(events),
        generator={"kind": kind, "seed": seed, "version": GENERATOR_VERSION, "demand_ratio": KINDS[kind]},
        description=(
            f"One synthetic week ({kind} capacity): demand {KINDS[kind]:.2f} x the sum of threshold x budget, "
            f"{_DEVELOPERS[kind]} developers, {len(_SERVICES)} services, {_BATCH_JOBS} batch jobs; "
            f"{_INCIDENT_SUBSCRIPTION} rate-limits {_INCIDENT_SHARE:.0%} of its requests from Wednesday 12:00 UTC"
        ),
    )
