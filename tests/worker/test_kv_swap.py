"""Preemption by swap (--kv-offload-memory): a KV cache too small for every sequence in flight
swaps the newest one's KV to the host tier and copies it back when it runs again; the outputs
equal the unconstrained run's and the recompute run's (chunked prefill, several requests in
flight, n > 1, logprobs); a host tier without room falls back to recompute; a sequence aborted
while swapped out gives its host slots back; nothing leaks on the device or the host."""

from __future__ import annotations

import pytest
from worker_testlib import GenerateResult, RefModel, prompts_of_lengths, run_to_completion

from services.worker.engine import Engine
from services.worker.kv_cache import block_bytes
from services.worker.request import EngineRequest, SamplingParams, SequenceStatus


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


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_swap_gives_the_unconstrained_and_the_recompute_outputs(
    ref_models: dict[str, RefModel], prefix_caching: bool
) -> None:
    ref = ref_models["stories"]
    reference = run_to_completion(ref.engine(max_model_len=128), requests())

    recompute = small_engine(ref, 14, enable_prefix_caching=prefix_caching)
    recomputed = run_to_completion(recompute, requests())
    assert recompute.scheduler.num_preemptions > 0
    assert recompute.block_manager.num_swapped_out == 0

    swap = small_engine(ref, 14, host_blocks=64, enable_prefix_caching=prefix_caching)
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
