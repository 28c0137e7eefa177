"""/health follows the standard gRPC health of the styler and the workers."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.config import GatewayConfig
from services.common.server import GrpcServer


async def test_health_follows_downstream_health(tmp_path: Path) -> None:
    styler = GrpcServer(f"unix:{tmp_path}/styler.sock", grace_s=0)
    worker = GrpcServer(f"unix:{tmp_path}/worker.sock", grace_s=0)
    await styler.start()
    await worker.start()
    config = GatewayConfig(
        styler=[styler.bound_address], worker=[worker.bound_address, f"unix:{tmp_path}/absent.sock"]
    )
    async with TestClient(TestServer(build_app(config))) as client:
        reply = await client.get("/health")
        body = await reply.json()
        assert reply.status == 200, body
        assert body["worker"] == {worker.bound_address: True, f"unix:{tmp_path}/absent.sock": False}

        await worker.set_serving(False)
        reply = await client.get("/health")
        assert reply.status == 503
        assert reply.headers["Retry-After"] == "1"

        await worker.set_serving(True)
        await styler.stop()
        reply = await client.get("/health")
        assert reply.status == 503
        assert (await reply.json())["styler"] == {styler.bound_address: False}
    await worker.stop()


async def test_unknown_route_is_404_envelope(tmp_path: Path) -> None:
    config = GatewayConfig(styler=[f"unix:{tmp_path}/s.sock"], worker=[f"unix:{tmp_path}/w.sock"])
    async with TestClient(TestServer(build_app(config))) as client:
        reply = await client.get("/v1/nothing")
        assert reply.status == 404
        body = await reply.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
