"""Preemption by swap (--kv-offload-memory): a KV cache too small for every sequence in flight
swaps the newest one's KV to the host tier and copies it back when it runs again; the outputs
equal the unconstrained run's and the recompute run's (chunked prefill, several requests in
flight, n > 1, logprobs, async scheduling); a host tier without room falls back to recompute; a sequence aborted
while swapped out gives its host slots back; nothing leaks on the device or the host; a worker
counts its swaps in GetLoad and /metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from worker_testlib import GenerateResult, RefModel, prompts_of_lengths, run_to_completion

from services.common.server import wait_for_serving
from services.worker.block_manager import BlockManager
from services.worker.engine import Engine
from services.worker.kv_cache import block_bytes
from services.worker.kv_events import KvEventLog
from services.worker.kv_offload import HostKVTier
from services.worker.parallel import free_port
from services.worker.request import EngineRequest, Request, SamplingParams, Sequence, SequenceStatus
from tandem.v1 import common_pb2, worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def per_block_bytes(ref: RefModel) -> int:
    probe = ref.engine(max_model_len=128)
    return block_bytes(probe.model_config, probe.config.block_size, probe.dtype)


def small_engine(ref: RefModel, num_blocks: int, host_blocks: int = 0, **overrides: object) -> Engine:
    per_block = per_block_bytes(ref)
    if host_blocks:
        overrides["kv_offload_memory"] = f"{per_block * host_blocks}B"
    return ref.engine(
        max_model_len=128, kv_cache_memory=str(per_block * num_blocks), max_num_batched_tokens=32, **overrides
    )


def requests() -> list[EngineRequest]:
    # prompts longer than the 32-token step budget are prefilled in chunks
    prompts = prompts_of_lengths([20, 9, 45, 14, 26, 5, 37, 30], 512, seed=21)
    out = []
    for i, prompt in enumerate(prompts):
        greedy = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logprobs=2)
        seeded = SamplingParams(temperature=1.0, seed=i, max_tokens=60, ignore_eos=True, n=2 if i == 2 else 1)
        out.append(EngineRequest(f"r{i}", tuple(prompt), greedy if i % 2 else seeded))
    return out


def assert_same_outputs(got: dict[str, GenerateResult], expected: dict[str, GenerateResult]) -> None:
    for rid, want in expected.items():
        assert got[rid].token_ids == want.token_ids, rid
        assert got[rid].finish_reasons == want.finish_reasons, rid
        for index, lps in want.logprobs.items():
            assert [lp.token_id for lp in got[rid].logprobs[index]] == [lp.token_id for lp in lps]
            assert [lp.logprob for lp in got[rid].logprobs[index]] == pytest.approx(
                [lp.logprob for lp in lps], abs=1e-4
            )


def assert_nothing_held(engine: Engine) -> None:
    bm, tier = engine.block_manager, engine.kv_offload
    assert bm.num_used_blocks == 0
    assert sorted(bm.free) == list(range(bm.num_blocks))
    assert tier is not None
    assert tier.num_held == 0
    assert len(tier.free_slots) + len(tier.slots) == tier.num_blocks
    assert len(set(tier.free_slots) | {slot for slot, _ in tier.slots.values()}) == tier.num_blocks


@pytest.mark.parametrize(
    ("prefix_caching", "async_scheduling"), [(True, "off"), (False, "off"), (True, "on")]
)
def test_swap_gives_the_unconstrained_and_the_recompute_outputs(
    ref_models: dict[str, RefModel], prefix_caching: bool, async_scheduling: str
) -> None:
    ref = ref_models["stories"]
    reference = run_to_completion(ref.engine(max_model_len=128), requests())

    recompute = small_engine(ref, 14, enable_prefix_caching=prefix_caching)
    recomputed = run_to_completion(recompute, requests())
    assert recompute.scheduler.num_preemptions > 0
    assert recompute.block_manager.num_swapped_out == 0

    swap = small_engine(
        ref, 14, host_blocks=64, enable_prefix_caching=prefix_caching, async_scheduling=async_scheduling
    )
    swapped = run_to_completion(swap, requests())
    bm = swap.block_manager
    # a 64-block host tier holds every preempted sequence: each preemption is a swap
    assert bm.num_swapped_out > 0
    assert bm.num_swapped_out == bm.num_swapped_in == swap.scheduler.num_preemptions

    assert_same_outputs(swapped, reference)
    assert_same_outputs(recomputed, reference)
    assert_nothing_held(swap)


def test_a_host_tier_without_room_falls_back_to_recompute(ref_models: dict[str, RefModel]) -> None:
    ref = ref_models["stories"]
    reference = run_to_completion(ref.engine(max_model_len=128), requests())
    # two host blocks: only a sequence with at most 32 computed tokens fits
    engine = small_engine(ref, 14, host_blocks=2)
    got = run_to_completion(engine, requests())
    bm = engine.block_manager
    assert 0 < bm.num_swapped_out == bm.num_swapped_in < engine.scheduler.num_preemptions
    assert_same_outputs(got, reference)
    assert_nothing_held(engine)


def test_aborting_a_swapped_out_sequence_frees_its_host_slots(ref_models: dict[str, RefModel]) -> None:
    ref = ref_models["stories"]
    engine = small_engine(ref, 14, host_blocks=64)
    tier = engine.kv_offload
    assert tier is not None
    reqs = requests()
    for r in reqs:
        engine.add_request(r)

    def swapped_out() -> list[str]:
        return [
            seq.request.request_id
            for seq in engine.scheduler.waiting
            if seq.swapped is not None and seq.status is SequenceStatus.WAITING
        ]

    while not swapped_out():
        assert engine.has_unfinished(), "no sequence was ever swapped out"
        engine.step()
    victims = swapped_out()
    held = tier.num_held
    assert held > 0
    for rid in victims:
        out = engine.abort(rid)
        assert out is not None and out.finished
    assert tier.num_held == 0  # every swapped-out sequence was aborted: no slot is held
    assert not swapped_out()
    while engine.has_unfinished():
        engine.step()
    assert_nothing_held(engine)


def test_a_worker_reports_its_swaps_in_get_load_and_metrics(
    ref_models: dict[str, RefModel], tmp_path: Path
) -> None:
    """A worker process with a 14-block cache and a host tier, eight requests at once over gRPC: the
    greedy tokens equal an unconstrained engine's, and GetLoad and /metrics count the swaps."""
    ref = ref_models["stories"]
    prompts = prompts_of_lengths([20, 9, 45, 14, 26, 5, 37, 30], 512, seed=21)
    sp = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    reference = run_to_completion(
        ref.engine(max_model_len=128), [EngineRequest(f"r{i}", tuple(p), sp) for i, p in enumerate(prompts)]
    )
    per_block = per_block_bytes(ref)
    addr, metrics_port = f"unix:{tmp_path / 'w.sock'}", free_port()
    args = [
        *("--model", str(ref.path), "--address", addr, "--device", "cpu", "--cpu-threads", "1"),
        *("--kv-cache-memory", str(per_block * 14), "--kv-offload-memory", f"{per_block * 64}B"),
        *("--max-model-len", "128", "--max-num-batched-tokens", "32", "--metrics-port", str(metrics_port)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "worker", *args], cwd=REPO, env=env)
    try:
        asyncio.run(wait_for_serving(addr, timeout_s=60))
        with grpc.insecure_channel(addr) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)

            def generate(i: int) -> list[int]:
                req = worker_pb2.GenerateRequest(
                    request_id=f"r{i}",
                    prompt_token_ids=prompts[i],
                    sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
                )
                return [
                    t for out in stub.Generate(req, timeout=120) for c in out.choices for t in c.token_ids
                ]

            with ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(generate, range(len(prompts))))
            for i, tokens in enumerate(got):
                assert tokens == reference[f"r{i}"].token_ids[0], i
            load = stub.GetLoad(worker_pb2.GetLoadRequest())
        assert load.num_kv_blocks_used == 0
        assert 0 < load.num_swapped_out == load.num_swapped_in <= load.num_preemptions
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        values = {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("tandem:")
        }
        assert values["tandem:kv_swapped_out_sequences"] == load.num_swapped_out
        assert values["tandem:kv_swapped_in_sequences"] == load.num_swapped_in
        assert values["tandem:preemptions"] == load.num_preemptions
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.mark.gpu
def test_swap_on_cuda_gives_the_unconstrained_outputs(ref_models: dict[str, RefModel]) -> None:
    """The same on a GPU: pinned host slots, copies enqueued on the model's stream, async
    scheduling on (the CUDA default)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref = ref_models["stories"]
    cuda = {"device": "cuda", "dtype": "float32"}
    # greedy only: batches of other shapes may move a seeded draw that sits on a near-tie
    greedy = [r for r in requests() if r.sampling.temperature == 0.0]
    reference = run_to_completion(ref.engine(max_model_len=128, **cuda), greedy)
    swap = small_engine(ref, 10, host_blocks=64, **cuda)
    assert swap.kv_offload is not None and swap.kv_offload.host.is_pinned()
    swapped = run_to_completion(swap, greedy)
    assert swap.block_manager.num_swapped_out > 0
    assert_same_outputs(swapped, reference)
    assert_nothing_held(swap)


def test_swap_space_comes_first_and_an_eviction_with_every_slot_held_drops_the_block() -> None:
    """Bookkeeping without a model: reserving evicts the least recently used host prefixes (and
    says so in the KV events); a device eviction while every host slot holds swapped KV drops the
    block (EVICTED) instead of failing; swap out and in restore the bytes."""
    bs = 2
    kv = torch.arange(1 * 2 * 6 * bs, dtype=torch.float32).reshape(1, 2, 6, bs, 1, 1)
    tier = HostKVTier(kv, 3)
    events = KvEventLog(64)
    bm = BlockManager(6, bs, True, events, tier)

    def seq_of(tokens: list[int]) -> Sequence:
        req = EngineRequest("r", tuple(tokens), SamplingParams())
        return Request(req, max_tokens=8, eos_token_ids=(2,), arrival=0).sequences[0]

    def computed(tokens: list[int]) -> Sequence:
        seq = seq_of(tokens)
        bm.allocate(seq, len(tokens))
        seq.num_computed_tokens = len(tokens)
        bm.register_computed_blocks(seq)
        return seq

    def cached_hashes() -> set[int]:
        alive: set[int] = set()
        for event in events.since(0, events.epoch):
            alive = alive | set(event.hashes) if event.kind == "stored" else alive - set(event.hashes)
        return alive

    # a 2-block prefix, freed, then evicted from the device into the host tier by 6 new blocks
    first = computed([10, 11, 12, 13])
    bm.free_sequence(first)
    running = computed(list(range(20, 32)))
    assert len(tier.slots) == 2 and len(cached_hashes()) == 6 + 2
    want = kv[:, :, running.block_ids[:3]].clone()
    # swapping out 3 blocks takes the free slot and both cached prefixes' (reported evicted)
    running.num_computed_tokens = 6  # (the KV of its first 3 blocks)
    assert bm.swap_out(running) and running.swapped is not None
    assert not tier.slots and tier.num_held == 3
    assert len(cached_hashes()) == 6  # the 2 prefix blocks are gone from both tiers
    # every host slot is held: a device block evicted now is dropped, not saved
    other = computed(list(range(40, 52)))
    assert not tier.slots and len(cached_hashes()) == 6
    bm.free_sequence(other)
    kv[:, :, other.block_ids] = -1.0  # what reusing those blocks would write
    bm.swap_in(running)
    assert torch.equal(kv[:, :, running.block_ids], want)
    assert tier.num_held == 0 and running.num_computed_tokens == 6
    assert bm.num_swapped_out == bm.num_swapped_in == 1
    bm.free_sequence(running)
    assert bm.num_used_blocks == 0 and len(tier.free_slots) + len(tier.slots) == 3
