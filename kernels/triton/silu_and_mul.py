"""SiLU-and-mul of a fused gate/up projection: out = silu(x[:, :I]) * x[:, I:]; and its folded-norm
variant `silu_and_mul_rms`, which also applies the post-attention RMSNorm's 1/rms (the norm's weight
was folded into the gate/up weight, so this is where the norm ends up; kernels/__init__.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl

# The residual row is summed in chunks of at most this many elements (32 fp32 registers a thread at
# 4 warps): Llama-3.1-8B's H = 4096 is one chunk; larger hidden sizes loop instead of spilling.
_MAX_BLOCK_H = 4096


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2*I] gate/up
    out_ptr,  # [T, I]
    h_ptr,  # [T, H] residual stream (RMS only; otherwise unused)
    stride_x,
    stride_o,
    stride_h,
    eps,
    INTER: tl.constexpr,
    BLOCK: tl.constexpr,
    RMS: tl.constexpr,  # scale gate and up by the row's rsqrt(mean(h**2) + eps)
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    inv_rms = 1.0
    if RMS:
        # The whole residual row, in every program of the row (H elements, from L2 after the first
        # program), before the PDL wait: gate/up were computed from h, so h's writer completed
        # before the previous kernel got past its own wait (pdl.py). With the gate/up GEMM
        # signalling early this overlaps the GEMM.
        sq = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in tl.static_range(0, HIDDEN, BLOCK_H):
            h_offs = h0 + tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + row * stride_h + h_offs, mask=h_offs < HIDDEN, other=0.0).to(tl.float32)
            sq += h * h
        inv_rms = tl.rsqrt(tl.sum(sq, axis=0) / HIDDEN + eps)
    pdl.enter(PDL)  # see pdl.py
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + offs, mask=mask, other=0.0)
    if RMS:
        # fp32 throughout, rounded once (the reference's semantics).
        g = gate * inv_rms
        u = up.to(tl.float32) * inv_rms
        out = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Same rounding as F.silu(gate) * up in the input dtype: silu computed in fp32, then cast.
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(out_ptr + row * stride_o + offs, act * up, mask=mask)
    pdl.leave(PDL)


def _launch(x: torch.Tensor, h: torch.Tensor | None, eps: float) -> torch.Tensor:
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0, (x.shape, x.stride())
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    hidden = 1 if h is None else h.shape[1]
    if h is not None:
        assert h.dim() == 2 and h.shape[0] == num_tokens and h.stride(1) == 1, (h.shape, x.shape, h.stride())
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        x,
        out,
        x if h is None else h,
        x.stride(0),
        out.stride(0),
        0 if h is None else h.stride(0),
        eps,
        INTER=inter,
        BLOCK=block,
        RMS=h is not None,
        HIDDEN=hidden,
        BLOCK_H=min(_MAX_BLOCK_H, triton.next_power_of_2(hidden)),
        num_warps=4,
        **pdl.launch_options(x.device),
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(x [T, 2*I]) -> [T, I]."""
    return _launch(x, None, 0.0)


def silu_and_mul_rms(gate_up: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """(gate_up [T, 2*I], x [T, H], eps) -> [T, I]: silu(s * gate) * (s * up), s = rsqrt(mean(x**2) + eps)
    of each row of the residual stream x; fp32 math, rounded once to gate_up's dtype."""
    return _launch(gate_up, x, eps)
