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
from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection, sql

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


async def _one(conn: AsyncConnection[Row], query: bytes, args: Sequence[object]) -> Row | None:
    return await (await conn.execute(query, args)).fetchone()


async def _all(conn: AsyncConnection[Row], query: bytes, args: Sequence[object]) -> list[Row]:
    return await (await conn.execute(query, args)).fetchall()


async def _subscription(
    conn: AsyncConnection[Row], s: UsageStatements, sid: str, starts: tuple[float, ...], before: float
) -> EarlySpend:
    spend = []
    for start in starts:
        row = await _one(conn, s.spend, (sid, start, before)) if start < before else None
        spend.append(0 if row is None else int(row[0]))
    ppm, since_report = None, spend[0] if spend else 0
    if starts and starts[0] < before:
        report = await _one(conn, s.newest_report, (sid, starts[0], before))
        if report is not None:
            at, request_id, ppm = report
            row = await _one(conn, s.spend_after, (sid, at, before, at, request_id))
            since_report = 0 if row is None else int(row[0])
    reset = await _one(conn, s.newest_reset, (sid, before))
    rate_limited_at = (await _one(conn, s.newest_rate_limit, (sid, before)) or (None,))[0] or 0.0  # MAX: NULL if none
    failures: tuple[float, ...] = ()
    if await _one(conn, s.has_auth_failure, (sid, before)) is not None:
        ok = await _one(conn, s.newest_ok, (sid, before))
        # With no success retained, every auth failure counts: from before the first record on.
        after = ok if ok is not None else (-math.inf, "")
        failures = tuple(at for (at,) in await _all(conn, s.auth_failures_after, (sid, after[0], before, *after)))
    return EarlySpend(
        tuple(spend),
        ppm,
        since_report,
        None if reset is None else reset[0],
        rate_limited_at,
        failures,
    )


async def early_usage(conn: AsyncConnection[Row], s: UsageStatements, plan: UsagePlan) -> EarlyUsage:
    """`usage.summarize(..., request_ids=True)`'s summary of the records before `plan.recent_since`."""
    before = plan.recent_since
    if before == -math.inf:
        return EarlyUsage(plan)
    subscriptions = {sid: await _subscription(conn, s, sid, starts, before) for sid, starts in plan.starts.items()}
    fallback = [(at, cost) for at, cost in await _all(conn, s.fallback, (before,))]
    ids = [(at, request_id, sid) for at, request_id, sid in await _all(conn, s.request_ids, (before,))]
    return EarlyUsage(plan, subscriptions, fallback, ids)
