"""Traces, the way an operator receives them: OTLP/gRPC to a collector named by `OTEL_*` variables.

An in-process OTLP receiver stands in for the collector. The server builds
its providers from the environment (`Server(..., telemetry=None)`), a real
channel calls it with a W3C `traceparent`, and stopping the server flushes
the spans to the receiver. Every `OTEL_*` variable of the outer environment
is removed first, so a developer's own collector settings cannot leak in.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator, default_getter, default_setter
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authpool_server.domain import PoolSpec
from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from authpool_server.telemetry.providers import telemetry_from_env
from tests.conftest import NO_AUTH, FakeClock, secret

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_SPAN_ID:016x}-01"
# Span names follow OpenTelemetry's RPC conventions: `$package.$service/$method`, no leading slash.
ALLOCATE = "authpool.v1.AuthPool/Allocate"
RENEW = "authpool.v1.AuthPool/Renew"

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# A caller's credentials and personal data, sent where a careless span could pick them up.
CALLER_TOKEN = secret("apt_s3cr3t-caller-token-0123456789")
CALLER_EMAIL = "alice.smith@example.com"


# -- the collector ---------------------------------------------------------------


@dataclass
class Collector:
    """What an OTLP collector received: every exported span, and whether metrics came too."""

    spans: list[Span] = field(default_factory=list)
    resources: list[dict[str, object]] = field(default_factory=list)
    metric_exports: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def server_spans(self, name: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.name == name and span.kind == Span.SPAN_KIND_SERVER]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._collector.lock:
            for resource_spans in request.resource_spans:
                self._collector.resources.append(attributes(resource_spans.resource.attributes))
                for scope_spans in resource_spans.scope_spans:
                    self._collector.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Metrics are pushed to the same endpoint; a collector accepts them (their content is not the point here)."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        with self._collector.lock:
            self._collector.metric_exports += 1
        return metrics_service_pb2.ExportMetricsServiceResponse()


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes(pairs: list[KeyValue]) -> dict[str, object]:
    return {pair.key: _value(pair.value) for pair in pairs}


def every_string(span: Span) -> list[str]:
    """Everything of a span a collector would store as text: attributes, event attributes, status, name."""
    texts: list[object] = [span.name, span.status.message]
    texts += attributes(span.attributes).values()
    for event in span.events:
        texts.append(event.name)
        texts += attributes(event.attributes).values()
    for link in span.links:
        texts += attributes(link.attributes).values()
    return [str(text) for text in texts]


@pytest.fixture
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OTEL_* setting of the outer environment reaches the server under test."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def collector(clean_otel_env: pytest.MonkeyPatch) -> Iterator[Collector]:
    received = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(received), receiver)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(received), receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        yield received
    finally:
        receiver.stop(grace=None)


class TracedServer:
    """A server whose telemetry comes from the environment; `stop` flushes its spans (once)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._stopped = False

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self.server.stop()  # shuts the tracer provider down, which flushes the batch of spans


@pytest.fixture
def security() -> SecuritySettings:
    return NO_AUTH


@pytest.fixture
async def traced_server(
    collector: Collector, tmp_path: Path, spec: PoolSpec, clock: FakeClock, security: SecuritySettings
) -> AsyncIterator[TracedServer]:
    server = Server(
        spec, data_dir=tmp_path, security=security, listen="127.0.0.1:0", background=False, clock=clock, grace_seconds=1
    )
    assert server.telemetry.tracer_provider is not None, "OTEL_EXPORTER_OTLP_ENDPOINT is set: spans must be exported"
    await server.start()
    traced = TracedServer(server)
    try:
        yield traced
    finally:
        await traced.stop()


async def _call(
    server: Server | TracedServer, method: str, request: object, token: str = CALLER_TOKEN
) -> grpc.aio.Call:
    """One unary call with the caller's trace context, a bearer token and an email in its metadata."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = authpool_pb2_grpc.AuthPoolStub(channel)
        call = getattr(stub, method.rsplit("/", 1)[1])(
            request,
            metadata=(
                ("traceparent", TRACEPARENT),
                ("authorization", f"Bearer {token}"),
                ("x-user-email", CALLER_EMAIL),
            ),
            timeout=5,
        )
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call  # the test reads the status from the call
        return call


# -- tests -------------------------------------------------------------------------


async def test_allocate_span_continues_the_callers_trace_with_its_identifiers(
    traced_server: TracedServer, collector: Collector
) -> None:
    call = await _call(
        traced_server,
        ALLOCATE,
        pb.AllocateRequest(
            client_id="laptop-7",
            session_id=f"session of {CALLER_EMAIL}",
            labels={"owner": CALLER_EMAIL},
        ),
    )
    assert await call.code() == grpc.StatusCode.OK
    lease = (await call).lease
    await traced_server.stop()

    [span] = collector.server_spans(ALLOCATE)
    assert int.from_bytes(span.trace_id, "big") == TRACE_ID
    assert int.from_bytes(span.parent_span_id, "big") == PARENT_SPAN_ID
    assert int.from_bytes(span.span_id, "big") not in (0, PARENT_SPAN_ID)
    found = attributes(span.attributes)
    assert found["rpc.system"] == "grpc"
    assert found["rpc.service"] == "authpool.v1.AuthPool"
    assert found["rpc.method"] == "Allocate"
    assert found["rpc.grpc.status_code"] == 0
    assert found["authpool.client_id"] == "laptop-7"
    assert found["authpool.subscription_id"] == lease.subscription_id != ""
    assert found["authpool.decision"] == "new"
    assert span.status.code != Status.STATUS_CODE_ERROR
    # The service is named by the resource, so traces from several services can be told apart.
    assert {"service.name": "authpool"}.items() <= collector.resources[0].items()

    texts = every_string(span)
    assert not [text for text in texts if EMAIL.search(text)], texts
    assert not [text for text in texts if "Bearer" in text or CALLER_TOKEN in text], texts


async def test_a_call_refused_with_a_status_records_that_status_on_its_span(
    traced_server: TracedServer, collector: Collector
) -> None:
    call = await _call(traced_server, RENEW, pb.RenewRequest(lease_id="no-such-lease", fencing_token=1))
    assert await call.code() == grpc.StatusCode.NOT_FOUND
    await traced_server.stop()

    [span] = collector.server_spans(RENEW)
    assert int.from_bytes(span.trace_id, "big") == TRACE_ID
    found = attributes(span.attributes)
    assert found["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0] == 5
    # NOT_FOUND is the caller's mistake, not the server's: OpenTelemetry's gRPC
    # conventions leave a server span's status unset for it, so error dashboards stay quiet.
    assert span.status.code == Status.STATUS_CODE_UNSET
    texts = every_string(span)
    assert not [text for text in texts if EMAIL.search(text) or "Bearer" in text], texts


@pytest.mark.parametrize(
    "security", [SecuritySettings(tokens=TokenDirectory([(CALLER_TOKEN, Principal("worker", Role.CLIENT))]))]
)
async def test_spans_name_the_principal_and_never_its_token(traced_server: TracedServer, collector: Collector) -> None:
    allowed = await _call(traced_server, ALLOCATE, pb.AllocateRequest(client_id="laptop-7"))
    assert await allowed.code() == grpc.StatusCode.OK
    refused = await _call(traced_server, RENEW, pb.RenewRequest(lease_id="l-1", fencing_token=1), token="wrong-token")
    assert await refused.code() == grpc.StatusCode.UNAUTHENTICATED
    await traced_server.stop()

    [allocate] = collector.server_spans(ALLOCATE)
    assert attributes(allocate.attributes)["authpool.principal"] == "worker"
    [renew] = collector.server_spans(RENEW)
    assert attributes(renew.attributes)["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert "authpool.principal" not in attributes(renew.attributes)
    for span in (allocate, renew):
        texts = every_string(span)
        assert not [text for text in texts if CALLER_TOKEN in text or "wrong-token" in text], texts


class KeyListingPropagator(TextMapPropagator):
    """A propagator that reads every key it is handed, as Jaeger's and OT's baggage do."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def extract(self, carrier: Any, context: Context | None = None, getter: Getter[Any] = default_getter) -> Context:
        self.seen.extend(getter.keys(carrier))
        return context if context is not None else Context()

    def inject(self, carrier: Any, context: Context | None = None, setter: Setter[Any] = default_setter) -> None:
        pass

    @property
    def fields(self) -> set[str]:
        return {"uber-trace-id"}


@pytest.fixture
def key_listing_propagator() -> Iterator[KeyListingPropagator]:
    listing = KeyListingPropagator()
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), listing]))
    try:
        yield listing
    finally:
        propagate.set_global_textmap(previous)


async def test_a_propagator_is_handed_its_fields_never_the_token(
    key_listing_propagator: KeyListingPropagator, traced_server: TracedServer, collector: Collector
) -> None:
    call = await _call(traced_server, ALLOCATE, pb.AllocateRequest(client_id="laptop-7"))
    assert await call.code() == grpc.StatusCode.OK
    await traced_server.stop()

    assert key_listing_propagator.seen == ["traceparent"]
    [span] = collector.server_spans(ALLOCATE)
    assert int.from_bytes(span.trace_id, "big") == TRACE_ID


def test_without_an_otlp_endpoint_no_span_is_made(clean_otel_env: pytest.MonkeyPatch) -> None:
    telemetry = telemetry_from_env({})
    try:
        assert telemetry.tracer_provider is None
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_SDK_DISABLED": "true"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"},
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317/v1/traces"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"},
    ],
    ids=["disabled", "disabled-with-endpoint", "disabled-with-traces-endpoint", "traces-exporter-none"],
)
def test_switched_off_tracing_makes_no_span(clean_otel_env: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    telemetry = telemetry_from_env(env)
    try:
        assert telemetry.tracer_provider is None
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize(
    ("switch", "metrics_pushed"),
    [({"OTEL_SDK_DISABLED": "true"}, False), ({"OTEL_TRACES_EXPORTER": "none"}, True)],
    ids=["sdk-disabled", "traces-exporter-none"],
)
async def test_a_collector_gets_no_span_when_tracing_is_switched_off(
    collector: Collector,
    clean_otel_env: pytest.MonkeyPatch,
    tmp_path: Path,
    spec: PoolSpec,
    clock: FakeClock,
    switch: dict[str, str],
    metrics_pushed: bool,
) -> None:
    # The endpoint is set (by `collector`) and reachable; the switch alone must keep spans home.
    for name, value in switch.items():
        clean_otel_env.setenv(name, value)
    server = Server(spec, data_dir=tmp_path, security=NO_AUTH, listen="127.0.0.1:0", background=False, clock=clock)
    assert server.telemetry.tracer_provider is None
    await server.start()
    try:
        call = await _call(server, ALLOCATE, pb.AllocateRequest(client_id="laptop-7"))
        assert await call.code() == grpc.StatusCode.OK
    finally:
        await server.stop()  # would flush spans and push metrics, were they on
    assert collector.spans == []
    assert (collector.metric_exports > 0) is metrics_pushed


async def test_an_email_shaped_identifier_is_masked_on_spans_as_in_the_logs(
    traced_server: TracedServer, collector: Collector
) -> None:
    # Client and lease ids may hold `@` (`user@host` style), so an email can arrive as one.
    allocated = await _call(traced_server, ALLOCATE, pb.AllocateRequest(client_id=CALLER_EMAIL))
    assert await allocated.code() == grpc.StatusCode.OK
    refused = await _call(traced_server, RENEW, pb.RenewRequest(lease_id="bob@example.com", fencing_token=1))
    assert await refused.code() == grpc.StatusCode.NOT_FOUND
    await traced_server.stop()

    [allocate] = collector.server_spans(ALLOCATE)
    assert attributes(allocate.attributes)["authpool.client_id"] == "a***@example.com"
    [renew] = collector.server_spans(RENEW)
    for span in (allocate, renew):
        texts = every_string(span)
        assert not [text for text in texts if EMAIL.search(text)], texts
