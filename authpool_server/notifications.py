"""Notification rules: which events become notifications, with which severity, to which channels.

Pure: `Rules.for_event` looks at one event and the configured rules. The
pool calls it for every event it makes, in the same decision, so a webhook
notification enters the outbox in the same transaction as its event.

| rule                    | fires on                                                        | severity |
|-------------------------|-----------------------------------------------------------------|----------|
| `usage_threshold`       | USAGE_THRESHOLD_CROSSED at the rule's threshold (once per       | info; warning |
|                         | subscription, window and threshold)                             | from 0.9 |
| `failover`              | a lease granted on the fallback or by failover, or moved off a  | warning  |
|                         | subscription that can no longer serve it                        |          |
| `rotation`              | ROTATION (an operator drained or resumed a subscription)        | info     |
| `all_exhausted`         | POOL_EXHAUSTED (no subscription takes new clients)              | critical |
| `subscription_disabled` | a status change to disabled (auth failures)                     | warning  |
| `webhook_failure`       | WEBHOOK_FAILURE (a notification was dead-lettered); log only,   | warning  |
|                         | never the webhook itself, so a failing endpoint cannot loop     |          |
| `config_reloaded`       | CONFIG_RELOADED (this server applied a changed config file)     | info     |

The severities follow the guide's alert tiers (critical: all subscriptions
exhausted; warning: health and webhook failures; info: the 80 % threshold,
config reloaded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from authpool_server.domain import PPM, Event, EventType, Notification, NotificationRuleSpec, Severity

__all__ = ["Rules", "log_notification"]

log = logging.getLogger("authpool.notifications")
_LEVELS = {Severity.CRITICAL: logging.CRITICAL, Severity.WARNING: logging.WARNING, Severity.INFO: logging.INFO}

_SEVERITY = {
    "failover": Severity.WARNING,
    "rotation": Severity.INFO,
    "all_exhausted": Severity.CRITICAL,
    "subscription_disabled": Severity.WARNING,
    "webhook_failure": Severity.WARNING,
    "config_reloaded": Severity.INFO,
}
_WARNING_THRESHOLD_PPM = 900_000


def _rule_of(event: Event) -> str | None:
    """The rule type an event can trigger, if any."""
    kind = dict(event.attributes).get
    if event.type is EventType.USAGE_THRESHOLD_CROSSED:
        return "usage_threshold"
    if event.type is EventType.LEASE_GRANTED and kind("kind") in ("failover", "fallback"):
        return "failover"
    if event.type is EventType.LEASE_MOVED and kind("cause") == "failover":
        return "failover"
    if event.type is EventType.ROTATION:
        return "rotation"
    if event.type is EventType.POOL_EXHAUSTED:
        return "all_exhausted"
    if event.type is EventType.SUBSCRIPTION_STATUS_CHANGED and kind("to") == "disabled":
        return "subscription_disabled"
    if event.type is EventType.WEBHOOK_FAILURE:
        return "webhook_failure"
    if event.type is EventType.CONFIG_RELOADED:
        return "config_reloaded"
    return None


def _summary(event: Event, rule: str) -> str:
    attributes = dict(event.attributes)
    subscription = event.subscription_id or "-"
    if rule == "usage_threshold":
        share = int(attributes.get("threshold_ppm", "0")) / PPM
        return f"subscription {subscription} has spent {share:.0%} of its weekly budget"
    if rule == "failover":
        return f"client {event.client_id} is now on {subscription} ({attributes.get('kind', 'failover')})"
    if rule == "rotation":
        return f"subscription {subscription} is {attributes.get('phase', 'rotating')}"
    if rule == "all_exhausted":
        return "no subscription can take new clients: they go to the fallback"
    if rule == "subscription_disabled":
        return f"subscription {subscription} is disabled after repeated auth failures"
    if rule == "webhook_failure":
        return f"webhook notification {attributes.get('notification_id', '?')} was given up"
    if rule == "config_reloaded":
        changes = [f"{key} {attributes[key]}" for key in ("added", "removed", "changed") if attributes.get(key)]
        return "configuration reloaded" + (f": {'; '.join(changes)}" if changes else "")
    return f"{event.type} on {subscription}"


class Rules:
    """The enabled rules, indexed by the rule type an event can trigger."""

    def __init__(self, rules: Sequence[NotificationRuleSpec]) -> None:
        self._by_type: dict[str, list[tuple[int, NotificationRuleSpec]]] = {}
        for index, rule in enumerate(rules):
            if rule.enabled:
                self._by_type.setdefault(rule.type, []).append((index, rule))
        self.usage_thresholds_ppm = tuple(
            sorted({rule.threshold_ppm for _, rule in self._by_type.get("usage_threshold", [])})
        )

    def __bool__(self) -> bool:
        return bool(self._by_type)

    def for_event(self, event: Event) -> list[Notification]:
        """The notifications `event` causes (usually none: most events are leases coming and going)."""
        if not self._by_type:
            return []
        rule_type = _rule_of(event)
        if rule_type is None or rule_type not in self._by_type:
            return []
        found = []
        for index, rule in self._by_type[rule_type]:
            if rule_type == "usage_threshold":
                if dict(event.attributes).get("threshold_ppm") != str(rule.threshold_ppm):
                    continue
                severity = Severity.WARNING if rule.threshold_ppm >= _WARNING_THRESHOLD_PPM else Severity.INFO
            else:
                severity = _SEVERITY[rule_type]
            channels = rule.channels
            if rule_type == "webhook_failure":
                channels = tuple(c for c in channels if c != "webhook")
            if channels:
                found.append(
                    Notification(
                        id=f"ntf-{event.sequence}-{index}",
                        event=event,
                        rule=rule_type,
                        severity=severity,
                        channels=channels,
                        summary=_summary(event, rule_type),
                    )
                )
        return found


def log_notification(notification: Notification) -> None:
    """The `log` channel: one line at the notification's severity."""
    event = notification.event
    context = {
        "notification_id": notification.id,
        "rule": notification.rule,
        "severity": str(notification.severity),
        "sequence": event.sequence,
    }
    if event.subscription_id:
        context["subscription_id"] = event.subscription_id
    if event.client_id:
        context["client_id"] = event.client_id
    log.log(_LEVELS[notification.severity], notification.summary, extra={"context": context})
