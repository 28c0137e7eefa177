"""Scatter new tokens' K and V into the paged KV cache by slot (vLLM's reshape_and_cache)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_cache_write_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_vt,
    stride_cache_slot,  # elements between consecutive slots (= Hkv * D for the standard layout)
    ROW: tl.constexpr,  # Hkv * D
    ROW_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs = tl.arange(0, ROW_PAD)
    # Padding tokens (slot -1) write nothing; a mask instead of an early return keeps one code path.
    mask = (offs < ROW) & (slot >= 0)
    k = tl.load(key_ptr + token.to(tl.int64) * stride_kt + offs, mask=mask)
    v = tl.load(value_ptr + token.to(tl.int64) * stride_vt + offs, mask=mask)
    dst = slot * stride_cache_slot + offs
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D], heads and dims contiguous (a token stride is fine)
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D] contiguous in its last three dims
    slot_mapping: torch.Tensor,  # [T] int64; -1 = skip
) -> None:
    """Write each token's K/V row to `slot_mapping[t]` of the cache, in place."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (key.shape, value.shape)
    assert kv_cache_layer.dim() == 5 and kv_cache_layer.shape[3:] == (num_kv_heads, head_dim), (
        kv_cache_layer.shape
    )
    for t in (key, value):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, (
            f"K/V rows must be [Hkv, D]-contiguous, got {t.stride()}"
        )
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    assert (
        k_cache.stride(3) == 1
        and k_cache.stride(2) == head_dim
        and k_cache.stride(1) == num_kv_heads * head_dim
    )
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), "cache blocks must be contiguous"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int64, torch.int32)
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    _kv_cache_write_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        k_cache.stride(1),
        ROW=row,
        ROW_PAD=triton.next_power_of_2(row),
        num_warps=4,
    )
