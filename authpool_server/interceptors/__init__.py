"""The server's interceptor chain: tracing → access log and metrics → auth → rate limit → handler.

The steps are wrapped into every method's handler as it is registered (see
`chain`): a grpc.aio interceptor would cost a coroutine and a handler
lookup per call.
"""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider

from authpool_server.interceptors.access import AccessStep
from authpool_server.interceptors.auth import AuthStep
from authpool_server.interceptors.chain import Chain, ChainedRegistration, Step
from authpool_server.interceptors.ratelimit import RateLimitStep
from authpool_server.interceptors.tracing import TracingStep
from authpool_server.security.settings import SecuritySettings
from authpool_server.telemetry.recorder import CallRecorder

__all__ = ["Chain", "ChainedRegistration", "build_chain"]


def build_chain(security: SecuritySettings, recorder: CallRecorder, tracer_provider: TracerProvider | None) -> Chain:
    steps: list[Step] = []
    if tracer_provider is not None:  # no span at all when traces go nowhere
        steps.append(TracingStep(tracer_provider))
    steps.append(AccessStep(recorder))
    steps.append(AuthStep(security))
    if security.rate_limits is not None:
        steps.append(RateLimitStep(security.rate_limits, security.open_services))
    return Chain(steps)
