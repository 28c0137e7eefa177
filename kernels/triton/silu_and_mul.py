"""SiLU-and-mul of a fused gate/up projection: out = silu(x[:, :I]) * x[:, I:]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl.enter(PDL)  # see pdl.py
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + offs, mask=mask, other=0.0)
    # Same rounding as F.silu(gate) * up in the input dtype: silu computed in fp32, then cast.
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + row * stride_o + offs, act * up, mask=mask)
    pdl.leave(PDL)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(x [T, 2*I]) -> [T, I]."""
    assert x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0, (x.shape, x.stride())
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
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
