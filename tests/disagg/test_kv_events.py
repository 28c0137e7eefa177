"""KV events and exact routing: the worker's event log follows its prefix cache (stores and
evictions), a subscriber resumes from a sequence number (or gets a snapshot when it fell behind
or the worker restarted), and the gateway's index, fed by real SubscribeKvEvents streams, routes a
prompt to the worker that holds its prefix."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from test_kv_transfer import COMMON, made_vocab, sampling_pb
from worker_servers import InProcessWorker, LoopThread, start_worker, stop_worker

from gateway.router import Router
from services.common.block_hash import block_hashes, chain_hash
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_events import KvEventLog
from services.worker.request import SamplingParams
from tandem.v1 import worker_pb2, worker_pb2_grpc

BLOCK = 16


def prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, vocab, (length - 1,), generator=gen).tolist()] for _ in range(count)]


def cached_digests(engine: Engine) -> set[int]:
    bm = engine.block_manager
    return {bm.block_digests[b] for b in bm.cached.values()}


def test_block_hash_is_the_block_managers_chain() -> None:
    tokens = list(range(1, 50))
    hashes = block_hashes(tokens, BLOCK)
    assert len(hashes) == 3
    assert hashes[1] == chain_hash(hashes[0], tokens[16:32])
    assert block_hashes(tokens, BLOCK, max_blocks=2) == hashes[:2]
    # the same in another process with another hash seed (Python's hash() would not be for str)
    code = "from services.common.block_hash import block_hashes; print(block_hashes(list(range(1, 50)), 16))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(hashes)
    assert all(0 <= h < 2**64 for h in hashes)  # a uint64 on the wire


def test_event_log_follows_stores_and_evictions(stories_dir: Path) -> None:
    # a cache of few blocks: later prompts evict earlier ones
    engine = Engine(WorkerConfig(model=str(stories_dir), **{**COMMON, "kv_cache_memory": "320KiB"}))
    log = engine.kv_events
    assert log is not None
    vocab = made_vocab(stories_dir)
    sp = SamplingParams(temperature=0.0, max_tokens=4)
    first = prompts(vocab, 1, 50, seed=1)[0]
    engine.generate([first], sp)
    events = log.since(0)
    assert [e.kind for e in events] == ["snapshot"]
    snapshot = set(events[0].hashes)
    assert set(block_hashes(first, BLOCK)) <= snapshot  # the prompt's full blocks are announced
    assert snapshot == cached_digests(engine)
    seen = events[0].sequence
    evicted: set[int] = set()
    stored: set[int] = set(snapshot)
    for i, prompt in enumerate(prompts(vocab, 12, 60, seed=2)):
        engine.generate([prompt], sp, prefix=f"p{i}")
        for event in log.since(seen, log.epoch):
            assert event.sequence == seen + 1  # no gaps
            seen = event.sequence
            if event.kind == "stored":
                stored.update(event.hashes)
            else:
                assert event.kind == "evicted"
                evicted.update(event.hashes)
                stored.difference_update(event.hashes)
    assert evicted & set(block_hashes(first, BLOCK)), "the small cache never evicted the first prompt"
    assert stored == cached_digests(engine)  # replaying the events gives exactly the cache


def test_event_log_resumes_or_snapshots() -> None:
    log = KvEventLog(capacity=3)
    log.stored([1, 2])
    log.stored([3])
    log.evicted([1])
    assert [(e.sequence, e.kind, e.hashes) for e in log.since(1, log.epoch)] == [
        (2, "stored", (3,)),
        (3, "evicted", (1,)),
    ]
    assert log.since(3, log.epoch) == []
    log.stored([4])
    log.stored([5])  # the ring now holds events 3..5
    assert [e.sequence for e in log.since(2, log.epoch)] == [3, 4, 5]
    too_old = log.since(1, log.epoch)
    assert [(e.sequence, e.kind, e.hashes) for e in too_old] == [(5, "snapshot", (2, 3, 4, 5))]
    assert log.since(4, "another-epoch")[0].kind == "snapshot"  # the worker restarted
    assert log.since(99, log.epoch)[0].kind == "snapshot"


def test_consecutive_events_of_one_kind_go_out_as_one() -> None:
    """SubscribeKvEvents merges a batch's consecutive stores (or evictions) into one message numbered
    as the last; applying the merged messages leaves the index as applying every event would."""
    from gateway.kv_index import CacheEvent, KvIndex
    from services.worker.rpc import merge_kv_events

    log = KvEventLog(capacity=16)
    log.stored([1, 2])
    log.stored([3])
    log.evicted([1])
    log.evicted([3])
    log.stored([1, 4])
    events = log.since(0, log.epoch)
    merged = merge_kv_events(events)
    assert merged == [(2, "stored", [1, 2, 3]), (4, "evicted", [1, 3]), (5, "stored", [1, 4])]
    one_by_one, together = KvIndex(), KvIndex()
    for e in events:
        one_by_one.apply("w", CacheEvent(e.sequence, e.kind, e.hashes, BLOCK, log.epoch))
    for sequence, kind, hashes in merged:
        together.apply("w", CacheEvent(sequence, kind, tuple(hashes), BLOCK, log.epoch))
    assert together.workers["w"].hashes == one_by_one.workers["w"].hashes == {1, 2, 4}
    assert together.workers["w"].sequence == one_by_one.workers["w"].sequence == 5
    snapshot = log.since(0, "another-epoch")
    assert merge_kv_events(snapshot + snapshot) == [(5, "snapshot", [1, 2, 4])] * 2  # never merged


# ---- over gRPC, and the gateway's index -------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(
    loop: LoopThread, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[InProcessWorker]]:
    sock = tmp_path_factory.mktemp("sock")
    opts: dict[str, Any] = dict(model=str(stories_dir), **COMMON)
    made = [start_worker(loop, sock, f"ev-{i}", kv_events_buffer=64, **opts) for i in range(2)]
    yield made
    for w in made:
        stop_worker(loop, w)


def generate(w: InProcessWorker, rid: str, prompt: list[int]) -> list[int]:
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(w.address))
    sp = sampling_pb(SamplingParams(temperature=0.0, max_tokens=2))
    request = worker_pb2.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp)
    return [t for chunk in stub.Generate(request, timeout=60) for c in chunk.choices for t in c.token_ids]


def test_subscription_streams_stores_and_resumes_by_sequence(
    workers: list[InProcessWorker], stories_dir: Path
) -> None:
    w = workers[0]
    vocab = made_vocab(stories_dir)
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(w.address))
    assert stub.Info(worker_pb2.InfoRequest()).kv_events
    first, second, third = prompts(vocab, 3, 40, seed=11)

    call = stub.SubscribeKvEvents(worker_pb2.SubscribeKvEventsRequest(), timeout=30)
    snapshot = next(call)
    assert snapshot.kind == worker_pb2.KV_EVENT_KIND_SNAPSHOT and snapshot.block_size == BLOCK
    generate(w, "sub-1", first)
    event = next(call)
    assert event.kind == worker_pb2.KV_EVENT_KIND_STORED and event.sequence == snapshot.sequence + 1
    assert list(event.block_hashes) == block_hashes(first, BLOCK)  # 2 full prompt blocks
    call.cancel()

    # missed while disconnected, then resumed from the last sequence number: no snapshot
    generate(w, "sub-2", second)
    generate(w, "sub-3", third)
    resumed = stub.SubscribeKvEvents(
        worker_pb2.SubscribeKvEventsRequest(after_sequence=event.sequence, epoch=event.epoch), timeout=30
    )
    # (the two stores, consecutive and of one kind, come as one message numbered as the second)
    got = next(resumed)
    resumed.cancel()
    assert got.kind == worker_pb2.KV_EVENT_KIND_STORED and got.sequence == event.sequence + 2
    assert list(got.block_hashes) == block_hashes(second, BLOCK) + block_hashes(third, BLOCK)

    # resuming with another epoch (as after a worker restart): a snapshot of everything cached
    other = stub.SubscribeKvEvents(
        worker_pb2.SubscribeKvEventsRequest(after_sequence=event.sequence, epoch="old"), timeout=30
    )
    fresh = next(other)
    other.cancel()
    assert fresh.kind == worker_pb2.KV_EVENT_KIND_SNAPSHOT
    assert {*block_hashes(first, BLOCK), *block_hashes(second, BLOCK)} <= set(fresh.block_hashes)


def test_a_subscription_does_not_hold_up_a_drain(workers: list[InProcessWorker]) -> None:
    """Gateways stay subscribed for good: a worker's drain must not wait for their streams."""
    w = workers[1]
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(w.address))
    call = stub.SubscribeKvEvents(worker_pb2.SubscribeKvEventsRequest(), timeout=30)
    assert next(call).kind == worker_pb2.KV_EVENT_KIND_SNAPSHOT  # the stream is open
    try:
        assert w.server.drain.in_flight == 0
    finally:
        call.cancel()


def wait_for(condition: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_gateway_index_routes_to_the_worker_holding_the_prefix(
    loop: LoopThread, workers: list[InProcessWorker], stories_dir: Path
) -> None:
    vocab = made_vocab(stories_dir)
    router: Router = loop.run(make_router([w.address for w in workers]))
    try:
        wait_for(lambda: all(router.kv_index.live(w.address) for w in workers), "both workers' event streams")
        a, b = (next(s for s in router.workers if s.address == w.address) for w in workers)
        system, fresh = prompts(vocab, 2, 97, seed=21)  # 6 full blocks of shared "system prompt"
        generate(workers[1], "warm-b", system)
        wait_for(
            lambda: router.kv_index.cached_blocks(b.address, block_hashes(system, BLOCK)) == 6,
            "the index to learn worker b's blocks",
        )
        assert router.kv_index.cached_blocks(a.address, block_hashes(system, BLOCK)) == 0
        follow_up = [*system, 7, 8, 9]
        # The load poll may have seen the warm-up in flight: wait until it reports both idle, so
        # the one request tracked below is b's whole load (a stale 1 would tip the cost to a).
        wait_for(lambda: a.load == 0 and b.load == 0, "the load poll to see both workers idle")
        exact_before = router.num_exact_routes
        # b is busier, but holds the prefix: 6 blocks saved outweigh one request of load
        with router.track(b):
            for _ in range(4):  # and not by round-robin luck
                assert loop.run(pick(router, follow_up)) is b
        assert router.num_exact_routes == exact_before + 4
        # a prompt nobody caches: today's least-load routing decides (no exact route)
        assert loop.run(pick(router, fresh)) in (a, b)
        assert router.num_exact_routes == exact_before + 4
        # worker b's events stop (its stream breaks): the index stops trusting it until it resumes
        router.kv_index.set_live(b.address, False)
        assert loop.run(pick(router, follow_up)) in (a, b)
        assert router.num_exact_routes == exact_before + 4
    finally:
        loop.run(router.close())


async def make_router(addresses: list[str]) -> Router:
    router = Router(addresses, poll_interval_s=0.05)
    await router.start()
    return router


async def pick(router: Router, prompt: list[int]) -> Any:
    return router.pick(prompt)
