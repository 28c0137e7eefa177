"""Prefill -> FetchKV -> decode between real worker gRPC servers (in-process, unix sockets).

Disaggregated output must equal what one unified engine produces, token for token, for greedy
and seeded sampling with 32 requests in flight, including prompts whose start is already in the
decode worker's prefix cache (then only the missing blocks travel). Bad handles get clear gRPC
errors and leave no block behind on either side.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from worker_servers import InProcessWorker, LoopThread, start_worker, stop_worker

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_transfer import chunk_plan
from services.worker.request import SamplingParams
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

NUM_REQUESTS = 32
MAX_TOKENS = 16
COMMON = dict(device="cpu", kv_cache_memory="8MiB", max_model_len=256, cpu_threads=1)


@dataclass
class Pair:
    """A prefill and a decode worker of one model, and a unified engine as the reference."""

    prefill: InProcessWorker
    decode: InProcessWorker
    reference: Engine
    vocab_size: int

    def stub(self, w: InProcessWorker) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(w.address))


@pytest.fixture(scope="module")
def pairs(
    loop: LoopThread, stories_dir: Path, tiny_qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Pair]]:
    sock = tmp_path_factory.mktemp("sock")
    made: dict[str, Pair] = {}
    for name, model in (("stories", stories_dir), ("qwen3", tiny_qwen3_dir)):
        opts: dict[str, Any] = dict(model=str(model), **COMMON)
        made[name] = Pair(
            start_worker(loop, sock, f"{name}-p", role="prefill", kv_chunk_bytes=4096, **opts),
            start_worker(loop, sock, f"{name}-d", role="decode", **opts),
            Engine(WorkerConfig(**opts)),
            made_vocab(model),
        )
    yield made
    for pair in made.values():
        stop_worker(loop, pair.prefill)
        stop_worker(loop, pair.decode)


def made_vocab(model: Path) -> int:
    from services.worker.model_config import load_model_config

    return load_model_config(str(model)).vocab_size


def sampling_pb(sp: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=sp.temperature, max_tokens=sp.max_tokens or 0)
    if sp.seed is not None:
        msg.seed = sp.seed
    if sp.top_k:
        msg.top_k = sp.top_k
    return msg


def disaggregated(pair: Pair, rid: str, prompt: list[int], sp: SamplingParams) -> tuple[list[int], int]:
    """Prefill on P, Generate with its handle on D; (tokens, decode-side cached prompt tokens)."""
    p, d = pair.stub(pair.prefill), pair.stub(pair.decode)
    reply = p.Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling_pb(sp)),
        timeout=60,
    )
    tokens = list(reply.first.token_ids)
    if not reply.HasField("handle"):
        return tokens, 0
    cached = 0
    request = worker_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=sampling_pb(sp),
        generated_token_ids=tokens,
        kv_source=reply.handle,
    )
    for chunk in d.Generate(request, timeout=60):
        for choice in chunk.choices:
            tokens += choice.token_ids
        if chunk.HasField("usage"):
            cached = chunk.usage.cached_prompt_tokens
    return tokens, cached


def wait_no_blocks(*stubs: worker_pb2_grpc.WorkerStub) -> None:
    """Every block back in the pool and no handle left (the engines free them asynchronously)."""
    deadline = time.monotonic() + 10
    while True:
        loads = [s.GetLoad(worker_pb2.GetLoadRequest()) for s in stubs]
        if all(lo.num_kv_blocks_used == 0 and lo.num_kv_handles == 0 for lo in loads):
            return
        assert time.monotonic() < deadline, f"leaked blocks or handles: {loads}"
        time.sleep(0.05)


def make_prompts(vocab_size: int) -> tuple[list[int], list[list[int]]]:
    """A 40-token shared prefix (warmed into the decode cache first) and 32 prompts, half of them
    starting with it, of lengths 5..70 (partial and whole last blocks)."""
    gen = torch.Generator().manual_seed(7)
    prefix = [1, *torch.randint(3, vocab_size, (39,), generator=gen).tolist()]
    prompts = []
    for i in range(NUM_REQUESTS):
        tail = torch.randint(3, vocab_size, (5 + (i * 7) % 33,), generator=gen).tolist()
        prompts.append(prefix + tail if i % 2 else [1, *tail])
    return prefix, prompts


@pytest.mark.parametrize("model", ["stories", "qwen3"])
@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_disaggregated_equals_unified(pairs: dict[str, Pair], model: str, mode: str) -> None:
    pair = pairs[model]
    prefix, prompts = make_prompts(pair.vocab_size)

    def params(i: int) -> SamplingParams:
        if mode == "greedy":
            return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        return SamplingParams(temperature=1.0, top_k=40, seed=1000 + i, max_tokens=MAX_TOKENS)

    expected = pair.reference.generate(prompts, [params(i) for i in range(NUM_REQUESTS)], prefix=mode)
    disaggregated(pair, f"warm-{mode}", [*prefix, 5], params(0))  # the prefix is now in D's cache
    sent_before = pair.prefill.engine.kv_handles.num_blocks_sent
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        results = list(
            pool.map(lambda i: disaggregated(pair, f"{mode}-{i}", prompts[i], params(i)), range(NUM_REQUESTS))
        )
    for i, ((tokens, cached), ref) in enumerate(zip(results, expected, strict=True)):
        assert tokens == ref.token_ids[0], f"request {i}"
        if i % 2:  # starts with the warmed prefix: D had its two full blocks already
            assert cached >= 32, f"request {i}: decode cache hit {cached}"
    # only the blocks D lacked travelled
    total_blocks = sum(-(-len(p) // 16) for p in prompts)
    assert pair.prefill.engine.kv_handles.num_blocks_sent - sent_before < total_blocks
    wait_no_blocks(pair.stub(pair.prefill), pair.stub(pair.decode))


def test_chunk_plan_covers_every_layer_block_once() -> None:
    for layers, blocks, first, per_layer, target in [
        (5, 7, 0, 100, 250),
        (5, 7, 2, 100, 10_000),
        (3, 1, 0, 64, 64),
    ]:
        cells = set()
        for l0, l1, b0, b1 in chunk_plan(layers, blocks, first, per_layer, target):
            for layer in range(l0, l1):
                for block in range(b0, b1):
                    assert (layer, block) not in cells
                    cells.add((layer, block))
        assert cells == {(la, b) for la in range(layers) for b in range(first, blocks)}


def test_bad_handles_are_clear_errors_and_leak_nothing(
    loop: LoopThread, pairs: dict[str, Pair], stories_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pair = pairs["stories"]
    p, d = pair.stub(pair.prefill), pair.stub(pair.decode)
    sock = tmp_path_factory.mktemp("bad")
    opts: dict[str, Any] = dict(model=str(stories_dir), **COMMON)
    short = start_worker(loop, sock, "short-ttl", role="prefill", kv_handle_ttl=0.3, **opts)
    other = start_worker(loop, sock, "block8", role="prefill", block_size=8, **opts)
    try:
        s_stub, o_stub = pair.stub(short), pair.stub(other)
        prompt = [1, 403, 407, 261, 378, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312]
        sp = SamplingParams(temperature=0.0, max_tokens=8)
        expected = pair.reference.generate([prompt], sp, prefix="bad")[0].token_ids[0]

        def prefill(stub: worker_pb2_grpc.WorkerStub, rid: str) -> worker_pb2.PrefillResponse:
            return stub.Prefill(
                worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling_pb(sp))
            )

        def generate(rid: str, handle: worker_pb2.KVHandle, first: list[int]) -> list[int]:
            request = worker_pb2.GenerateRequest(
                request_id=rid,
                prompt_token_ids=prompt,
                sampling=sampling_pb(sp),
                generated_token_ids=first,
                kv_source=handle,
            )
            out = list(first)
            for chunk in d.Generate(request, timeout=60):
                for choice in chunk.choices:
                    out += choice.token_ids
            return out

        # garbage handle: FetchKV says NOT_FOUND; a Generate naming it computes the prompt itself
        with pytest.raises(grpc.RpcError) as err:
            list(p.FetchKV(worker_pb2.FetchKVRequest(handle_id="no-such-handle")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "unknown" in (err.value.details() or "")
        real = prefill(p, "real")
        garbage = worker_pb2.KVHandle()
        garbage.CopyFrom(real.handle)
        garbage.handle_id = "no-such-handle"
        assert generate("garbage", garbage, list(real.first.token_ids)) == expected
        assert p.ReleaseKV(worker_pb2.ReleaseKVRequest(handle_id=real.handle.handle_id)).released
        with pytest.raises(grpc.RpcError) as err:
            list(p.FetchKV(worker_pb2.FetchKVRequest(handle_id="")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # expired handle: NOT_FOUND naming the TTL; Generate falls back to computing the prompt
        late = prefill(s_stub, "late")
        time.sleep(1.5)
        assert s_stub.GetLoad(worker_pb2.GetLoadRequest()).num_kv_handles == 0
        with pytest.raises(grpc.RpcError) as err:
            list(s_stub.FetchKV(worker_pb2.FetchKVRequest(handle_id=late.handle.handle_id)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in (err.value.details() or "")
        assert generate("late", late.handle, list(late.first.token_ids)) == expected

        # a handle from an incompatible worker (block size 8): FAILED_PRECONDITION, nothing allocated
        alien = prefill(o_stub, "alien")
        with pytest.raises(grpc.RpcError) as err:
            generate("alien", alien.handle, list(alien.first.token_ids))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "incompatible" in (err.value.details() or "")
        # ... and FetchKV from an incompatible caller: FAILED_PRECONDITION, the handle is freed
        with pytest.raises(grpc.RpcError) as err:
            list(
                o_stub.FetchKV(
                    worker_pb2.FetchKVRequest(
                        handle_id=alien.handle.handle_id, fingerprint=real.handle.fingerprint
                    )
                )
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        # a kv_source without the first token is refused up front
        with pytest.raises(grpc.RpcError) as err:
            generate("nofirst", real.handle, [])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kv_source" in (
            err.value.details() or ""
        )

        wait_no_blocks(p, d, s_stub, o_stub)
    finally:
        stop_worker(loop, short)
        stop_worker(loop, other)


def test_gateway_refuses_to_pair_incompatible_workers(
    loop: LoopThread,
    pairs: dict[str, Pair],
    stories_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from gateway.disaggregation import Disaggregation
    from gateway.router import Router

    pair = pairs["stories"]
    other = start_worker(
        loop,
        tmp_path_factory.mktemp("pair"),
        "p-block8",
        role="prefill",
        block_size=8,
        model=str(stories_dir),
        **COMMON,
    )

    async def check() -> tuple[list[str], list[str | None]]:
        decode = Router([pair.decode.address])
        disagg = Disaggregation([pair.prefill.address, other.address])
        await decode.start()
        await disagg.start(decode)  # logs the refusal at start-up
        lines = disagg.check_pairs(decode)
        picks = []
        for _ in range(4):  # only the compatible prefill worker is ever chosen
            chosen = disagg.pick_prefill([1, 2, 3], decode.workers[0])
            picks.append(chosen.address if chosen else None)
        await disagg.close()
        await decode.close()
        return lines, picks

    try:
        with caplog.at_level("ERROR", logger="gateway.disaggregation"):
            lines, picks = loop.run(check())
    finally:
        stop_worker(loop, other)
    assert len(lines) == 1 and other.address in lines[0] and "block size 8 != 16" in lines[0], lines
    assert any("refusing to pair" in r.getMessage() for r in caplog.records)
    assert picks == [pair.prefill.address] * 4
