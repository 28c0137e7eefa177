"""The paged-attention entry point of the Triton bundle: picks the decode or the prefill kernel.

A batch whose every sequence has one new token (max_seqlen_q == 1, a plain decode step, the
shape captured in CUDA graphs) goes to the split-KV decode kernel; anything else (prefill,
chunked prefill with a cached prefix) goes to the prefill kernel. A mixed step (decodes first,
then prompt chunks: `num_decode_rows`) runs both, each over its own sequences, into one output:
the prefill kernel would take a decode row as a 128-row query tile with 4 live rows and stream
the row's whole context through it at one program per SM (a mixed step's decodes then cost
nearly as much as its prompts; figures in docs/gpu.md, round 7). Head dims the tensor cores
cannot take (< 16, or > 256) fall back to the PyTorch reference.
"""

from __future__ import annotations

import torch

from kernels import reference
from kernels.triton.decode_attention import RotaryKV, decode_attention
from kernels.triton.prefill_attention import prefill_attention
from kernels.triton.rotary_kv_write import rotary_write_kv_cache

FUSED_ROPE_MAX_TOKENS = 8

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


def supports_head_dim(head_dim: int) -> bool:
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    max_seqlen_q: int,
    num_decode_rows: int = 0,  # sequences [0, k) have one new token each (token i = sequence i)
    sliding_window: int = 0,  # > 0: a query at position p sees keys at positions > p - sliding_window
    soft_cap: float = 0.0,  # > 0: scores := soft_cap * tanh(scores / soft_cap)
    sinks: torch.Tensor | None = None,  # [Hq]: each head's sink logit in the softmax (gpt-oss)
    out: torch.Tensor | None = None,  # [T, Hq, D] to write into (default: a new tensor)
) -> torch.Tensor:  # [T, Hq, D]
    if not supports_head_dim(q.shape[-1]) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return reference.paged_attention(
            q,
            kv_cache_layer,
            block_tables,
            cu_seqlens_q,
            seq_lens,
            scale,
            max_seqlen_q,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            sinks=sinks,
            out=out,
        )
    if max_seqlen_q == 1:
        return decode_attention(
            q,
            kv_cache_layer,
            block_tables,
            cu_seqlens_q,
            seq_lens,
            scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            sinks=sinks,
            out=out,
        )
    # A mixed step's decode rows go to the decode kernel (split-K over their contexts) and the
    # prompts' chunks to the prefill kernel: faster than the prefill kernel for all (docs/gpu.md).
    k = num_decode_rows
    if not 0 < k < block_tables.shape[0]:
        return prefill_attention(
            q,
            kv_cache_layer,
            block_tables,
            cu_seqlens_q,
            seq_lens,
            scale,
            max_seqlen_q,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            sinks=sinks,
            out=out,
        )
    # Both over the whole batch's metadata (no sliced pointers: each alignment would compile kernel
    # variants of its own, seconds inside a serving step), one split per decode (one kernel variant
    # whatever the number of decodes; the prompts' attention dominates such a step).
    out = torch.empty_like(q) if out is None else out
    meta = (kv_cache_layer, block_tables, cu_seqlens_q, seq_lens, scale)
    decode_attention(
        q, *meta, max_splits=1, out=out, num_seqs=k,
        sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks,
    )  # fmt: skip
    prefill_attention(
        q, *meta, max_seqlen_q, out=out, first_seq=k,
        sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks,
    )  # fmt: skip
    return out


def _fused_decode(num_tokens: int, max_seqlen_q: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Decode steps of at most FUSED_ROPE_MAX_TOKENS tokens run rotary + KV write in the attention
    kernel. (Larger batches keep the two kernels: with the fused kernel large-batch decode measured
    slower, docs/gpu.md round 5; the launch it saves matters at small batch.)"""
    return (
        max_seqlen_q == 1
        and num_tokens <= FUSED_ROPE_MAX_TOKENS
        and supports_head_dim(head_dim)
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def decode_scales_rms(max_seqlen_q: int, head_dim: int, dtype: torch.dtype, num_tokens: int) -> bool:
    """Whether `rotary_write_paged_attention` with `rms_input` runs as the one decode kernel (the
    model then skips the norm before its qkv projection)."""
    return _fused_decode(num_tokens, max_seqlen_q, head_dim, dtype)


def rotary_write_paged_attention(
    q: torch.Tensor,  # [T, Hq, D] before rotary
    k: torch.Tensor,  # [T, Hkv, D] before rotary
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    slot_mapping: torch.Tensor,  # [T]; -1 = skip
    positions: torch.Tensor,  # [T]
    cos_sin_cache: torch.Tensor,  # [max_pos, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    max_seqlen_q: int,
    rms_input: torch.Tensor | None = None,  # [T, hidden]
    rms_eps: float = 0.0,
    num_decode_rows: int = 0,  # see paged_attention
    sliding_window: int = 0,  # see paged_attention
    soft_cap: float = 0.0,
    sinks: torch.Tensor | None = None,  # see paged_attention
) -> torch.Tensor:  # [T, Hq, D]
    """rotary_write_kv_cache, then paged_attention over the rotated q. A decode step does both in
    the decode kernel (one launch a layer instead of two, docs/gpu.md); other steps launch the two
    kernels.

    rms_input: q/k/v are projections of this raw residual stream by weights with the RMSNorm's
    weight folded in; each token's q/k/v are scaled by rsqrt(mean(h^2) + rms_eps) first (the
    decode kernel does it before its PDL wait, which removes the norm's own launch)."""
    if _fused_decode(q.shape[0], max_seqlen_q, q.shape[-1], q.dtype):
        rotary = RotaryKV(k, v, slot_mapping, positions, cos_sin_cache, rms_input, rms_eps)
        return decode_attention(
            q,
            kv_cache_layer,
            block_tables,
            cu_seqlens_q,
            seq_lens,
            scale,
            rotary=rotary,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            sinks=sinks,
        )
    if rms_input is not None:  # not a decode step: scale here (eager torch ops; the model avoids it)
        hf = rms_input.float()
        inv_rms = torch.rsqrt(hf.pow(2).mean(dim=-1) + rms_eps)[:, None, None]  # [T, 1, 1]
        q, k, v = ((t.float() * inv_rms).to(t.dtype) for t in (q, k, v))
    q_rot = rotary_write_kv_cache(q, k, v, kv_cache_layer, slot_mapping, positions, cos_sin_cache)
    return paged_attention(
        q_rot,
        kv_cache_layer,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        scale,
        max_seqlen_q,
        num_decode_rows,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        sinks=sinks,
    )
