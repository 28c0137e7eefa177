"""The grpc.aio server bootstrap every tandem service uses.

    server = GrpcServer("unix:/tmp/w.sock", grace_s=30)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server.server)
    server.add_service_name("tandem.v1.Worker")
    await server.start()                 # health SERVING, reflection on
    await server.serve_until_signal()    # SIGTERM/SIGINT: drain, then return

Addresses are `host:port` (port 0 picks a free one; `bound_address` tells which) or
`unix:/path/to.sock`. On SIGTERM or SIGINT the server turns its health to NOT_SERVING (so
routers and Kubernetes probes stop sending work), refuses new rpcs with UNAVAILABLE while health
checks keep answering (services/common/drain.py), lets in-flight ones (streams included) finish
within the grace period, cancels what is left, and returns, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import heap_profile, telemetry
from services.common.drain import DrainInterceptor
from services.common.metrics import GrpcMetricsInterceptor, start_metrics_server
from services.common.reflection import enable_server_reflection
from services.common.service_config import ServiceConfig
from services.common.tls import secure_channel_options
from services.common.undecodable import UndecodableRequestInterceptor

log = logging.getLogger(__name__)

# Generous message size: FetchKV chunks and long prompts exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_PENDING_CALLS = 100_000
GRPC_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Calls not yet picked up by the grpc.aio server: past grpc core's defaults (1,000 / 3,000) it
    # cancels them with no message (a burst of 1,500 Generate calls lost dozens as CANCELLED).
    # Admission is the services' own (the worker's --max-pending-requests answers
    # RESOURCE_EXHAUSTED with a message), so core only needs to hand every call over.
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
)
# `wait_for_serving` polls a server that is still starting: its first connection attempts fail,
# and grpc core's default reconnect backoff (1 s, growing 1.6x a time) then left the channel
# waiting seconds after the server was listening. Reconnect at the poll's own pace instead.
READINESS_CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 100),
)


def is_unix_address(address: str) -> bool:
    return address.startswith("unix:")


def metrics_host(address: str) -> str:
    """Where --metrics-port listens: the gRPC address's host (a service kept on loopback keeps its
    metrics there too), loopback for a unix socket."""
    if is_unix_address(address):
        return "127.0.0.1"
    host = address.rsplit(":", 1)[0]
    return host.removeprefix("[").removesuffix("]") or "0.0.0.0"


class GrpcServer:
    """A grpc.aio server with health, reflection and graceful shutdown."""

    def __init__(
        self,
        address: str,
        grace_s: float = 30.0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        server_credentials: grpc.ServerCredentials | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.address = address
        self.grace_s = grace_s
        self.metrics_port = metrics_port
        self.drain = DrainInterceptor()
        # Tracing (empty unless OTEL_* / TANDEM_TRACE_FILE turned it on) and rpc / error counts
        # for every service, so no servicer needs its own hooks.
        observability = [*telemetry.grpc_server_interceptors(), GrpcMetricsInterceptor()]
        # Innermost: the outer interceptors see its INVALID_ARGUMENT like any other refusal.
        self.server = grpc.aio.server(
            interceptors=[self.drain, *observability, *interceptors, UndecodableRequestInterceptor()],
            options=list(GRPC_OPTIONS),
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._credentials = server_credentials
        self._service_names: list[str] = []
        self._bound_port = 0
        self._stop_event = asyncio.Event()
        self._on_drain: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    def from_config(
        cls, config: ServiceConfig, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    ) -> GrpcServer:
        """A server on `config.address` draining for `config.drain_timeout`, with mutual TLS when set."""
        tls = config.tls
        return cls(
            config.address,
            grace_s=config.drain_timeout,
            interceptors=interceptors,
            server_credentials=tls.server_credentials() if tls else None,
            metrics_port=config.metrics_port,
        )

    def add_service_name(self, full_name: str) -> None:
        """Register a service name for health and reflection (call once per servicer added)."""
        self._service_names.append(full_name)

    def on_drain(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` after health turns NOT_SERVING and before the server stops."""
        self._on_drain.append(callback)

    @property
    def bound_address(self) -> str:
        """The address clients should use (the real port when 0 was asked)."""
        if is_unix_address(self.address):
            return self.address
        host = self.address.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self._bound_port}"

    async def start(self) -> None:
        if is_unix_address(self.address):
            path = self.address.removeprefix("unix:").removeprefix("//")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        enable_server_reflection([*self._service_names, health.SERVICE_NAME], self.server)
        if self._credentials is not None:
            self._bound_port = self.server.add_secure_port(self.address, self._credentials)
        else:
            self._bound_port = self.server.add_insecure_port(self.address)
        if self._bound_port == 0 and not is_unix_address(self.address):
            raise OSError(f"could not bind gRPC server to {self.address}")
        await self.server.start()
        if self.metrics_port:
            host = metrics_host(self.address)
            port = start_metrics_server(self.metrics_port, host)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
        await self.set_serving(True)
        log.info("gRPC server listening on %s (%s)", self.bound_address, ", ".join(self._service_names))

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    def request_stop(self) -> None:
        """Ask `serve_until_signal` to drain and return (what SIGTERM does)."""
        self._stop_event.set()

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new rpcs, let in-flight ones finish within grace, then stop.

        Health checks keep answering (NOT_SERVING) during the drain, so routers see it.
        """
        await self.set_serving(False)
        self.drain.start()
        for callback in self._on_drain:
            await callback()
        if self.drain.in_flight:
            log.info("draining %d in-flight rpc(s) for up to %.1fs", self.drain.in_flight, self.grace_s)
        if not await self.drain.wait_idle(self.grace_s):
            log.warning(
                "%d rpc(s) still running after the %.1fs grace period; cancelling them",
                self.drain.in_flight,
                self.grace_s,
            )
        await self.server.stop(0.5)
        log.info("gRPC server on %s stopped", self.bound_address)

    async def serve_until_signal(self) -> None:
        """Serve until SIGTERM / SIGINT (or `request_stop`), then drain and return."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop_event.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        await self.stop()


def install_event_loop_policy() -> None:
    """Use uvloop when it is installed (it is a dependency on Linux and macOS)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_open_file_limit() -> None:
    """Raise this process's open-descriptor soft limit to its hard limit, where allowed: every
    connection, stream and socket is a descriptor, and distributions set the soft limit to 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:  # the kernel refuses "infinite" descriptors: use its cap
        try:
            hard = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            hard = 1024 * 1024
    if soft != resource.RLIM_INFINITY and soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run an async service main on uvloop and return exit status 0 after a graceful stop."""
    heap_profile.install_from_env()
    raise_open_file_limit()
    install_event_loop_policy()
    asyncio.run(main())
    return 0


async def wait_for_serving(
    address: str, timeout_s: float, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Poll the standard health check of `address` until SERVING; raise TimeoutError otherwise.

    Pass `credentials` (TlsFiles.channel_credentials()) for a server with mutual TLS.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    last_error = "no answer"
    channel_cm = (
        grpc.aio.secure_channel(
            address, credentials, options=[*READINESS_CHANNEL_OPTIONS, *secure_channel_options(address)]
        )
        if credentials is not None
        else grpc.aio.insecure_channel(address, options=READINESS_CHANNEL_OPTIONS)
    )
    async with channel_cm as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f}s ({last_error})")
            await asyncio.sleep(0.1)
