"""gpt-oss (attention sinks, alternating sliding-window / full layers, YaRN, biased experts with the
clamped SwiGLU): greedy output equals transformers' generate with many requests in flight, chunked
prefill, prefix hits and preemption, on sequences much longer than the window (8); logprobs within
1e-4; the same with the experts shipped as MXFP4 (`*_blocks` / `*_scales`), against transformers'
own dequantization of those tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from worker_testlib import (
    RefModel,
    check_prefix_hits_and_preemption,
    load_ref,
    prompts_of_lengths,
    usage_of,
)

from services.worker.layers.quantization.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from services.worker.loader import WeightLoadError
from services.worker.request import SamplingParams

LENGTHS = [1, 3, 7, 12, 16, 17, 29, 40, 5]


@pytest.fixture(scope="module")
def mxfp4_ref(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> RefModel:
    """The tiny gpt-oss with its experts' weights written as MXFP4 (as openai/gpt-oss-* ship them:
    [E, out, in] blocks and scales, biases full precision), and its transformers twin whose
    experts hold transformers' dequantization of those very tensors."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    src, dst = tiny_model_dirs["gpt_oss"], tmp_path_factory.mktemp("tiny-gpt-oss-mxfp4")
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weight = tensors.pop(name).transpose(1, 2)  # transformers' [E, in, out] -> [E, out, in]
        blocks, scales = quantize_mxfp4(weight)
        num_experts, rows = weight.shape[:2]
        tensors[f"{name}_blocks"] = blocks.reshape(num_experts, rows, -1, 16)
        tensors[f"{name}_scales"] = scales
        packed[name] = (tensors[f"{name}_blocks"], scales)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (dst / "config.json").write_text(json.dumps(config))
    ref = load_ref(src)
    params = dict(ref.hf.named_parameters())
    with torch.no_grad():
        for name, (blocks, scales) in packed.items():
            dequantized = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            assert not torch.equal(dequantized, params[name])  # the format's rounding is visible
            params[name].copy_(dequantized)
    return RefModel(dst, ref.hf, ref.eos_token_ids, ref.vocab_size)


def _refs(ref_models: dict[str, RefModel], mxfp4_ref: RefModel) -> dict[str, RefModel]:
    return {"bf16-layout": ref_models["gpt_oss"], "mxfp4": mxfp4_ref}


@pytest.mark.parametrize("weights", ["bf16-layout", "mxfp4"])
@pytest.mark.parametrize("budget", [2048, 16])
def test_greedy_matches_transformers(
    ref_models: dict[str, RefModel], mxfp4_ref: RefModel, weights: str, budget: int
) -> None:
    ref = _refs(ref_models, mxfp4_ref)[weights]
    engine = ref.engine(max_num_batched_tokens=budget)
    cfg = engine.model_config
    assert (
        cfg.attention_sinks and cfg.num_experts == 4 and cfg.layer_window(0) == 8 and cfg.layer_window(1) == 0
    )
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "yarn"
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=11)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids[0] == ref.greedy(prompt, 16), f"prompt of {len(prompt)} tokens"
        assert usage_of(result).prompt_tokens == len(prompt)
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_hits_and_preemption(ref_models: dict[str, RefModel]) -> None:
    check_prefix_hits_and_preemption(ref_models["gpt_oss"])


@pytest.mark.parametrize("weights", ["bf16-layout", "mxfp4"])
def test_logprobs_match_transformers(
    ref_models: dict[str, RefModel], mxfp4_ref: RefModel, weights: str
) -> None:
    ref = _refs(ref_models, mxfp4_ref)[weights]
    engine = ref.engine()
    (prompt,) = prompts_of_lengths([21], ref.vocab_size, seed=5)
    (result,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, logprobs=0))
    tokens, steps = ref.greedy_with_logprobs(prompt, 8)
    assert result.token_ids[0] == tokens
    for entry, step, token in zip(result.logprobs[0], steps, tokens, strict=True):
        assert abs(entry.logprob - float(step[token])) < 1e-4


def test_mxfp4_dequantization_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our dequantization ([E, out, in]) is the transpose of transformers' (its modules' [E, in, out]),
    also when it works in chunks that split rows and experts."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from services.worker.layers.quantization import mxfp4

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 10, 4), generator=gen, dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert ours.shape == (3, 10, 128)
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=0, atol=0)
    monkeypatch.setattr(mxfp4, "_CHUNK_GROUPS", 7)
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales, torch.float32), ours, rtol=0, atol=0)
    weight = torch.randn(2, 5, 64, generator=gen)
    packed, exps = quantize_mxfp4(weight)
    back = dequantize_mxfp4(packed.reshape(2, 5, 2, 16), exps, torch.float32)
    assert float((back - weight).norm() / weight.norm()) < 0.15  # FP4: coarse, but the same weight


def _copy(src: Path, dst: Path) -> dict[str, Any]:
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return load_file(str(dst / "model.safetensors"))


def test_a_missing_mxfp4_half_is_named(mxfp4_ref: RefModel, tmp_path: Path) -> None:
    from services.worker.config import WorkerConfig
    from services.worker.engine import Engine

    tensors = _copy(mxfp4_ref.path, tmp_path)
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"layers\.1\.mlp\.experts\.down_proj_scales"):
        Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="1MiB"))


def test_the_real_gpt_oss_20b_config() -> None:
    """openai/gpt-oss-20b's config.json (transformers 4.x spelling, MXFP4 quantization_config),
    generation_config.json and tokenizer_config.json: the fields the worker reads."""
    from services.worker.layers.quantization import checkpoint_quant_method
    from services.worker.model_config import load_model_config

    path = Path(__file__).resolve().parents[1] / "data" / "models" / "openai-gpt-oss-20b"
    cfg = load_model_config(str(path))
    assert cfg.architecture == "GptOssForCausalLM" and cfg.attention_sinks
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        24,
        2880,
        64,
        8,
        64,
    )
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (32, 4, 2880)
    assert cfg.attention_bias and cfg.o_proj_bias and not cfg.qk_norm
    assert [cfg.layer_window(i) for i in range(4)] == [128, 0, 128, 0]
    assert cfg.rope_theta == 150000.0 and cfg.rope_scaling is not None
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 32.0
    assert (
        cfg.rope_scaling["original_max_position_embeddings"] == 4096 and cfg.rope_scaling["truncate"] is False
    )
    # <|return|> and <|endoftext|> (config, generation config), and harmony's <|call|>
    assert set(cfg.eos_token_ids) == {200002, 199999, 200012}
    assert checkpoint_quant_method(str(path), "none") is None  # experts dequantized by the model
