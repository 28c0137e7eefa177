"""Bounded HTTP connections: an idle / slow-header timeout and a connection cap.

- `--idle-timeout`: a connection must deliver a complete request head within this many seconds
  of opening, or of the end of its previous response (aiohttp's keep-alive timer, which closes a
  connection still waiting for a request head: idle keep-alive connections and slow-header
  senders alike). The body has `--body-timeout` (app.py).
- `--max-connections`: at the cap, a new connection evicts the longest-open *idle* one (waiting
  for a request head), so idle connections can never lock clients out; when every connection is
  busy with a request, the new one gets 503 + `Connection: close` at once. The cap stays below
  the descriptor limit (raised at start-up by services/common/server.run), with a reserve for
  the gRPC channels, logs and listeners.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.http_server import GatewayRunner

log = logging.getLogger(__name__)

# Descriptors kept for everything but client connections (gRPC channels, files, listeners).
RESERVED_DESCRIPTORS = 256


def connection_cap(max_connections: int, descriptor_limit: int | None = None) -> int:
    """--max-connections, lowered to what `descriptor_limit` (default: this process's) allows."""
    if descriptor_limit is None:
        descriptor_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    allowed = max(descriptor_limit - RESERVED_DESCRIPTORS, 16)
    if max_connections > allowed:
        log.warning(
            "--max-connections %d lowered to %d (descriptor limit %d)",
            max_connections,
            allowed,
            descriptor_limit,
        )
        return allowed
    return max_connections


def _refusal(max_connections: int) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": f"too many connections (--max-connections {max_connections}); retry later",
                "type": "server_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _is_idle(handler: RequestHandler) -> bool:
    """Waiting for a request head (aiohttp's `_waiter` is set only then)."""
    waiter = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


class BoundedRunner(GatewayRunner):
    """The gateway's runner (errors of aiohttp's parser in OpenAI's envelope, http_server.py)
    whose server times out idle connections and caps them (see the module docstring)."""

    def __init__(
        self, app: web.Application, max_connections: int, idle_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(app, keepalive_timeout=idle_timeout, **kwargs)
        self.max_connections = max_connections
        self.num_refused = 0
        self.num_evicted = 0

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        admit = server.connection_made
        cap = self.max_connections
        refusal = _refusal(cap)

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            if cap and len(server._connections) >= cap:
                idle = next((h for h in server._connections if _is_idle(h)), None)
                if idle is not None:
                    self.num_evicted += 1
                    idle.force_close()
                else:
                    self.num_refused += 1
                    transport.write(refusal)
                    transport.close()
                    return
            admit(handler, transport)

        server.connection_made = connection_made  # type: ignore[method-assign]
        return server
