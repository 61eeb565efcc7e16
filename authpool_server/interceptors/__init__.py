"""The server's interceptor chain: tracing → access log and metrics → auth → rate limit → handler.

The steps are wrapped into every method's handler as it is registered (see
`chain`): a grpc.aio interceptor would cost a coroutine and a handler
lookup per call.
"""

from __future__ import annotations

from authpool_server.interceptors.access import AccessStep
from authpool_server.interceptors.auth import AuthStep
from authpool_server.interceptors.chain import Chain, ChainedRegistration, Step
from authpool_server.interceptors.ratelimit import RateLimitStep
from authpool_server.interceptors.tracing import TracingStep
from authpool_server.security.settings import SecuritySettings
from authpool_server.telemetry.recorder import CallRecorder

__all__ = ["Chain", "ChainedRegistration", "TracingStep", "build_chain"]


def build_chain(security: SecuritySettings, recorder: CallRecorder, tracing: TracingStep | None) -> Chain:
    """The chain; `tracing`, the step whose spans `recorder` makes (None: no span at all, traces go nowhere)."""
    steps: list[Step] = []
    if tracing is not None:
        steps.append(tracing)
    steps.append(AccessStep(recorder))
    steps.append(AuthStep(security))
    if security.rate_limits is not None:
        steps.append(RateLimitStep(security.rate_limits, security.open_services))
    return Chain(steps)
