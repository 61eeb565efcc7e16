"""The usage records the pool holds in memory, and the request ids it has charged.

The ledgers read whole records only for the recent past (the forecast
horizon or the error window, plus a margin): the pool keeps those here, in
time order, from `kept_since` on, and lets older ones go in steps
(`evict`). They stay in the store, which summarised them into the ledgers at
start (`store.usage`); a window whose start lies before `kept_since` is
counted from spend fetched from the store (`FetchedSpend`).

Request ids make a usage report count once. The log knows the ids of the
records it holds; on a store where asking for one costs a round trip
(PostgreSQL), it knows those of every retained record as well
(`holds_every_request_id`), and forgets them only when the store prunes
them. The fallback's spend is kept here too: it is every retained fallback
record's, old or recent, until pruned.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

from authpool_server.domain import UsageRecord
from authpool_server.store.usage import EarlyUsage

__all__ = ["FetchedSpend", "UsageLog"]

log = logging.getLogger(__name__)

# The log is in time order, but for a clock step back or a record another replica wrote a moment
# earlier and this one learned of later: reading it back from the newest end, `spend_since` goes
# this far past the start before it stops.
_ORDER_SLACK_SECONDS = 600.0
# Records are let go in steps this long, not before every decision.
_EVICT_EVERY_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class FetchedSpend:
    """Spend fetched from the store for windows older than the log: per (subscription, window start), to `before`."""

    before: float
    spend: dict[tuple[str, float], int]


class UsageLog:
    """The recent usage records in time order, the request ids charged, and the fallback's spend."""

    def __init__(self, early: EarlyUsage | None = None) -> None:
        """An empty log, or one that starts where `early` ends: the store's summary of the older records.

        The summary holds their fallback spend, and their request ids where the store gives them.
        """
        self._records: deque[UsageRecord] = deque()
        self._kept_since = -math.inf
        # Request id -> subscription charged: of the records in the log and, where the store gave them
        # (`_early_ids` not None), of every retained record.
        self._request_ids: dict[str, str] = {}
        self._early_ids: deque[tuple[float, str]] | None = None  # (time, request id) older than the log
        # (time, cost) of the fallback records older than the log, until pruned: they count in `fallback_spend`.
        self._early_fallback: deque[tuple[float, int]] = deque()
        self._fallback_spend = 0
        if early is not None:
            self._kept_since = early.plan.recent_since
            if early.request_ids is not None:
                self._early_ids = deque((at, request_id) for at, request_id, _ in early.request_ids)
                self._request_ids = {request_id: sid for _, request_id, sid in early.request_ids}
            self._early_fallback = deque(early.fallback)
            self._fallback_spend = sum(cost for _, cost in early.fallback)

    @property
    def kept_since(self) -> float:
        """Records from this time on are in the log; older ones are in the store alone."""
        return self._kept_since

    @property
    def holds_every_request_id(self) -> bool:
        """Whether `charged` knows every retained record's request id, not only the log's."""
        return self._early_ids is not None

    @property
    def fallback_spend(self) -> int:
        """The spend of every retained fallback record."""
        return self._fallback_spend

    def charged(self, request_id: str) -> str | None:
        """The subscription a record with `request_id` was charged to, if this log knows it."""
        return self._request_ids.get(request_id)

    def add(self, record: UsageRecord) -> None:
        self._request_ids[record.request_id] = record.subscription_id
        self._records.append(record)
        if record.fallback:
            self._fallback_spend += record.cost_micros

    def spend_since(self, subscription_id: str, start: float, fetched: FetchedSpend | None = None) -> int:
        """A subscription's spend from `start` on, from the log (and `fetched`, for before it).

        Read from the newest record back: when a week's windows roll (every
        subscription's at once, Monday 00:00 UTC by default) each reads only
        the few records since, not the whole retention (a thousand
        subscriptions times a million records would stall every call for a
        minute).

        A window rolls only once a decision finds it ended, and the pool lets
        records go only in decisions, after the rolls: a window a roll enters
        began after the last decision, so its records are all in the log. Only
        a reload that moves a window's start (`Pool.reconfigure`) reaches
        further back, with what it fetched from the store.
        """
        total = 0
        if start < self._kept_since and fetched is not None:
            # The reconfiguration checked before it changed anything: this is a bug, not a race.
            if (subscription_id, start) not in fetched.spend or fetched.before < self._kept_since:
                raise RuntimeError(f"the spend of {subscription_id} since {start} is older than memory holds")
            total = fetched.spend[subscription_id, start]
            start = fetched.before
        elif start < self._kept_since:
            log.error("the spend of %s since %s is older than memory: counting what it holds", subscription_id, start)
        stop = start - _ORDER_SLACK_SECONDS
        for record in reversed(self._records):
            if record.at < start:
                if record.at < stop:
                    break
                continue
            if record.subscription_id == subscription_id and not record.fallback:
                total += record.cost_micros
        return total

    def evict(self, keep_since: float) -> None:
        """Let go of the records older than `keep_since` (they stay in the store), in steps."""
        if keep_since - self._kept_since < _EVICT_EVERY_SECONDS:
            return  # the common case: the pool asks before every decision
        self._kept_since = keep_since
        while self._records and self._records[0].at < keep_since:
            record = self._records.popleft()
            if self._early_ids is not None:
                self._early_ids.append((record.at, record.request_id))
            else:
                self._request_ids.pop(record.request_id, None)
            if record.fallback:
                self._early_fallback.append((record.at, record.cost_micros))

    def forget(self, usage_before: float) -> None:
        """Drop what the store prunes: every record, request id and fallback spend older than `usage_before`."""
        while self._early_fallback and self._early_fallback[0][0] < usage_before:
            self._fallback_spend -= self._early_fallback.popleft()[1]
        while self._early_ids and self._early_ids[0][0] < usage_before:
            self._request_ids.pop(self._early_ids.popleft()[1], None)
        # A retention shorter than the forecast horizon prunes records the log still holds.
        while self._records and self._records[0].at < usage_before:
            record = self._records.popleft()
            self._request_ids.pop(record.request_id, None)
            if record.fallback:
                self._fallback_spend -= record.cost_micros

    def sizes(self) -> dict[str, int]:
        """How much it holds, for /debug/memory: each should stay bounded."""
        return {
            "usage_records": len(self._records),
            "usage_request_ids": len(self._request_ids),
            "early_fallback_records": len(self._early_fallback),
            "early_request_ids": len(self._early_ids or ()),
        }
