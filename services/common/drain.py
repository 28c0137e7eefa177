"""Graceful drain for grpc.aio servers.

`DrainInterceptor` counts in-flight rpcs (health checks and reflection excepted). Once draining
starts, new rpcs are refused with UNAVAILABLE ("draining") while in-flight ones run to the end;
health checks keep answering (NOT_SERVING), so routers and probes can still see the state. This is
what `grpc.aio.Server.stop(grace)` alone cannot give: it refuses every new rpc, health included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

# KV-event subscriptions last as long as their subscriber (a gateway): a drain must not wait for them.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/tandem.v1.Worker/SubscribeKvEvents")


class Drain:
    """In-flight work counted for a graceful drain: once `start()` is called, callers refuse new
    work and `wait_idle` waits for what is running to end. Shared by the gRPC servers (below)
    and the gateway's HTTP side (gateway/drain.py)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing counted is in flight; False when the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()


class DrainInterceptor(Drain, grpc.aio.ServerInterceptor):
    """Counts rpcs (health and reflection excepted) and refuses new ones while draining."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler

    def _wrap_unary(self, behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.draining:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica"
                )
            self._enter()
            try:
                return await behavior(request, context)
            finally:
                self._exit()

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self.draining:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica"
                )
            self._enter()
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write() and returns a coroutine
                    await result
            finally:
                self._exit()

        return wrapped
