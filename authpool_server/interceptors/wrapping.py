"""Wrapping the behaviour of a gRPC method handler, once per method.

A grpc.aio interceptor sees the method's name and metadata before the call
and must return a handler; per-call work (which needs the servicer context)
happens in a wrapper around the handler's behaviour. Building that wrapper
is the same for every call of a method, so it is cached by handler.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

__all__ = ["BehaviorInterceptor"]

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class BehaviorInterceptor(grpc.aio.ServerInterceptor):
    """Runs `around(method, context, proceed)` around every call of every method.

    Subclasses implement `around`, an async function that must call
    `proceed()` exactly once to continue (and return its result), or raise /
    abort to stop the call. Streaming responses are passed through: `around`
    wraps the whole stream, so it sees the stream's end and its errors.
    """

    def __init__(self) -> None:
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    async def around(self, method: str, context: grpc.aio.ServicerContext, proceed: Callable[[], Any]) -> Any:
        raise NotImplementedError  # pragma: no cover - abstract

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

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming = (handler.request_streaming, handler.response_streaming)
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        around = self.around

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                # The generator runs inside `around` by being drained there; the
                # responses are handed out through context.write.
                async def drain() -> None:
                    async for response in behavior(request, context):
                        await context.write(response)

                await around(method, context, drain)

            new_behavior: Behavior = stream
        else:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await around(method, context, lambda: behavior(request, context))

            new_behavior = unary
        return _FACTORIES[streaming](new_behavior, handler.request_deserializer, handler.response_serializer)
