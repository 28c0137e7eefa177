"""Row-wise argmax of the logits (greedy decoding inside the decode graph), in two short launches.

`torch.argmax` over a 128k vocabulary runs as one reduction of a few programs per row, a few
SMs reading the whole row (a visible share of a batch-1 decode step; docs/gpu.md). Here program (row, chunk) reduces BLOCK
logits to (max, first index of the max) and a second launch reduces the chunks' partials, so the
whole GPU reads the row. Ties go to the lowest index, as in torch.argmax; NaN is not special-cased
(logits of a working model have none).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl

BLOCK = 1024


@triton.jit
def _argmax_chunks_kernel(
    x_ptr,  # [R, V]
    part_val_ptr,  # [R, P] fp32
    part_idx_ptr,  # [R, P] int32
    vocab,
    stride_x,
    num_chunks,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # see pdl.py
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    best = tl.max(x, axis=0)
    idx = tl.min(tl.where(x == best, offs, vocab), axis=0)
    tl.store(part_val_ptr + row * num_chunks + chunk, best)
    tl.store(part_idx_ptr + row * num_chunks + chunk, idx)
    pdl.leave(PDL)


@triton.jit
def _argmax_merge_kernel(
    part_val_ptr,
    part_idx_ptr,
    out_ptr,  # [R] int64
    vocab,
    num_chunks,
    P_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, P_PAD)
    mask = p < num_chunks
    vals = tl.load(part_val_ptr + row * num_chunks + p, mask=mask, other=float("-inf"))
    idxs = tl.load(part_idx_ptr + row * num_chunks + p, mask=mask, other=vocab)
    best = tl.max(vals, axis=0)
    # chunks are in index order, so the smallest index among the chunks holding the max is the first
    tl.store(out_ptr + row, tl.min(tl.where(vals == best, idxs, vocab), axis=0).to(tl.int64))
    pdl.leave(PDL)


def argmax(logits: torch.Tensor) -> torch.Tensor:  # [R, V] -> [R] int64
    """torch.argmax(logits, dim=-1) for 2-D logits with contiguous rows."""
    assert logits.dim() == 2 and logits.stride(1) == 1, (logits.shape, logits.stride())
    rows, vocab = logits.shape
    assert vocab > 0, "argmax over an empty vocabulary"
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    num_chunks = triton.cdiv(vocab, BLOCK)
    part_val = torch.empty((rows, num_chunks), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((rows, num_chunks), dtype=torch.int32, device=logits.device)
    options = pdl.launch_options(logits.device)
    _argmax_chunks_kernel[(rows, num_chunks)](
        logits,
        part_val,
        part_idx,
        vocab,
        logits.stride(0),
        num_chunks,
        BLOCK=BLOCK,
        num_warps=4,
        **options,
    )
    _argmax_merge_kernel[(rows,)](
        part_val,
        part_idx,
        out,
        vocab,
        num_chunks,
        P_PAD=max(2, triton.next_power_of_2(num_chunks)),
        num_warps=4,
        **options,
    )
    return out
