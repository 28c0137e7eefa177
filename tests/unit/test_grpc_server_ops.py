"""What every service's gRPC bootstrap (services/common/server.py) sets up for operators:
reflection under v1 and v1alpha, the metrics port on the service's own host, and the raised
open-file limit."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from services.common.server import GrpcServer, metrics_host
from tests.e2e.stack import with_open_file_soft_limit

REPO = Path(__file__).resolve().parents[2]
GRPCURL = Path(sys.executable).parent / "grpcurl"
REFLECTION_SERVICES = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


async def _list_services(address: str, package: str) -> set[str]:
    """ServerReflectionInfo list_services over `grpc.reflection.<package>` (same messages on the wire)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = [r async for r in call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
    return {s.name for s in replies[0].list_services_response.service}


async def test_reflection_answers_v1_and_v1alpha() -> None:
    server = GrpcServer("127.0.0.1:0")
    await server.start()
    try:
        address = server.bound_address
        assert await _list_services(address, "v1") == REFLECTION_SERVICES
        assert await _list_services(address, "v1alpha") == REFLECTION_SERVICES
        # grpcurl (1.8 speaks v1alpha) lists, and describes the v1 service from its descriptor
        listed = await asyncio.to_thread(
            subprocess.run,
            [str(GRPCURL), "-plaintext", address, "list"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) == REFLECTION_SERVICES
        described = await asyncio.to_thread(
            subprocess.run,
            [str(GRPCURL), "-plaintext", address, "describe", "grpc.reflection.v1.ServerReflection"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert described.returncode == 0, described.stderr
        assert "grpc.reflection.v1.ServerReflectionRequest" in described.stdout
    finally:
        await server.stop()


def test_metrics_host_follows_the_service_address() -> None:
    assert metrics_host("unix:/run/tandem/worker-0.sock") == "127.0.0.1"
    assert metrics_host("127.0.0.1:50051") == "127.0.0.1"
    assert metrics_host("0.0.0.0:50051") == "0.0.0.0"
    assert metrics_host("[::1]:50051") == "::1"


def _listening_hosts(port: int) -> set[str]:
    """Local IPv4 addresses with a listening socket on `port`, from /proc/net/tcp."""
    hosts = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        hex_ip, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
            hosts.add(socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1]))
    return hosts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_metrics_port_of_a_unix_socket_service_is_loopback_only(tmp_path: Path) -> None:
    port = _free_port()
    server = GrpcServer(f"unix:{tmp_path}/s.sock", metrics_port=port)
    await server.start()
    try:
        assert _listening_hosts(port) == {"127.0.0.1"}  # was 0.0.0.0: every interface
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
        )
        assert b"tandem" in body or b"python_info" in body
    finally:
        await server.stop()


def test_services_raise_the_open_file_soft_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 64:
        pytest.skip(f"hard open-file limit {hard} leaves nothing to raise")
    script = (
        "import json, resource\n"
        "from services.common.server import run\n"
        "async def main():\n"
        "    print(json.dumps(resource.getrlimit(resource.RLIMIT_NOFILE)))\n"
        "run(main)\n"
    )
    result = subprocess.run(
        with_open_file_soft_limit([sys.executable, "-c", script], 64),  # as a distribution's 1024 would
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    new_soft, new_hard = json.loads(result.stdout.strip().splitlines()[-1])
    assert new_hard == hard and new_soft > 64
    assert new_soft == hard or hard == resource.RLIM_INFINITY
