"""One grpc.aio interceptor that runs the steps of the chain around every call.

A grpc.aio interceptor sees a method's name before the call and must return
a handler; per-call work (which needs the servicer context) happens in a
wrapper around the handler's behaviour. Each separate grpc.aio interceptor
costs a coroutine and a handler lookup per call, so the steps (tracing,
access log and metrics, auth, rate limit) share one interceptor and one
cached wrapper per method, and run in order as nested `around` calls.

The chain opens the per-call record (`telemetry.call.Call`) that the steps
and the service fill in, and closes it when the call ends.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from authpool_server.errors import InvalidArgument
from authpool_server.rpc_errors import to_status
from authpool_server.telemetry.call import Call, close_call, open_call

__all__ = ["ChainInterceptor", "Proceed", "Step", "final_code"]

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
Proceed = Callable[[], Awaitable[Any]]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Step(Protocol):
    """One link of the chain.

    `around` must await `proceed()` once and return its result, or raise /
    abort to end the call there. For a streaming response it wraps the
    whole stream, so it sees the stream's end and its errors.
    """

    async def around(self, call: Call, context: grpc.aio.ServicerContext, proceed: Proceed) -> Any: ...


class ChainInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, steps: Sequence[Step]) -> None:
        self._steps = tuple(steps)
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        key = (method, handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._wrap(method, handler)
        return wrapped

    async def _run(self, method: str, context: grpc.aio.ServicerContext, final: Proceed) -> Any:
        call, token = open_call(method)
        try:
            proceed: Proceed = functools.partial(_admit, call, final)
            for step in reversed(self._steps):
                proceed = functools.partial(step.around, call, context, proceed)
            return await proceed()
        finally:
            close_call(token)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming = (handler.request_streaming, handler.response_streaming)
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        run = self._run

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                # The generator is drained inside the chain, its responses handed
                # out through context.write, so every step sees the stream end.
                async def drain() -> None:
                    async for response in behavior(request, context):
                        await context.write(response)

                await run(method, context, drain)

            new_behavior: Behavior = stream
        else:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await run(method, context, lambda: behavior(request, context))

            new_behavior = unary
        deserializer = handler.request_deserializer
        if not handler.request_streaming and deserializer is not None:
            # grpc answers a request it cannot decode with UNKNOWN and the exception's text;
            # decoding to a marker instead lets the chain (auth first) refuse it properly.
            deserializer = _tolerant(deserializer)
            inner = new_behavior

            async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    return await run(method, context, functools.partial(_refuse_undecodable, request, context))
                return await inner(request, context)

            new_behavior = checked
        return _FACTORIES[streaming](new_behavior, deserializer, handler.response_serializer)


class _Undecodable:
    """What a request that is not a valid protobuf message decodes to; the service never sees it."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as error:
            return _Undecodable(str(error))  # upb names the type and the fault, never the bytes

    return decode


async def _refuse_undecodable(request: _Undecodable, context: grpc.aio.ServicerContext) -> Any:
    error = InvalidArgument([("request", f"is not a valid protobuf message ({request.problem})")])
    await context.abort_with_status(to_status(error))


async def _admit(call: Call, handler: Proceed) -> Any:
    # Past every step: the call reaches the service (auth and rate limits let it through).
    call.admitted = True
    return await handler()


_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def final_code(context: grpc.aio.ServicerContext, raised: BaseException | None) -> grpc.StatusCode:
    """How a call ended, as its caller sees it: the code set by abort, else OK, CANCELLED or UNKNOWN."""
    code = context.code()
    if code is None:
        if raised is None:
            return grpc.StatusCode.OK
        if isinstance(raised, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.UNKNOWN
    if isinstance(code, int):
        return _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return code
