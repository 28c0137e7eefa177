"""Slow and idle connections are bounded: a slow-header (slowloris) connection is closed after
--idle-timeout, a trickled body gets 408 after --body-timeout, idle connections past
--max-connections make room for new clients, and busy ones past it refuse with 503."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from collections.abc import Iterator

import aiohttp
import pytest

from gateway.connections import connection_cap

from .rstack import ReliabilityStack

MAX_CONNECTIONS = 8


def _gateway(stack: ReliabilityStack, name: str, args: list[str]) -> Iterator[str]:
    """A second gateway on the limited stack with small connection limits."""
    with stack.extra_gateway(name, ["--max-connections", str(MAX_CONNECTIONS), *args]) as url:
        yield url.removeprefix("http://")


@pytest.fixture(scope="module")
def strict_gateway(limited_stack: ReliabilityStack) -> Iterator[str]:
    yield from _gateway(limited_stack, "strict-gateway", ["--idle-timeout", "1", "--body-timeout", "1"])


@pytest.fixture(scope="module")
def patient_gateway(limited_stack: ReliabilityStack) -> Iterator[str]:
    """Bodies may take a minute: connections sending one stay busy for the whole test."""
    yield from _gateway(limited_stack, "patient-gateway", ["--body-timeout", "60"])


async def _open(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.split(":")
    return await asyncio.open_connection(host, int(port))


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


@pytest.mark.e2e
async def test_slowloris_is_disconnected(strict_gateway: str) -> None:
    reader, writer = await _open(strict_gateway)
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"X-Pad: y\r\n" * 50
    )
    closed = asyncio.create_task(_closed_by_server(reader))
    sent = 0
    try:
        for byte in head:  # one byte every 0.1 s: 65 s for the whole head, far past --idle-timeout 1
            if closed.done():
                break
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            sent += 1
            await asyncio.wait([closed], timeout=0.1)
        assert closed.done(), "the slow-header connection is still open"
        assert sent < len(head)
    finally:
        writer.close()


@pytest.mark.e2e
async def test_trickled_body_gets_408(strict_gateway: str) -> None:
    reader, writer = await _open(strict_gateway)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    try:
        # The connection closes with the 408 (--body-timeout 1), not after aiohttp's 10 s of
        # lingering on the rest of the body, which held a slow client's connection that long.
        reply = await asyncio.wait_for(_closed_by_server(reader), 8)
    finally:
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert b"\r\nConnection: close" in head, head
    assert "--body-timeout" in json.loads(body)["error"]["message"]


@pytest.mark.e2e
async def test_idle_connections_past_the_cap_make_room_for_new_clients(strict_gateway: str) -> None:
    idle = [await _open(strict_gateway) for _ in range(3 * MAX_CONNECTIONS)]
    try:
        # The oldest idle ones were closed to admit the newer ones: at most the cap stay open.
        closed = [asyncio.create_task(_closed_by_server(r)) for r, _ in idle]
        await asyncio.wait(closed[: 2 * MAX_CONNECTIONS], timeout=30)
        assert all(t.done() for t in closed[: 2 * MAX_CONNECTIONS])
        # A new client is served although the cap is full of idle connections.
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://{strict_gateway}/v1/completions", json={"prompt": "a", "max_tokens": 2}
            ) as reply,
        ):
            assert reply.status == 200, await reply.text()
    finally:
        for _, writer in idle:
            writer.close()


@pytest.mark.e2e
async def test_busy_connections_past_the_cap_refuse_with_503(patient_gateway: str) -> None:
    # Connections in the middle of sending a body are busy (not idle): they are never evicted.
    busy = [await _open(patient_gateway) for _ in range(MAX_CONNECTIONS)]
    for _, writer in busy:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
    try:
        reader, writer = await _open(patient_gateway)
        reply = await asyncio.wait_for(_closed_by_server(reader), 10)
        writer.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), reply
        assert "--max-connections" in json.loads(body)["error"]["message"]
    finally:
        for _, writer in busy:
            writer.close()


def test_connections_are_capped_below_the_descriptor_limit() -> None:
    assert connection_cap(10**9, 1024) == 1024 - 256
    assert connection_cap(100, 1024) == 100
    assert connection_cap(10**9) == resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 256
