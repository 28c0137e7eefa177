"""Row-wise top k of [R, V] values (beam search's pass over the vocabulary), ties in index order,
in two short launches.

`torch.topk` with a small k over a 150k vocabulary runs a multi-block radix select: several
kernels and, on the host, most of a beam step's selection (docs/beam_search.md); and it leaves the
order of equal values unspecified, which a beam search must fix with two more sorts. Here program
(row, chunk) takes its BLOCK values' top k by k rounds of (max, lowest index holding it), and a
second launch merges the chunks' [P, k] candidates per row the same way. Laid out chunk by chunk,
rank by rank, a lower place is a lower index among equal values, so the merge's "lowest place"
is the lowest index: the result is exact, equal values in index order (a stable descending sort's
first k). NaN is not special-cased (log-softmax rows of a working model have none).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def chunk_topk(
    x_ptr,
    part_val_ptr,
    part_idx_ptr,
    row,
    chunk,
    vocab,
    stride_x,
    num_chunks,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (row, chunk)'s part: its BLOCK values' top K into the [R, P, K] partials (stage 1,
    also beam_topk_candidates.py's)."""
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    alive = offs < vocab
    x = tl.load(x_ptr + row * stride_x + offs, mask=alive, other=float("-inf")).to(tl.float32)
    out = (row * num_chunks + chunk) * K
    for j in range(K):
        best = tl.max(tl.where(alive, x, float("-inf")), axis=0)
        idx = tl.min(tl.where(alive & (x == best), offs, vocab), axis=0)
        alive = alive & (offs != idx)
        tl.store(part_val_ptr + out + j, best)
        tl.store(part_idx_ptr + out + j, idx)


@triton.jit
def merge_row(
    part_val_ptr,
    part_idx_ptr,
    val_ptr,
    idx_ptr,
    row,
    vocab,
    num_candidates,
    K: tl.constexpr,
    C_PAD: tl.constexpr,
    CACHE: tl.constexpr,
):
    """Row `row`'s P x K partials merged into its top K (stage 2, also beam_topk_candidates.py's,
    which reads other programs' partials past L1: CACHE ".cg")."""
    place = tl.arange(0, C_PAD)
    base = row * num_candidates
    idxs = tl.load(
        part_idx_ptr + base + place, mask=place < num_candidates, other=vocab, cache_modifier=CACHE
    )
    vals = tl.load(
        part_val_ptr + base + place, mask=place < num_candidates, other=float("-inf"), cache_modifier=CACHE
    )
    alive = idxs < vocab
    for j in range(K):
        best = tl.max(tl.where(alive, vals, float("-inf")), axis=0)
        at = tl.min(tl.where(alive & (vals == best), place, C_PAD), axis=0)
        alive = alive & (place != at)
        tl.store(val_ptr + row * K + j, best)
        tl.store(idx_ptr + row * K + j, tl.sum(tl.where(place == at, idxs, 0), axis=0).to(tl.int64))


# sizes and strides: one compiled kernel per K whatever the vocabulary and layout
@triton.jit(do_not_specialize=["vocab", "stride_x", "num_chunks"])
def _topk_chunks_kernel(
    x_ptr,  # [R, V]
    part_val_ptr,  # [R, P, K] fp32
    part_idx_ptr,  # [R, P, K] int32 (V where a chunk has fewer than K values)
    vocab,
    stride_x,
    num_chunks,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    chunk_topk(x_ptr, part_val_ptr, part_idx_ptr, row, chunk, vocab, stride_x, num_chunks, K, BLOCK)


@triton.jit(do_not_specialize=["vocab", "num_candidates"])
def _topk_merge_kernel(
    part_val_ptr,
    part_idx_ptr,
    val_ptr,  # [R, K] fp32
    idx_ptr,  # [R, K] int64
    vocab,
    num_candidates,  # P * K
    K: tl.constexpr,
    C_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    merge_row(part_val_ptr, part_idx_ptr, val_ptr, idx_ptr, row, vocab, num_candidates, K, C_PAD, "")


def row_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, V] -> ([R, k] values as float32, [R, k] int64 indices), best first, equal values in
    index order; 0 < k <= V, rows contiguous."""
    assert values.dim() == 2 and values.stride(1) == 1, (values.shape, values.stride())
    rows, vocab = values.shape
    assert 0 < k <= vocab, (k, vocab)
    out_val = torch.empty((rows, k), dtype=torch.float32, device=values.device)
    out_idx = torch.empty((rows, k), dtype=torch.int64, device=values.device)
    if rows == 0:
        return out_val, out_idx
    block = min(BLOCK, max(16, triton.next_power_of_2(vocab)))
    num_chunks = triton.cdiv(vocab, block)
    part_val = torch.empty((rows, num_chunks, k), dtype=torch.float32, device=values.device)
    part_idx = torch.empty((rows, num_chunks, k), dtype=torch.int32, device=values.device)
    _topk_chunks_kernel[(rows, num_chunks)](
        values, part_val, part_idx, vocab, values.stride(0), num_chunks, K=k, BLOCK=block, num_warps=4
    )
    _topk_merge_kernel[(rows,)](
        part_val,
        part_idx,
        out_val,
        out_idx,
        vocab,
        num_chunks * k,
        K=k,
        C_PAD=max(16, triton.next_power_of_2(num_chunks * k)),
        num_warps=4,
    )
    return out_val, out_idx
