"""How the usage log is loaded at start: the recent records in full, what came before summarised.

A busy week holds a million usage records. Rebuilding the pool by building
and replaying every one of them in Python took seconds; but the ledgers need
only a few numbers from all but the newest: the spend in each window, what
the provider last said, the newest rate limit, the auth failures since the
last success. So the pool hands the store a `UsagePlan` (the window starts
it counts from, as of the time it rebuilds) and the store returns the
records from `UsagePlan.recent_since` on (the forecast horizon and the
error window, which need each record) and, for everything before, one
`EarlySpend` per subscription, computed where the rows are (in SQL for the
embedded store). Replaying the recent records on top of the summary gives
the ledger exactly the state the full replay gave (`SubscriptionLedger.absorb`).

`summarize` is the definition, in Python: the in-memory store uses it, and
the store contract tests hold the SQL of the SQLite and PostgreSQL stores
to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from authpool_server.domain import Outcome, UsageRecord

__all__ = ["EarlySpend", "EarlyUsage", "UsagePlan", "UsagePlanner", "everything", "summarize"]


@dataclass(frozen=True, slots=True)
class UsagePlan:
    """What the pool asks of the usage log when it loads."""

    # The time the pool rebuilds its state as of (None: the default plan, nothing summarised).
    now: float | None = None
    # Records at or after this come back in full; those before, summarised.
    recent_since: float = -math.inf
    # Per subscription: the starts of the windows whose spend is counted, the budget window first.
    starts: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


# Given when the newest event happened (None: no event retained), the plan to load by.
UsagePlanner = Callable[[float | None], UsagePlan]


def everything(newest_event_at: float | None) -> UsagePlan:
    """The default plan: every retained record in full (tools, backups, tests)."""
    return UsagePlan()


@dataclass(frozen=True, slots=True)
class EarlySpend:
    """One subscription's records before `recent_since` (not fallback), summarised as the ledger replays them.

    Order is time, then the store's own order for records of the same time.
    """

    # Per start of the plan: the spend at or after it (and before `recent_since`).
    spend: tuple[int, ...] = ()
    # The newest provider report in the budget window: the share it said was left, and what was spent after it.
    provider_remaining_ppm: int | None = None
    spent_since_provider: int = 0
    # The reset time the newest record that announced one announced.
    provider_reset_at: float | None = None
    rate_limited_at: float = 0.0
    # When each auth failure after the last success happened.
    auth_failures: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class EarlyUsage:
    """Everything of the usage log before the plan's `recent_since`."""

    plan: UsagePlan = field(default_factory=UsagePlan)
    subscriptions: Mapping[str, EarlySpend] = field(default_factory=dict)
    # (time, cost) of each fallback record, in time order: their sum is reported, and pruned with them.
    fallback: list[tuple[float, int]] = field(default_factory=list)
    # (time, request id, subscription charged) of every record, in time order, from a store that gives
    # them (where asking by request id costs a round trip); None: ask the store with `Store.charged`.
    request_ids: list[tuple[float, str, str]] | None = None


@dataclass(slots=True)
class _Tally:
    spend: list[int]
    provider_remaining_ppm: int | None = None
    spent_since_provider: int = 0
    provider_reset_at: float | None = None
    rate_limited_at: float = 0.0
    auth_failures: list[float] = field(default_factory=list)


def summarize(
    records: Iterable[UsageRecord], plan: UsagePlan, *, request_ids: bool = False
) -> tuple[list[UsageRecord], EarlyUsage]:
    """The recent records in time order, and the summary of the others, by `plan` (with their request ids if asked).

    `records` come in the store's own order, which breaks ties in time.
    """
    ordered = sorted(records, key=lambda record: record.at)
    recent = [record for record in ordered if record.at >= plan.recent_since]
    tallies = {sid: _Tally([0] * len(starts)) for sid, starts in plan.starts.items()}
    fallback: list[tuple[float, int]] = []
    ids: list[tuple[float, str, str]] | None = [] if request_ids and plan.recent_since > -math.inf else None
    for record in ordered:
        if record.at >= plan.recent_since:
            break
        if ids is not None:
            ids.append((record.at, record.request_id, record.subscription_id))
        if record.fallback:
            fallback.append((record.at, record.cost_micros))
            continue
        tally = tallies.get(record.subscription_id)
        if tally is None:
            continue  # not in the pool: no ledger counts it
        starts = plan.starts[record.subscription_id]
        for index, start in enumerate(starts):
            if record.at >= start:
                tally.spend[index] += record.cost_micros
        if starts and record.at >= starts[0]:
            if record.provider_remaining_ppm is not None:
                tally.provider_remaining_ppm = record.provider_remaining_ppm
                tally.spent_since_provider = 0
            else:
                tally.spent_since_provider += record.cost_micros
        if record.provider_reset_at > record.at:
            tally.provider_reset_at = record.provider_reset_at
        if record.outcome is Outcome.RATE_LIMITED:
            tally.rate_limited_at = max(tally.rate_limited_at, record.at)
        elif record.outcome is Outcome.AUTH_FAILED:
            tally.auth_failures.append(record.at)
        elif record.outcome is Outcome.OK:
            tally.auth_failures.clear()
    early = {
        sid: EarlySpend(
            tuple(t.spend),
            t.provider_remaining_ppm,
            t.spent_since_provider,
            t.provider_reset_at,
            t.rate_limited_at,
            tuple(t.auth_failures),
        )
        for sid, t in tallies.items()
    }
    return recent, EarlyUsage(plan, early, fallback, ids)
