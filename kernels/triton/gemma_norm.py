"""Gemma's RMSNorm (scale 1 + w, everything in fp32, rounded once: transformers' GemmaRMSNorm) and
the fusions a Gemma 2/3 layer is built from, so that its norms cost one launch each:

- `gemma_add_rms_norm`, the sandwich step: h = residual + norm_post(y), x = norm_pre(h) (the
  post-attention norm, residual add and pre-feedforward norm; the post-feedforward norm, residual
  add and the next layer's input norm, or the final norm, after the last layer);
- `gemma_scale_rms_norm`: the embedding's sqrt(hidden) scale and the first layer's input norm;
- `gemma_rms_norm`, the plain norm.

Gemma 3's per-head q and k norms are the q/k head norms of head_norm.py (shared with Qwen3).

One program per token row; fp32 statistics. Twins: kernels/reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import pdl


@triton.jit
def _gemma_norm(xf, w_ptr, offs, mask, eps, HIDDEN: tl.constexpr):
    """xf [BLOCK] fp32 (masked lanes 0) -> xf * rsqrt(mean(xf**2) + eps) * (1 + w), fp32."""
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return xf * inv_rms * (1.0 + w)


@triton.jit
def _gemma_rms_norm_kernel(
    x_ptr,  # [T, H]: the norm's input (MODE 0, 2) or a block's output y (MODE 1)
    residual_ptr,  # [T, H] (MODE 1)
    post_w_ptr,  # [H] (MODE 1)
    w_ptr,  # [H]: the norm whose output is `out`
    out_ptr,  # [T, H]
    h_ptr,  # [T, H]: the new residual stream (MODE 1, 2)
    stride_x,
    stride_r,
    stride_o,
    stride_h,
    eps,
    scale,  # MODE 2: the embedding scale, already rounded to the dtype
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    MODE: tl.constexpr,  # 0: out = norm(x); 1: h = residual + norm_post(x), out = norm(h); 2: h = x * scale, out = norm(h)
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # see pdl.py
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if MODE == 1:
        # transformers rounds the block's normed output to the dtype, then adds it in the dtype
        # (computed in fp32 and rounded once, as PyTorch's bf16/fp16 add does).
        y_normed = _gemma_norm(x.to(tl.float32), post_w_ptr, offs, mask, eps, HIDDEN).to(dtype)
        residual = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = (residual.to(tl.float32) + y_normed.to(tl.float32)).to(dtype)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    elif MODE == 2:
        h = (x.to(tl.float32) * scale).to(dtype)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    else:
        h = x
    out = _gemma_norm(h.to(tl.float32), w_ptr, offs, mask, eps, HIDDEN)
    tl.store(out_ptr + row * stride_o + offs, out.to(dtype), mask=mask)
    pdl.leave(PDL)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    post_weight: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert x.dim() == 2 and x.stride(1) == 1, (
        f"x must be [T, H] with contiguous rows, got {tuple(x.stride())}"
    )
    num_tokens, hidden = x.shape
    assert weight.shape == (hidden,) and weight.is_contiguous(), (weight.shape, hidden)
    mode = 0
    if residual is not None:
        assert post_weight is not None and post_weight.shape == (hidden,) and post_weight.is_contiguous()
        assert residual.shape == x.shape and residual.stride(1) == 1 and residual.dtype == x.dtype, (
            residual.shape,
            residual.dtype,
        )
        mode = 1
    elif scale is not None:
        mode = 2
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(out) if mode else None
    if num_tokens == 0:
        return out, h
    # The scale as transformers applies it: a tensor of the model's dtype (rounded first).
    scale_rounded = float(torch.tensor(scale, dtype=x.dtype)) if scale is not None else 1.0
    block = triton.next_power_of_2(hidden)
    _gemma_rms_norm_kernel[(num_tokens,)](
        x,
        residual if residual is not None else x,
        post_weight if post_weight is not None else weight,
        weight,
        out,
        h if h is not None else out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        h.stride(0) if h is not None else 0,
        eps,
        scale_rounded,
        HIDDEN=hidden,
        BLOCK=block,
        MODE=mode,
        num_warps=min(16, max(1, block // 256)),
        **pdl.launch_options(x.device),
    )
    return out, h


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(x [T, H], weight [H], eps) -> x * rsqrt(mean(x**2) + eps) * (1 + weight), [T, H]."""
    return _launch(x, weight, eps)[0]


def gemma_add_rms_norm(
    y: torch.Tensor, residual: torch.Tensor, post_weight: torch.Tensor, pre_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, residual [T, H], post_weight, pre_weight [H], eps) -> (gemma_rms_norm(h, pre_weight), h)
    with h = residual + gemma_rms_norm(y, post_weight)."""
    out, h = _launch(y, pre_weight, eps, residual=residual, post_weight=post_weight)
    assert h is not None
    return out, h


def gemma_scale_rms_norm(
    x: torch.Tensor, scale: float, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [T, H], scale, weight [H], eps) -> (gemma_rms_norm(h, weight), h), h = x * scale (the
    scale rounded to x's dtype first)."""
    out, h = _launch(x, weight, eps, scale=scale)
    assert h is not None
    return out, h
