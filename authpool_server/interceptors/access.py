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
from typing import Any

import grpc

from authpool_server.grpc_paths import method_name, service_of
from authpool_server.interceptors.chain import Proceed, final_code
from authpool_server.telemetry.call import Call
from authpool_server.telemetry.metrics import Metrics

__all__ = ["AccessStep"]

access_log = logging.getLogger("authpool.access")

_QUIET_SERVICES = frozenset({"grpc.health.v1.Health"})


class AccessStep:
    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    async def around(self, call: Call, context: grpc.aio.ServicerContext, proceed: Proceed) -> Any:
        started = time.perf_counter()
        raised: BaseException | None = None
        try:
            return await proceed()
        except BaseException as error:
            raised = error
            raise
        finally:
            self._finish(call, final_code(context, raised), time.perf_counter() - started)

    def _finish(self, call: Call, code: grpc.StatusCode, seconds: float) -> None:
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
