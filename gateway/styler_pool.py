"""The styler replicas: round-robin over those whose health check says SERVING.

Styler calls other than the detokenize streams are idempotent (render, tokenize, detokenize), so
`call` retries one that failed with UNAVAILABLE (a replica that died or is draining) on another
replica, taking the failed one out of rotation until its health check says SERVING again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from gateway.clients import StylerClient
from gateway.detokenize_mux import MuxCounts
from gateway.downstream import StylerInfo
from gateway.poller import Poller

log = logging.getLogger(__name__)
T = TypeVar("T")


class NoStylerAvailable(Exception):
    """No styler replica is serving."""


class StylerPool:
    def __init__(
        self,
        addresses: Sequence[str],
        poll_interval_s: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.clients = [StylerClient(a, credentials) for a in addresses]
        self.healthy = {c.address: False for c in self.clients}
        self.info: StylerInfo | None = None
        self.poll_interval_s = poll_interval_s
        self._round_robin = itertools.count()
        self._poller = Poller(self.poll_once, poll_interval_s, "styler")

    async def start(self) -> None:
        await self._poller.start()

    async def close(self) -> None:
        await self._poller.stop()
        for c in self.clients:
            await c.close()

    async def poll_once(self) -> None:
        async def poll(c: StylerClient) -> None:
            ok = await c.healthy(timeout_s=1.0)
            if ok and self.info is None:
                try:
                    self.info = await c.info()
                except Exception as exc:
                    log.warning("styler %s answered health but not Info: %s", c.address, exc)
                    ok = False
            if ok != self.healthy[c.address]:
                log.info("styler %s %s rotation", c.address, "back in" if ok else "taken out of")
            self.healthy[c.address] = ok

        await asyncio.gather(*(poll(c) for c in self.clients))

    def detokenize_counts(self) -> MuxCounts:
        """Message counts of every replica's detokenize streams, summed."""
        total = MuxCounts()
        for c in self.clients:
            total.messages_sent += c.detokenize_counts.messages_sent
            total.session_messages_sent += c.detokenize_counts.session_messages_sent
            total.messages_received += c.detokenize_counts.messages_received
        return total

    def mark_failed(self, client: StylerClient) -> None:
        """Take a replica out of rotation after a transport failure (the poller brings it back)."""
        if self.healthy.get(client.address):
            log.warning("styler %s failed; taken out of rotation", client.address)
        self.healthy[client.address] = False

    async def call(self, fn: Callable[[StylerClient], Awaitable[T]]) -> T:
        """`fn` on a healthy replica; on UNAVAILABLE, once more on each other replica."""
        tried: list[StylerClient] = []
        while True:
            client = self.pick(exclude=tried)
            tried.append(client)
            try:
                return await fn(client)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or len(tried) >= len(self.clients):
                    raise
                self.mark_failed(client)
                log.warning("styler %s unavailable; retrying on another replica", client.address)

    def pick(self, exclude: Sequence[StylerClient] = ()) -> StylerClient:
        candidates = [c for c in self.clients if self.healthy[c.address] and c not in exclude]
        if not candidates:
            # The poller may lag a restart; try one anyway rather than refuse outright.
            candidates = [c for c in self.clients if c not in exclude] or self.clients
        if not candidates:
            raise NoStylerAvailable("no styler is configured")
        return candidates[next(self._round_robin) % len(candidates)]
