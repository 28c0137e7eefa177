"""A process serving a slow generic server stream through the common bootstrap (for drain tests).

Usage: python slow_stream_server.py ADDRESS GRACE_S
Method /test.Slow/Count streams 10 messages, one every 0.1 s. It prints READY when serving.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from services.common.server import GrpcServer, run


async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(10):
        await asyncio.sleep(0.1)
        yield str(i).encode()


async def main() -> None:
    server = GrpcServer(sys.argv[1], grace_s=float(sys.argv[2]))
    handler = grpc.method_handlers_generic_handler(
        "test.Slow",
        {"Count": grpc.unary_stream_rpc_method_handler(count)},
    )
    server.server.add_generic_rpc_handlers((handler,))
    server.add_service_name("test.Slow")
    await server.start()
    print("READY", server.bound_address, flush=True)
    await server.serve_until_signal()


if __name__ == "__main__":
    sys.exit(run(main))
