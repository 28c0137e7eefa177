"""Mixture-of-experts families (Qwen3-MoE with a dense layer among sparse ones, Mixtral): greedy
output equals transformers' generate with many requests in flight, chunked prefill, prefix hits
and preemption; logprobs within 1e-4; the loader's errors name the expert tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from worker_testlib import (
    RefModel,
    check_greedy_matches_transformers,
    check_logprobs_match_transformers,
    check_prefix_hits_and_preemption,
)

from services.worker.loader import WeightLoadError

MOE_MODELS = ["qwen3_moe", "mixtral"]
LENGTHS = [1, 3, 7, 12, 16, 17, 29, 40, 5]


@pytest.mark.parametrize("model", MOE_MODELS)
@pytest.mark.parametrize("budget", [2048, 16])
def test_greedy_matches_transformers(ref_models: dict[str, RefModel], model: str, budget: int) -> None:
    engine = check_greedy_matches_transformers(ref_models[model], LENGTHS, budget)
    assert engine.model_config.num_experts > 0


@pytest.mark.parametrize("model", MOE_MODELS)
def test_prefix_hits_and_preemption(ref_models: dict[str, RefModel], model: str) -> None:
    check_prefix_hits_and_preemption(ref_models[model])


@pytest.mark.parametrize("model", MOE_MODELS)
def test_logprobs_match_transformers(ref_models: dict[str, RefModel], model: str) -> None:
    check_logprobs_match_transformers(ref_models[model], 9, max_tokens=8, seed=5)


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
