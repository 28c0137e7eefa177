"""services/common/large_buffers.py: a gRPC stream of megabyte messages stops paying a fresh
mapping (page faults, zeroed pages) per message once the worker's malloc settings are in (glibc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# 64 messages of 4 MiB from a grpc.aio server to a client in one process: the minor page faults
_STREAM = """
import asyncio, os, resource, sys
import grpc
from services.common.large_buffers import keep_large_buffers
if sys.argv[1] == "1":
    assert keep_large_buffers(arena_max=1)
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
payload = os.urandom(4 << 20)

async def stream(request, context):
    for _ in range(int(request)):
        yield payload

async def main():
    server = grpc.aio.server(options=OPTIONS)
    handler = grpc.method_handlers_generic_handler("t.T", {"S": grpc.unary_stream_rpc_method_handler(stream)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
    call = channel.unary_stream("/t.T/S", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    async for _ in call(b"4"):
        pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    received = 0
    async for message in call(b"64"):
        received += len(message)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, received)
    await channel.close()
    await server.stop(None)

asyncio.run(main())
"""


def _faults(keep: bool) -> int:
    # The control pins glibc's mmap threshold: by default glibc raises it after the first large free
    # (a dynamic threshold), so how often the default maps fresh pages depends on timing and varies
    # run to run; pinned, every megabyte buffer is a fresh mapping. keep_large_buffers' mallopt calls
    # override the variable, so the kept run measures our settings alone.
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
    out = subprocess.run(
        [sys.executable, "-c", _STREAM, "1" if keep else "0"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    faults, received = map(int, out.stdout.split())
    assert received == 64 * (4 << 20)
    return faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")
def test_megabyte_messages_reuse_their_buffers() -> None:
    pages = 64 * (4 << 20) // 4096  # the stream's bytes, in pages: each copy of them is this many
    mapped, kept = _faults(False), _faults(True)
    # every buffer a fresh mapping: at least one copy of the stream's pages faulted in (the control
    # shows the count sees them); kept: the first messages' buffers, then the same memory
    assert mapped > pages, (mapped, pages)
    assert kept < pages // 10, (kept, pages)
