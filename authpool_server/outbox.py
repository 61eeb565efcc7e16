"""The webhook outbox in memory: notifications waiting for delivery, and the dead letters.

The pool owns one. A notification enters it in the decision that made its
event (so both are written in one transaction), and every delivery attempt
is recorded through the pool as a write of its own; after a restart the
store's snapshot gives the outbox back, and delivery resumes where it was.
Delivered entries leave memory at once (only counted); dead letters stay
for `Status` until the event retention prunes them.
"""

from __future__ import annotations

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
        self._delivered = 0

    def restore(self, entries: list[OutboxEntry], delivered: int) -> None:
        self._entries = {entry.notification_id: entry for entry in entries}
        self._delivered = delivered

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
        return entry

    def due(self, now: float, limit: int, *, skip: set[str] | frozenset[str] = frozenset()) -> list[OutboxEntry]:
        """Pending entries whose next attempt is due, oldest first."""
        due = [
            e
            for e in self._entries.values()
            if e.state is DeliveryState.PENDING and e.next_attempt_at <= now and e.notification_id not in skip
        ]
        due.sort(key=lambda e: (e.next_attempt_at, e.event_sequence))
        return due[:limit]

    def next_due(self) -> float | None:
        """When the earliest pending entry is due, or None when nothing is pending."""
        times = [e.next_attempt_at for e in self._entries.values() if e.state is DeliveryState.PENDING]
        return min(times, default=None)

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
