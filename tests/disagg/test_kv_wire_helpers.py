"""Wire helper processes (`--kv-wire-helpers`, services/worker/kv_wire_helpers.py): a parallel
gRPC fetch's further streams served and read by helper processes on each side.

Real helper processes (`python -m services.worker.kv_wire_helper`) and real workers over TCP on
127.0.0.1: every mix of a side with helpers and one without gives a unified engine's tokens, the
helpers carry the further streams, and every block, handle and ring slot is back afterwards; a
further stream's bad request gets its status from the helper; a helper that exits leaves the
worker serving with the others, and with none its own streams carry every fetch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import worker_servers
from worker_servers import InProcessWorker, LoopThread, start_worker, stop_worker

from services.worker import kv_streams, kv_wire, kv_wire_helpers
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_transfer import KVChunkData
from services.worker.request import SamplingParams
from tandem.v1 import common_pb2, worker_pb2

COMMON = dict(device="cpu", kv_cache_memory="8MiB", max_model_len=256, cpu_threads=1)
MAX_TOKENS = 6
FETCH_KV = "/tandem.v1.Worker/FetchKV"
# small chunks: a fetch's streams cycle through their 4-slot rings several times
CHUNK = dict(kv_chunk_bytes=4096)


class Workers:
    def __init__(self, loop: LoopThread, sock: Path, model: Path) -> None:
        opts: dict[str, Any] = dict(model=str(model), **COMMON)
        tcp = dict(address="127.0.0.1:0", **CHUNK)
        self.prefill = start_worker(loop, sock, "wh-p", role="prefill", kv_wire_helpers=2, **tcp, **opts)
        self.plain_prefill = start_worker(loop, sock, "wh-p0", role="prefill", **CHUNK, **opts)
        self.decode = start_worker(loop, sock, "wh-d", role="decode", kv_wire_helpers=2, **tcp, **opts)
        self.plain_decode = start_worker(loop, sock, "wh-d0", role="decode", kv_fetch_streams=3, **opts)
        self.reference = Engine(WorkerConfig(**opts))
        self.all = [self.prefill, self.plain_prefill, self.decode, self.plain_decode]

    stub = staticmethod(worker_servers.stub)


@pytest.fixture(scope="module")
def workers(
    loop: LoopThread, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    made = Workers(loop, tmp_path_factory.mktemp("helpers"), stories_dir)
    yield made
    for w in made.all:
        stop_worker(loop, w)
    for w in (made.prefill, made.decode):  # stop_worker closed the servicer: the helpers exited
        helpers = w.servicer.wire_helpers
        assert helpers is not None
        assert all(h.process.poll() is not None for h in helpers.helpers)


def prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 500, (20 + 11 * i,), generator=gen).tolist()] for i in range(n)]


def greedy() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


def disaggregated(
    prefill: InProcessWorker, decode: InProcessWorker, rid: str, prompt: list[int]
) -> list[int]:
    return worker_servers.disaggregated(prefill, decode, rid, prompt, MAX_TOKENS)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def helpers_of(w: InProcessWorker) -> kv_wire_helpers.WireHelpers:
    assert w.servicer.wire_helpers is not None, "the worker started its helpers"
    return w.servicer.wire_helpers


def wait_nothing_held(workers: Workers) -> None:
    def idle() -> bool:
        loads = [Workers.stub(w).GetLoad(worker_pb2.GetLoadRequest()) for w in workers.all]
        return all(lo.num_kv_blocks_used == 0 and lo.num_kv_handles == 0 for lo in loads)

    wait_until(idle, "blocks or handles left behind")
    for w in (workers.prefill, workers.decode):
        for h in helpers_of(w).live():
            wait_until(lambda h=h: h.serve_free.qsize() == kv_wire_helpers.RING_SLOTS, "a serve slot leaked")
            wait_until(lambda h=h: h.receive_held == 0, "a receive slot leaked")
    assert len(workers.prefill.servicer.parallel_fetches) == 0


@pytest.mark.parametrize(
    "pair", ["helpers-both", "helpers-prefill-only", "helpers-decode-only"], ids=lambda p: p
)
def test_helpers_carry_the_further_streams_and_tokens_equal_unified(workers: Workers, pair: str) -> None:
    prefill = workers.plain_prefill if pair == "helpers-decode-only" else workers.prefill
    decode = workers.plain_decode if pair == "helpers-prefill-only" else workers.decode
    batch = prompts(6, seed=len(pair))
    expected = workers.reference.generate(
        batch, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), prefix=f"ref-{pair}"
    )
    served = helpers_of(workers.prefill).num_served
    read = helpers_of(workers.decode).num_read
    opened = prefill.servicer.parallel_fetches.num_opened
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: disaggregated(prefill, decode, f"{pair}-{i}", batch[i]), range(6)))
    for i, (tokens, ref) in enumerate(zip(got, expected, strict=True)):
        assert tokens == ref.token_ids[0], f"request {i}"
    stats = decode.servicer.fetch_stats[-6:]
    assert all(s.ok and s.transport == "grpc" and s.num_bytes > 0 for s in stats), stats
    # 3 streams a fetch (2 helpers and the worker's own, or --kv-fetch-streams 3): 2 further each
    assert prefill.servicer.parallel_fetches.num_opened - opened == 6
    further = 6 * 2
    assert helpers_of(workers.prefill).num_served - served == (further if prefill is workers.prefill else 0)
    assert helpers_of(workers.decode).num_read - read == (further if decode is workers.decode else 0)
    wait_nothing_held(workers)


def raw_fetch(
    address: str, handle_id: str, max_streams: int
) -> tuple[dict[tuple[int, int], bytes], list[int]]:
    """A raw client's fetch that follows `stream_addresses`: every (layer, block) cell's bytes,
    and the data chunks that came on each stream."""
    channels: list[grpc.Channel] = []

    def fetch(at: str, request: worker_pb2.FetchKVRequest) -> Iterator[kv_wire.WireChunk]:
        channels.append(grpc.insecure_channel(at))
        call = channels[-1].unary_stream(
            FETCH_KV,
            request_serializer=worker_pb2.FetchKVRequest.SerializeToString,
            response_deserializer=kv_wire.decode_chunk,
        )
        return iter(call(request, timeout=30))

    cells: dict[tuple[int, int], bytes] = {}
    lock = threading.Lock()

    def take(chunks: Iterator[kv_wire.WireChunk]) -> int:
        count = 0
        for chunk in chunks:
            worker_servers.add_cells(cells, chunk, lock)
            count += 1
        return count

    first = fetch(address, worker_pb2.FetchKVRequest(handle_id=handle_id, max_streams=max_streams))
    head = next(first)
    if not head.header.streams:  # one stream: everything on it
        return cells, [take(iter([head, *first]))]
    addresses = list(head.header.stream_addresses)
    assert len(addresses) == head.header.streams - 1
    further = [
        fetch(at, worker_pb2.FetchKVRequest(handle_id=handle_id, stream_index=i))
        for i, at in enumerate(addresses, start=1)
    ]
    with ThreadPoolExecutor(len(further)) as pool:
        counts = list(pool.map(take, further))
    counts.insert(0, take(first))
    for channel in channels:
        channel.close()
    return cells, counts


def test_the_helpers_carry_every_byte_and_equal_one_stream(workers: Workers) -> None:
    """With helpers the prefill worker's own stream carries no KV (the helpers split every
    layer), and the cells equal a one-stream fetch's, each once."""
    stub = Workers.stub(workers.prefill)
    prompt = prompts(1, seed=29)[0][:16] + list(range(100, 148))  # whole blocks
    assert len(prompt) % workers.prefill.engine.config.block_size == 0
    handles = [
        stub.Prefill(
            worker_pb2.PrefillRequest(request_id=f"raw-{i}", prompt_token_ids=prompt, sampling=greedy())
        ).handle.handle_id
        for i in range(2)
    ]
    one, one_counts = raw_fetch(workers.prefill.address, handles[0], 0)
    three, counts = raw_fetch(workers.prefill.address, handles[1], 3)
    assert len(one_counts) == 1 and len(counts) == 3
    assert counts[0] == 0 and all(c > 0 for c in counts[1:]), counts
    num_layers = workers.prefill.engine.kv_cache.model_shape[0]
    num_blocks = len(prompt) // workers.prefill.engine.config.block_size
    assert set(one) == set(three) == {(la, b) for la in range(num_layers) for b in range(num_blocks)}
    assert not sorted(k for k in one if one[k] != three[k])
    wait_nothing_held(workers)


def test_a_further_streams_bad_request_gets_its_status_from_the_helper(workers: Workers) -> None:
    address = helpers_of(workers.prefill).live()[0].address
    channel = grpc.insecure_channel(address)
    fetch = channel.unary_stream(
        FETCH_KV,
        request_serializer=worker_pb2.FetchKVRequest.SerializeToString,
        response_deserializer=kv_wire.decode_chunk,
    )
    with pytest.raises(grpc.RpcError) as info:  # a first stream belongs on the worker's address
        list(fetch(worker_pb2.FetchKVRequest(handle_id="h"), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream_index" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:  # the worker's own check, relayed
        list(fetch(worker_pb2.FetchKVRequest(handle_id="nope", stream_index=1), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (info.value.details() or "")
    channel.close()
    wait_nothing_held(workers)


@pytest.mark.parametrize("reader", ["decode-worker", "decode-helpers"])
def test_unreachable_helper_addresses_fall_back_to_the_workers_own(
    workers: Workers, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network that lets only the prefill worker's own port through (here: the helpers are
    advertised at a port nobody listens on): the first fetch fails and is computed locally, the
    decode worker then opens those streams at the worker's address, which serves them itself."""
    decode = workers.decode if reader == "decode-helpers" else workers.plain_decode
    helpers = helpers_of(workers.prefill)
    monkeypatch.setattr(helpers, "stream_addresses", lambda streams: ["127.0.0.1:1"] * (streams - 1))
    prompt = prompts(1, seed=61)[0]
    expected = workers.reference.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), prefix=f"ref-{reader}"
    )[0].token_ids[0]
    served = helpers.num_served
    for attempt in range(2):
        assert disaggregated(workers.prefill, decode, f"{reader}-{attempt}", prompt) == expected
        stats = decode.servicer.fetch_stats[-1]
        assert stats.ok == (attempt == 1), stats
    assert helpers.num_served == served  # the prefill worker served the second fetch's streams itself
    wait_nothing_held(workers)


def test_a_decode_helper_killed_mid_fetch_fails_that_fetch_only(workers: Workers) -> None:
    """The decode worker's helper that reads a fetch's stream 1 is stopped, the fetch starts and
    stalls on it, then the helper is killed: that fetch fails and the decode worker computes the
    prompt itself (same tokens), the prefill worker's handle, blocks and slots all go back, and
    the next fetch runs on the helper left."""
    helpers = helpers_of(workers.decode)
    victim = helpers.live()[0]  # reads stream 1 of every fetch while both live
    prompt = prompts(1, seed=53)[0] + list(range(60, 160))
    expected = workers.reference.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), prefix="ref-mid"
    )[0].token_ids[0]
    fetches = len(workers.decode.servicer.fetch_stats)
    os.kill(victim.process.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(disaggregated, workers.prefill, workers.decode, "mid-0", prompt)
            wait_until(lambda: len(workers.prefill.servicer.parallel_fetches) == 1, "the fetch started")
            os.kill(victim.process.pid, signal.SIGKILL)
            assert running.result(60) == expected
    finally:
        os.kill(victim.process.pid, signal.SIGKILL)  # (no-op once dead)
    wait_until(lambda: not victim.alive, "the worker noticed its helper's exit")
    stats = workers.decode.servicer.fetch_stats[fetches:]
    assert len(stats) == 1 and not stats[0].ok and "helper" in stats[0].error, stats
    wait_nothing_held(workers)
    assert disaggregated(workers.prefill, workers.decode, "mid-1", prompt) == expected
    assert workers.decode.servicer.fetch_stats[-1].ok
    wait_nothing_held(workers)


def test_a_helper_that_exits_leaves_the_others_then_the_worker_itself(workers: Workers) -> None:
    """Runs last in the module: it kills the prefill worker's helpers."""
    helpers = helpers_of(workers.prefill)
    batch = prompts(2, seed=41)
    expected = workers.reference.generate(
        batch, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), prefix="ref-exit"
    )
    for killed in (1, 2):
        victim = helpers.live()[0]
        victim.process.kill()
        wait_until(lambda v=victim: not v.alive, "the worker noticed its helper's exit")
        assert len(helpers.live()) == 2 - killed
        served = helpers.num_served
        for i, prompt in enumerate(batch):
            tokens = disaggregated(workers.prefill, workers.decode, f"exit{killed}-{i}", prompt)
            assert tokens == expected[i].token_ids[0]
        assert workers.decode.servicer.fetch_stats[-1].ok
        # one helper left: it serves both further streams; none: the worker serves them itself
        assert helpers.num_served - served == (4 if killed == 1 else 0)
    wait_nothing_held(workers)


def test_option_bounds() -> None:
    with pytest.raises(ValueError, match="--kv-wire-helpers"):
        WorkerConfig(model="m", kv_wire_helpers=8)
    with pytest.raises(ValueError, match="--kv-wire-helpers"):
        WorkerConfig(model="m", kv_wire_helpers=-2)
    assert WorkerConfig(model="m").kv_wire_helpers == -1  # auto by default
    assert kv_wire_helpers.slot_bytes_for(4096, 100) == 4096
    assert kv_wire_helpers.slot_bytes_for(4096, 5000) == 8192
    assert kv_wire_helpers.split_host("127.0.0.1:5") == "127.0.0.1"
    assert kv_wire_helpers.split_host("[::1]:5") == "[::1]"
    assert kv_wire_helpers.split_host("unix:/tmp/x.sock") is None
    # a prefill worker with helpers: its own stream carries no layers, the others all of them
    assert [kv_streams.layer_range(5, 3, i, first_empty=True) for i in range(3)] == [(0, 0), (0, 2), (2, 5)]


def test_auto_helpers_for_prefill_and_decode_workers_on_a_gpu_with_spare_cores() -> None:
    """--kv-wire-helpers -1 (the default): a GPU host's prefill or decode worker gets one per 4
    cores beyond 4, at most 3; the CPU, other roles and small machines none."""
    auto = kv_wire_helpers.auto_count
    assert [auto("prefill", "cuda", n) for n in (2, 4, 7, 8, 12, 16, 128)] == [0, 0, 0, 1, 2, 3, 3]
    assert auto("decode", "cuda", 16) == 3
    assert auto("unified", "cuda", 16) == auto("encode", "cuda", 16) == 0
    assert auto("prefill", "cpu", 64) == auto("decode", "cpu", 64) == 0
    # the cores counted are the ones this process may use (a container's CPU set)
    assert kv_wire_helpers.available_cpus() == len(os.sched_getaffinity(0))


def test_auto_streams_count_the_same_cores_as_the_auto_helpers(
    workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--kv-fetch-streams 0 reads the process's CPU set as --kv-wire-helpers -1 does (not the
    host's core count): a worker limited to 8 of a host's cores asks for 2 streams."""
    from services.worker.async_engine import AsyncEngine
    from services.worker.rpc import WorkerServicer

    counts = []
    for cpus in (1, 8, 16):
        monkeypatch.setattr(kv_wire_helpers, "available_cpus", lambda n=cpus: n)
        servicer = WorkerServicer(AsyncEngine(workers.reference))
        counts.append((servicer.kv_fetch_streams, servicer.num_wire_helpers))
        asyncio.run(servicer.close())
    assert counts == [(1, 0), (2, 0), (4, 0)]  # (a CPU worker: no helpers, whatever its cores)


def test_a_streams_reads_take_slots_in_its_order() -> None:
    """asyncio.Queue lets a newcomer take an item a woken waiter has not taken yet, and the
    waiter then waits again behind the others: a stream's second read could take a slot while its
    first (the one its sender waits for) waits on, and streams sharing a ring could each hold
    slots like that, none able to send. ServeStream takes slots in each stream's order."""

    async def scenario() -> list[str]:
        free: asyncio.Queue[int] = asyncio.Queue()
        ring = torch.zeros(2 * 16, dtype=torch.uint8)
        helper = types.SimpleNamespace(serve_free=free, serve_ring=ring, post=lambda message: None)
        done: list[str] = []
        with ThreadPoolExecutor(2) as pool:
            stream = kv_wire_helpers.ServeStream(helper, 1, 16, pool)  # type: ignore[arg-type]

            def read(out: torch.Tensor) -> KVChunkData:
                return KVChunkData(0, 1, 0, 1, out.numpy().data, "uint8", (16,))

            async def reader(name: str) -> None:
                chunk = await stream.read_into(read)
                done.append(f"{name}:{chunk.slot}")

            first = asyncio.ensure_future(reader("first"))
            second = asyncio.ensure_future(reader("second"))
            await asyncio.sleep(0)  # both reads wait for a slot
            free.put_nowait(0)  # wakes the first read's wait ...
            assert free.get_nowait() == 0  # ... but another stream's read takes the slot first
            await asyncio.sleep(0)
            free.put_nowait(0)  # that stream sent its chunk: the slot is free again
            await asyncio.wait_for(first, 5)
            assert not second.done()  # the second waits for a slot the first frees after sending
            free.put_nowait(1)
            await asyncio.wait_for(second, 5)
        return done

    assert asyncio.run(scenario()) == ["first:0", "second:1"]
