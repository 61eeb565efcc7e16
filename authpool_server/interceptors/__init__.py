"""The server's interceptor chain, outermost first: tracing → access log and metrics → auth → rate limit.

Tracing is the maintained OpenTelemetry gRPC instrumentation (server spans,
W3C trace context from the caller's metadata, `rpc.*` attributes); our
access interceptor adds what it lacks: the final status code of calls ended
with `abort_with_status`, and the client, subscription and decision.
"""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider

from authpool_server.interceptors.access import AccessInterceptor
from authpool_server.interceptors.auth import AuthInterceptor
from authpool_server.interceptors.ratelimit import RateLimitInterceptor
from authpool_server.security.settings import SecuritySettings
from authpool_server.telemetry.metrics import Metrics

__all__ = ["build_chain"]


def build_chain(
    security: SecuritySettings, metrics: Metrics | None, tracer_provider: TracerProvider | None
) -> list[grpc.aio.ServerInterceptor]:
    chain: list[grpc.aio.ServerInterceptor] = []
    if tracer_provider is not None:
        chain.append(aio_server_interceptor(tracer_provider=tracer_provider))
    chain.append(AccessInterceptor(metrics))
    chain.append(AuthInterceptor(security))
    if security.rate_limits is not None:
        chain.append(RateLimitInterceptor(security.rate_limits, security.open_services))
    return chain
