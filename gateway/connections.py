"""Bounded HTTP connections: an idle / slow-header timeout, a connection cap, the descriptor limit.

- `--idle-timeout`: a connection must deliver a complete request head within this many seconds
  of opening, or of the end of its previous response (aiohttp's keep-alive timer, which closes a
  connection still waiting for a request head: idle keep-alive connections and slow-header
  senders alike). The body has `--body-timeout` (app.py).
- `--max-connections`: at the cap, a new connection evicts the longest-open *idle* one (waiting
  for a request head), so idle connections can never lock clients out; when every connection is
  busy with a request, the new one gets 503 + `Connection: close` at once.
- At start-up the soft descriptor limit is raised to the hard one, and the cap is lowered to
  what the descriptors allow (a reserve is kept for the gRPC channels, logs and sockets).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

# Descriptors kept for everything but client connections (gRPC channels, files, listeners).
RESERVED_DESCRIPTORS = 256


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft


def connection_cap(max_connections: int, descriptor_limit: int) -> int:
    """--max-connections, lowered to what `descriptor_limit` allows."""
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


class GatewayRunner(web.AppRunner):
    """web.AppRunner whose server caps its connections (see the module docstring)."""

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
