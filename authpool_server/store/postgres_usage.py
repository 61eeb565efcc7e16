"""The PostgreSQL store's usage summary: `usage.summarize`, in SQL, where the rows are.

The same summary as `sqlite_usage`, so that a replica's restart brings the
recent records and a few numbers per subscription to Python instead of
every retained record. Ties in time are broken by request id, the order
this store gives records back in (`ORDER BY at, request_id`), so the
comparisons below name it where SQLite names its rowid. The indexes are
migration 0003's; like SQLite, PostgreSQL uses a partial index only for a
query that repeats its WHERE.

The request ids of the older records still come back, each with its time
and subscription: a replica answers a retried report from memory, since
asking the database would cost every report a round trip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from psycopg import AsyncConnection, AsyncCursor, sql

from authpool_server.store.usage import EarlySpend, EarlyUsage, UsagePlan

__all__ = ["UsageStatements", "early_usage"]

# Each as `sqlite_usage` has it, with the schema's placeholder, `%s` for parameters, and request ids for rowids.
_SPEND = (
    "SELECT COALESCE(SUM(cost_micros), 0) FROM {s}.usage WHERE subscription_id = %s AND at >= %s AND at < %s"
    " AND NOT fallback"
)
_NEWEST_REPORT = (
    "SELECT at, request_id, provider_remaining_ppm FROM {s}.usage WHERE subscription_id = %s"
    " AND provider_remaining_ppm IS NOT NULL AND at >= %s AND at < %s AND NOT fallback"
    " ORDER BY at DESC, request_id DESC LIMIT 1"
)
_SPEND_AFTER = (
    "SELECT COALESCE(SUM(cost_micros), 0) FROM {s}.usage WHERE subscription_id = %s AND at >= %s AND at < %s"
    " AND NOT fallback AND (at, request_id) > (%s, %s)"
)
_NEWEST_RESET = (
    "SELECT provider_reset_at FROM {s}.usage WHERE subscription_id = %s AND provider_reset_at > at AND at < %s"
    " AND NOT fallback ORDER BY at DESC, request_id DESC LIMIT 1"
)
_NEWEST_RATE_LIMIT = (
    "SELECT MAX(at) FROM {s}.usage WHERE subscription_id = %s AND outcome <> 'ok' AND at < %s AND NOT fallback"
    " AND outcome = 'rate_limited'"
)
_HAS_AUTH_FAILURE = (
    "SELECT 1 FROM {s}.usage WHERE subscription_id = %s AND outcome <> 'ok' AND at < %s AND NOT fallback"
    " AND outcome = 'auth_failed' LIMIT 1"
)
_NEWEST_OK = (
    "SELECT at, request_id FROM {s}.usage WHERE subscription_id = %s AND at < %s AND NOT fallback AND outcome = 'ok'"
    " ORDER BY at DESC, request_id DESC LIMIT 1"
)
_AUTH_FAILURES_AFTER = (
    "SELECT at FROM {s}.usage WHERE subscription_id = %s AND outcome <> 'ok' AND at >= %s AND at < %s"
    " AND NOT fallback AND outcome = 'auth_failed' AND (at, request_id) > (%s, %s) ORDER BY at, request_id"
)
_FALLBACK = "SELECT at, cost_micros FROM {s}.usage WHERE fallback AND at < %s ORDER BY at, request_id"
_REQUEST_IDS = "SELECT at, request_id, subscription_id FROM {s}.usage WHERE at < %s ORDER BY at, request_id"

Row = tuple[Any, ...]
Connection = AsyncConnection[Row]
Cursor = AsyncCursor[Row]


class UsageStatements:
    """The summary's statements, qualified with the store's schema once."""

    def __init__(self, schema: str) -> None:
        def q(text: str) -> bytes:
            return sql.SQL(text).format(s=sql.Identifier(schema)).as_bytes()

        self.spend = q(_SPEND)
        self.newest_report = q(_NEWEST_REPORT)
        self.spend_after = q(_SPEND_AFTER)
        self.newest_reset = q(_NEWEST_RESET)
        self.newest_rate_limit = q(_NEWEST_RATE_LIMIT)
        self.has_auth_failure = q(_HAS_AUTH_FAILURE)
        self.newest_ok = q(_NEWEST_OK)
        self.auth_failures_after = q(_AUTH_FAILURES_AFTER)
        self.fallback = q(_FALLBACK)
        self.request_ids = q(_REQUEST_IDS)


@dataclass(slots=True)
class _Asked:
    """One subscription's first questions, sent; each cursor holds its answer once the pipeline has synced."""

    spend: list[Cursor]  # in each window of `starts`
    report: Cursor | None  # the newest provider report in the current window (None: no window)
    reset: Cursor
    rate_limit: Cursor
    auth_failure: Cursor


@dataclass(slots=True)
class _FollowedUp:
    """What the first answers called for: the spend after the provider's report, the newest success before failures."""

    ppm: int | None  # of the provider's newest report in the current window
    spend_after: Cursor | None  # None: no report there
    ok: Cursor | None  # None: no auth failure retained
    failures: Cursor | None = None  # the auth failures after the newest success, asked once it is known


async def _ask(conn: Connection, s: UsageStatements, sid: str, starts: tuple[float, ...], before: float) -> _Asked:
    # A window that starts at or after `before` holds no record: its sum is 0 and it has no report,
    # as `summarize` has them.
    ask = conn.execute
    return _Asked(
        spend=[await ask(s.spend, (sid, start, before)) for start in starts],
        report=await ask(s.newest_report, (sid, starts[0], before)) if starts else None,
        reset=await ask(s.newest_reset, (sid, before)),
        rate_limit=await ask(s.newest_rate_limit, (sid, before)),
        auth_failure=await ask(s.has_auth_failure, (sid, before)),
    )


async def _follow_up(conn: Connection, s: UsageStatements, sid: str, before: float, asked: _Asked) -> _FollowedUp:
    report = None if asked.report is None else await asked.report.fetchone()
    ppm, spend_after = None, None
    if report is not None:
        at, request_id, ppm = report
        spend_after = await conn.execute(s.spend_after, (sid, at, before, at, request_id))
    # Only where an auth failure calls for it: a subscription with no success retained makes it read every record.
    ok = await conn.execute(s.newest_ok, (sid, before)) if await asked.auth_failure.fetchone() is not None else None
    return _FollowedUp(ppm, spend_after, ok)


async def _ask_failures(conn: Connection, s: UsageStatements, sid: str, before: float, followed: _FollowedUp) -> None:
    if followed.ok is not None:
        ok = await followed.ok.fetchone()
        # With no success retained, every auth failure counts: from before the first record on.
        after = ok if ok is not None else (-math.inf, "")
        followed.failures = await conn.execute(s.auth_failures_after, (sid, after[0], before, *after))


async def _summary(asked: _Asked, followed: _FollowedUp) -> EarlySpend:
    spend = tuple([int((await cursor.fetchone() or (0,))[0]) for cursor in asked.spend])
    since_report = spend[0] if spend else 0
    if followed.spend_after is not None:
        since_report = int((await followed.spend_after.fetchone() or (0,))[0])
    reset = await asked.reset.fetchone()
    rate_limited_at = (await asked.rate_limit.fetchone() or (None,))[0] or 0.0  # MAX: NULL if none
    failures: tuple[float, ...] = ()
    if followed.failures is not None:
        failures = tuple(at for (at,) in await followed.failures.fetchall())
    return EarlySpend(spend, followed.ppm, since_report, None if reset is None else reset[0], rate_limited_at, failures)


async def early_usage(conn: Connection, s: UsageStatements, plan: UsagePlan) -> EarlyUsage:
    """`usage.summarize(..., request_ids=True)`'s summary of the records before `plan.recent_since`.

    Asked in pipeline mode, every subscription's questions at once, then the
    follow-ups their answers call for, in three rounds: three round trips to
    the database whatever the number of subscriptions. Asked in turn, they
    were about nine a subscription, which a database a millisecond away
    would have made seconds of a restart with a thousand subscriptions.
    """
    before = plan.recent_since
    if before == -math.inf:
        return EarlyUsage(plan)
    async with conn.pipeline():
        fallback = await conn.execute(s.fallback, (before,))
        ids = await conn.execute(s.request_ids, (before,))
        asked = {sid: await _ask(conn, s, sid, starts, before) for sid, starts in plan.starts.items()}
        followed = {sid: await _follow_up(conn, s, sid, before, first) for sid, first in asked.items()}
        for sid, then in followed.items():
            await _ask_failures(conn, s, sid, before, then)
        subscriptions = {sid: await _summary(asked[sid], followed[sid]) for sid in asked}
        early_fallback = [(at, cost) for at, cost in await fallback.fetchall()]
        early_ids = [(at, request_id, sid) for at, request_id, sid in await ids.fetchall()]
    return EarlyUsage(plan, subscriptions, early_fallback, early_ids)
