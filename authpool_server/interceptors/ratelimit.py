"""Per-principal rate limits: RESOURCE_EXHAUSTED with a `RetryInfo` delay when a bucket is empty."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from authpool_server.errors import RateLimited
from authpool_server.grpc_paths import service_of
from authpool_server.interceptors.wrapping import BehaviorInterceptor
from authpool_server.rpc_errors import to_status
from authpool_server.security.ratelimit import RateLimiter
from authpool_server.security.settings import RateLimits
from authpool_server.telemetry.call import current_call

__all__ = ["RateLimitInterceptor"]


class RateLimitInterceptor(BehaviorInterceptor):
    def __init__(self, limits: RateLimits, open_services: frozenset[str]) -> None:
        super().__init__()
        self._limiter = RateLimiter(limits.default, limits.principals)
        # Probes and discovery are not limited: a throttled health check restarts pods.
        self._open_services = open_services

    async def around(self, method: str, context: grpc.aio.ServicerContext, proceed: Callable[[], Any]) -> Any:
        if service_of(method) not in self._open_services:
            call = current_call()
            principal = call.principal if call is not None and call.principal else "anonymous"
            wait = self._limiter.acquire(principal)
            if wait > 0:
                await context.abort_with_status(to_status(RateLimited(principal, wait)))
        return await proceed()
