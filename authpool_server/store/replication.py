"""Replication: how replicas sharing one store keep their memory current.

Replicas sharing a PostgreSQL store each keep the pool's state in memory.
Every write appends, in its own transaction and under the pool lock, one
change record holding the rows it wrote (leases, ended leases, usage,
subscription flags, outbox entries) and the pruning it asked for; its events
go to the event log as usual. A replica that was not the writer applies the
records after its own version, in order, and publishes the events after its
own sequence: the event log and the change records together are the
replication log.

The encoding is JSON with the fields of each record in declaration order,
so it is compact and a float round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Protocol, runtime_checkable

from authpool_server.domain import (
    DeliveryState,
    EndedLease,
    Event,
    Lease,
    OutboxEntry,
    Outcome,
    Severity,
    UsageRecord,
)
from authpool_server.ledger import SubscriptionFlags
from authpool_server.store.base import PruneHorizon, Store, WriteBatch

__all__ = ["CatchUp", "Change", "ReplicaBehind", "SharedStore", "decode_change", "encode_change"]


@dataclass(frozen=True, slots=True)
class Change:
    """One committed write of some replica: its version and the rows it wrote (no events)."""

    version: int
    leases: list[Lease] = field(default_factory=list)
    ended: list[EndedLease] = field(default_factory=list)
    usage: list[UsageRecord] = field(default_factory=list)
    flags: list[SubscriptionFlags] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)
    prune: PruneHorizon | None = None


@cache
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _values(record: Any) -> list[Any]:
    """A record's fields in declaration order (shallow: `dataclasses.astuple` deep-copies, and is slow)."""
    return [getattr(record, name) for name in _names(type(record))]


@dataclass(frozen=True, slots=True)
class CatchUp:
    """What the other replicas committed after a replica's own version and sequence, in order.

    The counters are the pool row's as read (under the pool lock, or in one
    snapshot with the records): after applying `changes` and `events`, the
    replica is at `version` and its next event is `last_sequence + 1`.
    """

    version: int
    fencing_token: int
    last_sequence: int
    changes: list[Change]
    events: list[Event]


class ReplicaBehind(Exception):
    """The change records a replica needs were pruned (or the store went back): it must reload everything."""


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store several replicas write, each deciding under the store's pool lock."""

    async def exchange(self, version: int, sequence: int, decide: Callable[[CatchUp], WriteBatch]) -> int:
        """Lock the pool, hand `decide` what others committed after `version`/`sequence`, write what it returns.

        `decide` runs synchronously while the lock is held; its batch is
        committed (with its change record, and the pool row's version bumped)
        before this returns the version now current. Raises `ReplicaBehind`
        before calling `decide` when the records since `version` are gone.
        """
        ...

    async def catch_up(self, version: int, sequence: int) -> CatchUp:
        """What others committed after `version`/`sequence`, without the lock (one consistent snapshot)."""
        ...

    async def follow(self, on_change: Callable[[int], None], on_leadership: Callable[[bool], None]) -> None:
        """Run until cancelled: report each committed version, and whether this replica leads background work."""
        ...


def encode_change(batch: WriteBatch) -> str:
    """The change record of `batch` (its events are not part of it: the event log has them)."""
    record: dict[str, Any] = {}
    if batch.leases:
        record["leases"] = [_values(lease) for lease in batch.leases]
    if batch.ended:
        record["ended"] = [[_values(e.lease), e.ended_at] for e in batch.ended]
    if batch.usage:
        record["usage"] = [_values(u) for u in batch.usage]
    if batch.flags:
        record["flags"] = [_values(f) for f in batch.flags]
    if batch.outbox:
        record["outbox"] = [_values(e) for e in batch.outbox]
    if batch.prune is not None:
        record["prune"] = _values(batch.prune)
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


def _lease(fields: list[Any]) -> Lease:
    *head, labels, history = fields
    return Lease(*head, labels=tuple(map(tuple, labels)), history=tuple(map(tuple, history)))


def _usage(fields: list[Any]) -> UsageRecord:
    return UsageRecord(*fields[:10], Outcome(fields[10]), *fields[11:])


def _outbox(fields: list[Any]) -> OutboxEntry:
    return OutboxEntry(*fields[:3], Severity(fields[3]), fields[4], DeliveryState(fields[5]), *fields[6:])


def decode_change(version: int, text: str) -> Change:
    """The inverse of `encode_change`, for the record written at `version`."""
    record = json.loads(text)
    prune = record.get("prune")
    return Change(
        version=version,
        leases=[_lease(fields) for fields in record.get("leases", ())],
        ended=[EndedLease(_lease(lease), ended_at) for lease, ended_at in record.get("ended", ())],
        usage=[_usage(fields) for fields in record.get("usage", ())],
        flags=[SubscriptionFlags(*fields) for fields in record.get("flags", ())],
        outbox=[_outbox(fields) for fields in record.get("outbox", ())],
        prune=PruneHorizon(*prune) if prune is not None else None,
    )
