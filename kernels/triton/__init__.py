"""Triton kernels, one per file; `TRITON_OPS` bundles them behind the `KernelOps` interface.

Gemma 2/3's (1 + w) norms run fused with the residual adds around them (gemma_norm.py), its
GELU(tanh)-and-mul in one kernel or the gate/up GEMM's epilogue (`linear_gelu_and_mul`).

Matmuls go to cuBLAS through torch, except decode-sized ones (<= 8 rows) of the weight shapes where
`tune_linear` measured the skinny-GEMM kernel faster on this GPU (skinny_gemm.py). The bundle has
the folded-RMSNorm ops, so the models run with each layer's norm weights folded into qkv/gate_up
(except in fp16): the norm's 1/rms is computed by the skinny GEMM (`linear_rms_norm`) and the SiLU
kernel (`silu_and_mul_rms`), the residual adds by the o/down projections (`linear_add`). A one-row
gate/up projection may run with SiLU-and-mul in its epilogue (`linear_silu_and_mul`). FP8 W8A8
projections run a Triton FP8 GEMM or `torch._scaled_mm`, per shape and row count as
`tune_fp8_linear` measured (fp8_gemm.py); integer-weight projections the tile config of the
quantized GEMM that `tune_quant_linear` measured fastest (quant_gemm.py); a quantized model's
decode steps run the folded-norm path with the norm weight, 1/rms, SiLU-and-mul and residual add
inside that GEMM (`quant_linear_fused`).
Decode-sized MoE layers route in one kernel that also computes the router's logits (`moe_router`,
moe_route.py) and run two GEMV kernels with the tile configs `tune_moe` measured fastest
(fused_moe.py, moe_tune.py). With the norms folded (Qwen3-MoE, Mixtral) the routing kernel and the
gate/up GEMV apply the post-attention norm's 1/rms and the down GEMV adds the residual stream;
Qwen3's q/k norms are one launch (`qk_rms_norm`, head_norm.py, beside Gemma 3's `gemma_qk_norm`),
which with the attention kernel also applies a folded input norm's 1/rms.
"""

from __future__ import annotations

from kernels.ops import KernelOps
from kernels.triton.argmax import argmax
from kernels.triton.beam_ahead import beam_ahead
from kernels.triton.beam_candidates import beam_candidates
from kernels.triton.beam_topk_candidates import beam_topk_candidates
from kernels.triton.decode_attention_tune import tune_decode_attention
from kernels.triton.exponential_race import exponential_race
from kernels.triton.fp8_gemm import tune_fp8_linear, w8a8_linear
from kernels.triton.fused_moe import fused_moe
from kernels.triton.gelu_and_mul import gelu_tanh_and_mul
from kernels.triton.gemma_norm import gemma_add_rms_norm, gemma_rms_norm, gemma_scale_rms_norm
from kernels.triton.head_norm import gemma_qk_norm, qk_rms_norm
from kernels.triton.kv_cache_write import write_kv_cache
from kernels.triton.lora import lora_expand, lora_shrink
from kernels.triton.moe_route import moe_route, moe_router
from kernels.triton.moe_tune import tune_moe
from kernels.triton.paged_attention import (
    decode_scales_rms,
    paged_attention,
    rotary_write_paged_attention,
    supports_head_dim,
)
from kernels.triton.quant_gemm import quant_linear, quant_linear_fused, tune_quant_linear
from kernels.triton.rms_norm import fused_add_rms_norm, rms_norm
from kernels.triton.rotary import rotary
from kernels.triton.rotary_kv_write import rotary_write_kv_cache
from kernels.triton.row_topk import row_topk
from kernels.triton.silu_and_mul import silu_and_mul, silu_and_mul_rms
from kernels.triton.skinny_gemm import (
    linear,
    linear_add,
    linear_gelu_and_mul,
    linear_rms_norm,
    linear_silu_and_mul,
    tune_linear,
)
from kernels.triton.soft_cap import soft_cap

TRITON_OPS = KernelOps(
    name="triton",
    write_kv_cache=write_kv_cache,
    paged_attention=paged_attention,
    rms_norm=rms_norm,
    fused_add_rms_norm=fused_add_rms_norm,
    rotary=rotary,
    silu_and_mul=silu_and_mul,
    # Gemma 2/3: its (1 + w) norms fused with the residual adds, GELU(tanh)-and-mul, the soft-cap
    gemma_rms_norm=gemma_rms_norm,
    gemma_add_rms_norm=gemma_add_rms_norm,
    gemma_scale_rms_norm=gemma_scale_rms_norm,
    gemma_qk_norm=gemma_qk_norm,
    qk_rms_norm=qk_rms_norm,  # (Qwen3's q/k norms: the q/k head norm kernel with plain weights)
    gelu_tanh_and_mul=gelu_tanh_and_mul,
    linear_gelu_and_mul=linear_gelu_and_mul,
    soft_cap=soft_cap,
    graph_capturable=supports_head_dim,
    rotary_write_kv_cache=rotary_write_kv_cache,
    rotary_write_attention=rotary_write_paged_attention,
    attention_scales_rms=decode_scales_rms,
    linear=linear,
    tune_linear=tune_linear,
    argmax=argmax,
    row_topk=row_topk,
    beam_candidates=beam_candidates,
    beam_topk_candidates=beam_topk_candidates,
    beam_ahead=beam_ahead,
    exponential_race=exponential_race,
    # The folded-RMSNorm decode path (kernels/__init__.py): the models fold their layer norms.
    linear_rms_norm=linear_rms_norm,
    linear_add=linear_add,
    silu_and_mul_rms=silu_and_mul_rms,
    linear_silu_and_mul=linear_silu_and_mul,
    fused_moe=fused_moe,
    moe_route=moe_route,
    moe_router=moe_router,
    tune_moe=tune_moe,
    tune_decode_attention=tune_decode_attention,
    quant_linear=quant_linear,
    tune_quant_linear=tune_quant_linear,
    quant_linear_fused=quant_linear_fused,
    fp8_linear=w8a8_linear,
    tune_fp8_linear=tune_fp8_linear,
    lora_shrink=lora_shrink,
    lora_expand=lora_expand,
)

__all__ = ["TRITON_OPS"]
