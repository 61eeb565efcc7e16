"""One access-log line and one latency measurement per RPC, and the span's final status.

The outermost of our interceptors (inside tracing), so what it records
includes the time spent refusing a call. It opens the per-call record that
the inner interceptors and the service fill in (`telemetry.call`).

Each line: method, status code, duration, principal and client id, plus the
subscription and decision when there is one; never a token or an email.
Health checks are logged at DEBUG, so probes every few seconds do not bury
the calls that matter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from authpool_server.grpc_paths import method_name, service_of
from authpool_server.interceptors.wrapping import BehaviorInterceptor
from authpool_server.telemetry.call import Call, close_call, open_call
from authpool_server.telemetry.metrics import Metrics

__all__ = ["AccessInterceptor"]

access_log = logging.getLogger("authpool.access")

_QUIET_SERVICES = frozenset({"grpc.health.v1.Health"})
# OpenTelemetry's gRPC conventions: on a server, only these codes are the server's fault.
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class AccessInterceptor(BehaviorInterceptor):
    def __init__(self, metrics: Metrics | None) -> None:
        super().__init__()
        self._metrics = metrics

    async def around(self, method: str, context: grpc.aio.ServicerContext, proceed: Callable[[], Any]) -> Any:
        call, token = open_call(method)
        started = time.perf_counter()
        raised: BaseException | None = None
        try:
            return await proceed()
        except BaseException as error:
            raised = error
            raise
        finally:
            close_call(token)
            self._finish(method, context, call, time.perf_counter() - started, raised)

    def _finish(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        call: Call,
        seconds: float,
        raised: BaseException | None,
    ) -> None:
        code = context.code()
        if code is None:
            if raised is None:
                code = grpc.StatusCode.OK
            elif isinstance(raised, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        elif isinstance(code, int):
            code = _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
        if self._metrics is not None:
            self._metrics.rpc_finished(method, code, seconds, decision=call.decision, outcome=call.outcome)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_FAULTS:
                span.set_status(Status(StatusCode.ERROR, code.name))
        level = logging.DEBUG if service_of(method) in _QUIET_SERVICES else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        fields: dict[str, object] = {"method": method_name(method), "code": code.name}
        fields["duration_ms"] = round(seconds * 1e3, 3)
        for name in ("principal", "client_id", "subscription_id", "decision"):
            if value := getattr(call, name):
                fields[name] = value
        access_log.log(level, "rpc", extra={"context": fields})


_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
