"""Per-principal rate limits: RESOURCE_EXHAUSTED with a `RetryInfo` delay when a bucket is empty."""

from __future__ import annotations

import grpc

from authpool_server.errors import RateLimited
from authpool_server.grpc_paths import service_of
from authpool_server.interceptors.chain import Hooks, Metadata
from authpool_server.security.ratelimit import RateLimiter
from authpool_server.security.settings import RateLimits
from authpool_server.telemetry.call import Call

__all__ = ["RateLimitStep"]


class RateLimitStep:
    def __init__(self, limits: RateLimits, open_services: frozenset[str]) -> None:
        self._limiter = RateLimiter(limits.default, limits.principals)
        # Probes and discovery are not limited: a throttled health check restarts pods.
        self._open_services = open_services

    def hooks(self, method: str) -> Hooks | None:
        return None if service_of(method) in self._open_services else Hooks(self.enter)

    def enter(self, call: Call, context: grpc.aio.ServicerContext, metadata: Metadata) -> RateLimited | None:
        principal = call.principal or "anonymous"
        wait = self._limiter.acquire(principal)
        return RateLimited(principal, wait) if wait > 0 else None
