"""The gateway's --routing: `exact` picks the worker whose prefix cache (as its KV events tell)
holds the prompt, `affinity` ignores the events and keeps to the worker that served the prefix
before; `/metrics` counts the exact picks by pool."""

from __future__ import annotations

import asyncio

from gateway.downstream import CacheEvent
from gateway.metrics import Metrics
from gateway.router import Router, WorkerState
from services.common.block_hash import block_hashes

BLOCK = 16
PROMPT = list(range(100, 100 + 5 * BLOCK + 3))


def _router(exact: bool) -> tuple[Router, WorkerState, WorkerState]:
    """Two healthy workers, idle but for `a` being the least loaded at first; the index says `b`
    caches the prompt's blocks and `a` none."""
    router = Router(["unix:/nonexistent/a.sock", "unix:/nonexistent/b.sock"], exact=exact)
    a, b = router.workers
    for w in (a, b):
        w.healthy = True
    snapshot = tuple(block_hashes(PROMPT, BLOCK))
    router.kv_index.apply(a.address, CacheEvent(1, "snapshot", (), BLOCK, "e"))
    router.kv_index.apply(b.address, CacheEvent(1, "snapshot", snapshot, BLOCK, "e"))
    return router, a, b


async def _picks(exact: bool) -> tuple[list[str], int]:
    router, _a, b = _router(exact)
    try:
        b.reported_load = 1  # a is the least loaded: affinity's first pick
        first = router.pick(PROMPT)
        b.reported_load = 0
        again = [router.pick(PROMPT) for _ in range(3)]  # affinity: back to the first pick's worker
        return [w.name for w in (first, *again)], router.num_exact_routes
    finally:
        await router.close()


def test_exact_routing_follows_the_index() -> None:
    names, exact_routes = asyncio.run(_picks(exact=True))
    # b holds 5 blocks: worth more than its one request of load
    assert names == ["worker-1"] * 4
    assert exact_routes == 4


def test_affinity_routing_ignores_the_index() -> None:
    names, exact_routes = asyncio.run(_picks(exact=False))
    assert names == ["worker-0"] * 4
    assert exact_routes == 0


def test_metrics_count_exact_routes_by_pool() -> None:
    metrics = Metrics()
    metrics.track_exact_routes(lambda: {"worker": 7, "prefill_worker": 2})
    text = metrics.render().decode()
    assert 'tandem:gateway_exact_routes_total{pool="worker"} 7.0' in text
    assert 'tandem:gateway_exact_routes_total{pool="prefill_worker"} 2.0' in text
