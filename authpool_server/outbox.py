"""The webhook outbox in memory: notifications waiting for delivery, and the dead letters.

The pool owns one. A notification enters it in the decision that made its
event (so both are written in one transaction), and every delivery attempt
is recorded through the pool as a write of its own; after a restart the
store's snapshot gives the outbox back, and delivery resumes where it was.
Delivered entries leave memory at once (only counted); dead letters stay
for `Status` until the event retention prunes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass, replace

from authpool_server.domain import DeliveryState, Notification, OutboxEntry
from authpool_server.webhooks.body import notification_body

__all__ = ["Attempt", "Outbox", "OutboxStatus"]

RECENT_DEAD_LETTERS = 20


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    enabled: bool
    pending: int
    delivered: int
    dead_lettered: int
    recent_dead_letters: tuple[OutboxEntry, ...]  # newest first


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one delivery attempt ended, as the dispatcher reports it."""

    notification_id: str
    delivered: bool
    error: str = ""
    retry_at: float | None = None  # None after a failure: that was the last attempt


class Outbox:
    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._entries: dict[str, OutboxEntry] = {}  # pending and dead
        # New entries whose batch is not durable yet: never sent before their event is.
        self._unsettled: set[str] = set()
        self._delivered = 0

    def restore(self, entries: list[OutboxEntry], delivered: int) -> None:
        self._entries = {entry.notification_id: entry for entry in entries}
        self._unsettled.clear()
        self._delivered = delivered

    def adopt(self, entries: Iterable[OutboxEntry]) -> None:
        """Take in entries another replica wrote (new ones, or attempts it recorded); they are durable."""
        for entry in entries:
            if entry.state is DeliveryState.DELIVERED:
                if self._entries.pop(entry.notification_id, None) is not None or entry.attempts:
                    self._delivered += 1
            else:
                self._entries[entry.notification_id] = entry

    def settle(self, notification_ids: Iterable[str]) -> None:
        """These entries' batch is durable: they may be sent."""
        self._unsettled.difference_update(notification_ids)

    def add(self, notification: Notification, now: float) -> OutboxEntry | None:
        """The new entry for `notification`, if it goes to the webhook."""
        if not self.enabled or "webhook" not in notification.channels:
            return None
        entry = OutboxEntry(
            notification_id=notification.id,
            event_sequence=notification.event.sequence,
            rule=notification.rule,
            severity=notification.severity,
            body=notification_body(notification),
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=now,
            last_error="",
            updated_at=now,
        )
        self._entries[entry.notification_id] = entry
        self._unsettled.add(entry.notification_id)
        return entry

    def _waiting(self, skip: Set[str]) -> list[OutboxEntry]:
        return [
            e
            for e in self._entries.values()
            if e.state is DeliveryState.PENDING
            and e.notification_id not in skip
            and e.notification_id not in self._unsettled
        ]

    def due(self, now: float, limit: int, *, skip: Set[str] = frozenset()) -> list[OutboxEntry]:
        """Durable pending entries whose next attempt is due, oldest first; `skip`: those in flight."""
        due = [e for e in self._waiting(skip) if e.next_attempt_at <= now]
        due.sort(key=lambda e: (e.next_attempt_at, e.event_sequence))
        return due[:limit]

    def next_due(self, *, skip: Set[str] = frozenset()) -> float | None:
        """When the earliest durable pending entry not in `skip` is due; None when there is none."""
        return min((e.next_attempt_at for e in self._waiting(skip)), default=None)

    def record(self, attempt: Attempt, now: float) -> OutboxEntry | None:
        """Apply an attempt's outcome; the updated entry to write, or None if it was not pending."""
        entry = self._entries.get(attempt.notification_id)
        if entry is None or entry.state is not DeliveryState.PENDING:
            return None
        attempts = entry.attempts + 1
        if attempt.delivered:
            del self._entries[entry.notification_id]
            self._delivered += 1
            return replace(entry, state=DeliveryState.DELIVERED, attempts=attempts, last_error="", updated_at=now)
        if attempt.retry_at is None:
            updated = replace(
                entry, state=DeliveryState.DEAD, attempts=attempts, last_error=attempt.error, updated_at=now
            )
        else:
            updated = replace(
                entry, attempts=attempts, next_attempt_at=attempt.retry_at, last_error=attempt.error, updated_at=now
            )
        self._entries[entry.notification_id] = updated
        return updated

    def prune(self, before: float) -> None:
        """Forget dead letters last updated before `before` (the store deletes them in the same write)."""
        self._entries = {
            k: e for k, e in self._entries.items() if e.state is DeliveryState.PENDING or e.updated_at >= before
        }

    def status(self) -> OutboxStatus:
        dead = sorted(
            (e for e in self._entries.values() if e.state is DeliveryState.DEAD),
            key=lambda e: e.updated_at,
            reverse=True,
        )
        return OutboxStatus(
            enabled=self.enabled,
            pending=sum(e.state is DeliveryState.PENDING for e in self._entries.values()),
            delivered=self._delivered,
            dead_lettered=len(dead),
            recent_dead_letters=tuple(dead[:RECENT_DEAD_LETTERS]),
        )
