"""A gRPC KV fetch over several parallel FetchKV streams (services/worker/kv_streams.py).

The decode worker asks for up to --kv-fetch-streams streams; the prefill worker answers with how
many it serves (`KVChunk.streams`, each a layer range) and the decode worker opens the others.
Outputs equal a unified engine's, the bytes equal a one-stream fetch's, an older peer on either
end falls back to one stream, and no block or handle is left behind, also when a fetch ends
before its further streams joined.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import worker_servers
from worker_servers import InProcessWorker, LoopThread, start_worker, stop_worker

from services.worker import kv_streams, kv_wire
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.request import SamplingParams
from tandem.v1 import common_pb2, worker_pb2

COMMON = dict(device="cpu", kv_cache_memory="8MiB", max_model_len=256, cpu_threads=1)
MAX_TOKENS = 8
FETCH_KV = "/tandem.v1.Worker/FetchKV"


class Workers:
    def __init__(self, loop: LoopThread, sock: Path, model: Path) -> None:
        opts: dict[str, Any] = dict(model=str(model), **COMMON)
        self.prefill = start_worker(loop, sock, "ps-p", role="prefill", kv_chunk_bytes=4096, **opts)
        # a prefill worker that predates parallel streams: it never offers more than one
        self.old_prefill = start_worker(loop, sock, "ps-old", role="prefill", kv_chunk_bytes=4096, **opts)
        self.old_prefill.servicer.max_serve_streams = 1
        self.decode = start_worker(loop, sock, "ps-d", role="decode", kv_fetch_streams=4, **opts)
        self.reference = Engine(WorkerConfig(**opts))
        self.all = [self.prefill, self.old_prefill, self.decode]

    stub = staticmethod(worker_servers.stub)


@pytest.fixture(scope="module")
def workers(
    loop: LoopThread, stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    made = Workers(loop, tmp_path_factory.mktemp("streams"), stories_dir)
    yield made
    for w in made.all:
        stop_worker(loop, w)


def prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(3, 500, (9 + 13 * i,), generator=gen).tolist()] for i in range(n)]


def greedy() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


def disaggregated(
    prefill: InProcessWorker, decode: InProcessWorker, rid: str, prompt: list[int]
) -> list[int]:
    return worker_servers.disaggregated(prefill, decode, rid, prompt, MAX_TOKENS)


def wait_no_blocks(workers: Workers) -> None:
    deadline = time.monotonic() + 10
    while True:
        loads = [Workers.stub(w).GetLoad(worker_pb2.GetLoadRequest()) for w in workers.all]
        if all(lo.num_kv_blocks_used == 0 and lo.num_kv_handles == 0 for lo in loads):
            break
        assert time.monotonic() < deadline, f"leaked blocks or handles: {loads}"
        time.sleep(0.05)
    assert len(workers.prefill.servicer.parallel_fetches) == 0


@pytest.mark.parametrize("old_prefill", [False, True], ids=["both-new", "old-prefill-worker"])
def test_parallel_streams_equal_unified(workers: Workers, old_prefill: bool) -> None:
    prefill = workers.old_prefill if old_prefill else workers.prefill
    batch = prompts(8, seed=3 + old_prefill)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    expected = workers.reference.generate(batch, sp, prefix=f"ps-{old_prefill}")
    opened = prefill.servicer.parallel_fetches.num_opened
    with ThreadPoolExecutor(8) as pool:
        got = list(
            pool.map(
                lambda i: disaggregated(prefill, workers.decode, f"ps{old_prefill}-{i}", batch[i]), range(8)
            )
        )
    for i, (tokens, ref) in enumerate(zip(got, expected, strict=True)):
        assert tokens == ref.token_ids[0], f"request {i}"
    stats = workers.decode.servicer.fetch_stats[-8:]
    assert all(s.ok and s.transport == "grpc" for s in stats), stats
    # 4 streams asked for: the new prefill worker served each fetch over several, the old one over one
    assert prefill.servicer.parallel_fetches.num_opened - opened == (0 if old_prefill else 8)
    wait_no_blocks(workers)


def fetch_cells(
    address: str, handle_id: str, max_streams: int, num_layers: int
) -> tuple[dict[tuple[int, int], bytes], int]:
    """A raw client's fetch (as a decode worker of either age would make it): every (layer,
    block) cell's bytes, and the number of streams it came over."""
    channel = grpc.insecure_channel(address)
    fetch = channel.unary_stream(
        FETCH_KV,
        request_serializer=worker_pb2.FetchKVRequest.SerializeToString,
        response_deserializer=kv_wire.decode_chunk,
    )
    cells: dict[tuple[int, int], bytes] = {}
    lock = threading.Lock()

    def take(chunk: kv_wire.WireChunk) -> None:
        worker_servers.add_cells(cells, chunk, lock)

    first = iter(fetch(worker_pb2.FetchKVRequest(handle_id=handle_id, max_streams=max_streams), timeout=30))
    head = next(first)
    streams = head.header.streams or 1
    if head.header.streams:
        assert not head.data and head.header.layer_end == 0
    else:
        take(head)

    def further(index: int) -> None:
        request = worker_pb2.FetchKVRequest(handle_id=handle_id, stream_index=index)
        for chunk in fetch(request, timeout=30):
            take(chunk)
            assert kv_streams.layer_range(num_layers, streams, index)[0] <= chunk.header.layer_start

    with ThreadPoolExecutor(max(1, streams - 1)) as pool:
        futures = [pool.submit(further, i) for i in range(1, streams)]
        for chunk in first:
            take(chunk)
            assert chunk.header.layer_end <= kv_streams.layer_range(num_layers, streams, 0)[1]
        for f in futures:
            f.result()
    channel.close()
    return cells, streams


def test_parallel_bytes_equal_one_stream_and_old_decode_worker(workers: Workers) -> None:
    """A fetch without max_streams (a decode worker that predates it) gets everything on one
    stream, no `streams` message; one over 3 streams gets the same bytes, each cell once."""
    stub = Workers.stub(workers.prefill)
    num_layers = workers.prefill.engine.kv_cache.model_shape[0]
    # whole blocks: a partial last block's unused slots hold whatever its last user left there
    prompt = prompts(1, seed=11)[0] + list(range(40, 94))
    assert len(prompt) % workers.prefill.engine.config.block_size == 0
    handles = []
    for rid in ("raw-1", "raw-3"):
        reply = stub.Prefill(
            worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=greedy())
        )
        handles.append(reply.handle.handle_id)
    one, streams_one = fetch_cells(workers.prefill.address, handles[0], 0, num_layers)
    three, streams_three = fetch_cells(workers.prefill.address, handles[1], 3, num_layers)
    assert (streams_one, streams_three) == (1, 3)
    num_blocks = -(-len(prompt) // workers.prefill.engine.config.block_size)
    assert set(one) == {(la, b) for la in range(num_layers) for b in range(num_blocks)}
    diff = sorted(k for k in one if one[k] != three[k])
    assert not diff, (diff, streams_three)
    wait_no_blocks(workers)


def test_further_stream_errors_and_early_end_leak_nothing(workers: Workers) -> None:
    stub = Workers.stub(workers.prefill)
    channel = grpc.insecure_channel(workers.prefill.address)
    fetch = channel.unary_stream(
        FETCH_KV,
        request_serializer=worker_pb2.FetchKVRequest.SerializeToString,
        response_deserializer=kv_wire.decode_chunk,
    )
    with pytest.raises(grpc.RpcError) as info:
        list(fetch(worker_pb2.FetchKVRequest(handle_id="nope", stream_index=1), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    reply = stub.Prefill(
        worker_pb2.PrefillRequest(
            request_id="early", prompt_token_ids=prompts(1, seed=5)[0], sampling=greedy()
        )
    )
    handle_id = reply.handle.handle_id
    first = fetch(worker_pb2.FetchKVRequest(handle_id=handle_id, max_streams=2), timeout=30)
    assert next(first).header.streams == 2
    with pytest.raises(grpc.RpcError) as info:
        list(fetch(worker_pb2.FetchKVRequest(handle_id=handle_id, stream_index=2), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream_index" in (info.value.details() or "")
    first.cancel()  # the caller goes away before its second stream joined: the handle goes back
    wait_no_blocks(workers)
    with pytest.raises(grpc.RpcError) as info:
        list(fetch(worker_pb2.FetchKVRequest(handle_id=handle_id, stream_index=1), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_stream_counts() -> None:
    assert [kv_streams.default_streams(n) for n in (None, 1, 2, 4, 8, 16, 128)] == [1, 1, 1, 1, 2, 4, 4]
    assert kv_streams.stream_count(4, 3) == 3 and kv_streams.stream_count(64, 80) == kv_streams.MAX_STREAMS
    ranges = [kv_streams.layer_range(5, 4, i) for i in range(4)]
    assert ranges == [(0, 1), (1, 2), (2, 3), (3, 5)]
    with pytest.raises(ValueError, match="--kv-fetch-streams"):
        WorkerConfig(model="m", kv_fetch_streams=9)
