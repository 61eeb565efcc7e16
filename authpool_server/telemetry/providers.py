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

Providers are built per server, never installed globally, so several servers
in one process (the tests) keep their signals apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from authpool_server import __version__

__all__ = ["Telemetry", "telemetry_from_env"]

# Seconds. RPCs here take ~1 ms; the guide alerts at 1 s for p95.
RPC_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REBALANCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The providers of one server; `shutdown` flushes whatever is pending."""

    meter_provider: MeterProvider
    tracer_provider: TracerProvider | None

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # flushes the batch of spans not yet exported
        self.meter_provider.shutdown()


def _true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() == "true"


def _exports(env: Mapping[str, str], signal: str) -> bool:
    if _true(env, "OTEL_SDK_DISABLED") or env.get(f"OTEL_{signal}_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))


def _protocol(env: Mapping[str, str], signal: str) -> str:
    chosen = env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    return chosen.strip().lower()


def _span_exporter(env: Mapping[str, str]) -> object:
    if _protocol(env, "TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


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
    readers: list[MetricReader] = [PrometheusMetricReader()]
    if _exports(env, "METRICS"):
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
    if _exports(env, "TRACES"):
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(env)))  # type: ignore[arg-type]
    return Telemetry(meter_provider=meter_provider, tracer_provider=tracer_provider)
