"""Prefill / extend attention over the paged KV cache: variable-length, causal, with a cached prefix.

Program (m_block, b, kv_head) takes BLOCK_M rows of the (new token, query head) pairs of sequence
b that share `kv_head` — the GROUP query heads of a token are adjacent rows — so every K/V tile
read from the cache serves all heads of the group (GQA-aware). Query token i of a sequence with
q_len new tokens and seq_len total sits at position seq_len - q_len + i; K/V positions are read
through the block table, so the cached prefix and the new tokens (written first) look the same.
The KV loop is split into a part every row may see in full (no mask) and the causal diagonal.
With a sliding window W the loop starts at the tile holding the block's first row's oldest key
(position > q_pos - W) and every tile masks keys that fell out of a row's window; soft-capping
(Gemma 2) replaces each scaled score s by cap * tanh(s / cap) before the mask. Attention sinks
(gpt-oss) add exp(sink[head]) to each row's softmax denominator after the loop (`with_sink`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def soft_cap(s, cap):
    """cap * tanh(s / cap) (the scores may be in the log2 domain: pass cap * log2(e) then),
    tanh written with exp, which every Triton backend (and the interpreter) has."""
    return cap * (2.0 / (1.0 + tl.exp(-2.0 * (s / cap))) - 1.0)


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    start,
    table,
    k_cache_ptr,
    v_cache_ptr,
    q_pos,
    seq_len,
    stride_cb,
    stride_cs,
    kv_head_off,
    d,
    d_mask,
    scale_log2,
    window,
    cap_log2,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pos = start + tl.arange(0, BLOCK_N)
    n_mask = pos < seq_len
    block = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    row = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head_off
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(
        q.dtype
    )  # fp8 cache: widened
    s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_M, BLOCK_N]
    if SOFTCAP:
        s = soft_cap(s, cap_log2)
    if CAUSAL:
        s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
    if WINDOW:
        s = tl.where(pos[None, :] > q_pos[:, None] - window, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows that have seen nothing yet keep m = -inf; shift by 0 then so exp2 stays finite.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def with_sink(acc, m_i, l_i, sink_log2):
    """acc / l_i with one more softmax column of logit `sink_log2` (log2 domain, no value): the
    running max moves to max(m_i, sink) first, so neither exp2 can overflow. Rows with no key
    (m_i = -inf, l_i = 0) come out 0."""
    m_new = tl.maximum(m_i, sink_log2)
    alpha = tl.exp2(m_i - m_new)
    denom = l_i * alpha + tl.exp2(sink_log2 - m_new)
    return acc * (alpha / denom)[:, None]


# first_seq is a plain runtime int (a value of 1 would otherwise compile a variant of its own).
@triton.jit(do_not_specialize=["first_seq"])
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [NB, BS, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    cu_seqlens_q_ptr,  # [B+1] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [T, Hq, D]
    sinks_ptr,  # SINKS: [Hq] the heads' sink logits
    scale_log2,
    window,  # WINDOW: a row at position p sees keys at positions > p - window
    cap_log2,  # SOFTCAP: the soft cap * log2(e)
    first_seq,  # program b attends sequence first_seq + b
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
):
    m_block = tl.program_id(0)
    b = tl.program_id(1) + first_seq
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_mask = tok < q_len
    q_pos = ctx_len + tok
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    first_tok = m_block * BLOCK_M // GROUP
    last_tok = tl.minimum(q_len - 1, ((m_block + 1) * BLOCK_M - 1) // GROUP)
    # Keys every row of this block may see (positions <= the first row's) need no causal mask.
    full_end = tl.where(first_tok < q_len, ((ctx_len + first_tok + 1) // BLOCK_N) * BLOCK_N, 0)
    kv_end = tl.where(first_tok < q_len, ctx_len + last_tok + 1, 0)
    kv_begin = 0
    if WINDOW:  # the first tile any row of the block still sees
        kv_begin = (tl.maximum(ctx_len + first_tok + 1 - window, 0) // BLOCK_N) * BLOCK_N
        full_end = tl.maximum(full_end, kv_begin)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    kv_head_off = kv_head * stride_ch
    for start in range(kv_begin, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            start,
            table,
            k_cache_ptr,
            v_cache_ptr,
            q_pos,
            seq_len,
            stride_cb,
            stride_cs,
            kv_head_off,
            d,
            d_mask,
            scale_log2,
            window,
            cap_log2,
            BLOCK_SIZE,
            BLOCK_N,
            False,
            WINDOW,
            SOFTCAP,
        )
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            start,
            table,
            k_cache_ptr,
            v_cache_ptr,
            q_pos,
            seq_len,
            stride_cb,
            stride_cs,
            kv_head_off,
            d,
            d_mask,
            scale_log2,
            window,
            cap_log2,
            BLOCK_SIZE,
            BLOCK_N,
            True,
            WINDOW,
            SOFTCAP,
        )

    if SINKS:
        sink = tl.load(sinks_ptr + head, mask=row_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        out = with_sink(acc, m_i, l_i, sink)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_rows = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(
        out_ptr + o_rows[:, None] + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


def prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    max_seqlen_q: int,
    out: torch.Tensor | None = None,  # [T, Hq, D] to write into (default: a new tensor)
    first_seq: int = 0,  # attend sequences [first_seq, B) only (their rows of `out`)
    sliding_window: int = 0,  # > 0: keys at positions <= p - sliding_window are masked
    soft_cap: float = 0.0,  # > 0: scores := soft_cap * tanh(scores / soft_cap)
    sinks: torch.Tensor | None = None,  # [Hq]: each head's sink logit (gpt-oss)
) -> torch.Tensor:  # [T, Hq, D]; rows of no attended sequence are left unwritten
    """Causal attention of each sequence's new tokens over its cached prefix and themselves.
    `first_seq` > 0 leaves the batch's first sequences to another kernel (a mixed step's decodes)
    without slicing the metadata (sliced pointers would compile kernel variants of their own)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache_layer.shape
    assert cache_head_dim == head_dim and num_q_heads % num_kv_heads == 0, (q.shape, kv_cache_layer.shape)
    assert q.stride(2) == 1 and kv_cache_layer.dtype in (q.dtype, torch.float8_e4m3fn), (
        q.dtype,
        kv_cache_layer.dtype,
    )
    assert kv_cache_layer.stride(4) == 1 and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert cu_seqlens_q.dtype == torch.int32 and seq_lens.dtype == torch.int32
    batch = block_tables.shape[0] - first_seq
    assert 0 <= first_seq <= block_tables.shape[0], (first_seq, block_tables.shape)
    group = num_q_heads // num_kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, (out.shape, out.dtype)
    if sinks is not None:
        assert sinks.shape == (num_q_heads,) and sinks.is_contiguous(), sinks.shape
    if num_tokens == 0 or batch == 0:
        return out
    if q.device.type == "cuda":
        block_m, block_n = (128, 64) if d_pad <= 128 else (64, 32)
        num_warps, num_stages = 8, 3
    else:  # the CPU interpreter: small tiles so short test prompts cross tiles and the causal diagonal
        block_m, block_n, num_warps, num_stages = 32, 16, 4, 1
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    grid = (triton.cdiv(max_seqlen_q * group, block_m), batch, num_kv_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        out,
        sinks if sinks is not None else q,
        scale * LOG2E,
        sliding_window,
        soft_cap * LOG2E,
        first_seq,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        WINDOW=sliding_window > 0,
        SOFTCAP=soft_cap > 0,
        SINKS=sinks is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
