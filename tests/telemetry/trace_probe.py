"""A tiny traced client and server in one process, for test_telemetry.py (run as a script).

A generic gRPC echo service on 127.0.0.1:0 (unary and server-streaming) on a `GrpcServer`,
called through `make_channel` (both install the tracing interceptors themselves) under a parent span whose context comes from a W3C
`traceparent` given on the command line; then an engine-style timeline recorded under the
server span's captured context. Spans go to TANDEM_TRACE_FILE.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract

from services.common import telemetry
from services.common.channels import make_channel
from services.common.server import GrpcServer


@dataclass
class Msg:
    request_id: str


def _decode(data: bytes) -> Msg:
    return Msg(request_id=data.decode())


def _encode(msg: Msg) -> bytes:
    return msg.request_id.encode()


async def main(traceparent: str) -> None:
    assert telemetry.setup_tracing("probe-service")
    captured: list[object] = []

    async def echo(request: Msg, context: grpc.aio.ServicerContext) -> Msg:
        return request

    async def stream(request: Msg, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        captured.append(telemetry.capture_context())
        for i in range(3):
            yield Msg(f"{request.request_id}-{i}")

    handler = grpc.method_handlers_generic_handler(
        "probe.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, _decode, _encode),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, _decode, _encode),
        },
    )
    server = GrpcServer("127.0.0.1:0", grace_s=1)  # adds the tracing interceptors itself
    server.server.add_generic_rpc_handlers((handler,))
    await server.start()
    channel = make_channel(server.bound_address)  # adds the client tracing interceptors itself
    parent = extract({"traceparent": traceparent})
    with trace.get_tracer("probe").start_as_current_span("client-root", context=parent):
        echo_call = channel.unary_unary(
            "/probe.Echo/Echo", request_serializer=_encode, response_deserializer=_decode
        )
        reply = await echo_call(Msg("req-echo"))
        assert reply.request_id == "req-echo"
        stream_call = channel.unary_stream(
            "/probe.Echo/Stream", request_serializer=_encode, response_deserializer=_decode
        )
        items = [m.request_id async for m in stream_call(Msg("req-stream"))]
        assert items == ["req-stream-0", "req-stream-1", "req-stream-2"], items
    now = time.monotonic()
    telemetry.record_request_timeline(
        telemetry.RequestTimeline(
            request_id="req-stream",
            arrival=now - 0.3,
            scheduled=now - 0.2,
            first_token=now - 0.1,
            finished=now,
            num_prompt_tokens=5,
            num_output_tokens=3,
            finish_reason="length",
        ),
        captured[0],  # type: ignore[arg-type]
    )
    await channel.close()
    await server.stop()
    telemetry.shutdown_tracing()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
