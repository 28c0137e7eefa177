"""Requests that are not valid protobuf get INVALID_ARGUMENT, not UNKNOWN with a Python exception.

grpcio deserializes a request before (unary) or while (streaming) the servicer runs; when the
deserializer raises, grpcio ends the rpc with UNKNOWN and "Unexpected <class 'DecodeError'>: ..."
as details. This interceptor wraps every method's deserializer: a unary request that does not
parse becomes a marker the wrapped behavior refuses before the servicer sees it; a message of a
request stream that does not parse raises `UndecodableMessage` out of the servicer's iterator,
which the wrapped behavior turns into the refusal. The message names the expected type only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

_Deserializer = Callable[[bytes], Any]


class UndecodableMessage(Exception):
    """A request message that is not a valid serialization of the method's request type."""


class _Undecodable:
    """Stands in for a unary request that did not parse."""


_UNDECODABLE = _Undecodable()


def _details(method: str) -> str:
    return f"the request is not a valid protobuf message for {method}"


def _wrap_deserializer(deserializer: _Deserializer, streaming: bool) -> _Deserializer:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:
            if streaming:
                raise UndecodableMessage from None
            return _UNDECODABLE

    return decode


class UndecodableRequestInterceptor(grpc.aio.ServerInterceptor):
    """Refuse requests that do not parse with INVALID_ARGUMENT and a generic message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        full_method = handler_call_details.method
        method = full_method.decode() if isinstance(full_method, bytes) else str(full_method)
        details = _details(method)
        deserializer = _wrap_deserializer(handler.request_deserializer, handler.request_streaming)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, details), deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, details), deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _unary(handler.stream_unary, details), deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _streaming(handler.stream_stream, details), deserializer, handler.response_serializer
            )
        return handler


def _unary(behavior: Callable[..., Any], details: str) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is _UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)
        try:
            return await behavior(request, context)
        except UndecodableMessage:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)

    return wrapped


def _streaming(behavior: Callable[..., Any], details: str) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if request is _UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)
        try:
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write() and returns a coroutine
                await result
        except UndecodableMessage:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)

    return wrapped
