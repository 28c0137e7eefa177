"""Fused mixture-of-experts feed-forward: tokens sorted by expert, one grouped-GEMM launch per
projection for all experts.

    align:   the T*k (token, slot) pairs sorted by expert, each expert's run padded to BLOCK_M
             (`sorted_ids`, sentinel T*k in the padding; `block_expert` per BLOCK_M block, -1 past
             the end). Device ops with shapes fixed by (T, k, E, BLOCK_M): no host sync, so a
             decode step stays CUDA-graph capturable.
    gemm 1:  h[p] = x[p // k] @ w13[e].T (+ b13[e]) for every sorted pair p   [T*k, 2I]
    act:     silu(h[:, :I]) * h[:, I:] (or gpt-oss's clamped SwiGLU)         [T*k, I]
    gemm 2:  y[p] = w[p] * (act[p] @ w2[e].T (+ b2[e]))                      [T*k, H]
    combine: out[t] = sum_j y[t*k + j]                                   [T, H]

Each program computes one BLOCK_M x BLOCK_N tile of one expert's rows (fp32 accumulation); small
T (decode) takes BLOCK_M = 16, larger T (prefill) 64. Reference twin: kernels/reference.fused_moe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels.triton.silu_and_mul import silu_and_mul


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [P] int32, block_expert [P // block_m] int32) for P = T*k + E*(block_m - 1)
    rounded up to block_m: the pairs of each expert contiguous and padded to a block boundary."""
    flat = topk_ids.flatten().to(torch.int64)  # [T*k]
    num_pairs = flat.numel()
    max_padded = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    # scatter_add, not bincount: CUDA's bincount reads the input's maximum back to the host, which
    # a CUDA graph capture refuses
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)  # pair indices sorted by expert
    expert_of = flat[order]
    count_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=flat.device) - count_start[expert_of]
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[padded_start[expert_of] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_ids, block_expert


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [M_a, K]
    b_ptr,  # [E, N, K]
    c_ptr,  # [num_pairs, N]
    weights_ptr,  # [num_pairs] fp32 (MUL_WEIGHTS)
    bias_ptr,  # [E, N] (HAS_BIAS)
    sorted_ids_ptr,  # [P] int32
    block_expert_ptr,  # [P // BLOCK_M] int32
    num_pairs,
    N,
    K,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    stride_bias_e,
    A_ROWS_PER_PAIR: tl.constexpr,  # top_k: row of a = pair // top_k (gemm 1); 1: row = pair (gemm 2)
    MUL_WEIGHTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    a_rows = pairs // A_ROWS_PER_PAIR
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:  # inside the projection, before the routing weight
        bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_e + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_WEIGHTS:
        w = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n[None, :] < N))


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    num_pairs: int,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    a_rows_per_pair: int,
    weights: torch.Tensor | None,
    block_m: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    assert a.is_contiguous() and b.is_contiguous() and b.dim() == 3
    n, k = b.shape[1], b.shape[2]
    assert a.shape[1] == k, (a.shape, b.shape)
    assert bias is None or (bias.shape == b.shape[:2] and bias.stride(1) == 1), (bias, b.shape)
    c = torch.empty((num_pairs, n), dtype=a.dtype, device=a.device)
    block_n = 64
    block_k = 32 if k >= 32 else 16
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, weights if weights is not None else c, bias if bias is not None else c,
        sorted_ids, block_expert, num_pairs, n, k, a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        bias.stride(0) if bias is not None else 0,
        A_ROWS_PER_PAIR=a_rows_per_pair, MUL_WEIGHTS=weights is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return c


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2*I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k] fp32
    topk_ids: torch.Tensor,  # [T, k]
    w13_bias: torch.Tensor | None = None,  # [E, 2*I]
    w2_bias: torch.Tensor | None = None,  # [E, H]
    activation: str = "silu",  # "silu" | "swiglu_oai" (reference.moe_activation)
) -> torch.Tensor:  # [T, H]
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    assert w2.shape[0] == num_experts and w13.shape[2] == x.shape[1] and w2.shape[2] * 2 == w13.shape[1]
    block_m = 16 if num_tokens * top_k <= 64 * num_experts else 64
    sorted_ids, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    num_pairs = num_tokens * top_k
    x = x.contiguous()
    h = _grouped_gemm(x, w13, num_pairs, sorted_ids, block_expert, top_k, None, block_m, w13_bias)
    # [T*k, 2I] -> [T*k, I]; gpt-oss's clamped SwiGLU as eager torch ops (elementwise, small
    # next to the GEMMs)
    act = silu_and_mul(h) if activation == "silu" else reference.moe_activation(h, activation)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    y = _grouped_gemm(act, w2, num_pairs, sorted_ids, block_expert, 1, weights, block_m, w2_bias)
    return y.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)
