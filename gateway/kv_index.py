"""Which prompt blocks each worker's prefix cache holds, from the workers' KV events.

Every worker with `Info.kv_events` streams its cache changes (SubscribeKvEvents: blocks stored and
evicted, by chain hash). `KvIndex` keeps one set of hashes per worker; `KvEventFollower` keeps one
subscription per worker alive and resumes it from the last sequence number it applied after a
broken stream (the worker sends a snapshot instead when it cannot resume there). The router asks
`cached_blocks(worker, hashes)`: how many leading blocks of a prompt that worker would not have
to prefill. Hashes are services/common/block_hash.py's, the definition the workers use.

A worker's entry is trusted (`live`) only while its subscription is up: events missed while it is
down would make the set wrong, and the router falls back to its prefix-affinity guess meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from gateway.downstream import CacheEvent

log = logging.getLogger(__name__)

# Seconds between attempts to re-subscribe to a worker whose event stream broke.
RESUBSCRIBE_DELAY_S = 0.5
# These answers mean the worker has no events to give (an older worker, or prefix caching off).
NO_EVENTS = {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION}


@dataclass
class WorkerCache:
    """What one worker caches, as far as its events tell."""

    hashes: set[int] = field(default_factory=set)
    block_size: int = 0
    sequence: int = 0  # the last event applied
    epoch: str = ""
    live: bool = False  # the subscription is up and has delivered its snapshot
    num_events: int = 0


class KvIndex:
    """Every followed worker's cached block hashes, by worker address."""

    def __init__(self) -> None:
        self.workers: dict[str, WorkerCache] = {}

    def apply(self, address: str, event: CacheEvent) -> None:
        cache = self.workers.setdefault(address, WorkerCache())
        if event.kind == "subscribed":  # resuming after `sequence`: what is known stays true
            cache.live = True
            return
        if event.kind == "snapshot":
            cache.hashes = set(event.block_hashes)
            cache.live = True
        elif event.kind == "stored":
            cache.hashes.update(event.block_hashes)
        elif event.kind == "evicted":
            cache.hashes.difference_update(event.block_hashes)
        cache.block_size = event.block_size or cache.block_size
        cache.sequence, cache.epoch = event.sequence, event.epoch
        cache.num_events += 1

    def set_live(self, address: str, live: bool) -> None:
        cache = self.workers.setdefault(address, WorkerCache())
        cache.live = live

    def live(self, address: str) -> WorkerCache | None:
        cache = self.workers.get(address)
        return cache if cache is not None and cache.live else None

    def forget(self, address: str) -> None:
        self.workers.pop(address, None)

    def cached_blocks(self, address: str, hashes: list[int]) -> int:
        """Leading blocks of a prompt (its chain `hashes`) the worker holds; 0 when unknown."""
        cache = self.live(address)
        if cache is None:
            return 0
        count = 0
        for h in hashes:
            if h not in cache.hashes:
                break
            count += 1
        return count


EventStream = Callable[[int, str], AsyncIterator[CacheEvent]]


class KvEventFollower:
    """Keeps one worker's event subscription up, feeding the index."""

    def __init__(self, index: KvIndex, address: str, subscribe: EventStream) -> None:
        self.index = index
        self.address = address
        self._subscribe = subscribe
        self._task: asyncio.Task[None] | None = None
        self.unsupported = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kv-events {self.address}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.index.forget(self.address)

    async def _run(self) -> None:
        while True:
            cache = self.index.workers.get(self.address)
            after, epoch = (cache.sequence, cache.epoch) if cache is not None else (0, "")
            try:
                async for event in self._subscribe(after, epoch):
                    self.index.apply(self.address, event)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in NO_EVENTS:
                    log.info(
                        "worker %s gives no KV events (%s); routing it by affinity",
                        self.address,
                        exc.details(),
                    )
                    self.unsupported = True
                    self.index.forget(self.address)
                    return
                log.debug("KV event stream of %s broke: %s", self.address, exc.code())
            self.index.set_live(self.address, False)
            await asyncio.sleep(RESUBSCRIBE_DELAY_S)
