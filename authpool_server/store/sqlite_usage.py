"""The embedded store's usage summary: `usage.summarize`, in SQL, where the rows are.

Each subscription's sums are range scans of one covering index (subscription,
time): the rows never leave SQLite. The rarer records the ledger looks for
(provider reports, announced resets, errors, fallback) each have a partial
index, so finding the newest one costs the same whether every record is one
or none is. Ties in time are broken by rowid, the order of insertion, as
the recent records come back (`ORDER BY at, rowid`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from authpool_server.store.usage import EarlySpend, EarlyUsage, UsagePlan

__all__ = ["USAGE_INDEXES", "early_usage", "spend_before"]

# Schema version 4. Partial indexes hold only the rows their WHERE names: the queries below repeat it word for word,
# which is how SQLite knows it may use them.
USAGE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS usage_subscription_at ON usage (subscription_id, at, fallback, cost_micros)",
    "CREATE INDEX IF NOT EXISTS usage_provider_report ON usage (subscription_id, at) "
    "WHERE provider_remaining_ppm IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS usage_provider_reset ON usage (subscription_id, at) WHERE provider_reset_at > at",
    "CREATE INDEX IF NOT EXISTS usage_not_ok ON usage (subscription_id, at) WHERE outcome != 'ok'",
    "CREATE INDEX IF NOT EXISTS usage_fallback ON usage (at) WHERE fallback",
)

_SPEND = (
    "SELECT COALESCE(SUM(cost_micros), 0) FROM usage WHERE subscription_id = ? AND at >= ? AND at < ? AND NOT fallback"
)
_NEWEST_REPORT = (
    "SELECT at, rowid, provider_remaining_ppm FROM usage WHERE subscription_id = ?"
    " AND provider_remaining_ppm IS NOT NULL AND at >= ? AND at < ? AND NOT fallback"
    " ORDER BY at DESC, rowid DESC LIMIT 1"
)
_SPEND_AFTER = (
    "SELECT COALESCE(SUM(cost_micros), 0) FROM usage WHERE subscription_id = ? AND at >= ? AND at < ? AND NOT fallback"
    " AND NOT (at = ? AND rowid <= ?)"
)
_NEWEST_RESET = (
    "SELECT provider_reset_at FROM usage WHERE subscription_id = ? AND provider_reset_at > at AND at < ?"
    " AND NOT fallback ORDER BY at DESC, rowid DESC LIMIT 1"
)
_NEWEST_RATE_LIMIT = (
    "SELECT MAX(at) FROM usage WHERE subscription_id = ? AND outcome != 'ok' AND at < ? AND NOT fallback"
    " AND outcome = 'rate_limited'"
)
_HAS_AUTH_FAILURE = (
    "SELECT 1 FROM usage WHERE subscription_id = ? AND outcome != 'ok' AND at < ? AND NOT fallback"
    " AND outcome = 'auth_failed' LIMIT 1"
)
_NEWEST_OK = (
    "SELECT at, rowid FROM usage WHERE subscription_id = ? AND at < ? AND NOT fallback AND outcome = 'ok'"
    " ORDER BY at DESC, rowid DESC LIMIT 1"
)
_AUTH_FAILURES_AFTER = (
    "SELECT at FROM usage WHERE subscription_id = ? AND outcome != 'ok' AND at >= ? AND at < ? AND NOT fallback"
    " AND outcome = 'auth_failed' AND NOT (at = ? AND rowid <= ?) ORDER BY at, rowid"
)
_FALLBACK = "SELECT at, cost_micros FROM usage WHERE fallback AND at < ? ORDER BY at, rowid"


def _one(conn: sqlite3.Connection, query: str, args: tuple[object, ...]) -> tuple[object, ...] | None:
    row: tuple[object, ...] | None = conn.execute(query, args).fetchone()
    return row


def _subscription(conn: sqlite3.Connection, sid: str, starts: tuple[float, ...], before: float) -> EarlySpend:
    spend = tuple(
        int(conn.execute(_SPEND, (sid, start, before)).fetchone()[0]) if start < before else 0 for start in starts
    )
    ppm, since_report = None, spend[0] if spend else 0
    if starts and starts[0] < before:
        report = _one(conn, _NEWEST_REPORT, (sid, starts[0], before))
        if report is not None:
            at, rowid, ppm = report
            since_report = int(conn.execute(_SPEND_AFTER, (sid, at, before, at, rowid)).fetchone()[0])
    reset = _one(conn, _NEWEST_RESET, (sid, before))
    rate_limited_at = conn.execute(_NEWEST_RATE_LIMIT, (sid, before)).fetchone()[0]
    failures: tuple[float, ...] = ()
    if _one(conn, _HAS_AUTH_FAILURE, (sid, before)) is not None:
        ok = _one(conn, _NEWEST_OK, (sid, before)) or (float("-inf"), 0)
        failures = tuple(at for (at,) in conn.execute(_AUTH_FAILURES_AFTER, (sid, ok[0], before, *ok)))
    return EarlySpend(
        spend,
        ppm,  # type: ignore[arg-type]
        since_report,
        None if reset is None else reset[0],  # type: ignore[arg-type]
        rate_limited_at or 0.0,
        failures,
    )


def early_usage(conn: sqlite3.Connection, plan: UsagePlan) -> EarlyUsage:
    """`usage.summarize`'s summary of the records before `plan.recent_since`."""
    before = plan.recent_since
    if before == float("-inf"):
        return EarlyUsage(plan)
    subscriptions = {sid: _subscription(conn, sid, starts, before) for sid, starts in plan.starts.items()}
    fallback = [(at, cost) for at, cost in conn.execute(_FALLBACK, (before,))]
    return EarlyUsage(plan, subscriptions, fallback)


def spend_before(
    conn: sqlite3.Connection, before: float, starts: Mapping[str, Sequence[float]]
) -> dict[str, tuple[int, ...]]:
    """Per subscription, its spend from each of its starts up to `before`."""
    return {
        sid: tuple(int(conn.execute(_SPEND, (sid, start, before)).fetchone()[0]) for start in sub_starts)
        for sid, sub_starts in starts.items()
    }
