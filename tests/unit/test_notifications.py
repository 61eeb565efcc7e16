"""Notification rules and the outbox, without a server."""

from __future__ import annotations

import pytest

from authpool_server.domain import (
    DeliveryState,
    Event,
    EventType,
    NotificationRuleSpec,
    Severity,
)
from authpool_server.notifications import Rules
from authpool_server.outbox import Attempt, Outbox

# The guide's template, plus the rules it does not list.
GUIDE_RULES = (
    NotificationRuleSpec("usage_threshold", ("webhook",), threshold_ppm=800_000),
    NotificationRuleSpec("usage_threshold", ("webhook",), threshold_ppm=900_000),
    NotificationRuleSpec("failover", ("webhook",)),
    NotificationRuleSpec("rotation", ("log",), enabled=False),
    NotificationRuleSpec("all_exhausted", ("webhook", "log")),
    NotificationRuleSpec("subscription_disabled", ("log",)),
    NotificationRuleSpec("webhook_failure", ("webhook", "log")),
)


def event(type_: EventType, sequence: int = 7, **attributes: str) -> Event:
    return Event(sequence, 1_000.0, type_, subscription_id="sub1", client_id="c1", attributes=tuple(attributes.items()))


@pytest.mark.parametrize(
    ("happened", "rule", "severity", "channels"),
    [
        (
            event(EventType.USAGE_THRESHOLD_CROSSED, threshold_ppm="800000"),
            "usage_threshold",
            Severity.INFO,
            ("webhook",),
        ),
        (
            event(EventType.USAGE_THRESHOLD_CROSSED, threshold_ppm="900000"),
            "usage_threshold",
            Severity.WARNING,
            ("webhook",),
        ),
        (event(EventType.LEASE_GRANTED, kind="fallback"), "failover", Severity.WARNING, ("webhook",)),
        (event(EventType.LEASE_GRANTED, kind="failover"), "failover", Severity.WARNING, ("webhook",)),
        (event(EventType.LEASE_MOVED, kind="failover", cause="failover"), "failover", Severity.WARNING, ("webhook",)),
        (event(EventType.POOL_EXHAUSTED), "all_exhausted", Severity.CRITICAL, ("webhook", "log")),
        (
            event(EventType.SUBSCRIPTION_STATUS_CHANGED, to="disabled"),
            "subscription_disabled",
            Severity.WARNING,
            ("log",),
        ),
        # A failing webhook is never told about itself through the webhook.
        (event(EventType.WEBHOOK_FAILURE, notification_id="ntf-1-0"), "webhook_failure", Severity.WARNING, ("log",)),
    ],
)
def test_each_rule_fires_on_its_event_with_its_severity(
    happened: Event, rule: str, severity: Severity, channels: tuple[str, ...]
) -> None:
    [notification] = Rules(GUIDE_RULES).for_event(happened)
    assert (notification.rule, notification.severity, notification.channels) == (rule, severity, channels)
    assert notification.event is happened
    assert notification.id.startswith(f"ntf-{happened.sequence}-")
    assert notification.summary


@pytest.mark.parametrize(
    "quiet",
    [
        event(EventType.LEASE_GRANTED, kind="new"),
        event(EventType.LEASE_MOVED, kind="failover", cause="rebalance"),  # rebalancing is not a failover
        event(EventType.USAGE_RECORDED, cost_micros="5"),
        event(EventType.ROTATION, phase="draining"),  # its rule is disabled
        event(EventType.USAGE_THRESHOLD_CROSSED, threshold_ppm="500000"),  # no rule at 0.5
        event(EventType.SUBSCRIPTION_STATUS_CHANGED, to="limited"),
    ],
)
def test_other_events_notify_nobody(quiet: Event) -> None:
    assert Rules(GUIDE_RULES).for_event(quiet) == []


def test_ids_are_stable_so_every_attempt_carries_the_same_webhook_id() -> None:
    crossed = event(EventType.USAGE_THRESHOLD_CROSSED, sequence=42, threshold_ppm="900000")
    assert [n.id for n in Rules(GUIDE_RULES).for_event(crossed)] == ["ntf-42-1"]
    assert [n.id for n in Rules(GUIDE_RULES).for_event(crossed)] == ["ntf-42-1"]


def test_the_thresholds_to_watch_come_from_enabled_rules() -> None:
    assert Rules(GUIDE_RULES).usage_thresholds_ppm == (800_000, 900_000)
    assert not Rules(())
    assert Rules(()).for_event(event(EventType.POOL_EXHAUSTED)) == []


def test_the_outbox_retries_delivers_and_dead_letters() -> None:
    outbox = Outbox(enabled=True)
    [first] = Rules(GUIDE_RULES).for_event(event(EventType.POOL_EXHAUSTED, sequence=1))
    [second] = Rules(GUIDE_RULES).for_event(event(EventType.LEASE_GRANTED, sequence=2, kind="fallback"))
    entry = outbox.add(first, now=10.0)
    assert entry is not None
    assert entry.state is DeliveryState.PENDING
    outbox.add(second, now=11.0)
    assert outbox.due(11.0, 10) == []  # not before their batch is durable: their events might never be
    assert outbox.next_due() is None
    outbox.settle([first.id, second.id])
    assert [e.notification_id for e in outbox.due(11.0, 10)] == [first.id, second.id]
    assert outbox.due(11.0, 10, skip={first.id}) == [outbox.due(11.0, 10)[1]]  # in flight: not again

    retry = outbox.record(Attempt(first.id, delivered=False, error="HTTP 500", retry_at=20.0), now=12.0)
    assert retry is not None
    assert (retry.attempts, retry.last_error, retry.next_attempt_at) == (1, "HTTP 500", 20.0)
    assert [e.notification_id for e in outbox.due(12.0, 10)] == [second.id]  # the first waits for its backoff
    assert outbox.next_due() == 11.0

    done = outbox.record(Attempt(second.id, delivered=True), now=13.0)
    assert done is not None
    assert done.state is DeliveryState.DELIVERED
    dead = outbox.record(Attempt(first.id, delivered=False, error="timed out after 5 s"), now=21.0)
    assert dead is not None
    assert dead.state is DeliveryState.DEAD
    assert outbox.record(Attempt(first.id, delivered=True), now=22.0) is None  # dead stays dead
    status = outbox.status()
    assert (status.pending, status.delivered, status.dead_lettered) == (0, 1, 1)
    assert status.recent_dead_letters[0].last_error == "timed out after 5 s"
    outbox.prune(before=100.0)
    assert outbox.status().dead_lettered == 0


def test_log_only_rules_never_enter_the_outbox() -> None:
    outbox = Outbox(enabled=True)
    [disabled] = Rules(GUIDE_RULES).for_event(event(EventType.SUBSCRIPTION_STATUS_CHANGED, to="disabled"))
    assert outbox.add(disabled, now=1.0) is None
    [exhausted] = Rules(GUIDE_RULES).for_event(event(EventType.POOL_EXHAUSTED))
    assert Outbox(enabled=False).add(exhausted, now=1.0) is None  # no webhook configured
