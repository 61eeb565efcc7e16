"""The store contract.

The pool is the only writer. It decides in memory, then hands the store a
`WriteBatch` holding everything the decision changed, including its events;
`write` returns only once the batch is durable, and batches are applied in
the order they were written, so event sequence numbers are committed in
order. At start the pool rebuilds its state from `open()`'s `Snapshot`: the
usage log comes back as the pool's `UsagePlan` asks, the recent records in
full and the rest summarised (see `usage.py`); a usage record older than
what the pool keeps in memory is found by its request id with `charged`.

A store for several replicas (PostgreSQL) implements the same contract and
`replication.SharedStore`: decisions are taken under a lock on the pool, and
each replica catches up on the others' writes from the change and event logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from authpool_server.domain import DeliveryState, EndedLease, Event, Lease, OutboxEntry, Severity, UsageRecord
from authpool_server.ledger import SubscriptionFlags
from authpool_server.store.usage import EarlyUsage, UsagePlanner, everything

__all__ = [
    "PruneHorizon",
    "Snapshot",
    "Store",
    "WriteBatch",
    "outbox_from_row",
    "outbox_row",
    "undelivered",
    "usage_row",
]


@dataclass(frozen=True, slots=True)
class PruneHorizon:
    """Delete what is older than these times (POSIX seconds)."""

    usage_before: float
    ended_leases_before: float
    # Also delivered and dead-lettered notifications last updated before this.
    events_before: float


@dataclass(slots=True)
class WriteBatch:
    """Everything one or more decisions changed, written atomically."""

    leases: list[Lease] = field(default_factory=list)
    ended: list[EndedLease] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    flags: list[SubscriptionFlags] = field(default_factory=list)
    # Webhook notifications, new or with a delivery attempt recorded (upserted by id).
    outbox: list[OutboxEntry] = field(default_factory=list)
    fencing_token: int = 0
    prune: PruneHorizon | None = None

    def extend(self, other: WriteBatch) -> None:
        """Append `other` after this batch (group commit merges batches)."""
        self.leases.extend(other.leases)
        self.ended.extend(other.ended)
        self.usage.extend(other.usage)
        self.events.extend(other.events)
        self.flags.extend(other.flags)
        self.outbox.extend(other.outbox)
        self.fencing_token = max(self.fencing_token, other.fencing_token)
        self.prune = other.prune or self.prune


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The durable state, as loaded at start."""

    live_leases: list[Lease]
    ended_leases: list[EndedLease]
    # The usage records from the plan's `recent_since` on (all of them by default), in time order.
    usage: list[UsageRecord]
    last_sequence: int
    fencing_token: int
    flags: list[SubscriptionFlags] = field(default_factory=list)
    # Webhook notifications not delivered: pending ones and dead letters.
    outbox: list[OutboxEntry] = field(default_factory=list)
    # How many were delivered within the retention (only counted, not loaded).
    delivered_notifications: int = 0
    # Writes committed so far (a shared store's position in its change log; 0 elsewhere).
    version: int = 0
    # The usage records before the plan's `recent_since`, summarised (nothing, by default).
    early: EarlyUsage = field(default_factory=EarlyUsage)


class Store(Protocol):
    async def open(self, plan: UsagePlanner = everything) -> Snapshot:
        """Create or migrate the schema and load the state, the usage log as `plan` asks.

        `plan` is called once, with the time of the newest event (the one
        numbered `last_sequence`, None if it is not retained), and in the same
        consistent read as the rest of the snapshot.
        """
        ...

    async def load(self, plan: UsagePlanner = everything) -> Snapshot:
        """Load the durable state again (after a failed write left memory ahead of it)."""
        ...

    async def charged(self, request_id: str) -> str | None:
        """The subscription the retained usage record with `request_id` was charged to, or None."""
        ...

    async def spend_before(self, before: float, starts: Mapping[str, Sequence[float]]) -> dict[str, tuple[int, ...]]:
        """Per subscription, its spend (not fallback) from each of its `starts` up to `before`."""
        ...

    async def write(self, batch: WriteBatch) -> None:
        """Apply `batch` atomically; return only once it is durable."""
        ...

    async def events_after(self, sequence: int, limit: int) -> list[Event]:
        """Up to `limit` events with a sequence greater than `sequence`, in order."""
        ...

    async def first_sequence(self) -> int:
        """The oldest retained event's sequence, or 0 when the log is empty."""
        ...

    async def ping(self) -> None:
        """Raise if the store cannot be reached now (readiness); cheap."""
        ...

    async def close(self) -> None:
        """Release the store's resources; later calls fail."""
        ...


def undelivered(entries: list[OutboxEntry]) -> list[OutboxEntry]:
    """Pending notifications and dead letters: what a store loads back."""
    return [e for e in entries if e.state is not DeliveryState.DELIVERED]


def outbox_row(entry: OutboxEntry) -> tuple[object, ...]:
    """An outbox entry as the column values both SQL stores keep, in their column order."""
    return (
        entry.notification_id,
        entry.event_sequence,
        entry.rule,
        entry.severity.value,
        entry.body,
        entry.state.value,
        entry.attempts,
        entry.next_attempt_at,
        entry.last_error,
        entry.updated_at,
    )


def outbox_from_row(row: Sequence[Any]) -> OutboxEntry:
    """The inverse of `outbox_row`."""
    return OutboxEntry(row[0], row[1], row[2], Severity(row[3]), row[4], DeliveryState(row[5]), *row[6:])


def usage_row(u: UsageRecord) -> tuple[object, ...]:
    """A usage record as the column values both SQL stores keep, in their column order."""
    return (
        u.request_id,
        u.lease_id,
        u.client_id,
        u.subscription_id,
        u.fallback,
        u.at,
        u.cost_micros,
        u.input_tokens,
        u.output_tokens,
        u.model,
        u.outcome.value,
        u.provider_remaining_ppm,
        u.provider_reset_at,
    )
