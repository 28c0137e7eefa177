"""Mixture-of-experts families (Qwen3-MoE with a dense layer among sparse ones, Mixtral): greedy
output equals transformers' generate with many requests in flight, chunked prefill, prefix hits
and preemption; logprobs within 1e-4; the loader's errors name the expert tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from worker_testlib import RefModel, prompts_of_lengths, run_to_completion, usage_of

from services.worker.loader import WeightLoadError
from services.worker.request import EngineRequest, SamplingParams

MOE_MODELS = ["qwen3_moe", "mixtral"]
LENGTHS = [1, 3, 7, 12, 16, 17, 29, 40, 5]


@pytest.mark.parametrize("model", MOE_MODELS)
@pytest.mark.parametrize("budget", [2048, 16])
def test_greedy_matches_transformers(ref_models: dict[str, RefModel], model: str, budget: int) -> None:
    ref = ref_models[model]
    engine = ref.engine(max_num_batched_tokens=budget)
    assert engine.model_config.num_experts > 0
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=11)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids[0] == ref.greedy(prompt, 16), f"prompt of {len(prompt)} tokens"
        assert usage_of(result).prompt_tokens == len(prompt)
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("model", MOE_MODELS)
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


@pytest.mark.parametrize("model", MOE_MODELS)
def test_logprobs_match_transformers(ref_models: dict[str, RefModel], model: str) -> None:
    ref = ref_models[model]
    engine = ref.engine()
    (prompt,) = prompts_of_lengths([9], ref.vocab_size, seed=5)
    (result,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, logprobs=0))
    tokens, steps = ref.greedy_with_logprobs(prompt, 8)
    assert result.token_ids[0] == tokens
    for entry, step, token in zip(result.logprobs[0], steps, tokens, strict=True):
        assert abs(entry.logprob - float(step[token])) < 1e-4


def test_a_missing_expert_is_named(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from services.worker.config import WorkerConfig
    from services.worker.engine import Engine

    src = tiny_model_dirs["mixtral"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"experts\.3"):
        Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="1MiB"))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert torch.get_default_dtype() == torch.float32
