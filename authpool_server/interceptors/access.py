"""Times every RPC and hands its end to the recorder: one access-log line and one latency measurement.

Runs inside tracing and outside auth, so what it records includes the time
spent refusing a call. The line and the measurement are written in batches,
shortly after the call (see `telemetry.recorder`); each line holds the
method, status code, duration, principal and client id, plus the
subscription and decision when there is one; never a token or an email.
"""

from __future__ import annotations

import time

import grpc

from authpool_server.interceptors.chain import Hooks, Metadata
from authpool_server.telemetry.call import Call
from authpool_server.telemetry.recorder import CallRecorder

__all__ = ["AccessStep"]


class AccessStep:
    def __init__(self, recorder: CallRecorder) -> None:
        self._recorder = recorder

    def hooks(self, method: str) -> Hooks:
        return Hooks(self.enter, self.exit)

    def enter(self, call: Call, context: grpc.aio.ServicerContext, metadata: Metadata) -> None:
        call.started = time.perf_counter()

    def exit(
        self, call: Call, context: grpc.aio.ServicerContext, code: grpc.StatusCode, raised: BaseException | None
    ) -> None:
        self._recorder.ended(call, code, time.perf_counter() - call.started)
