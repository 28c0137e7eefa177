"""Disaggregation between workers of different parallel layouts: KV re-sharded on fetch.

A parallel worker group (T = 2, or P = 2; its own processes, gloo) and a single-rank worker (in
this process) hand prompts to each other both ways: Prefill on one, Generate with the handle on
the other. Greedy tokens equal a unified T = 1 engine's, every fetch moved the KV (none fell back
to computing the prompt), and neither side keeps a block or a handle. GQA shapes: one KV head
(replicated on both ranks: a gather reads it from one rank, a scatter writes both copies) and four
(two per rank). The layout arithmetic itself: every (layer, head) is read from exactly one rank and
written to every rank that holds it.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from disagg_stack import Processes
from worker_servers import InProcessWorker, LoopThread, start_worker, stop_worker

from gateway.clients import WorkerClient
from gateway.disaggregation import incompatibility
from gateway.downstream import WorkerInfo
from services.common.server import wait_for_serving
from services.worker.kv_reshard import rank_kv
from services.worker.model_config import load_model_config
from services.worker.request import SamplingParams
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.worker.worker_testlib import TINY, load_ref, prompts_of_lengths

MAX_TOKENS = 8
LENGTHS = [3, 9, 16, 17, 30, 41, 5, 24]  # 8 requests in flight; whole and partial last blocks
COMMON = dict(device="cpu", kv_cache_memory="4MiB", max_model_len=256, cpu_threads=1, block_size=8)


def _llama(path: Path, num_kv_heads: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "num_key_value_heads": num_kv_heads}, num_hidden_layers=2)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


@pytest.mark.parametrize(
    ("num_kv_heads", "tp", "pp"), [(1, 2, 1), (4, 2, 1), (2, 4, 1), (1, 4, 2), (4, 2, 3), (2, 1, 2)]
)
def test_each_head_and_layer_is_read_once_and_written_where_held(
    tmp_path: Path, num_kv_heads: int, tp: int, pp: int
) -> None:
    config = {**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 5}
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": num_kv_heads}))
    cfg = load_model_config(str(tmp_path))
    ranks = rank_kv(cfg, tp, pp)
    assert [r.rank for r in ranks] == list(range(tp * pp))
    read = [
        (layer, head)
        for r in ranks
        if r.first_replica
        for layer in range(r.layer_start, r.layer_end)
        for head in range(r.head_start, r.head_start + r.num_heads)
    ]
    # a gather moves the model's KV exactly once: bytes moved = bytes needed
    assert sorted(read) == [(la, h) for la in range(cfg.num_layers) for h in range(cfg.num_kv_heads)]
    for r in ranks:  # a scatter gives each rank exactly the heads its attention reads
        t = r.rank % tp
        q_per_rank = cfg.num_heads // tp
        kv_of_query = {
            q * cfg.num_kv_heads // cfg.num_heads for q in range(t * q_per_rank, (t + 1) * q_per_rank)
        }
        assert set(range(r.head_start, r.head_start + r.num_heads)) == kv_of_query


def _stub(address: str) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address))


def _sampling(max_tokens: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)


def _disaggregated(
    prefill: worker_pb2_grpc.WorkerStub, decode: worker_pb2_grpc.WorkerStub, rid: str, prompt: list[int]
) -> list[int]:
    """Prefill on one worker, Generate with its handle on the other."""
    reply = prefill.Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=_sampling(MAX_TOKENS)),
        timeout=60,
    )
    tokens = list(reply.first.token_ids)
    assert reply.HasField("handle"), rid
    request = worker_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=_sampling(MAX_TOKENS),
        generated_token_ids=tokens,
        kv_source=reply.handle,
    )
    for chunk in decode.Generate(request, timeout=60):
        for choice in chunk.choices:
            tokens += choice.token_ids
    return tokens


def _wait_no_blocks(*stubs: worker_pb2_grpc.WorkerStub) -> None:
    deadline = time.monotonic() + 10
    while True:
        loads = [s.GetLoad(worker_pb2.GetLoadRequest()) for s in stubs]
        if all(lo.num_kv_blocks_used == 0 and lo.num_kv_handles == 0 for lo in loads):
            return
        assert time.monotonic() < deadline, f"leaked blocks or handles: {loads}"
        time.sleep(0.05)


async def _gateway_infos(*addresses: str) -> list[WorkerInfo]:
    clients = [WorkerClient(a) for a in addresses]
    try:
        return [await c.info() for c in clients]
    finally:
        for c in clients:
            await c.close()


def _fetches(stub: worker_pb2_grpc.WorkerStub) -> tuple[int, int]:
    """(completed, failed) KV fetches of a decode worker, over every prefill peer."""
    peers = stub.Info(worker_pb2.InfoRequest()).kv_peer_transfers
    return sum(p.num_transfers for p in peers), sum(p.num_failed for p in peers)


@pytest.mark.parametrize(
    ("num_kv_heads", "tp", "pp"),
    [
        (1, 2, 1),  # one KV head, replicated on both ranks
        (4, 2, 1),  # two KV heads per rank
        pytest.param(2, 1, 2, marks=pytest.mark.slow),  # two stages: a chunk's layers on two ranks
    ],
    ids=["kv1-replicated", "kv4-two-per-rank", "kv2-two-stages"],
)
def test_group_and_single_rank_workers_hand_kv_both_ways(
    loop: LoopThread, tmp_path: Path, num_kv_heads: int, tp: int, pp: int
) -> None:
    model = _llama(tmp_path / "model", num_kv_heads)
    ref = load_ref(model)
    group = Processes(tmp_path, model)
    options: dict[str, Any] = dict(model=str(model), **COMMON)
    group.worker("t2", "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
                 "--role", "prefill", "--block-size", "8", "--kv-chunk-bytes", "2048")  # fmt: skip
    single: InProcessWorker | None = None
    try:
        single = start_worker(loop, tmp_path, "t1", role="decode", kv_chunk_bytes=2048, **options)
        loop.run(wait_for_serving(group.address("t2"), 120))
        t2, t1 = _stub(group.address("t2")), _stub(single.address)
        info = t2.Info(worker_pb2.InfoRequest())
        assert (info.tensor_parallel_size, info.pipeline_parallel_size) == (tp, pp)
        assert info.kv_layout.num_kv_heads == max(1, num_kv_heads // tp)  # rank 0's
        assert info.kv_layout.num_layers == 2 // pp  # rank 0's stage
        assert (info.kv_layout.model_num_kv_heads, info.kv_layout.model_num_layers) == (num_kv_heads, 2)
        assert info.fingerprint == t1.Info(worker_pb2.InfoRequest()).fingerprint
        group_info, single_info = loop.run(_gateway_infos(group.address("t2"), single.address))
        assert incompatibility(group_info, single_info) == ""  # the gateway pairs them
        assert group_info.parallel_layout == f"T={tp} x P={pp}, {max(1, num_kv_heads // tp)} KV head" + (
            "s per rank" if num_kv_heads // tp > 1 else " per rank"
        )

        first = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=1)
        second = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=2)
        unified = ref.engine(kv_cache_memory="4MiB", block_size=8)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        expected = [r.token_ids[0] for r in unified.generate(first + second, params)]
        with ThreadPoolExecutor(len(LENGTHS)) as pool:
            # the group prefills, a single rank decodes: rank 0 gathers each chunk from the ranks
            got = list(pool.map(lambda i: _disaggregated(t2, t1, f"a{i}", first[i]), range(len(first))))
            assert got == expected[: len(first)]
            # a single rank prefills, the group decodes: rank 0 scatters each chunk to the ranks
            got = list(pool.map(lambda i: _disaggregated(t1, t2, f"b{i}", second[i]), range(len(second))))
            assert got == expected[len(first) :]
        assert all(s.ok for s in single.servicer.fetch_stats), single.servicer.fetch_stats
        assert len(single.servicer.fetch_stats) == len(first)
        assert _fetches(t2) == (len(second), 0)
        _wait_no_blocks(t1, t2)
    finally:
        if single is not None:
            stop_worker(loop, single)
        group.stop()
