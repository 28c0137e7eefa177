"""The host-memory KV tier (--kv-offload-memory): prefix blocks evicted from a too-small device
cache come back from host memory; the greedy tokens equal transformers', a device-cache hit's
and an uncached run's; the hits count as cached prompt tokens and in the host-hit metric; the KV
events say a block is evicted only once it leaves both tiers; no block leaks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from worker_testlib import RefModel, prompts_of_lengths, run_to_completion, usage_of

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.kv_cache import block_bytes
from services.worker.model_config import load_model_config
from services.worker.request import EngineRequest, SamplingParams

MAX_TOKENS = 8
MAX_MODEL_LEN = 128


def engine_with_blocks(ref: RefModel, num_blocks: int, **overrides: Any) -> Engine:
    per_block = block_bytes(load_model_config(str(ref.path)), 16, torch.float32)
    options: dict[str, Any] = {
        "model": str(ref.path),
        "device": "cpu",
        "kv_cache_memory": str(per_block * num_blocks),
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": 4,
    }
    options.update(overrides)
    return Engine(WorkerConfig(**options))


def run_one(engine: Engine, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    result = run_to_completion(engine, [EngineRequest(rid, tuple(prompt), sp)])[rid]
    return result.token_ids[0], usage_of(result).cached_prompt_tokens


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_host_tier_hits_equal_device_hits_uncached_and_transformers(
    ref_models: dict[str, RefModel], family: str
) -> None:
    ref = ref_models[family]
    # a 70-token conversation so far, four unrelated prompts that push it out of a 9-block device
    # cache, then the conversation's next turn
    history, *others = prompts_of_lengths([70, 60, 60, 60, 60], ref.vocab_size, seed=3)
    turn = [*history, *prompts_of_lengths([12], ref.vocab_size, seed=4)[0][1:]]
    expected = ref.greedy(turn, MAX_TOKENS)

    tiered = engine_with_blocks(ref, 9, kv_offload_memory="1MiB")
    assert tiered.kv_offload is not None
    run_one(tiered, "history", history)
    for i, prompt in enumerate(others):
        run_one(tiered, f"other-{i}", prompt)
    assert tiered.kv_offload.num_saved > 0
    tokens, cached = run_one(tiered, "turn", turn)
    assert tokens == expected
    assert cached == 64  # the history's 4 full blocks, all from host memory
    assert tiered.block_manager.num_host_hit_tokens == 64

    # the same without the host tier: the history was evicted, nothing cached
    plain = engine_with_blocks(ref, 9)
    run_one(plain, "history", history)
    for i, prompt in enumerate(others):
        run_one(plain, f"other-{i}", prompt)
    assert run_one(plain, "turn", turn) == (expected, 0)

    # a device hit (a cache big enough) and no prefix cache at all
    big = engine_with_blocks(ref, 64)
    run_one(big, "history", history)
    assert run_one(big, "turn", turn) == (expected, 64)
    uncached = engine_with_blocks(ref, 64, enable_prefix_caching=False)
    assert run_one(uncached, "turn", turn) == (expected, 0)


def test_events_call_a_block_evicted_only_when_both_tiers_dropped_it(ref_models: dict[str, RefModel]) -> None:
    ref = ref_models["llama"]
    per_block = block_bytes(load_model_config(str(ref.path)), 16, torch.float32)
    engine = engine_with_blocks(ref, 9, kv_offload_memory=f"{per_block * 6}B")  # 6 host blocks
    log = engine.kv_events
    assert log is not None and engine.kv_offload is not None
    known: set[int] = set()
    seen = log.since(0)[0].sequence
    for i, prompt in enumerate(prompts_of_lengths([50] * 8, ref.vocab_size, seed=9)):
        run_one(engine, f"p{i}", prompt)
        for event in log.since(seen, log.epoch):
            seen = event.sequence
            if event.kind == "stored":
                known.update(event.hashes)
            else:
                known.difference_update(event.hashes)
    bm = engine.block_manager
    on_device = {bm.block_digests[b] for b in bm.cached.values()}
    on_host = {digest for _, digest in engine.kv_offload.slots.values()}
    assert len(on_host) == 6  # the host tier is full: it has dropped blocks
    assert known == on_device | on_host
