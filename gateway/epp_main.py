"""`tandem epp`: tandem's routing as an Endpoint Picker over Envoy ext-proc (gateway/epp.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from grpc_health.v1 import health_pb2

from gateway.epp import SERVICE_NAME, EndpointPicker, ExternalProcessorServicer, add_to_server
from gateway.router import Router
from gateway.styler_pool import StylerPool
from services.common.config import parse_config
from services.common.logging import setup_logging
from services.common.server import GrpcServer, run
from services.common.service_config import ServiceConfig

log = logging.getLogger("tandem.epp")

# The EPP protocol's health services: `liveness` while the process answers, `readiness` (and the
# ext-proc service) while at least one worker is in rotation.
LIVENESS = "liveness"
READINESS = "readiness"


@dataclass(frozen=True)
class EppConfig(ServiceConfig):
    """The Endpoint Picker (Gateway API Inference Extension) for a pool of tandem workers."""

    address: str = "0.0.0.0:9002"
    """gRPC listen address of the ext-proc service (9002 is the InferencePool convention)."""
    worker: list[str] = field(default_factory=list)
    """gRPC address of a worker to route to (host:port, dns:HOST:PORT for every address HOST resolves to, e.g. a Kubernetes headless Service, or openengine:HOST:PORT / smg:HOST:PORT for engines behind those protocols, as for `tandem gateway`); repeat for several workers."""
    styler: list[str] = field(default_factory=list)
    """gRPC address of a styler, to render and tokenize prompts as the gateway does (without one, picks go by load alone); repeatable."""
    endpoint_port: int = 8000
    """HTTP port of the pool member in front of each worker (a gateway beside it in its pod): the picked endpoint is the worker's host with this port."""
    poll_interval: float = 1.0
    """Seconds between health and load polls of the workers and stylers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.worker:
            raise ValueError("--worker is required (repeat it for each worker, or use dns:HOST:PORT)")
        if any(a.startswith("unix:") for a in self.worker):
            raise ValueError("--worker must be host:port or dns:HOST:PORT: a picked endpoint is a host")
        if not 0 < self.endpoint_port < 65536:
            raise ValueError(f"--endpoint-port must be a TCP port, got {self.endpoint_port}")
        if self.poll_interval <= 0:
            raise ValueError(f"--poll-interval must be > 0, got {self.poll_interval}")


async def start_epp(config: EppConfig) -> tuple[GrpcServer, Router, StylerPool | None]:
    """The router, the styler pool and the ext-proc server, started."""
    tls = config.tls
    credentials = tls.channel_credentials() if tls else None
    router = Router(config.worker, config.poll_interval, credentials)
    stylers = StylerPool(config.styler, config.poll_interval, credentials) if config.styler else None
    await router.start()
    if stylers is not None:
        await stylers.start()
    server = GrpcServer.from_config(config)
    add_to_server(
        ExternalProcessorServicer(EndpointPicker(router, stylers, config.endpoint_port)), server.server
    )
    server.add_service_name(SERVICE_NAME)
    server.add_service_name(READINESS)
    server.add_service_name(LIVENESS)
    await server.start()
    return server, router, stylers


async def follow_readiness(server: GrpcServer, router: Router, interval_s: float) -> None:
    """Keep `readiness` and the ext-proc service's health in step with the workers in rotation."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    while True:
        ready = bool(router.healthy_workers())
        for name in ("", READINESS, SERVICE_NAME):
            await server.health.set(name, serving if ready else not_serving)
        await asyncio.sleep(interval_s)


async def serve(config: EppConfig) -> None:
    server, router, stylers = await start_epp(config)
    readiness = asyncio.create_task(follow_readiness(server, router, config.poll_interval))

    async def stop_following() -> None:  # on SIGTERM: NOT_SERVING stays, whatever the workers say
        readiness.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await readiness
        await server.set_serving(False)

    server.on_drain(stop_following)
    log.info("endpoint picker on %s for %d worker address(es)", server.bound_address, len(config.worker))
    try:
        await server.serve_until_signal()
    finally:
        await stop_following()
        await router.close()
        if stylers is not None:
            await stylers.close()


def main(argv: list[str], prog: str = "tandem epp") -> int:
    config = parse_config(EppConfig, argv, prog)
    setup_logging(config.log_level, config.log_format, service="tandem.epp")
    return run(lambda: serve(config))
