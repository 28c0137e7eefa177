"""Mixture-of-experts families (Qwen3-MoE with a dense layer among sparse ones, Mixtral): greedy
output equals transformers' generate with many requests in flight, chunked prefill, prefix hits
and preemption; logprobs within 1e-4; the loader's errors name the expert tensor; the Triton
routing and MoE kernels (prefill and decode paths) inside each MoE family give transformers' logits."""

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
    model_logits,
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


@pytest.mark.parametrize("model", [*MOE_MODELS, "gpt_oss"])
def test_triton_moe_kernels_give_transformers_logits(ref_models: dict[str, RefModel], model: str) -> None:
    """The Triton routing (its router GEMV in-kernel) and fused MoE kernels (the interpreter) in each family:
    a prefill of 11 tokens (the sorted grouped GEMM) and a decode step of one (the decode GEMVs)
    give transformers' logits (Qwen3-MoE and Mixtral: softmax then top-k; gpt-oss: top-k of the
    biased logits, softmax, biased experts, clamped SwiGLU)."""
    import dataclasses

    from kernels import REFERENCE_OPS
    from kernels.triton.fused_moe import fused_moe
    from kernels.triton.moe_route import moe_route, moe_router
    from services.worker.layers.moe import MoeLayer
    from services.worker.loader import build_model
    from services.worker.model_config import load_model_config

    ref = ref_models[model]
    ops = dataclasses.replace(REFERENCE_OPS, fused_moe=fused_moe, moe_route=moe_route, moe_router=moe_router)
    engine_model = build_model(
        load_model_config(str(ref.path)), ops, torch.device("cpu"), torch.float32, "auto"
    )
    # the router's GEMV runs inside the routing kernel (ops.moe_router): its Linear never runs
    router_calls: list[str] = []
    for name, module in engine_model.named_modules():
        if isinstance(module, MoeLayer):
            module.router_linear().register_forward_hook(lambda *args, n=name: router_calls.append(n))
    prompt = [1, 17, 99, 5, 64, 3, 120, 42, 8, 77, 31, 12]
    got = model_logits(engine_model, prompt)
    with torch.inference_mode():
        want = ref.hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert router_calls == [], router_calls


@pytest.mark.parametrize("model", ["qwen3_moe", "gpt_oss"])
def test_engine_start_tuning_skips_the_routers(ref_models: dict[str, RefModel], model: str) -> None:
    """The routers' decode GEMV runs inside the routing kernel (ops.moe_router), so engine start
    times every other projection for the skinny GEMM but not the routers (Qwen3-MoE's `gate`,
    gpt-oss's `router`)."""
    import dataclasses

    from kernels import REFERENCE_OPS
    from services.worker.kernel_tuning import tune_kernels
    from services.worker.loader import build_model
    from services.worker.model_config import load_model_config

    tuned: list[str] = []

    def record_tuning(
        weights: list[torch.Tensor], bias: object, max_rows: int, name: str, **kw: object
    ) -> list[str]:
        tuned.append(name)
        return []

    ops = dataclasses.replace(REFERENCE_OPS, tune_linear=record_tuning)
    engine_model = build_model(
        load_model_config(str(ref_models[model].path)), ops, torch.device("cpu"), torch.float32, "auto"
    )
    tune_kernels(engine_model, ops, torch.device("cpu"), torch.float32, 8)
    assert "qkv_proj" in tuned and "o_proj" in tuned, tuned
    assert "gate" not in tuned and "router" not in tuned, tuned
