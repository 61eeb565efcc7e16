"""An in-memory store: the real contract without a disk, for tests and the simulator.

It keeps exactly what a durable store would, so a pool rebuilt from it after
a "restart" must come back to the same state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from authpool_server.domain import DeliveryState, EndedLease, Event, Lease, OutboxEntry, UsageRecord
from authpool_server.ledger import SubscriptionFlags
from authpool_server.store.base import Snapshot, WriteBatch, undelivered
from authpool_server.store.usage import UsagePlanner, everything, summarize

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self.ended: dict[str, EndedLease] = {}
        self.usage: dict[str, UsageRecord] = {}
        self.events: list[Event] = []
        self.flags: dict[str, SubscriptionFlags] = {}
        self.outbox: dict[str, OutboxEntry] = {}
        self.fencing_token = 0
        self.last_sequence = 0
        self.writes = 0
        self.fail_next_write: Exception | None = None

    async def open(self, plan: UsagePlanner = everything) -> Snapshot:
        return await self.load(plan)

    async def load(self, plan: UsagePlanner = everything) -> Snapshot:
        newest = self.events[-1] if self.events and self.events[-1].sequence == self.last_sequence else None
        recent, early = summarize(self.usage.values(), plan(newest.at if newest else None))
        return Snapshot(
            live_leases=list(self.leases.values()),
            ended_leases=list(self.ended.values()),
            usage=recent,
            last_sequence=self.last_sequence,
            fencing_token=self.fencing_token,
            flags=list(self.flags.values()),
            outbox=undelivered(list(self.outbox.values())),
            delivered_notifications=sum(e.state is DeliveryState.DELIVERED for e in self.outbox.values()),
            early=early,
        )

    async def charged(self, request_id: str) -> str | None:
        record = self.usage.get(request_id)
        return None if record is None else record.subscription_id

    async def spend_before(self, before: float, starts: Mapping[str, Sequence[float]]) -> dict[str, tuple[int, ...]]:
        return {
            sid: tuple(
                sum(
                    u.cost_micros
                    for u in self.usage.values()
                    if u.subscription_id == sid and not u.fallback and since <= u.at < before
                )
                for since in sub_starts
            )
            for sid, sub_starts in starts.items()
        }

    async def write(self, batch: WriteBatch) -> None:
        if self.fail_next_write is not None:
            error, self.fail_next_write = self.fail_next_write, None
            raise error
        self.writes += 1
        for lease in batch.leases:
            self.leases[lease.lease_id] = lease
        for ended in batch.ended:
            self.leases.pop(ended.lease.lease_id, None)
            self.ended[ended.lease.lease_id] = ended
        for record in batch.usage:
            self.usage.setdefault(record.request_id, record)
        self.events.extend(batch.events)
        for flags in batch.flags:
            self.flags[flags.subscription_id] = flags
        for entry in batch.outbox:
            self.outbox[entry.notification_id] = entry
        if batch.events:
            self.last_sequence = batch.events[-1].sequence
        self.fencing_token = max(self.fencing_token, batch.fencing_token)
        if batch.prune is not None:
            horizon = batch.prune
            self.usage = {k: u for k, u in self.usage.items() if u.at >= horizon.usage_before}
            self.ended = {k: e for k, e in self.ended.items() if e.ended_at >= horizon.ended_leases_before}
            self.events = [e for e in self.events if e.at >= horizon.events_before]
            self.outbox = {
                k: e
                for k, e in self.outbox.items()
                if e.state is DeliveryState.PENDING or e.updated_at >= horizon.events_before
            }

    async def events_after(self, sequence: int, limit: int) -> list[Event]:
        return [e for e in self.events if e.sequence > sequence][:limit]

    async def first_sequence(self) -> int:
        return self.events[0].sequence if self.events else 0

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass
