"""The sampler's exponential race in one pass over the probabilities: argmax(probs / q) per row.

The twin of `services/worker/sampling_rng.py`'s `exponential_race` (the definition of the draws,
keyed by row and token id; tests/kernels/test_gpu_sampler.py checks the two agree). The torch
version materialises the [rows, vocab] int64 hash in about ten passes over memory; here one
program per row walks its vocabulary BLOCK ids at a time, hashing them in registers, reading
each probability once and keeping a running (max score, first index) per lane: one launch, one
read of `probs`, nothing else written. Ties go to the lowest index, as in torch.argmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl

BLOCK = 2048
UNIFORM_BITS = 23  # as sampling_rng.UNIFORM_BITS


@triton.jit
def _mix(x):
    """splitmix64's finalizer on uint64 (products wrap)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _race_kernel(
    probs_ptr,  # [R, V] fp32
    draws_ptr,  # [R, 3] int64 (seed, choice index, output position): sampling_rng.draw_table
    out_ptr,  # [R] int64
    vocab,
    stride_p,
    BLOCK: tl.constexpr,
    BITS: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # see pdl.py
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(draws_ptr + row * 3).to(tl.uint64, bitcast=True)
    choice = tl.load(draws_ptr + row * 3 + 1).to(tl.uint64, bitcast=True)
    position = tl.load(draws_ptr + row * 3 + 2).to(tl.uint64, bitcast=True)
    key = _mix(_mix(seed ^ _mix(choice * 0x9E3779B97F4A7C15)) ^ position)  # sampling_rng.row_keys
    lanes = tl.arange(0, BLOCK)
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + lanes
        mask = offs < vocab
        p = tl.load(probs_ptr + row * stride_p + offs, mask=mask, other=0.0)
        token_key = _mix(offs.to(tl.uint64) * 0x9E3779B97F4A7C15)
        bits = ((key ^ token_key) * 0x94D049BB133111EB) >> (64 - BITS)
        u = (bits.to(tl.float32) + 0.5) * (1.0 / (1 << BITS))
        score = tl.where(mask, p / -tl.log(u), float("-inf"))
        better = score > best  # strict: each lane keeps the first index of its maximum
        best = tl.where(better, score, best)
        best_idx = tl.where(better, offs, best_idx)
    top = tl.max(best, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_idx, vocab), axis=0).to(tl.int64))
    pdl.leave(PDL)


def exponential_race(probs: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:  # [R, V], [R, 3] -> [R]
    """argmax over v of probs[r, v] / -log(u(draws[r], v)): each row's token drawn from probs."""
    assert probs.dim() == 2 and probs.stride(1) == 1 and probs.dtype == torch.float32, (
        probs.shape,
        probs.stride(),
        probs.dtype,
    )
    assert draws.shape == (probs.shape[0], 3) and draws.dtype == torch.int64, (draws.shape, draws.dtype)
    rows, vocab = probs.shape
    out = torch.empty(rows, dtype=torch.int64, device=probs.device)
    if rows == 0:
        return out
    _race_kernel[(rows,)](
        probs,
        draws.contiguous(),
        out,
        vocab,
        probs.stride(0),
        BLOCK=BLOCK,
        BITS=UNIFORM_BITS,
        num_warps=8,
        **pdl.launch_options(probs.device),
    )
    return out
