"""The sampler's exponential race in one pass over the probabilities: argmax(probs / q) per row.

The twin of `services/worker/sampling_rng.py`'s `exponential_race` (the definition of the draws,
keyed by row and token id; tests/kernels/test_gpu_sampler.py checks the two agree). The torch
version materialises the [rows, vocab] int64 hash in about ten passes over memory; here each
program hashes its BLOCK token ids in registers, reads its probabilities once and reduces
(max score, first index), and the argmax kernel's merge launch reduces the chunks, so the cost
is one read of `probs`. Ties go to the lowest index, as in torch.argmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl
from kernels.triton.argmax import _argmax_merge_kernel

BLOCK = 1024
UNIFORM_BITS = 23  # as sampling_rng.UNIFORM_BITS


@triton.jit
def _mix(x):
    """splitmix64's finalizer on uint64 (products wrap)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _race_chunks_kernel(
    probs_ptr,  # [R, V] fp32
    keys_ptr,  # [R] int64 row keys (sampling_rng.row_keys)
    part_val_ptr,  # [R, P] fp32
    part_idx_ptr,  # [R, P] int32
    vocab,
    stride_p,
    num_chunks,
    BLOCK: tl.constexpr,
    BITS: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    p = tl.load(probs_ptr + row * stride_p + offs, mask=mask, other=0.0)
    key = tl.load(keys_ptr + row).to(tl.uint64, bitcast=True)
    token_key = _mix(offs.to(tl.uint64) * 0x9E3779B97F4A7C15)
    bits = ((key ^ token_key) * 0x94D049BB133111EB) >> (64 - BITS)
    u = (bits.to(tl.float32) + 0.5) * (1.0 / (1 << BITS))
    score = tl.where(mask, p / -tl.log(u), float("-inf"))
    best = tl.max(score, axis=0)
    idx = tl.min(tl.where(score == best, offs, vocab), axis=0)
    tl.store(part_val_ptr + row * num_chunks + chunk, best)
    tl.store(part_idx_ptr + row * num_chunks + chunk, idx)
    pdl.leave(PDL)


def exponential_race(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:  # [R, V], [R] -> [R]
    """argmax over v of probs[r, v] / -log(u(keys[r], v)): each row's token drawn from probs."""
    assert probs.dim() == 2 and probs.stride(1) == 1 and probs.dtype == torch.float32, (
        probs.shape,
        probs.stride(),
        probs.dtype,
    )
    assert keys.shape == probs.shape[:1] and keys.dtype == torch.int64, (keys.shape, keys.dtype)
    rows, vocab = probs.shape
    out = torch.empty(rows, dtype=torch.int64, device=probs.device)
    if rows == 0:
        return out
    num_chunks = triton.cdiv(vocab, BLOCK)
    part_val = torch.empty((rows, num_chunks), dtype=torch.float32, device=probs.device)
    part_idx = torch.empty((rows, num_chunks), dtype=torch.int32, device=probs.device)
    options = pdl.launch_options(probs.device)
    _race_chunks_kernel[(rows, num_chunks)](
        probs,
        keys.contiguous(),
        part_val,
        part_idx,
        vocab,
        probs.stride(0),
        num_chunks,
        BLOCK=BLOCK,
        BITS=UNIFORM_BITS,
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
