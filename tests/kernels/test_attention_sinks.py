"""Attention sinks (gpt-oss: a learned logit per head in every softmax's denominator) in the
Triton prefill and decode kernels against the reference twin, alone and with a sliding window;
and the reference against transformers' eager gpt-oss attention math.

CPU: Triton's interpreter in fp32; CUDA (`gpu` marker): bf16 and longer contexts.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_cases import CASES, rel_err, skip_without, tol_for
from paged_inputs import make_paged_batch

from kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# (num_q_heads, num_kv_heads, head_dim, block_size): gpt-oss has 64 query heads on 8 KV heads
SHAPE = (8, 2, 64, 16)
WINDOWS = [0, 5, 23]
FP32_CASES = [c for c in CASES if c.values[1] != torch.float16]  # type: ignore[attr-defined]


def _sinks(num_heads: int, device: str, gen: torch.Generator) -> torch.Tensor:
    # large enough to take a visible share of the softmax, one head far above every score
    sinks = torch.randn(num_heads, generator=gen) * 2.0
    sinks[1] = 40.0
    return sinks.to(device)


def test_reference_matches_transformers_eager_sinks() -> None:
    """transformers' eager_attention_forward (modeling_gpt_oss.py): the sink joins the row's
    logits, the row is softmaxed and the sink's column dropped."""
    gen = torch.Generator().manual_seed(0)
    batch = make_paged_batch([(11, 5)], 4, 2, 16, 4, torch.float32, "cpu", gen)
    sinks = torch.randn(4, generator=gen)
    scale, window = 0.25, 6
    out = reference.paged_attention(
        batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, scale, 5,
        sliding_window=window, sinks=sinks,
    )  # fmt: skip
    for t in range(5):
        p = 11 + t
        for h in range(4):
            k, v = batch.dense_k[0][:, h // 2].double(), batch.dense_v[0][:, h // 2].double()
            s = (batch.q[t, h].double() @ k.T) * scale
            keys = torch.arange(16)
            s[(keys > p) | (keys <= p - window)] = float("-inf")
            logits = torch.cat((s, sinks[h : h + 1].double()))
            logits = logits - logits.max()
            probs = torch.softmax(logits, -1)[:-1]
            torch.testing.assert_close(out[t, h].double(), probs @ v, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def triton_ops():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from kernels.triton import TRITON_OPS

    return TRITON_OPS


@pytest.mark.parametrize(("device", "dtype"), FP32_CASES)
def test_prefill_and_mixed_steps_with_sinks(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    skip_without(device)
    gen = torch.Generator().manual_seed(31)
    num_q_heads, num_kv_heads, head_dim, block_size = SHAPE
    decodes = [(40, 1), (3, 1)]
    prompts = [(0, 37), (45, 9)]
    if device == "cuda":
        decodes += [(3000, 1)]
        prompts += [(0, 700), (2000, 300)]
    batch = make_paged_batch(
        decodes + prompts, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
    )
    sinks = _sinks(num_q_heads, device, gen)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens)
    scale = 1.0 / math.sqrt(head_dim)
    for window in WINDOWS:
        ref = reference.paged_attention(*args, scale, batch.max_seqlen_q, sliding_window=window, sinks=sinks)
        plain = reference.paged_attention(*args, scale, batch.max_seqlen_q, sliding_window=window)
        assert rel_err(plain, ref) > 10 * tol_for(dtype)  # the sinks change the output
        whole = triton_ops.paged_attention(
            *args, scale, batch.max_seqlen_q, sliding_window=window, sinks=sinks
        )
        mixed = triton_ops.paged_attention(
            *args, scale, batch.max_seqlen_q, num_decode_rows=len(decodes), sliding_window=window, sinks=sinks
        )
        for got in (whole, mixed):
            assert rel_err(got, ref) < tol_for(dtype), window
        # the head whose sink dwarfs every score attends (almost) nothing
        assert whole[:, 1].abs().max() < 1e-6


@pytest.mark.parametrize(("device", "dtype"), FP32_CASES)
def test_decode_with_sinks_and_splits(triton_ops, device: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """One split (the sink in the program's normalisation) and several (the sink in the merge),
    and the decode kernel with rotary + KV write fused in."""
    skip_without(device)
    from kernels.triton import decode_attention as da
    from kernels.triton.paged_attention import rotary_write_paged_attention

    gen = torch.Generator().manual_seed(32)
    num_q_heads, num_kv_heads, head_dim, block_size = SHAPE
    lens = [1, 6, 17, 70, 3 * block_size + 1]
    if device == "cuda":
        lens += [4000, 513]
    batch = make_paged_batch(
        [(n - 1, 1) for n in lens], num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, gen
    )
    sinks = _sinks(num_q_heads, device, gen)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.cu_seqlens_q, batch.seq_lens)
    scale = 1.0 / math.sqrt(head_dim)
    for window in WINDOWS:
        ref = reference.paged_attention(*args, scale, 1, sliding_window=window, sinks=sinks)
        for max_splits in (1, 3, None):
            out = da.decode_attention(*args, scale, max_splits=max_splits, sliding_window=window, sinks=sinks)
            assert rel_err(out, ref) < tol_for(dtype), (window, max_splits)

    cos_sin = reference.build_rope_cache(head_dim, 8192, 10000.0, None, dtype, device)
    positions = (batch.seq_lens - 1).long()
    k_raw = torch.randn(batch.new_k.shape, generator=gen).to(dtype).to(device)
    cache_ref, cache_out = batch.kv_cache.clone(), batch.kv_cache.clone()
    q_rot = reference.rotary_write_kv_cache(
        batch.q, k_raw, batch.new_v, cache_ref, batch.slot_mapping, positions, cos_sin
    )
    tail = (batch.block_tables, batch.cu_seqlens_q, batch.seq_lens, scale, 1)
    ref = reference.paged_attention(q_rot, cache_ref, *tail, sliding_window=5, sinks=sinks)
    out = rotary_write_paged_attention(
        batch.q, k_raw, batch.new_v, cache_out, batch.slot_mapping, positions, cos_sin, *tail,
        sliding_window=5, sinks=sinks,
    )  # fmt: skip
    assert rel_err(out, ref) < tol_for(dtype)
