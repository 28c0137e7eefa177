"""The common grpc.aio bootstrap: health over TCP and unix sockets, reflection, graceful drain."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.server import GrpcServer, wait_for_serving

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


async def _check(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_health_and_reflection(kind: str, tmp_path: Path) -> None:
    address = "127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 's.sock'}"
    server = GrpcServer(address, grace_s=1)
    server.add_service_name("tandem.v1.Demo")
    await server.start()
    try:
        target = server.bound_address
        if kind == "tcp":
            assert not target.endswith(":0")
        assert await _check(target) == health_pb2.HealthCheckResponse.SERVING
        assert await _check(target, "tandem.v1.Demo") == health_pb2.HealthCheckResponse.SERVING
        await wait_for_serving(target, 5)

        async with grpc.aio.insecure_channel(target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def requests():  # type: ignore[no-untyped-def]
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            names = set()
            async for reply in stub.ServerReflectionInfo(requests()):
                names |= {s.name for s in reply.list_services_response.service}
        assert {
            "tandem.v1.Demo",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names

        await server.set_serving(False)
        assert await _check(target) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop()


async def _start_slow_server(address: str, grace: float) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "slow_stream_server.py"),
        address,
        str(grace),
        stdout=asyncio.subprocess.PIPE,
        cwd=str(REPO),
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
    assert line[0] == "READY", line
    return proc, line[1]


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_sigterm_lets_in_flight_stream_finish(kind: str, tmp_path: Path) -> None:
    address = "127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 'slow.sock'}"
    proc, target = await _start_slow_server(address, grace=10)
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_stream("/test.Slow/Count")(b"")
        received = [await call.read()]
        proc.send_signal(signal.SIGTERM)
        # Health turns NOT_SERVING right away, while the stream keeps going.
        await asyncio.sleep(0.15)
        status = await _check(target)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        # New work is refused while the old stream drains.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_stream("/test.Slow/Count")(b"").read()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        while (message := await call.read()) is not grpc.aio.EOF:
            received.append(message)
    assert received == [str(i).encode() for i in range(10)]
    assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_sigterm_grace_period_bounds_the_wait() -> None:
    proc, target = await _start_slow_server("127.0.0.1:0", grace=0.2)
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_stream("/test.Slow/Count")(b"")
        await call.read()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_wait_for_serving_sees_a_late_server_at_once(tmp_path: Path) -> None:
    """A server that starts while `wait_for_serving` polls is seen within a poll or two: with grpc
    core's default reconnect backoff (1 s, growing 1.6x) the channel noticed a server listening at
    3 s only at its 5.2 s attempt, and `tandem up` reported ready workers seconds late."""
    address = f"unix:{tmp_path / 'late.sock'}"
    server = GrpcServer(address, grace_s=1)
    waiting = asyncio.create_task(wait_for_serving(address, timeout_s=60))
    try:
        # the server starts once the poll has failed for a while (its backoff has grown)
        done, _ = await asyncio.wait({waiting}, timeout=3.0)
        assert not done, "SERVING before the server started"
        await server.start()
        started = asyncio.get_running_loop().time()
        await waiting
        assert asyncio.get_running_loop().time() - started < 1.0
    finally:
        waiting.cancel()
        await server.stop()
