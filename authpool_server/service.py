"""The gRPC face of the pool: protobuf in, validation, protobuf out.

No policy lives here. Each method checks its request (every problem named by
field), calls one `Pool` operation, and translates the result; an
`AuthPoolError` becomes a status with `google.rpc` details through
`rpc_errors`. `*_pb2` types stop at this module.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authpool_server.api import authpool_pb2 as pb
from authpool_server.api import authpool_pb2_grpc
from authpool_server.domain import PPM, DecisionKind, Event, EventType, Lease, Outcome, PoolSpec, SubscriptionStatus
from authpool_server.errors import AuthPoolError, WatcherLagged
from authpool_server.events import EventFilter, Progress
from authpool_server.pool import Pool, UsageReport
from authpool_server.rpc_errors import to_status
from authpool_server.telemetry.call import annotate
from authpool_server.validation import MAX_COST_MICROS, MAX_FILTER_ENTRIES, MAX_TOKENS, Violations

__all__ = ["AuthPoolService", "add_to_server", "mask_email"]

log = logging.getLogger(__name__)

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

_DECISION = {
    DecisionKind.NEW: pb.DECISION_KIND_NEW,
    DecisionKind.STICKY: pb.DECISION_KIND_STICKY,
    DecisionKind.FAILOVER: pb.DECISION_KIND_FAILOVER,
    DecisionKind.FALLBACK: pb.DECISION_KIND_FALLBACK,
}
_STATUS = {
    SubscriptionStatus.ACTIVE: pb.SUBSCRIPTION_STATUS_ACTIVE,
    SubscriptionStatus.LIMITED: pb.SUBSCRIPTION_STATUS_LIMITED,
    SubscriptionStatus.EXHAUSTED: pb.SUBSCRIPTION_STATUS_EXHAUSTED,
    SubscriptionStatus.DISABLED: pb.SUBSCRIPTION_STATUS_DISABLED,
    SubscriptionStatus.DRAINING: pb.SUBSCRIPTION_STATUS_DRAINING,
}
_OUTCOME = {
    pb.USAGE_OUTCOME_UNSPECIFIED: Outcome.OK,
    pb.USAGE_OUTCOME_OK: Outcome.OK,
    pb.USAGE_OUTCOME_RATE_LIMITED: Outcome.RATE_LIMITED,
    pb.USAGE_OUTCOME_AUTH_FAILED: Outcome.AUTH_FAILED,
    pb.USAGE_OUTCOME_SERVER_ERROR: Outcome.SERVER_ERROR,
}
_EVENT_TYPE = {
    EventType.LEASE_GRANTED: pb.EVENT_TYPE_LEASE_GRANTED,
    EventType.LEASE_RELEASED: pb.EVENT_TYPE_LEASE_RELEASED,
    EventType.LEASE_EXPIRED: pb.EVENT_TYPE_LEASE_EXPIRED,
    EventType.LEASE_MOVED: pb.EVENT_TYPE_LEASE_MOVED,
    EventType.USAGE_RECORDED: pb.EVENT_TYPE_USAGE_RECORDED,
    EventType.SUBSCRIPTION_STATUS_CHANGED: pb.EVENT_TYPE_SUBSCRIPTION_STATUS_CHANGED,
    EventType.REBALANCE_COMPLETED: pb.EVENT_TYPE_REBALANCE_COMPLETED,
    EventType.ROTATION: pb.EVENT_TYPE_ROTATION,
    EventType.USAGE_THRESHOLD_CROSSED: pb.EVENT_TYPE_USAGE_THRESHOLD_CROSSED,
    EventType.POOL_EXHAUSTED: pb.EVENT_TYPE_POOL_EXHAUSTED,
    EventType.WEBHOOK_FAILURE: pb.EVENT_TYPE_WEBHOOK_FAILURE,
    EventType.CONFIG_RELOADED: pb.EVENT_TYPE_CONFIG_RELOADED,
}

_EVENT_TYPE_OF = {wire: domain for domain, wire in _EVENT_TYPE.items()}
# Bounds of WatchEventsRequest.progress_interval, in seconds.
_PROGRESS_INTERVAL = (1.0, 3600.0)
# Bounds of WatchEventsRequest.max_batch_events and batch_window (seconds).
_MAX_BATCH_EVENTS = 1000
_BATCH_WINDOW = (0.0, 1.0)


_INTERNAL = AuthPoolError("internal error; the server log has the details")


# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_TIMESTAMP_SECONDS = -62_135_596_800
_MAX_TIMESTAMP_SECONDS = 253_402_300_799
_INT64_MAX = 2**63 - 1


def mask_email(email: str) -> str:
    """`team+sub1@company.com` -> `t***@company.com`: enough to tell accounts apart."""
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(round(seconds * 1e9))
    return stamp


def _errors_as_status(
    method: Callable[[AuthPoolService, _Request, grpc.aio.ServicerContext], Awaitable[_Response]],
) -> Callable[[AuthPoolService, _Request, grpc.aio.ServicerContext], Awaitable[_Response]]:
    @functools.wraps(method)
    async def wrapper(self: AuthPoolService, request: _Request, context: grpc.aio.ServicerContext) -> _Response:
        try:
            return await method(self, request, context)
        except AuthPoolError as error:
            await context.abort_with_status(to_status(error))
            raise  # unreachable: abort_with_status raises
        except Exception:
            # Never hand a caller a raw exception text: it may hold paths or worse.
            log.exception("%s failed unexpectedly", method.__name__)
            await context.abort_with_status(to_status(_INTERNAL))
            raise  # unreachable: abort_with_status raises

    return wrapper


class AuthPoolService(authpool_pb2_grpc.AuthPoolServicer):
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._responses = _ResponseCache()

    @property
    def _spec(self) -> PoolSpec:
        return self._pool.spec

    def _lease(self, lease: Lease) -> pb.Lease:
        if lease.fallback:
            subscription_type = self._spec.fallback.type
            credential_ref = self._spec.fallback.credential_ref
        else:
            spec = self._pool.subscription_spec(lease.subscription_id)
            subscription_type = spec.type if spec else ""
            credential_ref = spec.credential_ref if spec else ""
        return pb.Lease(
            lease_id=lease.lease_id,
            client_id=lease.client_id,
            session_id=lease.session_id,
            subscription_id=lease.subscription_id,
            subscription_type=subscription_type,
            credential_ref=credential_ref,
            granted_at=_timestamp(lease.granted_at),
            expires_at=_timestamp(lease.expires_at),
            fencing_token=lease.fencing_token,
            fallback=lease.fallback,
            labels=dict(lease.labels),
        )

    @_errors_as_status
    async def Allocate(self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext) -> pb.AllocateResponse:
        check = Violations()
        check.identifier("client_id", request.client_id)
        check.text("session_id", request.session_id, max_length=128)
        check.subscription_type("subscription_type", request.subscription_type)
        check.labels("labels", request.labels)
        check.raise_if_any()
        annotate(client_id=request.client_id)
        allocation = await self._pool.allocate(
            request.client_id,
            session_id=request.session_id,
            wanted_type=request.subscription_type,
            labels=sorted(request.labels.items()),
        )
        annotate(subscription_id=allocation.lease.subscription_id, decision=str(allocation.kind))
        return pb.AllocateResponse(
            lease=self._lease(allocation.lease),
            decision=_DECISION[allocation.kind],
            reason=allocation.reason,
        )

    @_errors_as_status
    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext) -> pb.RenewResponse:
        check = Violations()
        check.identifier("lease_id", request.lease_id)
        check.fencing_token("fencing_token", request.fencing_token)
        check.raise_if_any()
        renewal = await self._pool.renew(request.lease_id, request.fencing_token)
        annotate(client_id=renewal.lease.client_id, subscription_id=renewal.lease.subscription_id)
        return pb.RenewResponse(lease=self._lease(renewal.lease), moved=renewal.moved)

    @_errors_as_status
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        check = Violations()
        check.identifier("lease_id", request.lease_id)
        check.fencing_token("fencing_token", request.fencing_token)
        check.raise_if_any()
        released = await self._pool.release(request.lease_id, request.fencing_token)
        return pb.ReleaseResponse(released=released)

    @_errors_as_status
    async def ReportUsage(
        self, request: pb.ReportUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportUsageResponse:
        check = Violations()
        check.identifier("request_id", request.request_id)
        check.identifier("lease_id", request.lease_id)
        check.fencing_token("fencing_token", request.fencing_token)
        check.amount("cost_micros", request.cost_micros, maximum=MAX_COST_MICROS)
        check.amount("input_tokens", request.input_tokens, maximum=MAX_TOKENS)
        check.amount("output_tokens", request.output_tokens, maximum=MAX_TOKENS)
        check.text("model", request.model, max_length=128)
        if request.outcome not in _OUTCOME:
            check.add("outcome", f"unknown outcome {request.outcome}")
        limits = request.provider_limits
        remaining_ppm = None
        if limits.HasField("remaining_fraction"):
            if not 0.0 <= limits.remaining_fraction <= 1.0:  # also false for NaN
                check.add("provider_limits.remaining_fraction", "must be between 0 and 1")
            else:
                remaining_ppm = round(limits.remaining_fraction * PPM)
        reset_at = 0.0
        if limits.HasField("reset_time"):
            stamp = limits.reset_time
            # Checked by hand: ToNanoseconds raises on a Timestamp outside its documented range.
            if not (_MIN_TIMESTAMP_SECONDS <= stamp.seconds <= _MAX_TIMESTAMP_SECONDS and 0 <= stamp.nanos < 10**9):
                check.add("provider_limits.reset_time", "is not a valid timestamp (years 0001-9999, nanos 0-999999999)")
            else:
                reset_at = stamp.ToNanoseconds() / 1e9
                if reset_at < 0:
                    check.add("provider_limits.reset_time", "must be after 1970")
        check.raise_if_any()
        ack = await self._pool.report_usage(
            UsageReport(
                request_id=request.request_id,
                lease_id=request.lease_id,
                fencing_token=request.fencing_token,
                cost_micros=request.cost_micros,
                input_tokens=request.input_tokens,
                output_tokens=request.output_tokens,
                model=request.model,
                outcome=_OUTCOME[request.outcome],
                provider_remaining_ppm=remaining_ppm,
                provider_reset_at=reset_at,
            )
        )
        # A retried report (same request_id) is answered again but counted once.
        annotate(subscription_id=ack.subscription_id, outcome="" if ack.duplicate else str(_OUTCOME[request.outcome]))
        return pb.ReportUsageResponse(duplicate=ack.duplicate, subscription_id=ack.subscription_id)

    @_errors_as_status
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        status = self._pool.status(include_clients=request.include_clients)
        subscriptions = [
            pb.SubscriptionState(
                subscription_id=view.spec.id,
                type=view.spec.type,
                masked_email=mask_email(view.spec.email),
                status=_STATUS[view.status],
                health_score=view.health,
                live_clients=view.live_clients,
                max_clients=view.spec.max_clients,
                weekly_usage_micros=view.window_usage_micros,
                weekly_budget_micros=view.spec.weekly_budget_micros,
                utilization=view.window_usage_micros / view.spec.weekly_budget_micros,
                window_start=_timestamp(view.window_start),
                window_end=_timestamp(view.window_end),
                # A provider's far-future reset time can stretch a window past what int64 holds.
                spend_rate_micros_per_hour=min(view.forecast.spend_rate_micros_per_hour, _INT64_MAX),
                projected_window_usage_micros=min(view.forecast.projected_window_spend_micros, _INT64_MAX),
                seconds_to_threshold=view.forecast.seconds_to_threshold,
                recent_error_rate=view.error_rate,
            )
            for view in status.subscriptions
        ]
        views = status.subscriptions
        totals = pb.PoolTotals(
            subscriptions=len(views),
            active_subscriptions=sum(1 for view in views if view.status is SubscriptionStatus.ACTIVE),
            live_clients=sum(view.live_clients for view in views),
            fallback_clients=status.fallback_clients,
            weekly_usage_micros=sum(view.window_usage_micros for view in views),
            weekly_budget_micros=sum(view.spec.weekly_budget_micros for view in views),
            fallback_usage_micros=status.fallback_usage_micros,
            average_health=sum(view.health for view in views) / len(views) if views else 0.0,
            last_sequence=status.last_sequence,
        )
        webhooks = status.webhooks
        return pb.StatusResponse(
            subscriptions=subscriptions,
            totals=totals,
            clients=[self._lease(lease) for lease in status.leases],
            as_of=_timestamp(status.as_of),
            webhooks=pb.WebhookState(
                enabled=webhooks.enabled,
                pending=webhooks.pending,
                delivered=webhooks.delivered,
                dead_lettered=webhooks.dead_lettered,
                recent_dead_letters=[
                    pb.DeadLetter(
                        notification_id=entry.notification_id,
                        event_sequence=entry.event_sequence,
                        rule=entry.rule,
                        attempts=entry.attempts,
                        last_error=entry.last_error,
                        failed_at=_timestamp(entry.updated_at),
                    )
                    for entry in webhooks.recent_dead_letters
                ],
            ),
        )

    @_errors_as_status
    async def Rebalance(self, request: pb.RebalanceRequest, context: grpc.aio.ServicerContext) -> pb.RebalanceResponse:
        outcome = await self._pool.rebalance(dry_run=request.dry_run)
        return pb.RebalanceResponse(
            moves=[
                pb.Move(
                    lease_id=move.lease_id,
                    client_id=move.client_id,
                    from_subscription_id=move.from_subscription_id,
                    to_subscription_id=move.to_subscription_id,
                    fencing_token=token,
                )
                for move, token in outcome.moves
            ],
            reason=outcome.reason,
            dry_run=outcome.dry_run,
        )

    @_errors_as_status
    async def DrainSubscription(
        self, request: pb.DrainSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainSubscriptionResponse:
        check = Violations()
        check.identifier("subscription_id", request.subscription_id)
        check.raise_if_any()
        moved = await self._pool.drain(request.subscription_id)
        return pb.DrainSubscriptionResponse(clients_moved=moved)

    @_errors_as_status
    async def ResumeSubscription(
        self, request: pb.ResumeSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeSubscriptionResponse:
        check = Violations()
        check.identifier("subscription_id", request.subscription_id)
        check.raise_if_any()
        await self._pool.resume(request.subscription_id)
        return pb.ResumeSubscriptionResponse()

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext) -> None:
        # A coroutine that writes through `context.write` (not an async
        # generator): its task is the one blocked when the client stops
        # reading, so the hub can cut it (see `_watch`).
        try:
            plan = self._watch_request(request)
        except AuthPoolError as error:
            await context.abort_with_status(to_status(error))
            raise  # unreachable: abort_with_status raises
        await self._watch(request.after_sequence, plan, context)

    def _watch_request(self, request: pb.WatchEventsRequest) -> _WatchPlan:
        check = Violations()
        if check.entries("types", request.types, maximum=MAX_FILTER_ENTRIES):
            for index, value in enumerate(request.types):
                check.enum_value(f"types[{index}]", value, _EVENT_TYPE_OF, kind="event type")
        check.identifiers("subscription_ids", request.subscription_ids, maximum=MAX_FILTER_ENTRIES)
        check.identifiers("client_ids", request.client_ids, maximum=MAX_FILTER_ENTRIES)
        progress_seconds: float | None = self._spec.watch_progress_seconds
        if request.HasField("progress_interval"):
            interval = request.progress_interval
            low, high = _PROGRESS_INTERVAL
            progress_seconds = check.duration(
                "progress_interval", interval.seconds, interval.nanos, minimum=low, maximum=high
            )
        if request.max_batch_events > _MAX_BATCH_EVENTS:
            check.add("max_batch_events", f"must be at most {_MAX_BATCH_EVENTS}, got {request.max_batch_events}")
        window: float | None = 0.0
        if request.HasField("batch_window"):
            low, high = _BATCH_WINDOW
            window = check.duration(
                "batch_window", request.batch_window.seconds, request.batch_window.nanos, minimum=low, maximum=high
            )
            if window and request.max_batch_events <= 1:
                check.add("batch_window", "needs max_batch_events above 1: events sent one by one never wait")
        check.raise_if_any()
        assert progress_seconds is not None
        assert window is not None
        only = EventFilter(
            types=frozenset(_EVENT_TYPE_OF[value] for value in request.types),
            subscription_ids=frozenset(request.subscription_ids),
            client_ids=frozenset(request.client_ids),
        )
        return _WatchPlan(only, progress_seconds, max(1, request.max_batch_events), window)

    async def _watch(self, after_sequence: int, plan: _WatchPlan, context: grpc.aio.ServicerContext) -> None:
        """Stream the hub's events to the caller; a watcher that falls too far behind is cut.

        A client that stops reading leaves this task blocked in a write on
        HTTP/2 flow control, where no check of ours runs. So when its queue
        overflows, the hub (from the publisher, which never waits) calls
        `cut`: the watcher is already unregistered and its queue dropped, and
        this task is cancelled out of the blocked write and ends the call with
        ABORTED (WATCHER_LAGGED) naming the last sequence it handed over.
        """
        task = asyncio.current_task()
        assert task is not None
        lagged = False

        def cut() -> None:
            nonlocal lagged
            lagged = True
            task.cancel()

        sent = after_sequence  # the last sequence handed to the transport: where a resume starts
        try:
            # A cursor from another replica may be a moment ahead of this one.
            await self._pool.caught_up_to(after_sequence)
            # Headers first: the caller knows at once that its stream is open.
            await context.send_initial_metadata(())
            stream = self._pool.events.watch_batches(
                after_sequence,
                only=plan.only,
                progress_seconds=plan.progress_seconds,
                on_lag=cut,
                max_events=plan.max_batch_events,
                window=plan.batch_window,
            )
            responses = self._responses
            batched = plan.max_batch_events > 1
            try:
                async for item in stream:
                    # Each write is the response's wire form (see `add_to_server`). Once a
                    # write has started the message goes out ahead of any status, even if
                    # this task is cancelled while it waits.
                    if isinstance(item, Progress):
                        sent = item.sequence
                        await context.write(responses.progress(item))
                    elif batched:
                        sent = item[-1].sequence
                        await context.write(responses.batch(item))
                    else:
                        for event in item:
                            sent = event.sequence
                            await context.write(responses.event(event))
            finally:
                await stream.aclose()
            return  # the hub's stream never ends by itself
        except asyncio.CancelledError:
            if not lagged:
                raise  # the caller went away, or the server is stopping
            task.uncancel()
            error: AuthPoolError = WatcherLagged(sent)
        except AuthPoolError as raised:
            error = raised
        except Exception:
            log.exception("WatchEvents failed unexpectedly")
            error = _INTERNAL
        try:
            await context.abort_with_status(to_status(error))
        except grpc.aio.AbortError:
            raise
        except Exception:
            # The status waits behind the messages already on their way (HTTP/2
            # sends trailers after data); a caller that leaves instead of
            # reading them fails it. grpc ends the call all the same.
            log.debug("the caller left before the end of its event stream reached it")


@dataclass(frozen=True, slots=True)
class _WatchPlan:
    """A validated WatchEventsRequest, apart from its cursor."""

    only: EventFilter
    progress_seconds: float
    max_batch_events: int
    batch_window: float


_RECENT_RESPONSES_KEPT = 1024
# The wire tags (field number << 3 | length-delimited) of WatchEventsResponse.event
# and EventBatch.events (both field 1), and of WatchEventsResponse.batch (field 3).
_EVENT_TAG = b"\x0a"
_BATCH_TAG = b"\x1a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _ResponseCache:
    """The wire form of recent events' responses: a live event goes to every watcher that wants it, encoded once.

    An event's entry is its `WatchEventsResponse(event=...)` serialised, which
    is byte for byte the entry of that event in `EventBatch.events` (both
    field 1 of their message), so a batch is its events' entries joined
    under one header: no protobuf object is built or encoded per watcher.
    Each entry holds the event it was built from, so the identity check
    cannot be fooled by a sequence reused after a restore.
    """

    def __init__(self) -> None:
        self._recent: dict[int, tuple[Event, bytes]] = {}

    def event(self, event: Event) -> bytes:
        recent = self._recent.get(event.sequence)
        if recent is not None and recent[0] is event:
            return recent[1]
        encoded = _event(event).SerializeToString()
        entry = _EVENT_TAG + _varint(len(encoded)) + encoded
        if len(self._recent) >= _RECENT_RESPONSES_KEPT:
            del self._recent[next(iter(self._recent))]
        self._recent[event.sequence] = (event, entry)
        return entry

    def batch(self, events: Sequence[Event]) -> bytes:
        body = b"".join([self.event(event) for event in events])
        return _BATCH_TAG + _varint(len(body)) + body

    @staticmethod
    def progress(item: Progress) -> bytes:
        response = pb.WatchEventsResponse(progress=pb.Progress(sequence=item.sequence, time=_timestamp(time.time())))
        return response.SerializeToString()


def _wire(response: bytes | pb.WatchEventsResponse) -> bytes:
    """WatchEvents' serializer: its handler writes responses already encoded."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class _Handlers:
    """Stands in for the server while the generated code hands over the method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers


class Registry(Protocol):
    """Where handlers are registered: a grpc.aio server, or what chains them on their way to one."""

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None: ...

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None: ...


def add_to_server(service: AuthPoolService, server: Registry) -> None:
    """`add_AuthPoolServicer_to_server`, with WatchEvents taking responses already encoded (`_ResponseCache`)."""
    captured = _Handlers()
    authpool_pb2_grpc.add_AuthPoolServicer_to_server(service, captured)  # type: ignore[arg-type]
    handlers = dict(captured.handlers)
    watch = handlers["WatchEvents"]
    handlers["WatchEvents"] = grpc.unary_stream_rpc_method_handler(
        service.WatchEvents, request_deserializer=watch.request_deserializer, response_serializer=_wire
    )
    name = pb.DESCRIPTOR.services_by_name["AuthPool"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _event(event: Event) -> pb.Event:
    return pb.Event(
        sequence=event.sequence,
        time=_timestamp(event.at),
        type=_EVENT_TYPE[event.type],
        subscription_id=event.subscription_id,
        client_id=event.client_id,
        lease_id=event.lease_id,
        fencing_token=event.fencing_token,
        attributes=dict(event.attributes),
    )
