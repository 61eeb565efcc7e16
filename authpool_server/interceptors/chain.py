"""The steps of the chain around every call, wrapped into each method's handler when it is registered.

Not a `grpc.aio.ServerInterceptor`: grpc.aio runs interceptors per call, as
coroutines that look the handler up again through a continuation, and a
pass-through interceptor that did nothing else measured ~40 µs of server
CPU per call here, more than all the steps together. Every handler's
behaviour is wrapped once instead, as the services are registered
(`ChainedRegistration` stands in for the server in the generated
`add_*Servicer_to_server` functions), and grpc calls the wrapper directly.

A step hands the chain, once for each method as it is registered, its hooks
for that method's calls (`Hooks`): `enter` runs before the handler, in chain
order, and may refuse the call; `exit`, if the step has one, runs once the
call has ended (for a stream, once the stream has), in reverse order, for
every step that entered. Hooks are plain functions, not coroutines: nesting
each step as a coroutine around the next cost a frame, a partial and an
await per step on every call, all on the event loop that every RPC shares.
Choosing them per method means that what depends only on the method (the
role it needs; whether it is open to anyone) is worked out once, and a step
with nothing to do on a method (the rate limit on health checks) costs its
calls nothing: on the call's path, a step's work measured several times what
the same code costs in a loop, so every line there counts.

The chain opens the per-call record (`telemetry.call.Call`) that the steps
and the service fill in, and closes it when the call ends.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import grpc
from google.protobuf.message import DecodeError

from authpool_server.errors import AuthPoolError, InvalidArgument
from authpool_server.rpc_errors import to_status
from authpool_server.telemetry.call import Call, close_call, open_call

__all__ = ["Chain", "ChainedRegistration", "Enter", "Exit", "Hooks", "Metadata", "Step", "final_code"]

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
# A call's metadata, read once for every step: values are bytes for `-bin` keys, and a key
# sent more than once keeps its first value.
Metadata = Mapping[str, str | bytes]
# Before the handler: None lets the call on, an error refuses it (later steps never enter).
Enter = Callable[[Call, grpc.aio.ServicerContext, Metadata], AuthPoolError | None]
# After the call (or its stream) ended with a code; the exception that ended it, if anything.
Exit = Callable[[Call, grpc.aio.ServicerContext, grpc.StatusCode, BaseException | None], None]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Hooks(NamedTuple):
    """What a step does on the calls of one method; neither hook may block or raise."""

    enter: Enter
    exit: Exit | None = None


class Step(Protocol):
    """One link of the chain."""

    def hooks(self, method: str) -> Hooks | None:
        """What this step does on calls of `method` (`/authpool.v1.AuthPool/Allocate`); None: nothing."""
        ...


class Chain:
    def __init__(self, steps: Sequence[Step]) -> None:
        self._steps = tuple(steps)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of `method` (`/authpool.v1.AuthPool/Allocate`), with the steps around its behaviour."""
        hooks = [found for found in (step.hooks(method) for step in self._steps) if found is not None]
        enters = tuple(hook.enter for hook in hooks)
        # The exits to run when the first k steps have entered (k = 0 .. all), the last to enter first.
        exits_after = tuple(
            tuple(hook.exit for hook in reversed(hooks[:entered]) if hook.exit is not None)
            for entered in range(len(hooks) + 1)
        )
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if inspect.isasyncgenfunction(behavior):

            async def drain(request: Any, context: grpc.aio.ServicerContext) -> None:
                # The generator is drained inside the chain, its responses handed
                # out through context.write, so every step sees the stream end.
                async for response in behavior(request, context):
                    await context.write(response)

            final: Behavior = drain
        else:
            final = behavior

        async def chained(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, token = open_call(method)
            metadata: Metadata = dict(reversed(context.invocation_metadata() or ()))
            entered = 0
            raised: BaseException | None = None
            try:
                for enter in enters:
                    refusal = enter(call, context, metadata)
                    entered += 1
                    if refusal is not None:
                        await context.abort_with_status(to_status(refusal))
                call.admitted = True  # past every step: auth and rate limits let it through to the service
                if request.__class__ is _Undecodable:
                    return await _refuse_undecodable(request, context)
                return await final(request, context)
            except BaseException as error:
                raised = error
                raise
            finally:
                code = final_code(context, raised)
                for exit_ in exits_after[entered]:
                    exit_(call, context, code, raised)
                close_call(token)

        deserializer = handler.request_deserializer
        if not handler.request_streaming and deserializer is not None:
            # grpc answers a request it cannot decode with UNKNOWN and the exception's text;
            # decoding to a marker instead lets the chain (auth first) refuse it properly.
            deserializer = _tolerant(deserializer)
        streaming = (handler.request_streaming, handler.response_streaming)
        return _FACTORIES[streaming](chained, deserializer, handler.response_serializer)


class ChainedRegistration:
    """What the generated `add_*Servicer_to_server` functions register on: `server`, every handler chained.

    grpc matches a call to its registered method handler, else asks the
    generic handlers; both are wrapped, so every method of every service
    (health and reflection too) runs through the chain.
    """

    def __init__(self, server: grpc.aio.Server, chain: Chain) -> None:
        self._server = server
        self._chain = chain

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        chained = {name: self._chain.wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        self._server.add_registered_method_handlers(service, chained)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_ChainedGenericHandler(handler, self._chain) for handler in handlers)
        )


class _ChainedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, chain: Chain) -> None:
        self._inner = inner
        self._chain = chain
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None  # not this service's: grpc asks the next, or answers UNIMPLEMENTED
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        key = (method, handler)
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            wrapped = self._wrapped[key] = self._chain.wrap(method, handler)
        return wrapped


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
