"""RMSNorm and fused residual-add + RMSNorm: one program per token row, fp32 statistics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # see pdl.py
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the input dtype first, exactly like `x + residual` in PyTorch.
        x = x + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        tl.store(new_residual_ptr + row * stride_nr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    # HF multiplies the weight in the input dtype after casting the normalised row back.
    normed = (xf * inv_rms).to(x.dtype)
    tl.store(out_ptr + row * stride_o + offs, w * normed, mask=mask)
    pdl.leave(PDL)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert x.dim() == 2 and x.stride(1) == 1, (
        f"x must be [T, H] with contiguous rows, got {tuple(x.stride())}"
    )
    num_tokens, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous(), weight.shape
    assert weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    new_residual = None
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype
        new_residual = torch.empty_like(out)
    if num_tokens == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        new_residual if new_residual is not None else out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        new_residual.stride(0) if new_residual is not None else 0,
        eps,
        HIDDEN=hidden,
        BLOCK=block,
        HAS_RESIDUAL=residual is not None,
        num_warps=min(16, max(1, block // 256)),
        **pdl.launch_options(x.device),
    )
    return out, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(x [T, H], weight [H], eps) -> x / rms(x) * weight, [T, H]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [T, H], residual [T, H], weight [H], eps) -> (rms_norm(x + residual), x + residual)."""
    out, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual
