"""Triton kernels, one per file; `TRITON_OPS` bundles them behind the `KernelOps` interface.

Matmuls go to cuBLAS through torch, except decode-sized ones (<= 8 rows) of the weight shapes where
`tune_linear` measured the skinny-GEMM kernel faster on this GPU (skinny_gemm.py).
"""

from __future__ import annotations

from kernels import KernelOps
from kernels.triton.argmax import argmax
from kernels.triton.kv_cache_write import write_kv_cache
from kernels.triton.paged_attention import paged_attention, supports_head_dim
from kernels.triton.rms_norm import fused_add_rms_norm, rms_norm
from kernels.triton.rotary import rotary
from kernels.triton.rotary_kv_write import rotary_write_kv_cache
from kernels.triton.silu_and_mul import silu_and_mul
from kernels.triton.skinny_gemm import linear, tune_linear

TRITON_OPS = KernelOps(
    name="triton",
    write_kv_cache=write_kv_cache,
    paged_attention=paged_attention,
    rms_norm=rms_norm,
    fused_add_rms_norm=fused_add_rms_norm,
    rotary=rotary,
    silu_and_mul=silu_and_mul,
    graph_capturable=supports_head_dim,
    rotary_write_kv_cache=rotary_write_kv_cache,
    linear=linear,
    tune_linear=tune_linear,
    argmax=argmax,
)

__all__ = ["TRITON_OPS"]
