"""Client channels to tandem services.

Every gRPC client in tandem (the gateway's clients, a decode worker fetching KV, `tandem up`'s
health checks) opens its channel here, so that message limits, keepalive, TLS and tracing
interceptors are set in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.common import telemetry
from services.common.server import GRPC_OPTIONS
from services.common.tls import secure_channel_options

CLIENT_OPTIONS: Sequence[tuple[str, int | str]] = (
    *GRPC_OPTIONS,
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Dead workers must be noticed quickly so the router can take them out of rotation, and a
    # started or restarted one put back soon after it listens: a channel whose connection
    # attempts failed keeps retrying often, not at a backoff grown to seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 500),
)


def make_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to `address` (host:port or unix:/path); `options` are added to the
    client defaults."""
    # Tracing first (outermost), so the rpc's client span covers the caller's own interceptors.
    interceptors = [*telemetry.grpc_client_interceptors(), *interceptors]
    if credentials is not None:
        secure = [*CLIENT_OPTIONS, *secure_channel_options(address), *options]
        return grpc.aio.secure_channel(address, credentials, options=secure, interceptors=list(interceptors))
    return grpc.aio.insecure_channel(
        address, options=[*CLIENT_OPTIONS, *options], interceptors=list(interceptors)
    )
