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


async def test_a_measurement_links_to_its_own_calls_trace_never_to_another_calls() -> None:
    # The batch is recorded later, in whatever context its timer runs: here the timer is
    # started inside a traced call, and the untraced call after it must not take its trace.
    reader = InMemoryMetricReader()
    metrics = Metrics(MeterProvider(metric_readers=[reader]), Pool(make_spec(), MemoryStore()))
    recorder = CallRecorder(metrics, interval=0.05)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("traced call") as span:
        recorder.ended(ended_call("traced"), grpc.StatusCode.OK, 0.0003)  # starts the batch's timer
    recorder.ended(ended_call("untraced"), grpc.StatusCode.OK, 0.3)  # another bucket of the histogram
    await asyncio.sleep(0.2)

    data = reader.get_metrics_data()
    (histogram,) = [
        metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "rpc.server.duration"
    ]
    (point,) = histogram.data.data_points
    assert point.count == 2
    assert [(e.value, e.trace_id) for e in point.exemplars] == [(0.0003, span.get_span_context().trace_id)]
