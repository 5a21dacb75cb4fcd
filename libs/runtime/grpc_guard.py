"""Malformed protobuf bytes are the caller's error: INVALID_ARGUMENT, not INTERNAL.

gRPC itself answers a request it cannot deserialize with INTERNAL ("Exception
deserializing request!"), which reads as a bug of ours and is what a fuzzer sending
random bytes gets from every method. `MalformedRequestGuard` (every tierflow gRPC server
runs it, `runtime.grpc_server`) gives each unary-request method a deserializer that
returns a marker instead of raising, and answers the marker with INVALID_ARGUMENT before
the servicer runs. Streaming-request methods (reflection) are left as gRPC made them.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

__all__ = ["MalformedRequestGuard"]


class _Malformed:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, and anything a custom one raises
            return _Malformed(f"{type(exc).__name__}: {exc}"[:200])

    return run


async def _refuse(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid protobuf message of this method ({request.error})")


def _guard_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if type(request) is _Malformed:
            await _refuse(request, context)
        return await behavior(request, context)

    return unary


def _guard_stream(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if type(request) is _Malformed:
            await _refuse(request, context)
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        elif inspect.isawaitable(result):  # the servicer writes with context.write
            await result
        else:  # a plain iterator
            for item in result:
                yield item

    return stream


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=deserializer, unary_unary=_guard_unary(handler.unary_unary))  # type: ignore[attr-defined,no-any-return]
        if handler.unary_stream is not None:
            return handler._replace(request_deserializer=deserializer, unary_stream=_guard_stream(handler.unary_stream))  # type: ignore[attr-defined,no-any-return]
        return handler
