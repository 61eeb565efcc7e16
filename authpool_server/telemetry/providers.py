"""OpenTelemetry providers, configured from the standard `OTEL_*` environment variables.

- Metrics are always collected: the admin port serves them in Prometheus
  format at /metrics, and they are also pushed over OTLP when
  `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._METRICS_ENDPOINT`) is set.
- Traces are collected only when they go somewhere: `OTEL_EXPORTER_OTLP_ENDPOINT`
  (or `..._TRACES_ENDPOINT`) is set. Otherwise no span is made at all.
- `OTEL_SDK_DISABLED=true` turns off everything but /metrics;
  `OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none` turn off one push.
- `OTEL_EXPORTER_OTLP_PROTOCOL` picks `grpc` (the default here) or `http/protobuf`;
  endpoint, headers, certificates, timeouts and the sampler
  (`OTEL_TRACES_SAMPLER`) are read by the SDK itself, as documented upstream.

Providers (and the Prometheus registry) are built per server, never
installed globally, so several servers in one process (the tests) keep their
signals apart.

Spans carry identifiers, never secrets or emails; as with the logs, a second
line of defence masks anything shaped like an email address before a span is
exported (a client id may be `alice@laptop.example.com`, and a recorded
exception's message may quote one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Status
from opentelemetry.util.types import Attributes, AttributeValue
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from authpool_server import __version__
from authpool_server.logs import mask_emails

__all__ = ["Telemetry", "exports", "telemetry_from_env"]

# Seconds. RPCs here take ~1 ms; the guide alerts at 1 s for p95.
RPC_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REBALANCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The providers of one server; `shutdown` flushes whatever is pending.

    `registry` is what /metrics serves: this server's metrics and the
    process's (CPU, memory, file descriptors, GC), and nobody else's.
    """

    meter_provider: MeterProvider
    tracer_provider: TracerProvider | None
    registry: CollectorRegistry

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # flushes the batch of spans not yet exported
        self.meter_provider.shutdown()


def _true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() == "true"


def exports(env: Mapping[str, str], signal: str) -> bool:
    """Whether the server, run with `env`, pushes `signal` ("TRACES" or "METRICS") over OTLP."""
    if _true(env, "OTEL_SDK_DISABLED") or env.get(f"OTEL_{signal}_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))


def _protocol(env: Mapping[str, str], signal: str) -> str:
    chosen = env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    return chosen.strip().lower()


def _span_exporter(env: Mapping[str, str]) -> SpanExporter:
    if _protocol(env, "TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def _has_at(attributes: Attributes) -> bool:
    for value in (attributes or {}).values():
        if isinstance(value, str) and "@" in value:
            return True
        if isinstance(value, tuple | list) and any(isinstance(item, str) and "@" in item for item in value):
            return True
    return False


def _mask_value(value: AttributeValue) -> AttributeValue:
    if isinstance(value, str):
        return mask_emails(value)
    if isinstance(value, tuple | list):
        return tuple(mask_emails(item) if isinstance(item, str) else item for item in value)  # type: ignore[return-value]
    return value


def _mask_attributes(attributes: Attributes) -> Attributes:
    if not _has_at(attributes):
        return attributes
    return {key: _mask_value(value) for key, value in attributes.items()}  # type: ignore[union-attr]


def _needs_masking(span: ReadableSpan) -> bool:
    return (
        _has_at(span.attributes)
        or "@" in (span.status.description or "")
        or any(_has_at(event.attributes) for event in span.events)
        or any(_has_at(link.attributes) for link in span.links)
    )


def _masked(span: ReadableSpan) -> ReadableSpan:
    """The span as exported: a copy with emails masked, or the span itself when it holds none."""
    if not _needs_masking(span):
        return span
    status = span.status
    if status.description and "@" in status.description:
        status = Status(status.status_code, mask_emails(status.description))
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=_mask_attributes(span.attributes),
        events=[Event(event.name, _mask_attributes(event.attributes), event.timestamp) for event in span.events],
        links=[Link(link.context, _mask_attributes(link.attributes)) for link in span.links],
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class _MaskingSpanExporter(SpanExporter):
    """Exports through `exporter`, with anything shaped like an email masked as in the logs."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export([_masked(span) for span in spans])

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def _metric_exporter(env: Mapping[str, str]) -> object:
    if _protocol(env, "METRICS") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def telemetry_from_env(env: Mapping[str, str]) -> Telemetry:
    """Providers for one server, exporting where the environment says (nowhere by default)."""
    # Resource.create also reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    resource = Resource.create({"service.name": "authpool", "service.version": __version__})
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry)]
    if exports(env, "METRICS"):
        readers.append(PeriodicExportingMetricReader(_metric_exporter(env)))  # type: ignore[arg-type]
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=readers,
        views=[
            View(instrument_name="rpc.server.duration", aggregation=ExplicitBucketHistogramAggregation(RPC_BUCKETS)),
            View(
                instrument_name="authpool.rebalance.duration",
                aggregation=ExplicitBucketHistogramAggregation(REBALANCE_BUCKETS),
            ),
        ],
    )
    tracer_provider = None
    if exports(env, "TRACES"):
        tracer_provider = TracerProvider(resource=resource)
        exporter = _MaskingSpanExporter(_span_exporter(env))
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    return Telemetry(meter_provider=meter_provider, tracer_provider=tracer_provider, registry=registry)
