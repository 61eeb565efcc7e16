"""One access-log line and one latency measurement per RPC.

Runs inside tracing and outside auth, so what it records includes the time
spent refusing a call. Each line: method, status code, duration, principal
and client id, plus the subscription and decision when there is one; never
a token or an email. Health checks are logged at DEBUG, so probes every few
seconds do not bury the calls that matter.
"""

from __future__ import annotations

import logging
import time

import grpc

from authpool_server.grpc_paths import method_name, service_of
from authpool_server.telemetry.call import Call
from authpool_server.telemetry.metrics import Metrics

__all__ = ["AccessStep"]

access_log = logging.getLogger("authpool.access")

_QUIET_SERVICES = frozenset({"grpc.health.v1.Health"})


class AccessStep:
    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    def enter(self, call: Call, context: grpc.aio.ServicerContext) -> None:
        call.started = time.perf_counter()

    def exit(
        self, call: Call, context: grpc.aio.ServicerContext, code: grpc.StatusCode, raised: BaseException | None
    ) -> None:
        seconds = time.perf_counter() - call.started
        if self._metrics is not None:
            self._metrics.rpc_finished(call, code, seconds)
        level = logging.DEBUG if service_of(call.method) in _QUIET_SERVICES else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        fields: dict[str, object] = {"method": method_name(call.method), "code": code.name}
        fields["duration_ms"] = round(seconds * 1e3, 3)
        for name in ("principal", "client_id", "subscription_id", "decision"):
            if value := getattr(call, name):
                fields[name] = value
        access_log.log(level, "rpc", extra={"context": fields})
