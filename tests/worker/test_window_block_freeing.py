"""Freeing blocks that fall out of the sliding window when EVERY layer slides (Mistral with a
window of 8): a long sequence holds a bounded number of blocks and its tokens still equal
transformers'; prefix hits on freed (still cached) blocks, n > 1 choices forked after blocks were
freed, and preemption stay correct; models with full-attention layers free nothing."""

from __future__ import annotations

import pytest
from worker_testlib import RefModel, prompts_of_lengths, run_to_completion

from services.worker.engine import Engine, GenerateResult, collect
from services.worker.request import EngineRequest, SamplingParams


def _run_tracking_blocks(
    engine: Engine, requests: list[EngineRequest]
) -> tuple[dict[str, GenerateResult], int]:
    """run_to_completion that also records the most blocks in use after any step."""
    results = {r.request_id: GenerateResult(r.request_id) for r in requests}
    for r in requests:
        engine.add_request(r)
    most = 0
    while engine.has_unfinished():
        for out in engine.step():
            collect(results[out.request_id], out)
        most = max(most, engine.block_manager.num_used_blocks)
    assert engine.block_manager.num_used_blocks == 0
    return results, most


@pytest.mark.parametrize("budget", [2048, 16])
def test_long_sequence_holds_a_bounded_number_of_blocks(ref_models: dict[str, RefModel], budget: int) -> None:
    ref = ref_models["mistral_sw"]
    engine = ref.engine(max_num_batched_tokens=budget, max_model_len=256)
    assert engine.model_config.uniform_sliding_window == 8 and engine.block_manager.sliding_window == 8
    (prompt,) = prompts_of_lengths([40], ref.vocab_size, seed=21)
    request = EngineRequest(
        "long", tuple(prompt), SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    )
    results, most = _run_tracking_blocks(engine, [request])
    tokens = results["long"].token_ids[0]
    assert len(tokens) == 150
    # 190 positions are 12 blocks of 16; a window of 8 needs at most 2, plus the one being filled
    assert most <= 3, most
    assert engine.block_manager.num_window_freed_blocks >= 9
    assert tokens == ref.greedy(prompt, 150)


def test_prefix_hits_forks_and_preemption_after_freeing(ref_models: dict[str, RefModel]) -> None:
    """Requests sharing a 40-token prefix (longer than the window: its early blocks are freed by
    the first request, still cached, and hit by the later ones), two choices each (forked after
    the prompt's blocks were freed), in a cache small enough to preempt."""
    ref = ref_models["mistral_sw"]
    cfg = ref.hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    block_bytes = 16 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    engine = ref.engine(kv_cache_memory=str(9 * block_bytes), max_num_batched_tokens=32, max_model_len=128)
    (prefix,) = prompts_of_lengths([40], ref.vocab_size, seed=3)
    prompts = [prefix + tail[1:] for tail in prompts_of_lengths([5, 9, 3, 12, 7, 4], ref.vocab_size, seed=4)]
    requests = [
        EngineRequest(f"r{i}", tuple(p), SamplingParams(temperature=0.0, max_tokens=30, n=2))
        for i, p in enumerate(prompts)
    ]
    results = run_to_completion(engine, requests)
    for i, prompt in enumerate(prompts):
        want = ref.greedy(prompt, 30)
        assert results[f"r{i}"].token_ids[0] == want
        assert results[f"r{i}"].token_ids[1] == want
    assert engine.block_manager.num_window_freed_blocks > 0
    assert engine.block_manager.hit_rate > 0
    assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("model", ["gemma2", "gemma3", "gpt_oss"])
def test_models_with_full_attention_layers_free_nothing(ref_models: dict[str, RefModel], model: str) -> None:
    ref = ref_models[model]
    engine = ref.engine(max_model_len=128)
    assert engine.model_config.uniform_sliding_window == 0 and engine.block_manager.sliding_window == 0
    (prompt,) = prompts_of_lengths([40], ref.vocab_size, seed=5)
    results, _ = _run_tracking_blocks(
        engine, [EngineRequest("r", tuple(prompt), SamplingParams(temperature=0.0, max_tokens=30))]
    )
    assert engine.block_manager.num_window_freed_blocks == 0
    assert results["r"].token_ids[0] == ref.greedy(prompt, 30)
