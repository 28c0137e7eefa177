"""services/common/healthcheck.py, the containers' HEALTHCHECK command, against real servers."""

from __future__ import annotations

import asyncio

from aiohttp import web

from services.common import healthcheck
from services.common.server import GrpcServer


async def test_grpc_target_serving_then_not() -> None:
    server = GrpcServer("127.0.0.1:0", grace_s=0)
    server.add_service_name("tandem.v1.Styler")
    await server.start()
    try:
        assert await asyncio.to_thread(healthcheck.main, [server.bound_address]) == 0
        assert await asyncio.to_thread(healthcheck.main, [server.bound_address, "tandem.v1.Styler"]) == 0
        await server.set_serving(False)  # what SIGTERM's drain does first
        assert await asyncio.to_thread(healthcheck.main, [server.bound_address]) == 1
    finally:
        await server.stop()
    assert await asyncio.to_thread(healthcheck.main, [server.bound_address]) == 1


async def test_http_target() -> None:
    healthy = [True]

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, status=200 if healthy[0] else 503)

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        assert await asyncio.to_thread(healthcheck.main, [f"http://127.0.0.1:{port}/health"]) == 0
        healthy[0] = False
        assert await asyncio.to_thread(healthcheck.main, [f"http://127.0.0.1:{port}/health"]) == 1
    finally:
        await runner.cleanup()


def test_target_from_the_container_command_line() -> None:
    find = healthcheck.target_from_command
    assert (
        find(
            [
                "/opt/venv/bin/python",
                "/opt/venv/bin/tandem",
                "styler",
                "--model",
                "/model",
                "--address",
                "0.0.0.0:50051",
            ]
        )
        == "127.0.0.1:50051"
    )
    assert find(["tandem", "worker", "--address=0.0.0.0:50052"]) == "127.0.0.1:50052"
    assert find(["tandem", "worker"], {"TANDEM_ADDRESS": "unix:/run/w.sock"}) == "unix:/run/w.sock"
    assert (
        find(["tandem", "gateway", "--host", "0.0.0.0", "--port", "8000"]) == "http://127.0.0.1:8000/health"
    )
    assert find(["tandem", "gateway"], {"TANDEM_PORT": "9000"}) == "http://127.0.0.1:9000/health"
    assert find(["tandem", "styler"]) is None  # default address is port 0: nothing to probe
