"""The pool's vocabulary: plain, immutable values shared by every layer.

Nothing here does I/O or reads the clock. Times are POSIX seconds (floats);
money is integer micro-units (1 USD = 1,000,000), never floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

MICROS_PER_UNIT = 1_000_000
PPM = 1_000_000  # parts per million, for ratios kept as integers

__all__ = [
    "MICROS_PER_UNIT",
    "PPM",
    "BudgetReset",
    "DecisionKind",
    "EndedLease",
    "Event",
    "EventType",
    "ExtraWindow",
    "FallbackSpec",
    "Lease",
    "Outcome",
    "PoolSpec",
    "RebalancePolicy",
    "SubscriptionSpec",
    "SubscriptionStatus",
    "UsageRecord",
]


class SubscriptionStatus(StrEnum):
    ACTIVE = "active"
    LIMITED = "limited"
    EXHAUSTED = "exhausted"
    DISABLED = "disabled"
    DRAINING = "draining"


class DecisionKind(StrEnum):
    NEW = "new"
    STICKY = "sticky"
    FAILOVER = "failover"
    FALLBACK = "fallback"


class Outcome(StrEnum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    AUTH_FAILED = "auth_failed"
    SERVER_ERROR = "server_error"


class EventType(StrEnum):
    LEASE_GRANTED = "lease_granted"
    ROTATION = "rotation"
    LEASE_RELEASED = "lease_released"
    LEASE_EXPIRED = "lease_expired"
    LEASE_MOVED = "lease_moved"
    USAGE_RECORDED = "usage_recorded"
    SUBSCRIPTION_STATUS_CHANGED = "subscription_status_changed"
    REBALANCE_COMPLETED = "rebalance_completed"
    USAGE_THRESHOLD_CROSSED = "usage_threshold_crossed"
    POOL_EXHAUSTED = "pool_exhausted"
    WEBHOOK_FAILURE = "webhook_failure"
    CONFIG_RELOADED = "config_reloaded"


@dataclass(frozen=True, slots=True)
class BudgetReset:
    """When a weekly budget window starts.

    Either every `weekday` (0 = Monday) at `hour`:`minute` wall-clock time in
    `timezone` (an IANA name; the window follows daylight saving time), or,
    when `anchor` is set, every 7 x 24 hours from that POSIX time, for a
    subscription that resets at its own moment.
    """

    weekday: int = 0
    hour: int = 0
    minute: int = 0
    timezone: str = "UTC"
    anchor: float | None = None


@dataclass(frozen=True, slots=True)
class ExtraWindow:
    """A shorter limit beside the weekly budget, e.g. a five-hour session allowance.

    Windows of `length_seconds` follow one another from `anchor` (POSIX
    seconds); spend within one may not pass `budget_micros`.
    """

    name: str
    length_seconds: float
    budget_micros: int
    anchor: float = 0.0


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """One subscription as configured."""

    id: str
    email: str
    type: str
    credential_ref: str
    weekly_budget_micros: int
    max_clients: int
    reset: BudgetReset = field(default_factory=BudgetReset)
    extra_windows: tuple[ExtraWindow, ...] = ()


@dataclass(frozen=True, slots=True)
class FallbackSpec:
    """The pay-as-you-go credential used when the pool is spent."""

    id: str = "fallback"
    type: str = "pay-as-you-go"
    credential_ref: str = ""


@dataclass(frozen=True, slots=True)
class RebalancePolicy:
    enabled: bool = True
    interval_seconds: float = 300.0
    cost_gap_micros: int = 5 * MICROS_PER_UNIT
    max_moves_per_cycle: int = 3
    idle_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class NotificationRuleSpec:
    """One of the config's `notifications.rules`."""

    type: str  # usage_threshold, failover, rotation, all_exhausted, subscription_disabled, ...
    channels: tuple[str, ...]  # "webhook", "log"
    threshold_ppm: int = 0  # usage_threshold only: the share of the weekly budget
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """Everything the policy needs to know about the pool's configuration."""

    subscriptions: tuple[SubscriptionSpec, ...]
    threshold_ppm: int = 850_000
    fallback_when_exhausted: bool = True
    fallback: FallbackSpec = field(default_factory=FallbackSpec)
    rebalancing: RebalancePolicy = field(default_factory=RebalancePolicy)
    lease_ttl_seconds: float = 60.0
    # A rate-limited report keeps its subscription LIMITED this long.
    cooldown_seconds: float = 300.0
    # This many auth failures in a row disable a subscription until an operator resumes it.
    auth_failure_limit: int = 3
    # Outcomes within this window make up a subscription's recent error rate.
    error_window_seconds: float = 900.0
    # Spend within this window sets the spend rate that forecasts extrapolate.
    forecast_horizon_seconds: float = 6 * 3600.0
    usage_retention_seconds: float = 7 * 86_400.0
    event_retention_seconds: float = 7 * 86_400.0
    # How long an ended lease is remembered so late usage reports still count.
    ended_lease_retention_seconds: float = 3_600.0
    # Events a watcher may fall behind by before its stream is ended (resume to go on).
    watcher_buffer: int = 10_000
    # An idle watcher gets a progress message this often.
    watch_progress_seconds: float = 10.0
    notification_rules: tuple[NotificationRuleSpec, ...] = ()
    # A webhook URL and signing secret are configured: webhook notifications go to the outbox.
    webhooks_enabled: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """A client's right to one credential until `expires_at`.

    `fencing_token` grows with every grant and move. `acked_token` is the
    newest token the holder has been told of; tokens below it are stale.
    `history` maps every earlier token of this lease to the subscription it
    was on, so late usage is charged where it was spent.
    """

    lease_id: str
    client_id: str
    session_id: str
    subscription_id: str
    fallback: bool
    granted_at: float
    expires_at: float
    fencing_token: int
    acked_token: int
    last_used_at: float
    wanted_type: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    history: tuple[tuple[int, str], ...] = ()

    def subscription_at(self, token: int) -> str | None:
        """The subscription the lease was on under `token`, if it ever was."""
        if token == self.fencing_token:
            return self.subscription_id
        for past_token, subscription_id in self.history:
            if past_token == token:
                return subscription_id
        return None


@dataclass(frozen=True, slots=True)
class EndedLease:
    """What is kept of a released or expired lease for late usage reports."""

    lease: Lease
    ended_at: float


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    lease_id: str
    client_id: str
    subscription_id: str
    fallback: bool
    at: float
    cost_micros: int
    input_tokens: int
    output_tokens: int
    model: str
    outcome: Outcome
    # What the provider said about this subscription's weekly allowance with
    # this response (as rate-limit headers give it), if anything: the share
    # left in parts per million, and when its window resets (0 if not said).
    provider_remaining_ppm: int | None = None
    provider_reset_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the event log; `sequence` is gapless and increasing."""

    sequence: int
    at: float
    type: EventType
    subscription_id: str = ""
    client_id: str = ""
    lease_id: str = ""
    fencing_token: int = 0
    attributes: tuple[tuple[str, str], ...] = ()


class Severity(StrEnum):
    """The guide's alert tiers."""

    CRITICAL = "critical"  # PagerDuty: all subscriptions exhausted
    WARNING = "warning"  # Slack: health, failover, disabled subscriptions, webhook failures
    INFO = "info"  # email: budget thresholds, rotations, config reloaded


@dataclass(frozen=True, slots=True)
class Notification:
    """What a notification rule made of one event, for its channels.

    `id` is stable (the event's sequence and the rule's position), so every
    delivery attempt, before and after a restart, carries the same
    `webhook-id` and a receiver can drop repeats.
    """

    id: str
    event: Event
    rule: str  # the rule's type, e.g. "usage_threshold"
    severity: Severity
    channels: tuple[str, ...]  # "webhook", "log"
    summary: str  # one line for people; identifiers only, never secrets or emails


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD = "dead"  # given up after the last attempt


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A webhook notification and where its delivery stands; written with the event that caused it."""

    notification_id: str
    event_sequence: int
    rule: str
    severity: Severity
    body: str  # the JSON body, exactly as signed and sent on every attempt
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str
    updated_at: float
