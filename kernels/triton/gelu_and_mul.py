"""GELU(tanh)-and-mul of a fused gate/up projection: out = gelu_tanh(x[:, :I]) * x[:, I:] (Gemma's
MLP; `silu_and_mul`'s sibling). Twin: reference.gelu_tanh_and_mul."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl


@triton.jit
def gelu_tanh(g):
    """0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) of fp32 g, written as g * sigmoid(2 z):
    the same function (1 + tanh z = 2 sigmoid(2 z)), with no cancellation and no overflow (exp
    going to inf gives 0, the limit)."""
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return g / (1.0 + tl.exp(-2.0 * z))


@triton.jit
def _gelu_and_mul_kernel(
    x_ptr,  # [T, 2*I] gate/up
    out_ptr,  # [T, I]
    stride_x,
    stride_o,
    INTER: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # see pdl.py
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + offs, mask=mask, other=0.0)
    # Same rounding as F.gelu(gate, approximate="tanh") * up in the input dtype: the activation in
    # fp32, rounded, then the product rounded.
    act = gelu_tanh(gate).to(up.dtype)
    tl.store(out_ptr + row * stride_o + offs, act * up, mask=mask)
    pdl.leave(PDL)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(x [T, 2*I]) -> [T, I]."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0, (x.shape, x.stride())
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _gelu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
        x,
        out,
        x.stride(0),
        out.stride(0),
        INTER=inter,
        BLOCK=block,
        num_warps=4,
        **pdl.launch_options(x.device),
    )
    return out
