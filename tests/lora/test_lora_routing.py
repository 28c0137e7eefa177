"""The gateway's routing of adapter requests (gateway/router.py): workers that hold the adapter
first; the KV index matched with the adapter's own block-hash root, so a worker caching a prompt
under one adapter does not attract the same prompt under another adapter or the base model."""

from __future__ import annotations

from gateway.downstream import CacheEvent
from gateway.router import Router
from services.common.block_hash import ROOT_HASH, block_hashes, lora_root_hash
from services.worker.request import EngineRequest, Request, SamplingParams


async def test_prefers_workers_holding_the_adapter() -> None:
    router = Router(["unix:/tmp/a.sock", "unix:/tmp/b.sock", "unix:/tmp/c.sock"])
    a, b, c = router.workers
    for w in (a, b, c):
        w.healthy = True
    b.loras = {"tuned": "d1"}
    b.reported_load = 5  # busier, but the only one holding it
    assert all(router.pick([i, 2, 3], lora_name="tuned") is b for i in range(8))
    assert router.adapters() == {"tuned": "d1"}
    # nobody holds it (e.g. a worker that has not been polled since the load): any worker
    assert router.pick([1, 2, 3], lora_name="other") in (a, c)
    b.healthy = False  # an adapter held only by a worker out of rotation is not served
    assert router.adapters() == {}
    await router.close()


async def test_kv_index_matches_the_adapters_hashes() -> None:
    router = Router(["unix:/tmp/a.sock", "unix:/tmp/b.sock"])
    a, b = router.workers
    a.healthy = b.healthy = True
    a.loras = b.loras = {"tuned": "digest-1"}
    prompt = list(range(1, 70))
    # worker a holds the prompt's blocks under the adapter, worker b under the base model
    for w, root in ((a, lora_root_hash("digest-1")), (b, ROOT_HASH)):
        hashes = tuple(block_hashes(prompt, 16, root=root))
        router.kv_index.apply(w.address, CacheEvent(1, "snapshot", hashes, 16, "e"))
    assert router.pick(prompt, lora_name="tuned") is a
    assert router.pick(prompt) is b
    await router.close()


def test_worker_block_hashes_use_the_adapter_root() -> None:
    """The worker's chain root for a request under an adapter is the gateway's lora_root_hash."""
    from services.worker.lora.adapter import LoRAAdapter

    adapter = LoRAAdapter("tuned", "/x", 8, 2.0, {}, digest="digest-1")
    req = EngineRequest("r", (1, 2, 3), SamplingParams(), lora_name="tuned", lora=adapter)
    assert Request(req, 4, (2,), 0).root_hash == lora_root_hash("digest-1") != ROOT_HASH
    plain = EngineRequest("p", (1, 2, 3), SamplingParams())
    assert Request(plain, 4, (2,), 0).root_hash == ROOT_HASH
    assert block_hashes([5] * 32, 16) != block_hashes([5] * 32, 16, root=lora_root_hash("digest-1"))
