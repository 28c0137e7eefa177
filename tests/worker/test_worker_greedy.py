"""Greedy output equals transformers' generate, token for token, with many requests in flight."""

from __future__ import annotations

import pytest
from worker_testlib import RefModel, prompts_of_lengths, usage_of

from services.worker.request import SamplingParams

MODELS = ["stories", "llama", "qwen2", "qwen3"]
LENGTHS = [1, 3, 7, 12, 16, 17, 29, 40, 5]
MAX_TOKENS = 24


def _check_against_reference(ref: RefModel, prompts: list[list[int]], results: list, max_tokens: int) -> None:
    for prompt, result in zip(prompts, results, strict=True):
        expected = ref.greedy(prompt, max_tokens)
        assert result.token_ids[0] == expected, f"prompt of {len(prompt)} tokens"
        finish = "stop" if expected and expected[-1] in ref.eos_token_ids else "length"
        assert result.finish_reasons[0] == finish
        assert usage_of(result).prompt_tokens == len(prompt)
        assert usage_of(result).completion_tokens == len(expected)


@pytest.mark.parametrize(
    ("model", "budget"), [(m, b) for m in MODELS for b in (2048, 16)] + [("mistral", 2048), ("mistral", 16)]
)
def test_greedy_matches_transformers(ref_models: dict[str, RefModel], model: str, budget: int) -> None:
    ref = ref_models[model]
    engine = ref.engine(max_num_batched_tokens=budget)
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=len(model))
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    _check_against_reference(ref, prompts, results, MAX_TOKENS)
    if budget == 16:  # prompts longer than the budget were chunked over several steps
        assert all(r.num_outputs >= 1 for r in results)
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("model", MODELS)
def test_shared_prefix_hits_cache_and_matches(ref_models: dict[str, RefModel], model: str) -> None:
    ref = ref_models[model]
    engine = ref.engine(max_num_batched_tokens=64)
    (prefix,) = prompts_of_lengths([37], ref.vocab_size, seed=7)
    tails = prompts_of_lengths([2, 5, 9, 1, 12, 4, 6, 3], ref.vocab_size, seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    first = engine.generate([[*prefix, 5]], params, prefix="first")
    prompts = [prefix + tail[1:] + [7] for tail in tails]
    later = engine.generate(prompts, params, prefix="later")
    _check_against_reference(ref, [[*prefix, 5]], first, 12)
    _check_against_reference(ref, prompts, later, 12)
    assert usage_of(first[0]).cached_prompt_tokens == 0
    block = engine.config.block_size
    for result in later:
        assert usage_of(result).cached_prompt_tokens == (len(prefix) // block) * block > 0
    assert engine.block_manager.hit_rate > 0
    assert engine.block_manager.num_used_blocks == 0


def test_stories_stops_at_eos_from_generation_config(ref_models: dict[str, RefModel]) -> None:
    """stories260K ends a story with BOS (1) or EOS (2); both come from generation_config.json."""
    ref = ref_models["stories"]
    engine = ref.engine()
    assert set(engine.model_config.eos_token_ids) == {1, 2}
    prompt = [1, 403, 407, 261, 378]
    (result,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=400))
    expected = ref.greedy(prompt, 400)
    assert result.token_ids[0] == expected
    assert result.finish_reasons[0] == "stop"
    assert result.stop_token_ids[0] == expected[-1] in (1, 2)
