"""The final-logit soft-cap of Gemma 2, cap * tanh(x / cap), in one elementwise launch (fp32 math,
rounded once) instead of PyTorch's div, tanh, mul and cast over the [T, vocab] logits. Twin:
reference.soft_cap."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl

_BLOCK = 2048


@triton.jit
def _soft_cap_kernel(x_ptr, out_ptr, n, cap, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.enter(PDL)  # see pdl.py
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) / cap
    # tanh(u) = 2 sigmoid(2u) - 1: no overflow (exp -> inf gives -1, the limit)
    capped = cap * (2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0)
    tl.store(out_ptr + offs, capped.to(out_ptr.dtype.element_ty), mask=mask)
    pdl.leave(PDL)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """(x [...], cap > 0) -> cap * tanh(x / cap), a new tensor of x's shape and dtype."""
    assert cap > 0, cap
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    _soft_cap_kernel[(triton.cdiv(n, _BLOCK),)](
        x, out, n, cap, BLOCK=_BLOCK, num_warps=8, **pdl.launch_options(x.device)
    )
    return out
