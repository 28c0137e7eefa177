"""Folded RMSNorms (models/llama.py `fold_norms`): the model with each layer's norm weights folded
into qkv_proj / gate_up_proj gives the logits of the unfolded model and of transformers.

Every model here gets random positive norm weights (and random biases) before it is saved, so the
folding multiplies by something other than ones: stories260K's own trained weights, and tiny random
Qwen2 (qkv bias, added after the norm's scale) and Qwen3 (q/k norms after qkv, not folded), and the
sparse MoE families (Qwen3-MoE: q/k norms, a dense layer among MoE ones; Mixtral), whose
post-attention norm folds into the router and the experts (issue 22).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from worker_testlib import TINY_BUILDERS, randomize_norms_and_biases

from kernels import REFERENCE_OPS, KernelOps, build_rope_cache
from services.worker.layers.attention import AttentionMetadata
from services.worker.loader import build_model
from services.worker.model_config import ModelConfig, load_model_config
from services.worker.models.llama import LlamaForCausalLM

# The reference bundle without the three folded-norm ops: the unfolded forward, as before.
UNFOLDED_OPS = dataclasses.replace(
    REFERENCE_OPS, linear_rms_norm=None, linear_add=None, silu_and_mul_rms=None
)
PROMPT = [1, 37, 5, 211, 90, 14, 301, 8, 77, 160, 3, 42, 250]  # prefill all but the last, then decode it
BLOCK_SIZE = 4  # several blocks per sequence


@pytest.fixture(scope="module")
def model_dirs(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """name -> (saved HF directory with non-trivial norms, its transformers model in fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    models = {
        "stories": AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32),
        "qwen2": TINY_BUILDERS["qwen2"](),
        "qwen3": TINY_BUILDERS["qwen3"](),
        "qwen3_moe": TINY_BUILDERS["qwen3_moe"](),
        "mixtral": TINY_BUILDERS["mixtral"](),
    }
    dirs = {}
    for i, (name, hf) in enumerate(models.items()):
        randomize_norms_and_biases(hf, seed=i)
        path = tmp_path_factory.mktemp(f"folded-{name}")
        hf.save_pretrained(str(path))
        dirs[name] = (path, hf.eval())
    return dirs


def _logits(model: LlamaForCausalLM, cfg: ModelConfig, prompt: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Logits [len(prompt), vocab] fp32: a prefill of prompt[:-1], then a decode step of prompt[-1]
    against the cached prefix (both paths of the attention)."""
    num_tokens = len(prompt)
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    kv = torch.zeros(cfg.num_layers, 2, num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    for i, attn in enumerate(model.attention_layers()):
        attn.kv_cache = kv[i]
    cos_sin = build_rope_cache(cfg.head_dim, num_tokens, cfg.rope_theta, cfg.rope_scaling, dtype, "cpu")
    block_table = torch.arange(num_blocks, dtype=torch.int32)[None, :]

    def step(start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        meta = AttentionMetadata(
            positions=positions,
            slot_mapping=positions.clone(),
            block_tables=block_table,
            cu_seqlens_q=torch.tensor([0, end - start], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            max_seqlen_q=end - start,
            cos_sin_cache=cos_sin,
        )
        return model.compute_logits(model(torch.tensor(prompt[start:end]), meta))

    with torch.inference_mode():
        return torch.cat([step(0, num_tokens - 1), step(num_tokens - 1, num_tokens)])


def _build(
    path: Path, ops: KernelOps, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, ModelConfig]:
    cfg = load_model_config(str(path))
    return build_model(cfg, ops, torch.device("cpu"), dtype, "auto"), cfg


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_models_with_qkv_bias_or_qk_norm_do_not_fold(
    model_dirs: dict[str, tuple[Path, Any]], name: str
) -> None:
    """Qwen2 (qkv bias) and Qwen3 (q/k norms) keep their norms (`can_fold_norms`), and still match
    transformers."""
    path, hf = model_dirs[name]
    model, cfg = _build(path, REFERENCE_OPS)
    assert not model.norms_folded
    with torch.inference_mode():
        expected = hf(torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(_logits(model, cfg, PROMPT, torch.float32), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["stories"])
def test_folded_model_matches_unfolded_and_transformers(
    model_dirs: dict[str, tuple[Path, Any]], name: str
) -> None:
    path, hf = model_dirs[name]
    folded, cfg = _build(path, REFERENCE_OPS)
    unfolded, _ = _build(path, UNFOLDED_OPS)
    assert folded.norms_folded and not unfolded.norms_folded

    # The folding itself: W' = W * g[None, :] (fp32, exact), the layer norms ones, the rest untouched.
    ours, theirs = dict(folded.named_parameters()), dict(hf.named_parameters())
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}"
        g_in = theirs[f"{layer}.input_layernorm.weight"]
        g_post = theirs[f"{layer}.post_attention_layernorm.weight"]
        q_rows, inter = cfg.num_heads * cfg.head_dim, cfg.intermediate_size
        qkv, gate_up = ours[f"{layer}.self_attn.qkv_proj.weight"], ours[f"{layer}.mlp.gate_up_proj.weight"]
        assert torch.equal(qkv[:q_rows], theirs[f"{layer}.self_attn.q_proj.weight"] * g_in)
        assert torch.equal(gate_up[inter:], theirs[f"{layer}.mlp.up_proj.weight"] * g_post)
        for unchanged in ("mlp.down_proj.weight", "self_attn.o_proj.weight"):
            assert torch.equal(ours[f"{layer}.{unchanged}"], theirs[f"{layer}.{unchanged}"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert bool((ours[f"{layer}.{norm}.weight"] == 1).all())
        if cfg.qk_norm:  # per head, after qkv: not folded
            assert torch.equal(
                ours[f"{layer}.self_attn.q_norm.weight"], theirs[f"{layer}.self_attn.q_norm.weight"]
            )
    assert torch.equal(ours["model.norm.weight"], theirs["model.norm.weight"])  # the final norm stays

    got = _logits(folded, cfg, PROMPT, torch.float32)
    torch.testing.assert_close(got, _logits(unfolded, cfg, PROMPT, torch.float32), atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        expected = hf(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("moe_kernels", ["reference", "triton"])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_models_fold_into_router_and_experts(
    model_dirs: dict[str, tuple[Path, Any]], name: str, moe_kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen3-MoE (q/k norms: folding off by default, `folds_with_qk_norm` turned on here) and
    Mixtral fold: each MoE layer's
    post-attention norm weight g multiplies the router's and every expert's w13 columns (exactly
    the fp32 product), the norm is ones, w2 untouched; the decode step (the folded forward: router
    of the raw stream, 1/rms in the routing and gate/up kernels, residual in the down kernel) gives
    the unfolded model's and transformers' logits. "triton": the routing and MoE kernels on the
    interpreter (their folded variants), the rest the reference ops."""
    from kernels.triton.fused_moe import fused_moe
    from kernels.triton.moe_route import moe_route, moe_router
    from services.worker.layers.moe import SparseMoeBlock
    from services.worker.models.qwen3_moe import Qwen3MoeForCausalLM

    monkeypatch.setattr(Qwen3MoeForCausalLM, "folds_with_qk_norm", True)
    path, hf = model_dirs[name]
    ops = REFERENCE_OPS
    if moe_kernels == "triton":
        ops = dataclasses.replace(
            REFERENCE_OPS, fused_moe=fused_moe, moe_route=moe_route, moe_router=moe_router
        )
    folded, cfg = _build(path, ops)
    unfolded, _ = _build(
        path,
        dataclasses.replace(
            UNFOLDED_OPS, fused_moe=ops.fused_moe, moe_route=ops.moe_route, moe_router=ops.moe_router
        ),
    )
    assert folded.norms_folded and not unfolded.norms_folded

    moe_layers = 0
    for ours, theirs in zip(folded.model.layers, unfolded.model.layers, strict=True):
        g = theirs.post_attention_layernorm.weight.float()
        assert not bool((g == 1).all())  # random norm weights: the fold multiplies by something
        assert bool((ours.post_attention_layernorm.weight == 1).all())
        if isinstance(ours.mlp, SparseMoeBlock):
            moe_layers += 1
            assert torch.equal(ours.mlp.gate.weight, theirs.mlp.gate.weight * g)
            assert torch.equal(ours.mlp.w13, theirs.mlp.w13 * g)
            assert torch.equal(ours.mlp.w2, theirs.mlp.w2)
        else:  # Qwen3-MoE's dense layer (mlp_only_layers) folds as a dense model's
            assert torch.equal(ours.mlp.gate_up_proj.weight, theirs.mlp.gate_up_proj.weight * g)
    assert moe_layers >= 2

    got = _logits(folded, cfg, PROMPT, torch.float32)
    torch.testing.assert_close(got, _logits(unfolded, cfg, PROMPT, torch.float32), atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        expected = hf(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bf16_folds_and_fp16_does_not(model_dirs: dict[str, tuple[Path, Any]]) -> None:
    """bf16 folds (fp32's range) and is as close to the fp32 model as unfolded bf16 is; fp16 keeps
    the separate norms (raw residual-stream values times the weights could overflow fp16)."""
    path, _ = model_dirs["stories"]
    fp32, cfg = _build(path, UNFOLDED_OPS)
    expected = _logits(fp32, cfg, PROMPT, torch.float32)

    def error(model: LlamaForCausalLM, dtype: torch.dtype) -> float:
        return (_logits(model, cfg, PROMPT, dtype) - expected).abs().max().item()

    bf16, _ = _build(path, REFERENCE_OPS, torch.bfloat16)
    assert bf16.norms_folded
    bf16_unfolded_error = error(_build(path, UNFOLDED_OPS, torch.bfloat16)[0], torch.bfloat16)
    assert error(bf16, torch.bfloat16) <= 1.5 * bf16_unfolded_error + 1e-3
    fp16, _ = _build(path, REFERENCE_OPS, torch.float16)
    assert not fp16.norms_folded
    assert not bool((dict(fp16.named_parameters())["model.layers.0.input_layernorm.weight"] == 1).all())
    assert error(fp16, torch.float16) < 0.01 * expected.abs().max().item()


def test_dummy_weights_fold_and_folding_happens_once(stories_dir: Path) -> None:
    cfg = load_model_config(str(stories_dir))
    model = build_model(cfg, REFERENCE_OPS, torch.device("cpu"), torch.float32, "dummy")
    assert model.norms_folded
    before = {name: p.clone() for name, p in model.named_parameters()}
    assert not model.fold_norms()  # a second call changes nothing
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_qwen3_moe_keeps_its_norms_by_default(model_dirs: dict[str, tuple[Path, Any]]) -> None:
    """Qwen3-MoE does not fold by default, as dense Qwen3 does not: on the GPU the folded bf16 model
    fell under test_engine_gpu.py's agreement bar (docs/worker.md "MoE decode (issue 22)");
    Mixtral (no q/k norms) folds."""
    qwen3_moe, _ = _build(model_dirs["qwen3_moe"][0], REFERENCE_OPS)
    mixtral, _ = _build(model_dirs["mixtral"][0], REFERENCE_OPS)
    assert not qwen3_moe.norms_folded
    assert mixtral.norms_folded
