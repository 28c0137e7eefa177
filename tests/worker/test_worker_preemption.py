"""A KV cache too small for everyone: preemption by recompute, identical outputs, no leaked blocks."""

from __future__ import annotations

import pytest
from worker_testlib import RefModel, prompts_of_lengths, run_to_completion

from services.worker.engine import Engine
from services.worker.kv_cache import block_bytes
from services.worker.request import EngineRequest, SamplingParams


def small_engine(ref: RefModel, num_blocks: int, **overrides: object) -> Engine:
    probe = ref.engine(max_model_len=128)
    per_block = block_bytes(probe.model_config, probe.config.block_size, probe.dtype)
    return ref.engine(max_model_len=128, kv_cache_memory=str(per_block * num_blocks), **overrides)


def requests() -> list[EngineRequest]:
    prompts = prompts_of_lengths([20, 9, 33, 14, 26, 5, 17, 30], 512, seed=21)
    out = []
    for i, prompt in enumerate(prompts):
        greedy = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True, logprobs=2)
        seeded = SamplingParams(temperature=1.0, seed=i, max_tokens=60, ignore_eos=True, n=2 if i == 2 else 1)
        out.append(EngineRequest(f"r{i}", tuple(prompt), greedy if i % 2 else seeded))
    return out


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_gives_the_unconstrained_outputs(
    ref_models: dict[str, RefModel], prefix_caching: bool
) -> None:
    ref = ref_models["stories"]
    reference = run_to_completion(ref.engine(max_model_len=128), requests(), check_blocks_freed=False)
    engine = small_engine(ref, 14, enable_prefix_caching=prefix_caching, max_num_batched_tokens=32)
    constrained = run_to_completion(engine, requests(), check_blocks_freed=False)
    assert engine.scheduler.num_preemptions > 0
    for rid, expected in reference.items():
        got = constrained[rid]
        assert got.token_ids == expected.token_ids, rid
        assert got.finish_reasons == expected.finish_reasons
        for index, lps in expected.logprobs.items():
            assert [lp.token_id for lp in got.logprobs[index]] == [lp.token_id for lp in lps]
            assert [lp.logprob for lp in got.logprobs[index]] == pytest.approx(
                [lp.logprob for lp in lps], abs=1e-4
            )
    assert engine.block_manager.num_used_blocks == 0
    assert sorted(engine.block_manager.free) == list(range(engine.block_manager.num_blocks))


def test_abort_frees_blocks_at_once(ref_models: dict[str, RefModel]) -> None:
    ref = ref_models["stories"]
    engine = small_engine(ref, 14, max_num_batched_tokens=32)
    reqs = requests()
    for r in reqs:
        engine.add_request(r)
    for _ in range(6):
        engine.step()
    used_before = engine.block_manager.num_used_blocks
    assert used_before > 0
    aborted = [engine.abort(r.request_id) for r in reqs[::2]]
    assert all(out is not None and out.finished for out in aborted)
    for out in aborted:
        assert out is not None and all(c.finish_reason == "abort" for c in out.choices)
    assert engine.abort("no-such-request") is None
    assert engine.block_manager.num_used_blocks < used_before
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0


def test_kv_cache_too_small_for_one_sequence_is_a_clear_error(ref_models: dict[str, RefModel]) -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        small_engine(ref_models["stories"], 3)
