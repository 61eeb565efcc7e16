"""Per-principal rate limits: RESOURCE_EXHAUSTED with a `RetryInfo` delay when a bucket is empty."""

from __future__ import annotations

from typing import Any

import grpc

from authpool_server.errors import RateLimited
from authpool_server.grpc_paths import service_of
from authpool_server.interceptors.chain import Proceed
from authpool_server.rpc_errors import to_status
from authpool_server.security.ratelimit import RateLimiter
from authpool_server.security.settings import RateLimits
from authpool_server.telemetry.call import Call

__all__ = ["RateLimitStep"]


class RateLimitStep:
    def __init__(self, limits: RateLimits, open_services: frozenset[str]) -> None:
        self._limiter = RateLimiter(limits.default, limits.principals)
        # Probes and discovery are not limited: a throttled health check restarts pods.
        self._open_services = open_services

    async def around(self, call: Call, context: grpc.aio.ServicerContext, proceed: Proceed) -> Any:
        if service_of(call.method) not in self._open_services:
            principal = call.principal or "anonymous"
            wait = self._limiter.acquire(principal)
            if wait > 0:
                await context.abort_with_status(to_status(RateLimited(principal, wait)))
        return await proceed()
