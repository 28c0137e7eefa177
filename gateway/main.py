"""`tandem gateway`: the OpenAI-compatible HTTP gateway (and the public gRPC Inference API)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from gateway.app import build_app
from gateway.config import GatewayConfig
from services.common.config import parse_config
from services.common.logging import setup_logging
from services.common.server import run

log = logging.getLogger("gateway")


async def serve(config: GatewayConfig) -> None:
    """Serve HTTP (and gRPC when --grpc-port is set) until SIGTERM / SIGINT."""
    app = build_app(config)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels the
    # worker's Generate stream (= abort on the worker).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    grpc_server = None
    if config.grpc_port:
        from gateway.rpc import start_grpc_server

        grpc_server = await start_grpc_server(app, config)
    for sock in site._server.sockets if site._server is not None else []:  # type: ignore[attr-defined,union-attr]
        host, port = sock.getsockname()[:2]
        log.info("gateway listening on http://%s:%s", host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping")
    if grpc_server is not None:
        await grpc_server.stop()
    await runner.cleanup()


def main(argv: list[str], prog: str) -> int:
    config = parse_config(GatewayConfig, argv, prog)
    setup_logging(config.log_level, config.log_format, service="gateway")
    return run(lambda: serve(config))
