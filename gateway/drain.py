"""Graceful drain of the gateway's HTTP side on SIGTERM.

While draining, `/health` answers 503 (load balancers and Kubernetes stop sending traffic), new
requests get 503 + Retry-After with `Connection: close`, and requests already in flight (SSE
streams included) run to the end. `main.serve` waits for them up to `--drain-timeout`, then
closes the server, and the process exits 0.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.errors import APIError
from services.common.drain import Drain

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Probes and scrapers keep answering during the drain (so they can see it).
_UNCOUNTED = {"/health", "/metrics", "/ping", "/openapi.json"}


class HttpDrain(Drain):
    """The gateway's HTTP requests, counted for the drain (probes and scrapers excepted)."""

    def middleware(self) -> Middleware:
        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in _UNCOUNTED:
                return await handler(request)
            if self.draining:
                raise APIError(503, "the gateway is shutting down; retry on another replica", retry_after_s=1)
            self._enter()
            try:
                return await handler(request)
            finally:
                self._exit()

        return count
