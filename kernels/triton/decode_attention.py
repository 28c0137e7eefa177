"""Paged decode attention (one query token per sequence), GQA-aware and split along the KV length.

Flash-decoding: program (b, kv_head, split) attends the `GROUP` query heads that share `kv_head`
(padded to 16 rows so the scores are one tensor-core dot, or unpadded with CUDA-core dots) over
one slice of sequence b's context, reading K/V straight from the paged cache through the block
table. The last split of (b, kv_head)
to finish (an arrival counter) merges the splits by their log-sum-exp in the same launch: one
kernel per layer instead of two (launches weigh in a batch-1 decode graph; docs/gpu.md).

Split sizing is done on the device from each sequence's own length: at most `max_splits` slices
of at least MIN_SPLIT_LEN tokens. `max_splits` depends only on the power of two at or above the
batch size (and the GPU and head counts), never on the block-table width: a batch run eagerly and
the same batch padded to a CUDA-graph size (which never crosses a power of two) compute the
same partition, so graphs on and off give bitwise-equal attention. The grid's split dimension
only has to cover the splits the longest possible context needs; extra programs exit at once.

With PDL, everything the previous kernel does not write (metadata, block table, the first tile's
K/V of tokens cached by earlier steps) is loaded before the wait. With `rotary` (a decode step's
default, paged_attention.rotary_write_paged_attention) the kernel also does rotary + the KV write:
every program rotates its query heads, the split holding the new position rotates the new K,
writes K/V to their slot and uses them from registers (never reading them back).

The tile, split and dot choices are a `LaunchConfig`: today's rule (`default_launch`), or the one
`decode_attention_tune` measured fastest for the shape and batch bucket on this GPU (`CHOICE`,
keyed by next_power_of_2(batch) like the split cap, so eager and graph-padded batches agree). At
batch 1-8 the kernel is latency-bound; docs/gpu.md ("Decode attention at batch 1") says what
bounds it and what each config changes.

A sliding window W (Mistral, Gemma's local layers) shrinks the context to its last W positions
before the split partition (the window's keys, never more, are read); soft-capping (Gemma 2)
replaces each scaled score s by cap * tanh(s / cap). Attention sinks (gpt-oss) add exp(sink[head])
to each head's softmax denominator where the output is normalised: in the one split, or in the
merge (the sink is a column of no split; the merge weighs it against the splits' log-sum-exps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton import pdl
from kernels.triton.arrival_counters import arrival_counters
from kernels.triton.prefill_attention import soft_cap, with_sink
from services.common import switches

LOG2E = 1.4426950408889634
FP8 = torch.float8_e4m3fn  # the fp8 KV cache (--kv-cache-dtype fp8): plain casts, no scales


@dataclass(frozen=True)
class RotaryKV:
    """The new tokens' unrotated K/V and what rotary + the KV write need (see `decode_attention`)."""

    k: torch.Tensor  # [T, Hkv, D] before rotary, head dim contiguous
    v: torch.Tensor  # [T, Hkv, D]
    slot_mapping: torch.Tensor  # [T] int32/int64; -1 = write nothing
    positions: torch.Tensor  # [T] int32/int64
    cos_sin_cache: torch.Tensor  # [max_pos, D]: cos in [:, :D/2], sin in [:, D/2:]
    # q/k/v were projected from this raw residual stream h by a weight with the RMSNorm's weight
    # folded in: each token's q/k/v are first scaled by rsqrt(mean(h^2) + rms_eps) (the norm)
    rms_input: torch.Tensor | None = None  # [T, hidden], rows contiguous
    rms_eps: float = 0.0


@dataclass(frozen=True)
class LaunchConfig:
    """Tile, split and launch parameters. `default_launch` gives today's rule; a benchmark passes
    others to compare, and `decode_attention_tune` keeps the one measured fastest for a shape
    (`CHOICE`). Every field but the launch's warps and stages changes the summation order, so a
    config is a function of the shape and the batch's power of two only (graphs on/off agree)."""

    block_n: int  # context tokens per loop iteration (a multiple of 16)
    num_warps: int
    num_stages: int
    min_split_len: int = 0  # shortest split in tokens; 0: GPU_MIN_SPLIT_LEN (the interpreter: 16)
    max_splits: int = 0  # cap on the splits; 0: max_splits_for's rule (an explicit argument wins)
    # False: the scores and P @ V as CUDA-core multiply-adds over the GROUP rows (no padding of the
    # query rows to the 16 a tensor-core dot needs: GQA groups of 1-4 waste 75-94% of the MMA)
    tensor_core: bool = True

    def __str__(self) -> str:
        text = f"n{self.block_n} w{self.num_warps} s{self.num_stages}"
        if self.min_split_len:
            text += f" min{self.min_split_len}"
        if self.max_splits:
            text += f" max{self.max_splits}"
        return text + ("" if self.tensor_core else " fma")


# (Hq, Hkv, head_dim, q dtype, sliding window, next_power_of_2(batch)) -> the config chosen by
# decode_attention_tune for that shape (process-wide; read by every eager and graph-captured call)
DecodeKey = tuple[int, int, int, torch.dtype, int, int]
CHOICE: dict[DecodeKey, LaunchConfig] = {}


def decode_key(
    num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, sliding_window: int, batch: int
) -> DecodeKey:
    return (num_q_heads, num_kv_heads, head_dim, dtype, sliding_window, triton.next_power_of_2(max(1, batch)))


def default_launch(head_dim: int, on_gpu: bool) -> LaunchConfig:
    """Today's rule: 64-token tiles (32 for head dims over 128), 4 warps, 3 stages; small tiles on
    the CPU interpreter so that short test contexts still cross tiles and splits."""
    if not on_gpu:
        return LaunchConfig(16, 4, 3, min_split_len=16)
    return LaunchConfig(64 if triton.next_power_of_2(head_dim) <= 128 else 32, 4, 3)


@triton.jit
def _scores(q, k, TC: tl.constexpr):
    """q [G_PAD, D] . k [N, D]^T -> fp32 [G_PAD, N]: a tensor-core dot, or CUDA-core products
    (exact in fp32 for 16-bit inputs) summed over D."""
    if TC:
        s = tl.dot(q, tl.trans(k))
    else:
        s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    return s


@triton.jit
def _weighted_values(p, v, TC: tl.constexpr):
    """p [G_PAD, N] fp32 @ v [N, D] -> fp32 [G_PAD, D], p rounded to V's dtype either way."""
    if TC:
        out = tl.dot(p.to(v.dtype), v)
    else:
        out = tl.sum(p.to(v.dtype).to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return out


@triton.jit
def _decode_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [NB, BS, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks] int32
    cu_seqlens_q_ptr,  # [B+1] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [T, Hq, D]
    part_out_ptr,  # [B, Hq, NUM_SPLITS, D_PAD] fp32 (unused when NUM_SPLITS == 1)
    part_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32, log2 domain
    counter_ptr,  # [>= B * Hkv] int32, zero between launches: splits of (b, kv_head) that finished
    k_new_ptr,  # ROTARY: [T, Hkv, D] the new tokens' K before rotary (unused otherwise)
    v_new_ptr,  # ROTARY: [T, Hkv, D]
    slot_mapping_ptr,  # ROTARY: [T] cache slot of each new token (-1: none)
    positions_ptr,  # ROTARY: [T] rotary position of each new token
    cos_sin_ptr,  # ROTARY: [max_pos, D] cos in [:, :D/2], sin in [:, D/2:]
    rms_input_ptr,  # RMS_SCALE: [T, HIDDEN] the residual stream the raw q/k/v were projected from
    rms_eps,
    scale_log2,  # softmax scale * log2(e)
    window,  # WINDOW: the query at position p sees keys at positions > p - window
    cap_log2,  # SOFTCAP: the soft cap * log2(e)
    sinks_ptr,  # SINKS: [Hq] the heads' sink logits
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    stride_rope,
    stride_rms,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,  # query rows of the dots (>= 16 for a tensor-core dot)
    G_MERGE: tl.constexpr,  # next_power_of_2(GROUP): rows of the merge
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # the cache's block size
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,  # the grid's split dimension (also the stride of part_out)
    MAX_SPLITS: tl.constexpr,  # the partition's split cap (numerics depend on this, not NUM_SPLITS)
    S_PAD: tl.constexpr,  # next_power_of_2(MAX_SPLITS): the merge's width, a function of MAX_SPLITS only
    MIN_SPLIT_LEN: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    ROTARY: tl.constexpr,  # q is unrotated; rotate it, and rotate + write the new K/V (see module doc)
    RMS_SCALE: tl.constexpr,  # ROTARY only: q/k/v are W' @ h; scale them by h's 1/rms first
    HIDDEN: tl.constexpr,
    HIDDEN_PAD: tl.constexpr,
    PDL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
    TC: tl.constexpr,  # tensor-core dots (else CUDA-core multiply-adds, see LaunchConfig)
    DOT_DT: tl.constexpr,  # the dots' operand type: q's, or fp16 (FP16_DOTS)
    FP16_DOTS: tl.constexpr,  # an fp8 cache with bf16 q: q converted to fp16 for the dots
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Before the PDL wait: everything no kernel of this forward writes. The step's metadata (H2D
    # copies before the first kernel), the block table, and the first K/V tile's rows of tokens
    # cached by earlier steps; only q and the new tokens' K/V come from the previous kernel
    # (rotary + KV write). The chain seq_len -> table -> K/V then overlaps the previous kernel.
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    # A padded batch entry (no query or no context) attends nothing and writes nothing.
    seq_len = tl.where(q_len > 0, tl.load(seq_lens_ptr + b), 0)
    token = q_start.to(tl.int64)

    ctx_start = 0
    if WINDOW:  # the one query sits at seq_len - 1: only the last `window` keys are in its window
        ctx_start = tl.maximum(seq_len - window, 0)
    ctx_len = seq_len - ctx_start
    num_splits = tl.maximum(tl.minimum(MAX_SPLITS, tl.cdiv(ctx_len, MIN_SPLIT_LEN)), 1)
    split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    kv_start = ctx_start + split * split_len
    kv_end = tl.minimum(seq_len, kv_start + split_len)
    cached_end = seq_len - q_len  # positions below this were written by earlier steps

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    head = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    n = tl.arange(0, BLOCK_N)
    pos0 = kv_start + n
    n_mask0 = (pos0 < kv_end) & (split < num_splits)
    block0 = tl.load(table + pos0 // BLOCK_SIZE, mask=n_mask0, other=0).to(tl.int64)
    row0 = block0 * stride_cb + (pos0 % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
    old0 = (n_mask0 & (pos0 < cached_end))[:, None] & d_mask[None, :]
    # An fp8 cache is widened to the dots' type as it is loaded: q's, except fp16 for bf16 q (see
    # `fp16_dots`: one conversion instruction per two codes instead of three per two).
    DT: tl.constexpr = DOT_DT
    k0 = tl.load(k_cache_ptr + row0[:, None] + d[None, :], mask=old0, other=0.0).to(DT)
    v0 = tl.load(v_cache_ptr + row0[:, None] + d[None, :], mask=old0, other=0.0).to(DT)
    if ROTARY:
        # rotate_half as a gather: element d pairs with (d + D/2) % D, the first half negated.
        HALF: tl.constexpr = HEAD_DIM // 2
        d_pair = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
        rope_pos = tl.load(positions_ptr + token, mask=q_len > 0, other=0).to(tl.int64)
        slot = tl.load(slot_mapping_ptr + token, mask=q_len > 0, other=-1).to(tl.int64)
        rope_row = cos_sin_ptr + rope_pos * stride_rope + tl.where(d < HALF, d, d - HALF)
        cos = tl.load(rope_row, mask=d_mask, other=0.0).to(tl.float32)  # [D_PAD]
        sin = tl.load(rope_row + HALF, mask=d_mask, other=0.0).to(tl.float32)
        inv_rms = 1.0
        if RMS_SCALE:
            # h was written two kernels back (before the qkv projection), so it is complete once
            # this program runs (pdl.py): its 1/rms is computed before the wait.
            hh = tl.arange(0, HIDDEN_PAD)
            h_row = tl.load(
                rms_input_ptr + token * stride_rms + hh, mask=(hh < HIDDEN) & (q_len > 0), other=0.0
            ).to(tl.float32)
            inv_rms = tl.rsqrt(tl.sum(h_row * h_row, axis=0) / HIDDEN + rms_eps)

    pdl.enter(PDL)  # see pdl.py
    if split < num_splits:
        q_rows = q_ptr + token * stride_qt + head[:, None] * stride_qh
        q_mask = g_mask[:, None] & d_mask[None, :]
        q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)
        if ROTARY:
            # Same arithmetic and roundings as rotary_kv_write: fp32 rotation, rounded to q's / k's
            # dtype (then the cache's). The split that holds the new position writes its K/V.
            q_pair = tl.load(q_rows + d_pair[None, :], mask=q_mask, other=0.0).to(tl.float32) * inv_rms
            q_f = q.to(tl.float32) * inv_rms
            q = (q_f * cos[None, :] + sign[None, :] * q_pair * sin[None, :]).to(q.dtype)
            holds_new = (q_len > 0) & (cached_end >= kv_start) & (cached_end < kv_end)
            new_mask = d_mask & holds_new
            k_src = k_new_ptr + token * stride_knt + kv_head * stride_knh
            k_a = tl.load(k_src + d, mask=new_mask, other=0.0)
            k_b = tl.load(k_src + d_pair, mask=new_mask, other=0.0).to(tl.float32) * inv_rms
            k_new = (k_a.to(tl.float32) * inv_rms * cos + sign * k_b * sin).to(k_a.dtype)
            k_new = k_new.to(k_cache_ptr.dtype.element_ty)
            v_new = tl.load(
                v_new_ptr + token * stride_vnt + kv_head * stride_vnh + d, mask=new_mask, other=0.0
            )
            if RMS_SCALE:
                v_new = (v_new.to(tl.float32) * inv_rms).to(v_new.dtype)
            v_new = v_new.to(v_cache_ptr.dtype.element_ty)
            slot_row = (
                (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
            )
            tl.store(k_cache_ptr + slot_row + d, k_new, mask=new_mask & (slot >= 0))
            tl.store(v_cache_ptr + slot_row + d, v_new, mask=new_mask & (slot >= 0))
            # The tiles below leave the new position out (it is added from registers after the
            # loop: a select between the load and the dot would stop Triton pipelining the loop's
            # K/V loads, which long contexts at large batch depend on).
            tile_end = tl.minimum(kv_end, cached_end)
        else:
            tile_end = kv_end
            # The first tile's rows of this step's tokens (written by the previous kernel).
            new0 = (n_mask0 & (pos0 >= cached_end))[:, None] & d_mask[None, :]
            k0 = tl.where(
                new0, tl.load(k_cache_ptr + row0[:, None] + d[None, :], mask=new0, other=0.0).to(DT), k0
            )
            v0 = tl.where(
                new0, tl.load(v_cache_ptr + row0[:, None] + d[None, :], mask=new0, other=0.0).to(DT), v0
            )
        if FP16_DOTS:  # (bf16 q in fp16: exact within fp16's range, which the clamp keeps)
            q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(DT)
        s = _scores(q, k0, TC) * scale_log2  # [G_PAD, BLOCK_N]
        if SOFTCAP:
            s = soft_cap(s, cap_log2)
        s = tl.where((n_mask0 & (pos0 < tile_end))[None, :], s, float("-inf"))
        m_i = tl.max(s, axis=1)
        m_i = tl.where(m_i == float("-inf"), 0.0, m_i)  # a split past the context: all stays 0
        p = tl.exp2(s - m_i[:, None])
        l_i = tl.sum(p, axis=1)
        acc = _weighted_values(p, v0, TC)
        for start in range(kv_start + BLOCK_N, tile_end, BLOCK_N):
            pos = start + n
            n_mask = pos < tile_end
            block = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            row = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(DT)
            s = _scores(q, k, TC) * scale_log2  # [G_PAD, BLOCK_N]
            if SOFTCAP:
                s = soft_cap(s, cap_log2)
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0).to(DT)
            acc = acc * alpha[:, None] + _weighted_values(p, v, TC)
            m_i = m_new
        if ROTARY:  # the new token, in the split that holds it: one more online-softmax column
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale_log2
            if SOFTCAP:
                s_new = soft_cap(s_new, cap_log2)
            seen = l_i > 0  # m_i is a real running max (else 0 and acc, l_i are 0)
            m_new = tl.maximum(tl.where(seen, m_i, s_new), s_new)
            alpha = tl.where(seen, tl.exp2(m_i - m_new), 0.0)
            p_new = tl.exp2(s_new - m_new)
            alpha = tl.where(holds_new, alpha, 1.0)
            p_new = tl.where(holds_new, p_new, 0.0)
            l_i = l_i * alpha + p_new
            # p rounded to V's dtype as in the tiles' dot
            p_v = p_new.to(DT).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
            acc = acc * alpha[:, None] + p_v
            m_i = tl.where(holds_new, m_new, m_i)

        has_kv = l_i > 0
        if SINKS and NUM_SPLITS == 1:
            sink = tl.load(sinks_ptr + head, mask=g_mask, other=0.0).to(tl.float32) * 1.4426950408889634
            out = with_sink(acc, tl.where(has_kv, m_i, float("-inf")), l_i, sink)
        else:
            out = acc / tl.where(has_kv, l_i, 1.0)[:, None]
        if NUM_SPLITS == 1:  # the whole context in this program: no partials, no merge
            tl.store(
                out_ptr + token * stride_ot + head[:, None] * stride_oh + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=g_mask[:, None] & d_mask[None, :] & (q_len > 0),
            )
        else:
            lse = tl.where(has_kv, m_i + tl.log2(tl.where(has_kv, l_i, 1.0)), float("-inf"))
            row_ids = (b.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS + split  # [G_PAD]
            tl.store(part_out_ptr + row_ids[:, None] * D_PAD + d[None, :], out, mask=g_mask[:, None])
            tl.store(part_lse_ptr + row_ids, lse, mask=g_mask)

    if NUM_SPLITS > 1:
        # The last program of (b, kv_head) to finish merges the splits by their log-sum-exp: no
        # second launch. Every thread's partial stores are ordered before the counter's release by
        # the barrier (the pattern of CUDA's threadFenceReduction / cooperative grid sync); the
        # acquire side reads the partials past L1 (.cg).
        tl.debug_barrier()
        counter = counter_ptr + b * NUM_KV_HEADS + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == NUM_SPLITS - 1:
            gm = tl.arange(0, G_MERGE)
            sp = tl.arange(0, S_PAD)
            m_heads = kv_head * GROUP + gm  # [G_MERGE]
            base = (b.to(tl.int64) * NUM_Q_HEADS + m_heads) * NUM_SPLITS  # [G_MERGE]
            valid = (gm < GROUP)[:, None] & (sp < num_splits)[None, :]  # [G_MERGE, S_PAD]
            lse_all = tl.load(
                part_lse_ptr + base[:, None] + sp[None, :],
                mask=valid,
                other=float("-inf"),
                cache_modifier=".cg",
            )
            # both loads issued before either is used: the merge's two L2 round trips overlap
            parts = tl.load(
                part_out_ptr + (base[:, None, None] + sp[None, :, None]) * D_PAD + d[None, None, :],
                mask=valid[:, :, None],
                other=0.0,
                cache_modifier=".cg",
            )  # [G_MERGE, S_PAD, D_PAD]
            m = tl.max(lse_all, axis=1)
            if SINKS:  # one more column, of no split: its weight joins the normaliser only
                sink = (
                    tl.load(sinks_ptr + m_heads, mask=gm < GROUP, other=0.0).to(tl.float32)
                    * 1.4426950408889634
                )
                m = tl.maximum(m, sink)
            m = tl.where(m == float("-inf"), 0.0, m)
            w = tl.exp2(lse_all - m[:, None])  # 0 for empty splits
            total = tl.sum(w, axis=1)
            if SINKS:
                total += tl.exp2(sink - m)
            merged = tl.sum(parts * w[:, :, None], axis=1) / tl.where(total > 0, total, 1.0)[:, None]
            tl.store(
                out_ptr + token * stride_ot + m_heads[:, None] * stride_oh + d[None, :],
                merged.to(out_ptr.dtype.element_ty),
                mask=(gm < GROUP)[:, None] & (d < HEAD_DIM)[None, :] & (q_len > 0),
            )
            tl.atomic_xchg(counter, 0)  # ready for the next launch (next layer, next step)
    pdl.leave(PDL)


# The merge runs inside the kernel over a [group, splits, head_dim] tile: 16 splits keep that tile
# in registers (16 x 4 x 128 fp32 for Llama-8B heads). 16 splits x the KV heads is about one
# wave of programs on a Hopper GPU for 8 KV heads; models with 2 KV heads decoding one very long
# sequence alone get fewer programs than SMs (docs/gpu.md).
MAX_SPLITS = 16
# A config (LaunchConfig.max_splits) may ask for up to 32 splits where the merge tile stays at
# most the size of today's largest (8 x 16 x 128 for Qwen3-30B-A3B's heads): e.g. Gemma-3's 2 x 32
# x 256, more and shorter splits for one sequence.
MERGE_TILE = 16 * 8 * 128


def split_cap(group: int, head_dim: int) -> int:
    """The most splits a launch may ask for (see MERGE_TILE)."""
    rows, d_pad = triton.next_power_of_2(group), triton.next_power_of_2(head_dim)
    return 2 * MAX_SPLITS if rows * 2 * MAX_SPLITS * d_pad <= MERGE_TILE else MAX_SPLITS


# Shortest context slice of one split on the GPU (a multiple of the 64-token tile); the split's
# first tile is loaded before the PDL wait, so 64 makes every split of a short context one
# preloaded tile, which measured faster than longer splits (docs/gpu.md, round 5 and 6).
GPU_MIN_SPLIT_LEN = 64


def max_splits_for(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Split cap: enough (b, kv_head, split) programs to fill the GPU twice over, at most MAX_SPLITS.
    A function of next_power_of_2(batch) so that CUDA-graph padding (never past that power) keeps
    the numerics."""
    fill = triton.cdiv(2 * num_sms, triton.next_power_of_2(max(1, batch)) * num_kv_heads)
    return max(1, min(MAX_SPLITS, fill))


_SM_COUNT: dict[int, int] = {}

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def fp16_dots(q_dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """An fp8 cache read by bf16 queries: the dots run in fp16. Hopper converts two e4m3 codes to
    two fp16 values in one instruction, but to bf16 only through fp16 (three instructions per two
    codes), and at a large batch those conversions, not the bytes, bounded the kernel: over an fp8
    cache it streamed well below its rate over a bf16 one (docs/benchmarks.md, round 20). e4m3
    values are exact in either type, q (bf16) is exact in fp16 within its range (|q| <= 65504; the
    kernel clamps), so the scores are the same; P is rounded to fp16 (10 bits) instead of bf16 (7)
    for P @ V. TANDEM_FP8_KV_FP16_DOTS=0 keeps bf16 dots (the A/B)."""
    return switches.FP8_KV_FP16_DOTS.value and cache_dtype == FP8 and q_dtype == torch.bfloat16


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: a few splits exercise the merge path
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def decode_attention(
    q: torch.Tensor,  # [T, Hq, D]: one row per sequence (padded entries have q_len 0)
    kv_cache_layer: torch.Tensor,  # [2, NB, BS, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    max_splits: int | None = None,
    rotary: RotaryKV | None = None,
    launch: LaunchConfig | None = None,
    out: torch.Tensor | None = None,  # [T, Hq, D] to write into (default: a new tensor)
    num_seqs: int | None = None,  # attend sequences [0, num_seqs) only (default: all of block_tables)
    sliding_window: int = 0,  # > 0: keys at positions <= p - sliding_window are not read
    soft_cap: float = 0.0,  # > 0: scores := soft_cap * tanh(scores / soft_cap)
    sinks: torch.Tensor | None = None,  # [Hq]: each head's sink logit (gpt-oss)
) -> torch.Tensor:  # [T, Hq, D]; rows of no sequence are left unwritten
    """Attention of each sequence's single new token over its whole cached context (one launch).

    With `rotary`, q is the unrotated query and the new tokens' K/V are not in the cache yet: the
    kernel rotates q and K (NeoX rotate_half) and writes the rotated K and V to their slots, i.e.
    `rotary_write_kv_cache` and this attention in one launch."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache_layer.shape
    assert cache_head_dim == head_dim and num_q_heads % num_kv_heads == 0, (q.shape, kv_cache_layer.shape)
    assert q.stride(2) == 1 and kv_cache_layer.dtype in (q.dtype, FP8), (
        q.stride(),
        q.dtype,
        kv_cache_layer.dtype,
    )
    assert kv_cache_layer.stride(4) == 1 and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert cu_seqlens_q.dtype == torch.int32 and seq_lens.dtype == torch.int32
    batch = block_tables.shape[0] if num_seqs is None else num_seqs
    assert 0 <= batch <= block_tables.shape[0], (num_seqs, block_tables.shape)
    group = num_q_heads // num_kv_heads
    d_pad = triton.next_power_of_2(head_dim)
    on_gpu = q.device.type == "cuda"
    if launch is None:  # the tuned config of this shape (decode_attention_tune), else today's rule
        key = decode_key(num_q_heads, num_kv_heads, head_dim, q.dtype, sliding_window, batch)
        launch = CHOICE.get(key) or default_launch(head_dim, on_gpu)
    block_n, num_warps, num_stages = launch.block_n, launch.num_warps, launch.num_stages
    assert block_n % 16 == 0, launch
    min_split_len = launch.min_split_len or (GPU_MIN_SPLIT_LEN if on_gpu else 16)
    max_context = block_tables.shape[1] * block_size
    if sliding_window > 0:  # no split ever starts before the window
        max_context = min(max_context, sliding_window)
    if max_splits is None:
        max_splits = launch.max_splits or max_splits_for(batch, num_kv_heads, _sm_count(q.device))
    max_splits = max(1, min(split_cap(group, head_dim), max_splits))
    num_splits = max(1, min(max_splits, triton.cdiv(max_context, min_split_len)))
    if rotary is not None:
        k_new, v_new = rotary.k, rotary.v
        assert k_new.shape == (num_tokens, num_kv_heads, head_dim) and v_new.shape == k_new.shape, k_new.shape
        assert k_new.stride(2) == 1 and v_new.stride(2) == 1 and k_new.dtype == q.dtype and head_dim % 2 == 0
        assert rotary.cos_sin_cache.shape[1] == head_dim and rotary.cos_sin_cache.stride(1) == 1
        assert rotary.positions.shape == (num_tokens,) and rotary.slot_mapping.shape == (num_tokens,)
    rms_input = rotary.rms_input if rotary is not None else None
    hidden = 1
    if rms_input is not None:
        assert rms_input.dim() == 2 and rms_input.shape[0] == num_tokens and rms_input.stride(1) == 1
        hidden = rms_input.shape[1]
    # Rows of no sequence (CUDA-graph padding) are left unwritten: a zero fill costs a launch per layer.
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, (out.shape, out.dtype)
    if sinks is not None:
        assert sinks.shape == (num_q_heads,) and sinks.is_contiguous(), sinks.shape
    if num_tokens == 0 or batch == 0:
        return out
    parts_shape = (batch, num_q_heads, num_splits) if num_splits > 1 else (1, 1, 1)
    part_out = torch.empty((*parts_shape, d_pad), dtype=torch.float32, device=q.device)
    part_lse = torch.empty(parts_shape, dtype=torch.float32, device=q.device)
    # (at least 2^16: enough for any batch of a CUDA-graph ladder, allocated by its first eager step)
    counters = arrival_counters("decode attention", q.device, max(batch * num_kv_heads, 1 << 16))
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    to_fp16 = fp16_dots(q.dtype, kv_cache_layer.dtype)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        out,
        part_out,
        part_lse,
        counters,
        rotary.k if rotary is not None else q,
        rotary.v if rotary is not None else q,
        rotary.slot_mapping if rotary is not None else cu_seqlens_q,
        rotary.positions if rotary is not None else cu_seqlens_q,
        rotary.cos_sin_cache if rotary is not None else q,
        rms_input if rms_input is not None else q,
        rotary.rms_eps if rotary is not None else 0.0,
        scale * LOG2E,
        sliding_window,
        soft_cap * LOG2E,
        sinks if sinks is not None else q,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        rotary.k.stride(0) if rotary is not None else 0,
        rotary.k.stride(1) if rotary is not None else 0,
        rotary.v.stride(0) if rotary is not None else 0,
        rotary.v.stride(1) if rotary is not None else 0,
        rotary.cos_sin_cache.stride(0) if rotary is not None else 0,
        rms_input.stride(0) if rms_input is not None else 0,
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)) if launch.tensor_core else triton.next_power_of_2(group),
        G_MERGE=triton.next_power_of_2(group),
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        MAX_SPLITS=max_splits,
        S_PAD=max(2, triton.next_power_of_2(max_splits)),
        MIN_SPLIT_LEN=min_split_len,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        ROTARY=rotary is not None,
        RMS_SCALE=rms_input is not None,
        HIDDEN=hidden,
        HIDDEN_PAD=triton.next_power_of_2(hidden),
        WINDOW=sliding_window > 0,
        SOFTCAP=soft_cap > 0,
        SINKS=sinks is not None,
        TC=launch.tensor_core,
        DOT_DT=tl.float16 if to_fp16 else _TL_DTYPES[q.dtype],
        FP16_DOTS=to_fp16,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl.launch_options(q.device),
    )
    return out
