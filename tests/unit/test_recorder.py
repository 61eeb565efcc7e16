"""Access-log lines of ended calls: written in batches shortly after, stamped with when each call ended."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authpool_server.interceptors import TracingStep
from authpool_server.pool import Pool
from authpool_server.store.memory import MemoryStore
from authpool_server.telemetry.call import Call
from authpool_server.telemetry.metrics import Metrics
from authpool_server.telemetry.recorder import CallRecorder
from tests.conftest import make_spec

ALLOCATE = "/authpool.v1.AuthPool/Allocate"


def ended_call(client_id: str) -> Call:
    return Call(ALLOCATE, principal="svc", client_id=client_id, subscription_id="sub1", decision="new")


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "authpool.access"]


async def test_calls_are_logged_one_interval_later_in_order_stamped_with_their_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "authpool.access")
    recorder = CallRecorder(metrics=None, interval=0.2)
    before = time.time()
    recorder.ended(ended_call("worker-1"), grpc.StatusCode.OK, 0.0012)
    await asyncio.sleep(0.05)
    recorder.ended(ended_call("worker-2"), grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0005)
    after = time.time()
    assert access_records(caplog) == []  # not yet: the batch waits for the interval

    await asyncio.sleep(0.3)
    first, second = access_records(caplog)
    assert [r.context["client_id"] for r in (first, second)] == ["worker-1", "worker-2"]  # type: ignore[attr-defined]
    assert first.context == {  # type: ignore[attr-defined]
        "method": "Allocate",
        "code": "OK",
        "duration_ms": 1.2,
        "principal": "svc",
        "client_id": "worker-1",
        "subscription_id": "sub1",
        "decision": "new",
    }
    assert second.context["code"] == "RESOURCE_EXHAUSTED"  # type: ignore[attr-defined]
    # When the call ended, not when the batch was written a fifth of a second later.
    assert before <= first.created <= second.created <= after
    assert first.msecs == pytest.approx((first.created % 1) * 1000)


async def test_flush_writes_what_is_pending_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "authpool.access")
    recorder = CallRecorder(metrics=None, interval=60)
    recorder.ended(ended_call("worker-1"), grpc.StatusCode.OK, 0.001)
    recorder.flush()  # what a /metrics scrape does
    assert [r.context["client_id"] for r in access_records(caplog)] == ["worker-1"]  # type: ignore[attr-defined]
    recorder.flush()
    assert len(access_records(caplog)) == 1  # each call once


async def test_once_closed_it_records_what_waits_and_then_each_call_as_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "authpool.access")
    recorder = CallRecorder(metrics=None, interval=60)
    recorder.ended(ended_call("worker-1"), grpc.StatusCode.OK, 0.001)
    recorder.close()  # the server is stopping
    assert len(access_records(caplog)) == 1
    recorder.ended(ended_call("worker-2"), grpc.StatusCode.CANCELLED, 0.001)  # a call that ended after
    assert [r.context["client_id"] for r in access_records(caplog)] == ["worker-1", "worker-2"]  # type: ignore[attr-defined]


async def test_a_burst_is_written_without_waiting_for_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "authpool.access")
    recorder = CallRecorder(metrics=None, interval=60)
    for index in range(1000):
        recorder.ended(ended_call(f"worker-{index}"), grpc.StatusCode.OK, 0.001)
    assert access_records(caplog) == []  # not inside the call that reached the bound
    await asyncio.sleep(0)  # the next turn of the loop
    assert len(access_records(caplog)) == 1000  # bounded: about a thousand calls wait at most


@pytest.mark.parametrize(("level", "logged"), [(logging.INFO, ["Allocate"]), (logging.DEBUG, ["Check", "Allocate"])])
async def test_health_checks_are_logged_at_debug(
    caplog: pytest.LogCaptureFixture, level: int, logged: list[str]
) -> None:
    caplog.set_level(level, "authpool.access")
    recorder = CallRecorder(metrics=None, interval=60)
    recorder.ended(Call("/grpc.health.v1.Health/Check"), grpc.StatusCode.OK, 0.0001)
    recorder.ended(ended_call("worker-1"), grpc.StatusCode.OK, 0.001)
    recorder.flush()
    assert [r.context["method"] for r in access_records(caplog)] == logged  # type: ignore[attr-defined]


def continued_call(client_id: str, parent: object) -> Call:
    """A call whose caller sent its trace context (`parent`, as the tracing step extracted it)."""
    call = ended_call(client_id)
    call.parent = parent
    return call


async def test_each_call_gets_its_own_span_with_its_own_times_and_its_measurement_links_to_it() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    metrics = Metrics(MeterProvider(metric_readers=[reader]), Pool(make_spec(), MemoryStore()))
    recorder = CallRecorder(metrics, TracingStep(provider), interval=0.05)
    caller = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    )

    before = time.time_ns()
    recorder.ended(ended_call("root"), grpc.StatusCode.OK, 0.0003)
    recorder.ended(ended_call("other"), grpc.StatusCode.OK, 0.3)  # another bucket of the histogram
    recorder.ended(continued_call("continued", caller), grpc.StatusCode.UNAVAILABLE, 0.02)
    after = time.time_ns()
    assert exporter.get_finished_spans() == ()  # made in the batch, not in the call
    await asyncio.sleep(0.2)

    root, other, continued = exporter.get_finished_spans()
    assert root.attributes["authpool.client_id"] == "root"
    assert root.parent is None
    assert other.context.trace_id != root.context.trace_id  # a trace of its own
    assert continued.attributes["authpool.client_id"] == "continued"
    assert continued.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert continued.parent.span_id == 0xB7AD6B7169203331
    assert continued.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert continued.status.status_code is StatusCode.ERROR
    timed = ((root, 0.0003), (other, 0.3), (continued, 0.02))
    for span, seconds in timed:
        # When the call ran, not when its batch was recorded a twentieth of a second later.
        assert before <= span.end_time <= after
        assert span.end_time - span.start_time == pytest.approx(seconds * 1e9, abs=1000)

    data = reader.get_metrics_data()
    (histogram,) = [
        metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "rpc.server.duration"
    ]
    points = histogram.data.data_points  # one per status code
    assert sum(point.count for point in points) == 3
    # Each data point keeps an exemplar per bucket (the reservoir picks which): every one kept
    # must be the span of the call measured, never another call's.
    spans_by_value = {seconds: (span.context.trace_id, span.context.span_id) for span, seconds in timed}
    for point in points:
        assert point.exemplars
        for exemplar in point.exemplars:
            assert (exemplar.trace_id, exemplar.span_id) == spans_by_value[exemplar.value]


async def test_a_call_that_crashed_has_the_exception_on_its_span_and_an_answer_does_not() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = TracingStep(provider)
    recorder = CallRecorder(metrics=None, spans=tracing, interval=60)
    crashed, refused = ended_call("crashed"), ended_call("refused")
    tracing.exit(crashed, None, grpc.StatusCode.UNKNOWN, RuntimeError("the store went away"))  # type: ignore[arg-type]
    tracing.exit(refused, None, grpc.StatusCode.PERMISSION_DENIED, grpc.aio.AbortError())  # type: ignore[arg-type]
    recorder.ended(crashed, grpc.StatusCode.UNKNOWN, 0.001)
    recorder.ended(refused, grpc.StatusCode.PERMISSION_DENIED, 0.001)
    recorder.flush()

    crashed_span, refused_span = exporter.get_finished_spans()
    (event,) = crashed_span.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "RuntimeError"
    assert crashed_span.status.status_code is StatusCode.ERROR
    assert refused_span.events == ()  # an answer, not a crash
    assert refused_span.status.status_code is StatusCode.UNSET  # the caller's fault, not the server's


async def test_a_call_without_a_callers_trace_is_a_root_wherever_its_batch_is_recorded() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = CallRecorder(metrics=None, spans=TracingStep(provider), interval=60)
    recorder.ended(ended_call("root"), grpc.StatusCode.OK, 0.001)
    with provider.get_tracer("test").start_as_current_span("whoever flushes"):  # a scrape, say
        recorder.flush()

    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert spans["authpool.v1.AuthPool/Allocate"].parent is None
    assert spans["authpool.v1.AuthPool/Allocate"].context.trace_id != spans["whoever flushes"].context.trace_id
