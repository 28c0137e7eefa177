"""/health and routing errors of a gateway whose downstream services are absent (in-process app)."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.config import GatewayConfig


async def test_absent_services_give_503_and_unknown_routes_404(tmp_path: Path) -> None:
    config = GatewayConfig(styler=[f"unix:{tmp_path}/s.sock"], worker=[f"unix:{tmp_path}/w.sock"])
    async with TestClient(TestServer(build_app(config))) as client:
        reply = await client.get("/health")
        assert reply.status == 503 and reply.headers["Retry-After"] == "1"
        body = await reply.json()
        # by name: /health needs no API key, and socket paths are internal
        assert body["styler"] == {"styler-0": False}
        assert body["worker"] == {"worker-0": False}
        assert str(tmp_path) not in await reply.text()
        reply = await client.get("/v1/nothing")
        assert reply.status == 404
        assert set((await reply.json())["error"]) == {"message", "type", "param", "code"}
        reply = await client.post("/v1/completions", json={"prompt": "x"})
        assert reply.status == 503 and reply.headers["Retry-After"] == "1"


async def test_internal_addresses_only_with_the_flag(tmp_path: Path) -> None:
    config = GatewayConfig(
        styler=[f"unix:{tmp_path}/s.sock"],
        worker=[f"unix:{tmp_path}/w.sock", f"unix:{tmp_path}/w2.sock"],
        expose_internal_addresses=True,
        instance_id="start-1",
    )
    async with TestClient(TestServer(build_app(config))) as client:
        body = await (await client.get("/health")).json()
        assert body["styler"] == {f"unix:{tmp_path}/s.sock": False}
        assert body["worker"] == {f"unix:{tmp_path}/w.sock": False, f"unix:{tmp_path}/w2.sock": False}
        assert body["instance"] == "start-1"
