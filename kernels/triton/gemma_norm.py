"""Gemma's RMSNorm (scale 1 + w, everything in fp32, rounded once: transformers' GemmaRMSNorm) and
the fusions a Gemma 2/3 layer is built from, so that its norms cost one launch each:

- `gemma_add_rms_norm`, the sandwich step: h = residual + norm_post(y), x = norm_pre(h) (the
  post-attention norm, residual add and pre-feedforward norm; the post-feedforward norm, residual
  add and the next layer's input norm, or the final norm, after the last layer);
- `gemma_scale_rms_norm`: the embedding's sqrt(hidden) scale and the first layer's input norm;
- `gemma_rms_norm`, the plain norm;
- `gemma_qk_norm`: Gemma 3's per-head q and k norms, all heads of both in one launch;
- `qk_rms_norm`: the same kernel with plain RMSNorm weights (HF's rounding: the normalised row
  rounded to the input dtype, then times the weight), Qwen3's and Qwen3-MoE's q/k norms: one launch
  a layer instead of two `rms_norm` launches.

One program per token row (per token head for q/k); fp32 statistics. Twins: kernels/reference.py.
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


@triton.jit
def _gemma_qk_norm_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    q_w_ptr,  # [D]
    k_w_ptr,  # [D]
    q_out_ptr,  # [T, Hq, D] contiguous
    k_out_ptr,  # [T, Hkv, D] contiguous
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    eps,
    rms_ptr,  # [T, H] (HAS_RMS)
    stride_rt,
    hidden,
    rms_eps,
    HAS_RMS: tl.constexpr,  # folded input norm: normalise s * x, return the result / s
    BLOCK_H: tl.constexpr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    PLAIN: tl.constexpr,  # w * round(x / rms) (reference.rms_norm), else x / rms * (1 + w) (Gemma)
    PDL: tl.constexpr,
):
    pdl.enter(PDL)  # see pdl.py
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    # Program `head` < HQ normalises q's head, the others k's head (head - HQ): both loads are
    # issued, one of them fully masked (no memory access), so the program has no branch.
    is_q = head < HQ
    is_k = head >= HQ
    kh = tl.maximum(head - HQ, 0)
    qh = tl.minimum(head, HQ - 1)
    xq = tl.load(q_ptr + t * stride_qt + qh * stride_qh + offs, mask=mask & is_q, other=0.0)
    xk = tl.load(k_ptr + t * stride_kt + kh * stride_kh + offs, mask=mask & is_k, other=0.0)
    wq = tl.load(q_w_ptr + offs, mask=mask & is_q, other=0.0).to(tl.float32)
    wk = tl.load(k_w_ptr + offs, mask=mask & is_k, other=0.0).to(tl.float32)
    xf = xq.to(tl.float32) + xk.to(tl.float32)
    s = 1.0
    if HAS_RMS:  # (the h row in one load where it fits: it overlaps the q/k loads)
        cols = tl.arange(0, BLOCK_H)
        sum_sq = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, hidden, BLOCK_H):
            hv = tl.load(rms_ptr + t * stride_rt + h0 + cols, mask=h0 + cols < hidden, other=0.0).to(
                tl.float32
            )
            sum_sq += hv * hv
        s = tl.rsqrt(tl.sum(sum_sq, axis=0) / hidden + rms_eps)
        xf = xf * s
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    if PLAIN:
        normed = (xf * inv_rms).to(q_out_ptr.dtype.element_ty).to(tl.float32)
        out = (normed * (wq + wk) / s).to(q_out_ptr.dtype.element_ty)
    else:
        out = (xf * inv_rms * (1.0 + wq + wk) / s).to(q_out_ptr.dtype.element_ty)
    tl.store(q_out_ptr + (t * HQ + qh) * D + offs, out, mask=mask & is_q)
    tl.store(k_out_ptr + (t * HKV + kh) * D + offs, out, mask=mask & is_k)
    pdl.leave(PDL)


def gemma_qk_norm(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, Hq, D], k [T, Hkv, D] (rows of each head contiguous, any token/head strides, e.g.
    views of the qkv projection), q_weight, k_weight [D], eps) -> (gemma_rms_norm(q, q_weight),
    gemma_rms_norm(k, k_weight)), new contiguous tensors, in one launch."""
    return _qk_norm(q, k, q_weight, k_weight, eps, plain=False)


def qk_rms_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    rms_input: torch.Tensor | None = None,
    rms_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gemma_qk_norm's layout with plain RMSNorm weights: (rms_norm(q, q_weight), rms_norm(k,
    k_weight)) per head, in one launch; with `rms_input`, a folded input norm's raw-stream q/k
    (reference.qk_rms_norm)."""
    return _qk_norm(q, k, q_weight, k_weight, eps, True, rms_input, rms_eps)


def _qk_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    plain: bool,
    rms_input: torch.Tensor | None = None,
    rms_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2], (
        q.shape,
        k.shape,
    )
    assert q.stride(2) == 1 and k.stride(2) == 1 and q.dtype == k.dtype, (q.stride(), k.stride())
    num_tokens, num_q, head_dim = q.shape
    num_kv = k.shape[1]
    assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    block = triton.next_power_of_2(head_dim)
    assert rms_input is None or (rms_input.shape[0] == num_tokens and rms_input.stride(1) == 1)
    hidden = rms_input.shape[1] if rms_input is not None else 0
    _gemma_qk_norm_kernel[(num_tokens, num_q + num_kv)](
        q,
        k,
        q_weight,
        k_weight,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        eps,
        rms_input if rms_input is not None else q,
        rms_input.stride(0) if rms_input is not None else 0,
        hidden,
        rms_eps,
        HAS_RMS=rms_input is not None,
        BLOCK_H=min(4096, triton.next_power_of_2(max(hidden, 16))),
        HQ=num_q,
        HKV=num_kv,
        D=head_dim,
        BLOCK=block,
        PLAIN=plain,
        num_warps=min(4, max(1, block // 128)),
        **pdl.launch_options(q.device),
    )
    return q_out, k_out
