"""Plain values the client hands back, and the requests it builds (shared by the sync and asyncio clients)."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from authpool_client.api import authpool_pb2 as pb

__all__ = ["Decision", "LeaseInfo", "Outcome", "UsageReceipt"]


class Decision(enum.Enum):
    """How an Allocate was answered."""

    NEW = pb.DECISION_KIND_NEW
    STICKY = pb.DECISION_KIND_STICKY
    FAILOVER = pb.DECISION_KIND_FAILOVER
    FALLBACK = pb.DECISION_KIND_FALLBACK
    UNSPECIFIED = pb.DECISION_KIND_UNSPECIFIED


class Outcome(enum.Enum):
    """How a provider request ended, for `report_usage`."""

    OK = pb.USAGE_OUTCOME_OK
    RATE_LIMITED = pb.USAGE_OUTCOME_RATE_LIMITED
    AUTH_FAILED = pb.USAGE_OUTCOME_AUTH_FAILED
    SERVER_ERROR = pb.USAGE_OUTCOME_SERVER_ERROR


def _time(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as the server last described it. Immutable: a renewal that moves the lease makes a new one."""

    lease_id: str
    client_id: str
    session_id: str
    subscription_id: str
    subscription_type: str
    credential_ref: str
    fencing_token: int
    fallback: bool
    granted_at: datetime
    expires_at: datetime
    labels: Mapping[str, str]

    @classmethod
    def from_pb(cls, lease: pb.Lease) -> LeaseInfo:
        return cls(
            lease_id=lease.lease_id,
            client_id=lease.client_id,
            session_id=lease.session_id,
            subscription_id=lease.subscription_id,
            subscription_type=lease.subscription_type,
            credential_ref=lease.credential_ref,
            fencing_token=lease.fencing_token,
            fallback=lease.fallback,
            granted_at=_time(lease.granted_at),
            expires_at=_time(lease.expires_at),
            labels=dict(lease.labels),
        )


@dataclass(frozen=True, slots=True)
class UsageReceipt:
    """The server's acknowledgement of one usage report.

    Attributes:
        request_id: The id the report was sent with (generated unless given);
            send it again to retry by hand, it is never counted twice.
        duplicate: The server had already counted this request id.
        subscription_id: The subscription the cost was charged to.
    """

    request_id: str
    duplicate: bool
    subscription_id: str


def allocate_request(
    client_id: str, session_id: str, subscription_type: str, labels: Mapping[str, str] | None
) -> pb.AllocateRequest:
    return pb.AllocateRequest(
        client_id=client_id, session_id=session_id, subscription_type=subscription_type, labels=dict(labels or {})
    )


def usage_request(
    *,
    lease_id: str,
    fencing_token: int,
    cost_micros: int,
    model: str,
    input_tokens: int,
    output_tokens: int,
    outcome: Outcome,
    remaining_fraction: float | None,
    resets_at: datetime | None,
    request_id: str | None,
) -> pb.ReportUsageRequest:
    # Money is integer micro-units end to end; a float here is a units mix-up (dollars?) waiting to happen.
    if isinstance(cost_micros, bool) or not isinstance(cost_micros, int):
        raise TypeError(f"cost_micros must be an int of micro-units (1 USD = 1,000,000), not {cost_micros!r}")
    request = pb.ReportUsageRequest(
        # One id per provider request, made here so that the channel's retries (which resend these bytes)
        # and the caller's own (with `request_id=receipt.request_id`) are counted once.
        request_id=request_id or str(uuid.uuid4()),
        lease_id=lease_id,
        fencing_token=fencing_token,
        cost_micros=cost_micros,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        model=model,
        outcome=outcome.value,
    )
    if remaining_fraction is not None or resets_at is not None:
        limits = pb.ProviderLimits()
        if remaining_fraction is not None:
            limits.remaining_fraction = remaining_fraction
        if resets_at is not None:
            limits.reset_time.FromDatetime(resets_at)
        request.provider_limits.CopyFrom(limits)
    return request


def receipt(request: pb.ReportUsageRequest, response: pb.ReportUsageResponse) -> UsageReceipt:
    return UsageReceipt(request.request_id, response.duplicate, response.subscription_id)


# What `watch_events` asks for by default: a busy stream's events in messages of up to 100,
# as many as the server has queued when it writes (it never waits for more unless asked).
WATCH_BATCH_EVENTS = 100


def watch_request(
    after_sequence: int,
    types: Iterable[pb.EventType.ValueType],
    subscription_ids: Iterable[str],
    client_ids: Iterable[str],
    progress_interval: float | None,
    max_batch_events: int = 1,
    batch_window: float | None = None,
) -> pb.WatchEventsRequest:
    request = pb.WatchEventsRequest(
        after_sequence=after_sequence,
        types=list(types),
        subscription_ids=list(subscription_ids),
        client_ids=list(client_ids),
        max_batch_events=max_batch_events,
    )
    if progress_interval is not None:
        request.progress_interval.FromNanoseconds(round(progress_interval * 1e9))
    if batch_window:
        request.batch_window.FromNanoseconds(round(batch_window * 1e9))
    return request


def one_by_one(message: pb.WatchEventsResponse) -> Iterator[pb.WatchEventsResponse]:
    """A stream message as the messages of an unbatched stream: a batch becomes one `event` message per event."""
    if message.WhichOneof("message") != "batch":
        yield message
        return
    for event in message.batch.events:
        single = pb.WatchEventsResponse()
        single.event.CopyFrom(event)
        yield single
