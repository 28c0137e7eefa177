"""Graceful drain of the gateway's HTTP side on SIGTERM.

While draining, `/health` answers 503 (load balancers and Kubernetes stop sending traffic), new
requests get 503 + Retry-After with `Connection: close`, and requests already in flight (SSE
streams included) run to the end. `main.serve` waits for them up to `--drain-timeout`, then
closes the server, and the process exits 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.errors import APIError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Probes and scrapers keep answering during the drain (so they can see it).
_UNCOUNTED = {"/health", "/metrics", "/ping", "/openapi.json"}


class HttpDrain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no counted request is in flight; False when `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def middleware(self) -> Middleware:
        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path in _UNCOUNTED:
                return await handler(request)
            if self.draining:
                raise APIError(503, "the gateway is shutting down; retry on another replica", retry_after_s=1)
            self.in_flight += 1
            self._idle.clear()
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self._idle.set()

        return count
