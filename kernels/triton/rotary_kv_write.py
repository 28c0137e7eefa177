"""Rotary embedding fused with the KV-cache write: one program per token rotates q (returned) and k,
and writes the rotated K and the V row straight into the token's cache slot.

Separately, `rotary` and `write_kv_cache` are two launches per layer and K makes a round trip
through memory between them; in a batch-1 decode step each launch weighs inside the CUDA graph
(docs/gpu.md), which is what this saves. Same arithmetic as the two kernels (fp32 rotation,
rounded to the input dtype), so the cache holds bit-identical K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_cache_slot,  # elements between consecutive cache slots (Hkv * D)
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    # Positions, slots and the cos/sin table are step inputs no kernel of the forward writes: with
    # PDL their dependent loads (position -> cos/sin row) run before the wait, off the critical path.
    pos = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)[None, :]
    d_mask = dims < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + dims, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + dims, mask=d_mask, other=0.0).to(tl.float32)
    pdl.enter(PDL)  # see pdl.py: q, k and v are the previous kernel's output

    # q: rotate into the new [T, Hq, D] tensor
    qh = tl.arange(0, Q_HEADS_PAD)[:, None]
    q_mask = (qh < NUM_Q_HEADS) & d_mask
    q_src = q_ptr + token * stride_qt + qh * stride_qh + dims
    x1 = tl.load(q_src, mask=q_mask, other=0.0).to(tl.float32)
    x2 = tl.load(q_src + HALF, mask=q_mask, other=0.0).to(tl.float32)
    q_dst = q_out_ptr + token * stride_qot + qh * stride_qoh + dims
    tl.store(q_dst, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + HALF, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=q_mask)

    # k: rotate straight into the cache slot (padding tokens, slot -1, write nothing)
    kh = tl.arange(0, KV_HEADS_PAD)[:, None]
    kv_mask = (kh < NUM_KV_HEADS) & d_mask & (slot >= 0)
    k_src = k_ptr + token * stride_kt + kh * stride_kh + dims
    y1 = tl.load(k_src, mask=kv_mask, other=0.0).to(tl.float32)
    y2 = tl.load(k_src + HALF, mask=kv_mask, other=0.0).to(tl.float32)
    # Rounded to k's dtype first (as `rotary` does), then to the cache's.
    k_rot1 = (y1 * cos - y2 * sin).to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
    k_rot2 = (y2 * cos + y1 * sin).to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
    k_dst = k_cache_ptr + slot * stride_cache_slot + kh * HEAD_DIM + dims
    tl.store(k_dst, k_rot1, mask=kv_mask)
    tl.store(k_dst + HALF, k_rot2, mask=kv_mask)

    # v: copied as is (both halves)
    v_src = v_ptr + token * stride_vt + kh * stride_vh + dims
    v_dst = v_cache_ptr + slot * stride_cache_slot + kh * HEAD_DIM + dims
    v1 = tl.load(v_src, mask=kv_mask, other=0.0)
    v2 = tl.load(v_src + HALF, mask=kv_mask, other=0.0)
    tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(v_dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
    pdl.leave(PDL)


def rotary_write_kv_cache(
    q: torch.Tensor,  # [T, Hq, D], head dim contiguous (a strided view of the qkv output is fine)
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64; -1 = skip
    positions: torch.Tensor,  # [T] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D]: cos in [:, :D/2], sin in [:, D/2:]
    out: torch.Tensor | None = None,  # [T, Hq, D] contiguous, to write the rotated q into
) -> torch.Tensor:  # [T, Hq, D] rotated q, contiguous
    """Rotate q and k (NeoX rotate_half), write rotated K and V to their slots; returns rotated q."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == (num_tokens, num_kv_heads, head_dim) and v.shape == k.shape, (q.shape, k.shape, v.shape)
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1, "head dims must be contiguous"
    assert head_dim % 2 == 0
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1
    assert positions.shape == (num_tokens,) and slot_mapping.shape == (num_tokens,)
    assert kv_cache_layer.dim() == 5 and kv_cache_layer.shape[3:] == (num_kv_heads, head_dim), (
        kv_cache_layer.shape
    )
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    assert (
        k_cache.stride(3) == 1
        and k_cache.stride(2) == head_dim
        and k_cache.stride(1) == num_kv_heads * head_dim
        and k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)
    ), "cache blocks must be contiguous [BS, Hkv, D]"
    if out is not None:
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), (out.shape, out.dtype)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if num_tokens == 0:
        return q_out
    half = head_dim // 2
    _rotary_kv_write_kernel[(num_tokens,)](
        q,
        k,
        v,
        q_out,
        k_cache,
        v_cache,
        slot_mapping,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_cache.stride(1),
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads,
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
        NUM_KV_HEADS=num_kv_heads,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        HALF=half,
        HALF_PAD=triton.next_power_of_2(half),
        num_warps=4,
        **pdl.launch_options(q.device),
    )
    return q_out
