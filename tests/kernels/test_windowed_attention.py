"""Sliding-window attention and attention-score soft-capping (Mistral, Gemma 2 / 3) in the Triton
prefill and decode kernels, against the reference twin; and the reference against a dense
transformers-style masked softmax.

CPU: Triton's interpreter in fp32 / fp16; CUDA (`gpu` marker): bf16 and longer contexts.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import CASES, rel_err, skip_without, tol_for
from paged_inputs import make_paged_batch

from kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# (num_q_heads, num_kv_heads, head_dim, block_size)
SHAPES = [(4, 2, 64, 16), (14, 2, 64, 16)]
# (sliding window, soft cap): window only, cap only, both; windows shorter than a tile, a few
# tiles, and longer than every context
MASKS = [(5, 0.0), (23, 30.0), (0, 20.0), (1000, 0.0)]


def _shapes(device: str) -> list[tuple[int, int, int, int]]:
    return SHAPES if device == "cuda" else SHAPES[1:]  # the interpreter is slow: one GQA-7 shape


def test_reference_matches_dense_masked_softmax() -> None:
    """The reference's window: a query at p sees keys p - W < k <= p (W keys, itself included,
    transformers' sliding-window mask); the cap tanh-squashes the scaled scores before the mask."""
    gen = torch.Generator().manual_seed(0)
    batch = make_paged_batch([(13, 6)], 2, 1, 16, 4, torch.float32, "cpu", gen)
    scale, window, cap = 0.25, 4, 2.0
    out = reference.paged_attention(
        batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, scale, 6,
        sliding_window=window, soft_cap=cap,
    )  # fmt: skip
    k, v = batch.dense_k[0][:, 0].double(), batch.dense_v[0][:, 0].double()
    for t in range(6):
        p = 13 + t
        for h in range(2):
            s = (batch.q[t, h].double() @ k.T) * scale
            s = cap * torch.tanh(s / cap)
            keys = torch.arange(19)
            s[(keys > p) | (keys <= p - window)] = float("-inf")
            want = torch.softmax(s, -1) @ v
            torch.testing.assert_close(out[t, h].double(), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def triton_ops():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from kernels.triton import TRITON_OPS

    return TRITON_OPS


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_prefill_and_mixed_steps(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """Prompt chunks with cached prefixes longer than the window (the prefill kernel), and a mixed
    step whose decode rows take the decode kernel."""
    skip_without(device)
    gen = torch.Generator().manual_seed(21)
    for num_q_heads, num_kv_heads, head_dim, block_size in _shapes(device):
        decodes = [(40, 1), (3, 1)]
        prompts = [(0, 37), (45, 9), (block_size, block_size + 3)]
        if device == "cuda":
            decodes += [(3000, 1)]
            prompts += [(0, 700), (2000, 300)]
        batch = make_paged_batch(
            decodes + prompts, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
        )
        args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens)
        scale = 1.0 / math.sqrt(head_dim)
        for window, cap in MASKS:
            masks = {"sliding_window": window, "soft_cap": cap}
            ref = reference.paged_attention(*args, scale, batch.max_seqlen_q, **masks)
            whole = triton_ops.paged_attention(*args, scale, batch.max_seqlen_q, **masks)
            mixed = triton_ops.paged_attention(
                *args, scale, batch.max_seqlen_q, num_decode_rows=len(decodes), **masks
            )
            for got in (whole, mixed):
                err = rel_err(got, ref)
                assert err < tol_for(dtype), (num_q_heads, head_dim, window, cap, err)


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_decode_with_splits(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """Decode rows whose window starts mid-block and mid-tile, split over several programs (the
    in-kernel merge), and the decode kernel with rotary + KV write fused in."""
    skip_without(device)
    from kernels.triton import decode_attention as da
    from kernels.triton.paged_attention import rotary_write_paged_attention

    gen = torch.Generator().manual_seed(22)
    for num_q_heads, num_kv_heads, head_dim, block_size in _shapes(device):
        lens = [1, 6, 17, 70, 3 * block_size + 1]
        if device == "cuda":
            lens += [4000, 513]
        batch = make_paged_batch(
            [(n - 1, 1) for n in lens], num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
        )
        args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens)
        scale = 1.0 / math.sqrt(head_dim)
        for window, cap in MASKS:
            masks = {"sliding_window": window, "soft_cap": cap}
            ref = reference.paged_attention(*args, scale, 1, **masks)
            for max_splits in (None, 3) if window < 1000 else (None,):
                out = da.decode_attention(*args, scale, max_splits=max_splits, **masks)
                assert rel_err(out, ref) < tol_for(dtype), (window, cap, max_splits)

        # fused rotary: K/V of the new token come from registers, the older ones from the cache
        cos_sin = reference.build_rope_cache(head_dim, 8192, 10000.0, None, dtype, device)
        positions = (batch.seq_lens - 1).long()
        k_raw = torch.randn(batch.new_k.shape, generator=gen).to(dtype).to(device)
        v_new = batch.new_v.clone()
        for window, cap in MASKS[:3]:
            masks = {"sliding_window": window, "soft_cap": cap}
            cache_ref, cache_out = batch.kv_cache.clone(), batch.kv_cache.clone()
            q_rot = reference.rotary_write_kv_cache(
                batch.q, k_raw, v_new, cache_ref, batch.slot_mapping, positions, cos_sin
            )
            tail = (batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, scale, 1)
            ref = reference.paged_attention(q_rot, cache_ref, *tail, **masks)
            out = rotary_write_paged_attention(
                batch.q, k_raw, v_new, cache_out, batch.slot_mapping, positions, cos_sin, *tail, **masks
            )
            assert rel_err(out, ref) < tol_for(dtype), (window, cap)
