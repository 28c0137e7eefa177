"""Gemma 2, Gemma 3 (text), Phi-3 and Mistral with a sliding window: greedy output equals
transformers' generate with many requests in flight, chunked prefill, prefix hits and preemption,
on sequences much longer than the window (8 positions); logprobs within 1e-4; the config fields
these families read (layer patterns, local ropes, LongRoPE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from worker_testlib import RefModel, prompts_of_lengths, run_to_completion, usage_of

from services.worker.model_config import ModelConfigError, load_model_config
from services.worker.request import EngineRequest, SamplingParams

FAMILIES = ["mistral_sw", "gemma2", "gemma3", "phi3"]
LENGTHS = [1, 3, 7, 12, 16, 17, 29, 40]


def _context(model: str) -> dict[str, int]:
    """Phi-3's tiny config has a LongRoPE switch at 64 positions: served within it, the short
    factors apply (transformers' choice for sequences of these lengths)."""
    return {"max_model_len": 64} if model == "phi3" else {}


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("budget", [2048, 16])
def test_greedy_matches_transformers(ref_models: dict[str, RefModel], model: str, budget: int) -> None:
    ref = ref_models[model]
    engine = ref.engine(max_num_batched_tokens=budget, **_context(model))
    assert engine.max_model_len > 8  # the window does not cap the context
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=11)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids[0] == ref.greedy(prompt, 16), f"prompt of {len(prompt)} tokens"
        assert usage_of(result).prompt_tokens == len(prompt)
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("model", FAMILIES)
def test_prefix_hits_and_preemption(ref_models: dict[str, RefModel], model: str) -> None:
    ref = ref_models[model]
    # a cache of 10 blocks for 8 requests of 3-4 blocks each: some are preempted and recomputed
    cfg = ref.hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    block_bytes = 16 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    engine = ref.engine(kv_cache_memory=str(10 * block_bytes), max_num_batched_tokens=64, max_model_len=64)
    (prefix,) = prompts_of_lengths([33], ref.vocab_size, seed=3)
    prompts = [
        prefix + tail[1:] for tail in prompts_of_lengths([4, 9, 2, 6, 11, 3, 8, 5], ref.vocab_size, seed=4)
    ]
    requests = [
        EngineRequest(f"r{i}", tuple(p), SamplingParams(temperature=0.0, max_tokens=20))
        for i, p in enumerate(prompts)
    ]
    results = run_to_completion(engine, requests)
    for i, prompt in enumerate(prompts):
        assert results[f"r{i}"].token_ids[0] == ref.greedy(prompt, 20)
    assert engine.block_manager.hit_rate > 0
    assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("model", FAMILIES)
def test_logprobs_match_transformers(ref_models: dict[str, RefModel], model: str) -> None:
    ref = ref_models[model]
    engine = ref.engine(**_context(model))
    (prompt,) = prompts_of_lengths([21], ref.vocab_size, seed=5)
    (result,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, logprobs=0))
    tokens, steps = ref.greedy_with_logprobs(prompt, 8)
    assert result.token_ids[0] == tokens
    for entry, step, token in zip(result.logprobs[0], steps, tokens, strict=True):
        assert abs(entry.logprob - float(step[token])) < 1e-4


def test_phi3_long_context_uses_the_long_factors(ref_models: dict[str, RefModel]) -> None:
    """Served past original_max_position_embeddings (64), every position rotates with LongRoPE's
    long factors, as transformers does for a prompt longer than that."""
    ref = ref_models["phi3"]
    engine = ref.engine(max_model_len=128)
    (prompt,) = prompts_of_lengths([70], ref.vocab_size, seed=6)
    (result,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, logprobs=0))
    tokens, steps = ref.greedy_with_logprobs(prompt, 12)
    assert result.token_ids[0] == tokens
    for entry, step, token in zip(result.logprobs[0], steps, tokens, strict=True):
        assert abs(entry.logprob - float(step[token])) < 1e-4


def _write_config(tmp_path: Path, cfg: dict) -> str:  # type: ignore[type-arg]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


GEMMA3_4X = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh",
}


def test_gemma3_config_of_transformers_4(tmp_path: Path) -> None:
    """A Gemma 3 config.json as the model repos ship it (no layer_types): five local layers, then
    a global one; the local layers' rope base; q/k norms; the window does not cap the context."""
    cfg = load_model_config(_write_config(tmp_path, GEMMA3_4X))
    assert cfg.qk_norm and cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4
    assert [cfg.layer_window(i) for i in range(7)] == [512] * 5 + [0] + [512]
    assert cfg.attention_scale == 256**-0.5


def test_longrope_su_config_of_phi3(tmp_path: Path) -> None:
    """Phi-3-mini-128k's spelling: rope_scaling type "su", original_max_position_embeddings at the
    top level; the attention factor comes from the ratio of the two lengths."""
    factors = [1.0] * 48
    cfg = load_model_config(
        _write_config(
            tmp_path,
            {
                "architectures": ["Phi3ForCausalLM"],
                "model_type": "phi3",
                "vocab_size": 32064,
                "hidden_size": 3072,
                "intermediate_size": 8192,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096,
                "rope_scaling": {"type": "su", "short_factor": factors, "long_factor": factors},
                "sliding_window": 262144,
            },
        )
    )
    assert cfg.rope_scaling is not None
    assert cfg.rope_scaling["rope_type"] == "longrope"
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096
    assert cfg.rope_scaling["factor"] == 32.0


def test_partial_rotary_is_a_clear_error(tmp_path: Path) -> None:
    cfg = {**GEMMA3_4X, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    cfg["partial_rotary_factor"] = 0.75
    with pytest.raises(ModelConfigError, match="partial_rotary_factor"):
        load_model_config(_write_config(tmp_path, cfg))
