"""`tandem gateway`: the OpenAI-compatible HTTP gateway (and the public gRPC Inference API)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Awaitable

from aiohttp import web

from gateway.app import build_app
from gateway.appkeys import CONTEXT
from gateway.config import GatewayConfig
from gateway.connections import BoundedRunner, connection_cap
from services.common import gc_heap
from services.common.config import parse_config
from services.common.logging import setup_logging
from services.common.server import run
from services.common.telemetry import setup_tracing

log = logging.getLogger("gateway")


def ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The HTTPS server context (--ssl-certfile / --ssl-keyfile), or None for plain HTTP."""
    if not config.ssl_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    return context


async def serve(config: GatewayConfig) -> None:
    """Serve HTTP (and gRPC when --grpc-port is set) until SIGTERM / SIGINT, then drain."""
    app = build_app(config)
    ctx = app[CONTEXT]
    # handler_cancellation: a client that disconnects cancels its handler, which cancels the
    # worker's Generate stream (= abort on the worker). shutdown_timeout is short because the
    # drain below already waited for in-flight requests.
    # Connection bounds (--max-connections, --idle-timeout): gateway/connections.py. run() has
    # raised the descriptor limit already; the cap stays below it.
    runner = BoundedRunner(
        app,
        connection_cap(config.max_connections),
        config.idle_timeout,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context(config))
    await site.start()
    grpc_server = None
    if config.grpc_port:
        from gateway.rpc import start_grpc_server

        grpc_server = await start_grpc_server(app, config)
    gc_heap.freeze_startup_heap()  # ready: what start-up left stays out of every collection
    scheme = "https" if config.ssl_certfile else "http"
    for sock in site._server.sockets if site._server is not None else []:  # type: ignore[attr-defined,union-attr]
        host, port = sock.getsockname()[:2]
        log.info("gateway listening on %s://%s:%s", scheme, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Drain: /health turns 503 and new requests are refused while in-flight ones (streams
    # included) finish, for at most --drain-timeout; the gRPC API drains the same way.
    ctx.drain.start()
    log.info(
        "gateway draining: %d request(s) in flight, up to %.1fs", ctx.drain.in_flight, config.drain_timeout
    )
    waits: list[Awaitable[object]] = [ctx.drain.wait_idle(config.drain_timeout)]
    if grpc_server is not None:
        waits.append(grpc_server.stop())
    drained, *_ = await asyncio.gather(*waits)
    if not drained:
        log.warning("%d request(s) still running after --drain-timeout; closing them", ctx.drain.in_flight)
    await runner.cleanup()
    log.info("gateway stopped")


def main(argv: list[str], prog: str) -> int:
    config = parse_config(GatewayConfig, argv, prog)
    setup_logging(config.log_level, config.log_format, service="gateway")
    setup_tracing("tandem-gateway")  # from the OTEL_* environment; a no-op without it
    return run(lambda: serve(config))
